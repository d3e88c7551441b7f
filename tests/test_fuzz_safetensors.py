"""Mutated headers of real safetensors files: taskvec rejects with a one-line error, or reads exactly
what the `safetensors` library reads; whenever the library rejects a file, taskvec does too."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from taskvec.errors import CheckpointError, DtypeError
from taskvec.io.safetensors_file import SafetensorsFile

Header = dict[str, object]


def _originals() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "a": torch.randn(3, 4, generator=g),
            "b": torch.randn(5, generator=g).half(),
            "c": torch.arange(6).reshape(2, 3),
        },
        {
            "w": torch.randn(2, 2, 2, generator=g).bfloat16(),
            "empty": torch.zeros(0, 3),
            "s": torch.tensor(1.5, dtype=torch.float64),
            "m": torch.tensor([True, False, True]),
            "i8": torch.arange(-3, 4, dtype=torch.int8),
        },
        {"one": torch.randn(7, generator=g)},
        {"x": torch.randn(4, 4, generator=g).half(), "y": torch.randn(8, generator=g).half()},  # same-size dtypes
    ]


def _split(raw: bytes) -> tuple[Header, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(text: str | bytes, data: bytes) -> bytes:
    body = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(body)) + body + data


def _tensors(h: Header) -> list[str]:
    return [k for k in h if k != "__metadata__"]


# each mutation: (rng, header, data) -> new file bytes
Mutation = Callable[[random.Random, Header, bytes], bytes]


def _edit(fn: Callable[[random.Random, Header], object]) -> Mutation:
    def m(rng: random.Random, h: Header, data: bytes) -> bytes:
        out = fn(rng, h)
        return _pack(json.dumps(h if out is None else out), data)

    return m


def _pick(rng: random.Random, h: Header) -> dict:
    return h[rng.choice(_tensors(h))]  # type: ignore[return-value]


def swap_offsets(rng: random.Random, h: Header) -> None:
    ks = _tensors(h)
    if len(ks) > 1:
        a, b = rng.sample(ks, 2)
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]  # type: ignore[index]


def shift(rng: random.Random, h: Header) -> None:
    e = _pick(rng, h)
    d = rng.choice([-8, -2, -1, 1, 2, 4, 8])
    which = rng.choice([[0], [1], [0, 1]])
    for i in which:
        e["data_offsets"][i] += d


def overlap(rng: random.Random, h: Header) -> None:
    ks = sorted(_tensors(h), key=lambda k: h[k]["data_offsets"])  # type: ignore[index]
    if len(ks) > 1:
        i = rng.randrange(1, len(ks))
        h[ks[i]]["data_offsets"][0] = h[ks[i - 1]]["data_offsets"][0]  # type: ignore[index]


def reverse(rng: random.Random, h: Header) -> None:
    e = _pick(rng, h)
    e["data_offsets"] = e["data_offsets"][::-1]


def same_offsets(rng: random.Random, h: Header) -> None:
    ks = _tensors(h)
    if len(ks) > 1:
        a, b = rng.sample(ks, 2)
        h[b]["data_offsets"] = list(h[a]["data_offsets"])  # type: ignore[index]


def shape_edit(rng: random.Random, h: Header) -> None:
    e = _pick(rng, h)
    kind = rng.randrange(7)
    shape = e["shape"]
    if kind == 0 and shape:
        shape[rng.randrange(len(shape))] += rng.choice([-1, 1])
    elif kind == 1:
        shape.insert(rng.randrange(len(shape) + 1), 1)  # same bytes: valid
    elif kind == 2 and shape:
        shape[rng.randrange(len(shape))] = -shape[0] or -1
    elif kind == 3 and shape:
        shape[0] = float(shape[0])
    elif kind == 4 and shape:
        shape[0] = str(shape[0])
    elif kind == 5 and len(shape) >= 2:
        shape[0], shape[1] = shape[1], shape[0]  # same bytes: valid
    else:
        e["shape"] = [sum(1 for _ in range(0))] if not shape else [int(torch.tensor(shape).prod())]  # flatten


def dtype_edit(rng: random.Random, h: Header) -> None:
    e = _pick(rng, h)
    e["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "U16", "f32", "X9", 3, None])


def type_change(rng: random.Random, h: Header) -> object:
    kind = rng.randrange(12)
    if kind == 0:
        return list(h.items())
    if kind == 1:
        return "header"
    if kind == 2:
        return 42
    if kind == 3:
        return None
    e = _pick(rng, h)
    if kind == 4:
        del e["data_offsets"]
    elif kind == 5:
        del e["shape"]
    elif kind == 6:
        del e["dtype"]
    elif kind == 7:
        e["data_offsets"] = e["data_offsets"] + [0]
    elif kind == 8:
        e["data_offsets"] = [str(x) for x in e["data_offsets"]]
    elif kind == 9:
        e["data_offsets"] = None
    elif kind == 10:
        h[rng.choice(_tensors(h))] = list(e.values())
    else:
        e["shape"] = None
    return None


def metadata_edit(rng: random.Random, h: Header) -> None:
    h["__metadata__"] = rng.choice([{"k": 1}, ["a"], "text", {"k": None}, None, {"k": "v"}])


def duplicate(rng: random.Random, h: Header, data: bytes) -> bytes:
    k = rng.choice(_tensors(h))
    other = h[rng.choice(_tensors(h))]
    text = json.dumps(h)
    extra = json.dumps({k: other})[1:-1]
    return _pack(text[:-1] + ", " + extra + "}", data)


def truncate(rng: random.Random, h: Header, data: bytes) -> bytes:
    raw = _pack(json.dumps(h), data)
    return raw[: rng.randrange(0, len(raw))]


def trailing(rng: random.Random, h: Header, data: bytes) -> bytes:
    return _pack(json.dumps(h), data + b"\0" * rng.randrange(1, 9))


def bad_length(rng: random.Random, h: Header, data: bytes) -> bytes:
    raw = _pack(json.dumps(h), data)
    (n,) = struct.unpack("<Q", raw[:8])
    return struct.pack("<Q", max(0, n + rng.choice([-3, -1, 1, 5, 1 << 40]))) + raw[8:]


def padding(rng: random.Random, h: Header, data: bytes) -> bytes:
    return _pack(rng.choice([" ", "\n", ""]) + json.dumps(h) + " " * rng.randrange(0, 9), data)


def invalid_json(rng: random.Random, h: Header, data: bytes) -> bytes:
    text = json.dumps(h)
    i = rng.randrange(len(text))
    return _pack(text[:i] + rng.choice(["\xff", "}", "NaN", ",", '"']) + text[i + 1 :], data)


def extra_field(rng: random.Random, h: Header) -> None:
    _pick(rng, h)["offsets"] = [0, 1]


MUTATIONS: list[Mutation] = [
    _edit(swap_offsets),
    _edit(shift),
    _edit(overlap),
    _edit(reverse),
    _edit(same_offsets),
    _edit(shape_edit),
    _edit(dtype_edit),
    _edit(type_change),
    _edit(metadata_edit),
    _edit(extra_field),
    duplicate,
    truncate,
    trailing,
    bad_length,
    padding,
    invalid_json,
]


def _theirs(path: Path) -> dict[str, torch.Tensor] | Exception:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the library raises several types
        return e


def _ours(path: Path) -> dict[str, torch.Tensor] | Exception:
    try:
        f = SafetensorsFile(path)
        try:
            return {k: f.read(k) for k in f.keys()}
        finally:
            f.close()
    except Exception as e:
        return e


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize("which", range(len(_originals())))
def test_mutated_headers(tmp_path: Path, which: int) -> None:
    tensors = _originals()[which]
    src = tmp_path / "orig.safetensors"
    save_file(tensors, src, metadata={"k": "v"})
    raw = src.read_bytes()
    counts = {"both read": 0, "both reject": 0, "only taskvec rejects": 0}
    for i in range(400):
        rng = random.Random(1000 * which + i)
        header, data = _split(raw)
        mutation = MUTATIONS[i % len(MUTATIONS)]
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(mutation(rng, header, data))
        theirs, ours = _theirs(path), _ours(path)
        if isinstance(ours, Exception):
            assert isinstance(ours, (CheckpointError, DtypeError)), f"{mutation}: {type(ours).__name__}: {ours}"
            msg = str(ours)
            assert "\n" not in msg and str(path) in msg, msg
            counts["both reject" if isinstance(theirs, Exception) else "only taskvec rejects"] += 1
            continue
        assert not isinstance(theirs, Exception), (
            f"case {i} ({mutation}): safetensors rejects ({theirs}) but taskvec reads it"
        )
        assert list(ours) == list(theirs) or set(ours) == set(theirs)
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
            assert torch.equal(_bytes(ours[k]), _bytes(theirs[k])), k
        counts["both read"] += 1
        path.unlink()
    # the mutations exercise both outcomes
    assert counts["both read"] > 10 and counts["both reject"] > 100, counts
    # taskvec is stricter only on duplicate names (the library keeps one of them) and on entries
    # written as JSON lists or with dtypes taskvec does not use
    assert counts["only taskvec rejects"] < 0.2 * counts["both reject"], counts


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda h: h["b"].__setitem__("data_offsets", list(h["a"]["data_offsets"])), "overlap the previous tensor"),
        (lambda h: h["a"].__setitem__("data_offsets", h["a"]["data_offsets"][::-1]), "end before they start"),
        (lambda h: h["a"]["data_offsets"].__setitem__(1, h["a"]["data_offsets"][1] - 4), "span 44 bytes"),  # short
        (lambda h: h["a"]["shape"].__setitem__(0, 2), "span 48 bytes, shape \\[2, 4\\] of F32 needs 32"),
    ],
)
def test_offsets_that_read_other_tensors_bytes_are_refused(tmp_path: Path, edit, why: str) -> None:  # type: ignore[no-untyped-def]
    save_file({"a": torch.randn(3, 4), "b": torch.randn(3, 4)}, tmp_path / "x.safetensors")
    header, data = _split((tmp_path / "x.safetensors").read_bytes())
    edit(header)
    (tmp_path / "x.safetensors").write_bytes(_pack(json.dumps(header), data))
    assert isinstance(_theirs(tmp_path / "x.safetensors"), Exception)
    with pytest.raises(CheckpointError, match=why):
        SafetensorsFile(tmp_path / "x.safetensors")
