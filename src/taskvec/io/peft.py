"""PEFT LoRA adapters as task vectors: tau = scale * B @ A for every adapted weight.

A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) becomes a factored
source keyed by the base model's tensor names (`base_model.model.` stripped, `X.lora_A.weight` /
`X.lora_B.weight` mapped to `X.weight`). Nothing is multiplied out until a tensor (or a slice) is
read. The scale is lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), with `rank_pattern`
and `alpha_pattern` resolved as PEFT does. Linear, transformers' Conv1D (`fan_in_fan_out`),
embedding and (ungrouped) convolution layers are supported; a LoRA bias (`lora_bias`) adds
scale * lora_B.bias to the layer's bias; tensors saved whole (`modules_to_save`, trained biases)
become dense deltas against the base, so they need the base model.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskvec.errors import (
    CheckpointError,
    ConfigError,
    DtypeError,
    KeyMismatchError,
    ShapeMismatchError,
    format_validation_error,
)
from taskvec.io.lowrank import FactoredSource, Factors, check_factors
from taskvec.io.readers import check_regular, note_input, read_json
from taskvec.io.safetensors_file import SafetensorsFile, TensorSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# config options that change what the adapter computes beyond tau = scale * B @ A
_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA adapters (use_dora) rescale the merged weight per column; merge them with PEFT first",
    "layer_replication": "layer_replication duplicates base layers",
    "trainable_token_indices": "trainable_token_indices (trainable token deltas)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QA-LoRA adapters (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).exists()


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first pattern matching the end of `module` (PEFT's rule for rank/alpha patterns)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


class _LoraOptions(BaseModel):
    """The options of an adapter config that decide tau, with the types PEFT writes (strict: a
    string "8" or `true` is not a rank)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    r: int = Field(gt=0)
    lora_alpha: float
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_rslora: bool | None = None
    fan_in_fan_out: bool | None = None


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        cfg = read_json(path, max_bytes=16 * 2**20)
    except ValueError as e:  # JSON syntax, not UTF-8, nested too deep, too large
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ConfigError(f"{path}: peft_type {kind!r} is not supported (only LoRA adapters are task vectors here)")
    for opt, what in _UNSUPPORTED.items():
        if cfg.get(opt):
            raise ConfigError(f"{path}: {what} is not supported")
    if cfg.get("r") is None or cfg.get("lora_alpha") is None:
        raise ConfigError(f"{path}: 'r' and 'lora_alpha' are required")
    try:
        _LoraOptions.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from None
    for field in ("rank_pattern", "alpha_pattern"):
        for p in cfg.get(field) or {}:
            try:
                re.compile(rf"(.*\.)?({p})$")
            except re.error as e:
                raise ConfigError(f"{path}: {field}: {p!r} is not a valid regular expression ({e})") from None
    return cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / WEIGHTS_NAMES[0]
    if st.exists():
        f = SafetensorsFile(st)
        try:
            return {k: f.read(k) for k in f.keys()}
        finally:
            f.close()
    binp = folder / WEIGHTS_NAMES[1]
    if binp.exists():
        check_regular(binp)
        note_input(binp)
        try:
            sd = torch.load(binp, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise CheckpointError(f"{binp}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())})") from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{binp}: holds a {type(sd).__name__}, not a dict of adapter tensors")
        bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise CheckpointError(f"{binp}: entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor")
        return dict(sd)
    raise CheckpointError(f"{folder}: adapter folder has {CONFIG_NAME} but no {' or '.join(WEIGHTS_NAMES)}")


def _strip(key: str) -> str:
    """The base model's name of an adapter tensor: no PEFT prefix, no `.base_layer` wrapper."""
    key = key.removeprefix(PREFIX)
    return key.replace(".base_layer.", ".")


def _lora_factors(
    module: str, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool, embedding: bool, where: str
) -> Factors:
    """Factors of scale * B @ A in the base weight's layout."""
    r = a.shape[0]
    if embedding:  # lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r): weight (num, dim) = (B @ A)^T
        if b.dim() != 2 or b.shape[1] != r:
            raise ShapeMismatchError(
                f"{where}: lora_embedding_A {list(a.shape)} and lora_embedding_B {list(b.shape)} do not fit"
            )
        return Factors(a.T, torch.full((r,), scale, dtype=a.dtype), b, (a.shape[1], b.shape[0]))
    if b.shape[1] != r:
        raise ConfigError(
            f"{where}: lora_B has {b.shape[1]} input channels for rank {r} (grouped convolution LoRA is not supported)"
        )
    if b.dim() > 2 and any(d != 1 for d in b.shape[2:]):
        raise ShapeMismatchError(f"{where}: lora_B of shape {list(b.shape)} is not a 1x1 map")
    bm = b.reshape(b.shape[0], r)
    am = a.reshape(r, -1)
    s = torch.full((r,), scale, dtype=a.dtype)
    if fan_in_fan_out:
        if a.dim() != 2:
            raise ConfigError(f"{where}: fan_in_fan_out is set for a layer with a {a.dim()}-D lora_A")
        return Factors(am.T, s, bm, (am.shape[1], bm.shape[0]))
    shape = (bm.shape[0], *a.shape[1:])
    return Factors(bm, s, am.T, tuple(shape))


def open_lora(adapter: str | os.PathLike[str], base: Any | None = None) -> FactoredSource:
    """A PEFT LoRA adapter folder as a factored source of deltas, keyed by the base model's names.

    `base` (any `Source`) is checked against the adapter: every adapted tensor must exist in it
    with the delta's shape; it is required when the adapter saves whole tensors
    (`modules_to_save`, trained biases), whose deltas are taken against it.
    """
    folder = Path(adapter)
    if not is_adapter_folder(folder):
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {CONFIG_NAME})")
    cfg = _load_config(folder)
    tensors = _read_weights(folder)
    where = str(folder)
    r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    rslora, fifo = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))

    def scale_of(module: str) -> float:
        rk, ak = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
        r = int(rank_pattern[rk]) if rk is not None else r_default
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
        return alpha / math.sqrt(r) if rslora else alpha / r

    lora: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A", "B", "bias", "embedding"}
    whole: dict[str, torch.Tensor] = {}
    for raw, t in tensors.items():
        key = _strip(raw)
        if "lora_magnitude_vector" in key:
            raise ConfigError(f"{where}: tensor {raw!r} belongs to a DoRA adapter, which is not supported")
        m = re.fullmatch(r"(.+)\.lora_(embedding_)?([AB])(?:\.(?!weight$|bias$)[^.]+)?(\.weight|\.bias)?", key)
        if m and not t.is_floating_point():
            raise DtypeError(f"{where}: LoRA tensor {raw!r} has dtype {t.dtype}; LoRA weights must be floating")
        if m:
            module, emb, ab, tail = m.group(1), m.group(2), m.group(3), m.group(4)
            entry = lora.setdefault(module, {})
            if tail == ".bias":
                entry["bias"] = t
            else:
                entry[ab] = t
            if emb:
                entry["embedding"] = torch.ones(())
            continue
        if ".lora_" in key or "token_adapter" in key:
            raise ConfigError(f"{where}: adapter tensor {raw!r} is of a kind taskvec does not support")
        whole[key] = t

    factors: dict[str, Factors] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    for module, e in lora.items():
        if "A" not in e or "B" not in e:
            raise CheckpointError(
                f"{where}: module {module!r} has {'lora_A' if 'A' in e else 'lora_B'} but not the other"
            )
        a, b = e["A"], e["B"]
        rk = _pattern_key(rank_pattern, module)
        r_cfg = int(rank_pattern[rk]) if rk is not None else r_default
        if a.shape[0] != r_cfg:
            raise ShapeMismatchError(
                f"{where}: module {module!r} has rank {a.shape[0]} in its weights but {r_cfg} in the config"
            )
        sc = scale_of(module)
        key = f"{module}.weight"
        cdt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        f = _lora_factors(
            module, a.to(cdt), b.to(cdt), sc, fifo and "embedding" not in e, "embedding" in e, f"{where}: {module!r}"
        )
        check_factors(f, f"{where}: module {module!r}")
        factors[key] = f
        if "bias" in e:
            bias_deltas[f"{module}.bias"] = sc * e["bias"].to(cdt)

    if base is not None:
        _check_base(cfg, folder, base, factors, whole, bias_deltas)
    elif whole:
        raise CheckpointError(
            f"{where}: the adapter saves whole tensors "
            f"({', '.join(sorted(whole)[:3])}{' ...' if len(whole) > 3 else ''}), "
            "whose task vector is taken against the base model: load it with TaskVector.from_lora(adapter, base)"
        )
    dense: dict[str, torch.Tensor] = dict(bias_deltas)
    for k in whole:
        if k in dense:
            raise CheckpointError(f"{where}: tensor {k!r} is both saved whole and adapted by a LoRA bias")
    specs: dict[str, TensorSpec] = {}
    order = base.keys() if base is not None else [*factors, *bias_deltas, *whole]
    for k in order:
        if k in factors:
            specs[k] = TensorSpec(factors[k].shape, factors[k].u.dtype)
        elif k in bias_deltas:
            specs[k] = TensorSpec(tuple(bias_deltas[k].shape), bias_deltas[k].dtype)
        elif k in whole:
            specs[k] = TensorSpec(tuple(whole[k].shape), torch.promote_types(whole[k].dtype, torch.float32))

    def read_dense(k: str, s: int, e: int | None) -> torch.Tensor:
        if k in dense:
            return dense[k].reshape(-1)[s:e]
        dt = specs[k].dtype
        return whole[k].reshape(-1)[s:e].to(dt) - base.read_flat(k, s, e).to(dt)  # type: ignore[union-attr]

    return FactoredSource(
        f"{folder} (LoRA)", specs, set(factors), factors.__getitem__, read_dense, {"taskvec": "peft/lora"}
    )


