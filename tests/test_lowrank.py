"""Low-rank task vectors: truncated SVD storage, transparent reads, Gram from factors, composed forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from taskvec import TaskVector, compose
from taskvec.bases.analysis import gram
from taskvec.cli import app
from taskvec.core.lowrank import (
    compress,
    factored_gram,
    factors_of,
    is_factored,
    pick_rank,
    truncated_svd,
)
from taskvec.core.similarity import gram_matrix
from taskvec.io import open_checkpoint
from taskvec.io.lowrank import FactoredSource, Factors, factored_from_tensors


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 30, generator=g, dtype=torch.float64)
    decay = torch.logspace(0, -3, 16, dtype=torch.float64)
    q1, _ = torch.linalg.qr(torch.randn(24, 16, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(72, 16, generator=g, dtype=torch.float64))
    conv = ((q1 * decay) @ q2.T).reshape(24, 8, 3, 3)
    return {
        "lin.weight": low + 1e-3 * torch.randn(40, 30, generator=g, dtype=torch.float64),
        "lin.bias": torch.randn(40, generator=g, dtype=torch.float64),
        "conv.weight": conv,
        "emb.weight": torch.randn(50, 20, generator=g, dtype=torch.float64),
    }


def _svd64(a: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(a.reshape(a.shape[0], -1).to(torch.float64), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(a.shape)


def test_full_rank_svd_is_exact() -> None:
    a = torch.randn(20, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, s, v = truncated_svd(a, rank=12)
    assert torch.allclose((u * s) @ v.T, a, atol=1e-12)
    f = Factors(u, s, v, (20, 3, 4))
    assert torch.allclose(f.dense(), a.reshape(20, 3, 4), atol=1e-12)
    # randomized path on a large matrix of exact rank 5
    b = torch.randn(300, 5, dtype=torch.float64) @ torch.randn(5, 200, dtype=torch.float64)
    u, s, v = truncated_svd(b, rank=5, exact_elems=0)
    assert torch.allclose((u * s) @ v.T, b, atol=1e-9)


@pytest.mark.parametrize("exact_elems", [1 << 22, 0])
def test_energy_picks_smallest_rank(exact_elems: int) -> None:
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(400, 120, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(300, 120, generator=g, dtype=torch.float64))
    s_true = 0.9 ** torch.arange(120, dtype=torch.float64)
    a = (q1 * s_true) @ q2.T
    total = float((s_true**2).sum())
    for energy in (0.5, 0.9, 0.95, 0.999):
        _, s, _ = truncated_svd(a, energy=energy, exact_elems=exact_elems)
        k = s.shape[0]
        c = torch.cumsum(s_true**2, 0) / total
        assert c[k - 1] >= energy - 1e-12 and (k == 1 or c[k - 2] < energy), (energy, k)
    assert pick_rank(torch.tensor([3.0, 2.0, 1.0]), 14.0, 9 / 14) == 1
    assert pick_rank(torch.tensor([3.0, 2.0, 1.0]), 14.0, 0.92) == 2


def test_compress_roundtrip_and_error_report(tmp_path: Path) -> None:
    tensors = _tensors(0)
    tv = TaskVector.from_tensors(tensors)
    out = tmp_path / "tv_lr.safetensors"
    rep = compress(tv, out, rank=4, dtype=torch.float64)
    lr = TaskVector.load(out)
    assert is_factored(lr) and isinstance(open_checkpoint(out), FactoredSource)
    assert lr.keys() == tv.keys()
    by_key = {r.key: r for r in rep.tensors}
    err2 = norm2 = 0.0
    for k, t in tensors.items():
        want = _svd64(t, 4) if t.dim() > 1 else t
        assert torch.allclose(lr[k], want, atol=1e-10), k
        e = float((want - t).norm())  # float64 recomputation of the error
        assert math.isclose(by_key[k].error, e, rel_tol=1e-9, abs_tol=1e-12), k
        assert math.isclose(by_key[k].norm, float(t.norm()), rel_tol=1e-12)
        assert (by_key[k].rank is None) == (t.dim() == 1)
        err2, norm2 = err2 + e**2, norm2 + float(t.norm()) ** 2
        flat = lr[k].reshape(-1)
        n = flat.numel()
        for s, e_ in [(0, 7), (5, n // 2 + 3), (n // 3, n), (n - 1, n)]:
            assert torch.allclose(lr.source.read_flat(k, s, e_), flat[s:e_], atol=1e-12), (k, s, e_)
    assert math.isclose(rep.rel_error, math.sqrt(err2 / norm2), rel_tol=1e-9)
    assert rep.stored_bytes < rep.dense_bytes
    assert out.stat().st_size < sum(t.numel() * 8 for t in tensors.values())


def test_compress_full_rank_exact_and_dense_when_larger(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(64, 6, dtype=torch.float64) @ torch.randn(6, 80, dtype=torch.float64),
        "small": torch.randn(3, 3, dtype=torch.float64),
    }
    rep = compress(TaskVector.from_tensors(tensors), tmp_path / "x.safetensors", rank=6, dtype=torch.float64)
    lr = TaskVector.load(tmp_path / "x.safetensors")
    assert factors_of(lr, "w") is not None and factors_of(lr, "small") is None  # 3x3 factors would be larger
    for k, t in tensors.items():
        assert torch.allclose(lr[k], t, atol=1e-11), k
    assert rep.rel_error < 1e-13


def test_methods_read_lowrank_transparently(tmp_path: Path) -> None:
    dense, lrs = [], []
    for i in range(3):
        compress(TaskVector.from_tensors(_tensors(i)), tmp_path / f"{i}.safetensors", rank=3, dtype=torch.float64)
        lr = TaskVector.load(tmp_path / f"{i}.safetensors")
        lrs.append(lr)
        dense.append(TaskVector.from_tensors({k: lr[k] for k in lr.keys()}))
    for method, kw in [("task_arithmetic", {}), ("ties", {"density": 0.3})]:
        a, b = compose(lrs, method, **kw), compose(dense, method, **kw)
        for k in a.keys():
            assert torch.allclose(a[k], b[k], atol=1e-12), (method, k)


def test_gram_from_factors_matches_dense(tmp_path: Path) -> None:
    tvs = []
    for i in range(3):
        compress(TaskVector.from_tensors(_tensors(i)), tmp_path / f"{i}.safetensors", rank=3 + i, dtype=torch.float64)
        tvs.append(TaskVector.load(tmp_path / f"{i}.safetensors"))
    tvs.append(TaskVector.from_tensors(_tensors(9)))  # a dense one among them
    tvs.append(-0.5 * tvs[0])  # a scaled low-rank one
    flat = torch.stack([torch.cat([tv[k].reshape(-1).to(torch.float64) for k in tvs[0].keys()]) for tv in tvs])
    ref = flat @ flat.T
    for g in (factored_gram(tvs), gram_matrix(tvs), gram(tvs)):
        assert torch.allclose(g, ref, rtol=1e-12, atol=1e-10)
    assert factors_of(tvs[4], "lin.weight") is not None


def test_cli_compress(tmp_path: Path) -> None:
    tv = TaskVector.from_tensors({k: v.float() for k, v in _tensors(0).items()})
    src = tv.save(tmp_path / "tv.safetensors")
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "lr.safetensors"), "--energy", "0.99"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "total relative error" in text and "conv.weight" in text
    lr = TaskVector.load(tmp_path / "lr.safetensors")
    assert 1 <= factors_of(lr, "lin.weight").rank <= 7  # type: ignore[union-attr]
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "lr.safetensors"), "--rank", "2"])
    assert res.exit_code == 2 and "exists" in " ".join(res.output.split())
    res = CliRunner().invoke(
        app, ["compress", str(src), "-o", str(tmp_path / "b.safetensors"), "--rank", "2", "--energy", "0.9"]
    )
    assert res.exit_code == 2 and "exactly one" in " ".join(res.output.split())


def test_factored_from_tensors_reads() -> None:
    f = Factors(
        torch.randn(6, 2, dtype=torch.float64),
        torch.tensor([2.0, 0.5], dtype=torch.float64),
        torch.randn(4, 2, dtype=torch.float64),
        (6, 4),
    )
    src = factored_from_tensors({"w": f}, {"b": torch.ones(6, dtype=torch.float64)})
    assert torch.allclose(src.read_flat("w", 5, 19), f.dense().reshape(-1)[5:19], atol=1e-14)
    assert torch.equal(src.read_flat("b"), torch.ones(6, dtype=torch.float64))


# --------------------------------------------------------------------------- low-rank composed forward


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.pw = torch.nn.Conv2d(8, 6, 1)
        self.fc1 = torch.nn.Linear(6, 12)
        self.norm = torch.nn.LayerNorm(12)
        self.fc2 = torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pw(torch.relu(self.dw(torch.relu(self.conv1(x))))).mean((2, 3))
        return self.fc2(self.norm(torch.relu(self.fc1(h))).unsqueeze(1).expand(-1, 3, -1)).sum(1)


def _lowrank_tvs(model: torch.nn.Module, t: int) -> list[TaskVector]:
    g = torch.Generator().manual_seed(5)
    tvs = []
    for k in range(t):
        factors, dense = {}, {}
        for name, p in model.state_dict().items():
            if p.dim() >= 2:
                m, n = p.shape[0], p[0].numel()
                r = 1 + (k + len(name)) % 3
                factors[name] = Factors(
                    torch.randn(m, r, generator=g, dtype=torch.float64),
                    torch.rand(r, generator=g, dtype=torch.float64),
                    0.3 * torch.randn(n, r, generator=g, dtype=torch.float64),
                    tuple(p.shape),
                )
            else:
                dense[name] = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        tvs.append(TaskVector(factored_from_tensors(factors, dense), name=f"t{k}"))
    return tvs


def test_lowrank_composed_forward_exact() -> None:
    from taskvec.variational import ComposedModel

    torch.manual_seed(0)
    model = _Net().double().eval()
    tvs = _lowrank_tvs(model, 3)
    lr = ComposedModel(model, tvs, blocks="tensor")
    assert {"conv1.weight", "pw.weight", "fc1.weight", "fc2.weight", "dw.weight"} <= set(lr.lowrank_keys)
    dense = ComposedModel(
        model, [TaskVector.from_tensors({k: tv[k] for k in tv.keys()}) for tv in tvs], blocks="tensor"
    )
    assert dense.lowrank_keys == []
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    alpha = torch.rand(5, 3, lr.num_blocks, dtype=torch.float64, requires_grad=True)
    y = lr(x, alpha)
    assert {k for kind, k in lr._cache if kind == "stack"} == {"dw.weight"}  # only the depthwise conv formed weights
    assert torch.allclose(y, lr.naive_forward(x, alpha.detach()), atol=1e-11)
    a2 = alpha.detach().clone().requires_grad_()
    y2 = dense(x, a2)
    assert torch.allclose(y, y2, atol=1e-11)
    (y.square().sum()).backward()
    (y2.square().sum()).backward()
    assert torch.allclose(alpha.grad, a2.grad, atol=1e-10)  # type: ignore[arg-type]
    one = alpha.detach()[:1]  # a batch of one sample
    assert torch.allclose(lr(x[:1], one), dense(x[:1], one), atol=1e-11)
    shared = alpha.detach()[0]
    assert torch.allclose(lr(x, shared), dense(x, shared), atol=1e-11)
    for k in lr.keys:  # merged weights from factors equal the dense merge
        assert torch.allclose(lr.merged(shared)[k], dense.merged(shared)[k], atol=1e-12), k


def test_lowrank_forward_with_gated_coefficients_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mostly zero coefficients (as the variational gate leaves them) take the per-task path that
    skips zero terms; it equals the float64 materialised forward, and the all-samples path."""
    from taskvec.variational import ComposedModel, ops

    monkeypatch.setattr(ops, "SPARSE_MIN_RANK", 1)  # these factors have ranks 1 to 3
    monkeypatch.setattr(ops, "SPARSE_SHARE", 0.5)
    torch.manual_seed(0)
    model = _Net().double().eval()
    tvs = _lowrank_tvs(model, 4)
    lr = ComposedModel(model, tvs, blocks="tensor")
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    alpha = torch.rand(9, 4, lr.num_blocks, generator=g, dtype=torch.float64)
    alpha = alpha * (torch.rand(alpha.shape, generator=g) < 0.3)  # about 30 % kept
    alpha[:, 0] = 0.0  # a task no sample uses
    alpha[:, 1] = 0.5  # a task every sample uses
    alpha[3, 2:] = 0.0  # a sample with one task only
    alpha[:, :, -1] = 0.0  # a block gated out for every sample: its layer runs as the base layer
    dense = ComposedModel(
        model, [TaskVector.from_tensors({k: tv[k] for k in tv.keys()}) for tv in tvs], blocks="tensor"
    )
    col = lr.factors(lr.lowrank_keys[0])[3]
    c = alpha[:, :, 0]
    plan = ops.active_tasks(c, col)
    assert plan is not None and [t.task for t in plan] == [1, 2, 3] and plan[0].rows is None
    assert plan[1].rows is not None and set(plan[1].rows.tolist()) == set(c[:, 2].nonzero().squeeze(1).tolist())
    with torch.no_grad():
        y = lr(x, alpha)
        ref = lr.naive_forward(x, alpha)
        monkeypatch.setattr(ops, "SPARSE_SHARE", 0.0)  # the all-samples path
        y_all = lr(x, alpha)
        y_dense = dense(x, alpha)
    assert torch.allclose(y, ref, atol=1e-11)
    assert torch.allclose(y, y_all, atol=1e-11)
    assert torch.allclose(y_dense, ref, atol=1e-11)
    calls: list[int] = []
    real = ops.lowrank_linear
    monkeypatch.setattr(ops, "lowrank_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    off = alpha.clone()
    off[:, :, lr.blocks.index["fc1.weight"]] = 0.0  # fc1 runs as the base layer, fc2 is composed
    with torch.no_grad():
        y_off = lr(x, off)
        assert len(calls) == 1
        assert torch.allclose(y_off, lr.naive_forward(x, off), atol=1e-11)
        lr.skip_gated = False
        assert torch.allclose(lr(x, off), y_off, atol=1e-11) and len(calls) == 3
        lr.skip_gated = True
    a = alpha.clone().requires_grad_()
    assert ops.active_tasks(a[:, :, 0], col) is None  # a gradient to the coefficients needs every term
    a2 = alpha.clone().requires_grad_()
    lr(x, a).square().sum().backward()
    dense(x, a2).square().sum().backward()
    assert a.grad is not None and a2.grad is not None
    assert torch.allclose(a.grad, a2.grad, atol=1e-10)
    assert float(a.grad[:, :, -1].abs().sum()) > 0  # the zero block still gets its gradient


class _EmbNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8, padding_idx=0)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(idx)).mean(1)


