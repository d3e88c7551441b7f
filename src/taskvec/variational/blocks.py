"""Parameter blocks: which tensors share one composition coefficient per task vector.

A coefficient matrix alpha has shape (T, B): one row per task vector, one column per block.
Blocks are chosen by a rule ("tensor", "module", "all") or by glob patterns; every composed
tensor belongs to exactly one block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from taskvec.errors import ConfigError

BlockRule = str | Sequence[str] | Mapping[str, Sequence[str]]
"""'tensor' (one block per tensor), 'module' (one per module: weight and bias together), 'all'
(one block: task-level coefficients), a list of globs (one block per glob, first match wins) or
a {block name: [globs]} map (first matching block wins)."""


@dataclass(frozen=True)
class BlockSpec:
    """Block names in order and the block index of every composed tensor."""

    names: tuple[str, ...]
    index: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.names)

    def keys_of(self, b: int) -> list[str]:
        return [k for k, i in self.index.items() if i == b]

    def to_json(self) -> dict[str, object]:
        return {"names": list(self.names), "index": dict(self.index)}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> BlockSpec:
        names, index = d["names"], d["index"]
        if not isinstance(names, Sequence) or not isinstance(index, Mapping):
            raise ConfigError(f"block spec needs a 'names' list and an 'index' map, got {sorted(d)}")
        return cls(tuple(names), dict(index))


def make_blocks(keys: Sequence[str], rule: BlockRule = "tensor") -> BlockSpec:
    """Group `keys` (tensor names, in model order) into blocks by `rule` (see BlockRule)."""
    if isinstance(rule, str):
        if rule == "tensor":
            groups = {k: k for k in keys}
        elif rule == "module":
            groups = {k: k.rsplit(".", 1)[0] if "." in k else k for k in keys}
        elif rule == "all":
            groups = {k: "all" for k in keys}
        else:
            raise ConfigError(f"blocks: unknown rule {rule!r}; use 'tensor', 'module', 'all', a list of globs or a map")
    else:
        named = dict(rule) if isinstance(rule, Mapping) else {p: [p] for p in rule}
        if not named:
            raise ConfigError("blocks: the list of patterns is empty")
        groups = {}
        for k in keys:
            for name, pats in named.items():
                if isinstance(pats, str):
                    pats = [pats]
                if any(fnmatchcase(k, p) for p in pats):
                    groups[k] = name
                    break
            else:
                raise ConfigError(f"blocks: no pattern matches tensor {k!r} (add '*' as a last, catch-all block)")
    names: list[str] = []
    for k in keys:
        if groups[k] not in names:
            names.append(groups[k])
    pos = {n: i for i, n in enumerate(names)}
    return BlockSpec(tuple(names), {k: pos[groups[k]] for k in keys})