def _check_base(
    cfg: Mapping[str, Any],
    folder: Path,
    base: Any,
    factors: Mapping[str, Factors],
    whole: Mapping[str, torch.Tensor],
    bias_deltas: Mapping[str, torch.Tensor],
) -> None:
    """Every tensor the adapter changes exists in `base` with the same shape."""
    have = set(base.keys())
    for k, shape in [
        *((k, f.shape) for k, f in factors.items()),
        *((k, tuple(t.shape)) for k, t in whole.items()),
        *((k, tuple(t.shape)) for k, t in bias_deltas.items()),
    ]:
        if k not in have:
            raise KeyMismatchError(
                f"{folder}: the adapter changes {k!r}, which the base {base.name} does not have "
                "(is this the base model the adapter was trained on?)"
            )
        if tuple(base.spec(k).shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{folder}: tensor {k!r} has shape {list(shape)} in the adapter "
                f"but {list(base.spec(k).shape)} in the base {base.name}"
            )
        if not base.spec(k).dtype.is_floating_point:
            raise KeyMismatchError(
                f"{folder}: the adapter changes {k!r}, which is not floating in the base {base.name}"
            )
    named = cfg.get("base_model_name_or_path")
    base_path = Path(str(base.name))
    if named and base_path.is_dir() and Path(str(named)).name != base_path.name:
        warnings.warn(
            f"{folder}: adapter was trained on {named!r}, used here with the base folder {base_path}", stacklevel=3
        )
