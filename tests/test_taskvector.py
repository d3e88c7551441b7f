"""TaskVector: extraction, arithmetic, application and storage against float64 recomputation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from taskvec import DtypeError, KeyMismatchError, ShapeMismatchError, TaskVector
from taskvec.core.similarity import cosine_matrix, gram_error_bound, gram_matrix
from taskvec.errors import ConfigError

FLOAT_KEYS = ["embed.weight", "layers.0.attn.weight", "layers.0.attn.bias", "layers.1.mlp.weight", "head.weight"]


def test_extract_is_exact_difference(base64, finetuned64) -> None:
    tv = TaskVector.from_checkpoints(base64, finetuned64[0])
    assert tv.keys() == FLOAT_KEYS  # integer buffers carry no task vector
    for k in FLOAT_KEYS:
        assert tv[k].dtype == torch.float64
        assert torch.equal(tv[k], finetuned64[0][k] - base64[k])


def test_arithmetic_matches_float64_recomputation(base64, finetuned64) -> None:
    t = [TaskVector.from_checkpoints(base64, ft) for ft in finetuned64]
    d = [{k: ft[k].numpy() - base64[k].numpy() for k in FLOAT_KEYS} for ft in finetuned64]
    cases = {
        "add": (t[0] + t[1], lambda k: d[0][k] + d[1][k]),
        "sub": (t[0] - t[2], lambda k: d[0][k] - d[2][k]),
        "neg": (-t[1], lambda k: -d[1][k]),
        "scale": (0.3 * t[0] - t[1] * 2, lambda k: 0.3 * d[0][k] - 2 * d[1][k]),
        "div": (t[2] / 4, lambda k: d[2][k] / 4),
        "sum": (TaskVector.sum(t, [0.5, -1.0, 2.0]), lambda k: 0.5 * d[0][k] - d[1][k] + 2 * d[2][k]),
        "builtin sum": (sum(t), lambda k: d[0][k] + d[1][k] + d[2][k]),
        "nested": (-(t[0] + 0.5 * (t[1] - t[2])), lambda k: -(d[0][k] + 0.5 * (d[1][k] - d[2][k]))),
    }
    for name, (tv, ref) in cases.items():
        for k in FLOAT_KEYS:
            np.testing.assert_allclose(tv[k].numpy(), ref(k), rtol=1e-12, atol=1e-14, err_msg=name)


def test_per_layer_coefficients(base64, finetuned64) -> None:
    tv = TaskVector.from_checkpoints(base64, finetuned64[0])
    coef = {"layers.0.*": 0.25, "head.*": 0.0, "*": 1.5}
    scaled = tv * coef
    for k in FLOAT_KEYS:
        c = 0.25 if k.startswith("layers.0.") else 0.0 if k.startswith("head.") else 1.5
        assert torch.allclose(scaled[k], c * tv[k], rtol=0, atol=1e-15)
    with pytest.raises(ConfigError, match="no pattern matching tensor 'embed.weight'"):
        (tv * {"layers.*": 1.0})["embed.weight"]


def test_apply_to_module_dict_and_file_agree(tmp_path: Path, base64, finetuned64) -> None:
    tv = TaskVector.from_checkpoints(base64, finetuned64[1])
    new = tv.apply_to(base64, coef=0.7)
    for k in FLOAT_KEYS:
        np.testing.assert_allclose(
            new[k].numpy(), base64[k].numpy() + 0.7 * (finetuned64[1][k].numpy() - base64[k].numpy()), rtol=1e-13
        )
    assert torch.equal(new["bn.num_batches_tracked"], base64["bn.num_batches_tracked"])
    # coefficient 1 gives back the fine-tuned weights; 0 gives the base
    back = tv.apply_to(base64, 1.0)
    assert all(torch.allclose(back[k], finetuned64[1][k], atol=1e-15) for k in FLOAT_KEYS)
    # a module: a new module, the base untouched
    lin = nn.Linear(5, 2).double()
    ft = {k: v + 1.0 for k, v in lin.state_dict().items()}
    m2 = TaskVector.from_checkpoints(lin, ft).apply_to(lin, coef=-1.0)
    assert torch.allclose(m2.weight, lin.weight - 1.0) and not torch.equal(m2.weight, lin.weight)
    # a file on disk: streamed to `out`, the same numbers as the in-memory path
    save_file(base64, tmp_path / "base.safetensors")
    out = tv.apply_to(tmp_path / "base.safetensors", 0.7, out=tmp_path / "merged.safetensors")
    disk = load_file(out)
    assert all(torch.equal(disk[k], new[k]) for k in base64)


def test_save_load_roundtrip_and_storage_dtype(tmp_path: Path, files) -> None:
    tv = TaskVector.from_checkpoints(files["base"], files["ft0"], exclude=["head.*"])
    assert "head.weight" not in tv.keys()
    tv.save(tmp_path / "tv32.safetensors")
    tv.save(tmp_path / "tv16", dtype=torch.float16, shard_size=200)
    t32 = TaskVector.load(tmp_path / "tv32.safetensors")
    t16 = TaskVector.load(tmp_path / "tv16")
    assert len(list((tmp_path / "tv16").glob("*.safetensors"))) > 1
    for k in tv.keys():
        assert torch.equal(t32[k], tv[k])
        assert t16[k].dtype == torch.float32  # stored fp16, computed in fp32
        assert torch.equal(t16[k], tv[k].half().float())


def test_filters(base64, finetuned64) -> None:
    tv = TaskVector.from_checkpoints(base64, finetuned64[0], include=["layers.*"], exclude=["*.bias"])
    assert tv.keys() == ["layers.0.attn.weight", "layers.1.mlp.weight"]
    assert TaskVector.from_checkpoints(base64, finetuned64[0]).filter(exclude=["embed.*"]).keys() == FLOAT_KEYS[1:]


def test_missing_key_is_named(base64, finetuned64) -> None:
    ft = dict(finetuned64[0])
    del ft["layers.1.mlp.weight"]
    with pytest.raises(KeyMismatchError, match="layers.1.mlp.weight"):
        TaskVector.from_checkpoints(base64, ft)
    ft2 = dict(finetuned64[0], extra=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(KeyMismatchError, match="extra"):
        TaskVector.from_checkpoints(base64, ft2)
    # excluding the offending tensor is the way out
    assert "extra" not in TaskVector.from_checkpoints(base64, ft2, exclude=["extra"])


def test_shape_mismatch_names_tensor_and_both_shapes(files, base64, finetuned64) -> None:
    ft = dict(finetuned64[0], **{"layers.0.attn.weight": torch.zeros(8, 9, dtype=torch.float64)})
    with pytest.raises(ShapeMismatchError, match=r"'layers.0.attn.weight': shape \[8, 8\] in .* but \[8, 9\]"):
        TaskVector.from_checkpoints(base64, ft)
    t0 = TaskVector.from_checkpoints(files["base"], files["ft0"])
    t1 = TaskVector.from_tensors({k: torch.zeros(2) for k in t0.keys()})
    with pytest.raises(ShapeMismatchError, match="embed.weight"):
        t0 + t1


def test_wrong_dtype_is_named(base64, finetuned64) -> None:
    ft = dict(finetuned64[0], **{"head.weight": torch.zeros(3, 8, dtype=torch.int32)})
    with pytest.raises(DtypeError, match=r"'head.weight'.*torch.float64.*torch.int32"):
        TaskVector.from_checkpoints(base64, ft)


def test_streamed_gram_and_cosine_match_numpy(base64, finetuned64) -> None:
    t = [TaskVector.from_checkpoints(base64, ft) for ft in finetuned64]
    flat = np.stack([np.concatenate([(ft[k] - base64[k]).numpy().ravel() for k in FLOAT_KEYS]) for ft in finetuned64])
    np.testing.assert_allclose(gram_matrix(t, chunk_elems=37).numpy(), flat @ flat.T, rtol=1e-12)
    n = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(cosine_matrix(t).numpy(), flat @ flat.T / np.outer(n, n), rtol=1e-12)
    assert t[0].norm() == pytest.approx(n[0], rel=1e-12)
    assert t[0].cosine(t[1]) == pytest.approx(flat[0] @ flat[1] / n[0] / n[1], rel=1e-12)


def test_mixed_precision_checkpoints_compute_in_float32(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g).bfloat16()}
    ft = {"w": (base["w"].float() + 0.01 * torch.randn(64, generator=g)).half()}
    tv = TaskVector.from_checkpoints(base, ft)
    assert tv["w"].dtype == torch.float32
    assert torch.equal(tv["w"], ft["w"].float() - base["w"].float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gram_of_16_and_32_bit_task_vectors_within_the_stated_bound(tmp_path: Path, dtype: torch.dtype) -> None:
    """float32 products per run of columns, float64 sums: within `gram_error_bound` of the float64
    Gram matrix of the same values, and really computed in float32 (not exact)."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (300, 517), "b": (4099,), "c": (64, 64)}
    tvs, rows = [], []
    for i in range(5):
        sd = {k: (torch.randn(s, generator=g) * 0.01 + 0.002 * i).to(dtype) for k, s in shapes.items()}
        save_file(sd, str(tmp_path / f"tv{i}.safetensors"))
        tvs.append(TaskVector.load(tmp_path / f"tv{i}.safetensors"))
        rows.append(torch.cat([sd[k].reshape(-1).to(torch.float64) for k in tvs[0].keys()]))
    x = torch.stack(rows)
    exact = x @ x.T
    bound = gram_error_bound(x)
    for chunk in (None, 1000, 37):
        got = gram_matrix(tvs, chunk_elems=chunk)
        assert got.dtype == torch.float64
        assert bool(((got - exact).abs() <= bound).all()), chunk
    assert not torch.equal(gram_matrix(tvs), exact)  # float32 products: rounding shows
