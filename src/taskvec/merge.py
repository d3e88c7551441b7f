"""The streamed merge of a config: base + scale * method(task vectors), written tensor by tensor."""

from __future__ import annotations

import os
from pathlib import Path

from taskvec.config import DTYPES, MergeConfig
from taskvec.core import apply_streaming
from taskvec.core.coef import check_patterns
from taskvec.core.source import open_task
from taskvec.core.stream import LastSliceCache
from taskvec.io import open_checkpoint, parse_size
from taskvec.io.hf import hf_output_files
from taskvec.methods import compose


def merge_checkpoints(
    cfg: MergeConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
    device: str = "cpu",
) -> Path:
    """Run `cfg` and write the merged model to `out` (a shard folder, or one `.safetensors` file).

    Every include/exclude glob must match some tensor of the base; NaN or infinite values in the
    inputs are refused unless `allow_nonfinite`. `device` is where the per-slice arithmetic runs
    ("cpu" or "cuda")."""
    base = LastSliceCache(open_checkpoint(cfg.base))  # each base slice is read once for all task vectors
    check_patterns(base.keys(), cfg.include, cfg.exclude, base.name)
    tvs = [
        open_task(m, base, include=cfg.include, exclude=cfg.exclude, allow_nonfinite=allow_nonfinite)
        for m in cfg.models
    ]
    merged = compose(tvs, cfg.method, [m.weight for m in cfg.models], device=device, **cfg.params)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    metadata = {"taskvec_method": cfg.method, "taskvec_models": str(len(tvs))}
    return apply_streaming(
        base,
        merged,
        cfg.scale,
        out,
        dtype=dtype,
        shard_size=parse_size(cfg.shard_size),
        overwrite=overwrite,
        progress=progress,
        metadata=metadata,
        extra_files=hf_output_files(cfg.base, out, dtype),
        allow_nonfinite=allow_nonfinite,
    )