def test_lowrank_embedding_composed_exact() -> None:
    from taskvec.variational import ComposedModel

    torch.manual_seed(0)
    model = _EmbNet().double().eval()
    tvs = _lowrank_tvs(model, 4)
    lr = ComposedModel(model, tvs)
    dense = ComposedModel(model, [TaskVector.from_tensors({k: tv[k] for k in tv.keys()}) for tv in tvs])
    assert "emb.weight" in lr.lowrank_keys
    idx = torch.randint(0, 30, (6, 7))
    idx[:, -1] = 0  # padding positions
    alpha = torch.rand(6, 4, lr.num_blocks, dtype=torch.float64, requires_grad=True)
    a2 = alpha.detach().clone().requires_grad_()
    y, y2 = lr(idx, alpha), dense(idx, a2)
    assert torch.allclose(y, y2, atol=1e-12)
    assert torch.allclose(y, lr.naive_forward(idx, alpha.detach()), atol=1e-12)
    y.sum().backward()
    y2.sum().backward()
    assert torch.allclose(alpha.grad, a2.grad, atol=1e-12)  # type: ignore[arg-type]
    assert not lr._cache  # no dense weights were formed


def test_small_vocabulary_embedding_tables_exact() -> None:
    """An embedding with fewer rows than indices per sample (token types) composes per-sample tables."""
    from taskvec.variational import ComposedModel

    torch.manual_seed(0)
    model = _EmbNet().double().eval()
    model.emb = torch.nn.Embedding(3, 8).double()
    g = torch.Generator().manual_seed(2)
    tvs = [
        TaskVector.from_tensors(
            {k: 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in model.state_dict().items()}
        )
        for _ in range(4)
    ]
    cm = ComposedModel(model, tvs)
    idx = torch.randint(0, 3, (6, 7))
    alpha = torch.rand(6, 4, cm.num_blocks, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(cm(idx, alpha), cm.naive_forward(idx, alpha), atol=1e-12)
