"""The per-sample composed forward equals a per-sample loop of functional_call (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskvec import TaskVector
from taskvec.errors import ShapeMismatchError, TaskVecError
from taskvec.variational import ComposedModel, make_blocks, ops

T = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _taus(model: nn.Module, seed: int, scale: float = 0.1, offset: float = 0.1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    # relative perturbations keep composed BatchNorm variances positive
    return [
        {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) * (v.abs() + offset) for k, v in sd.items()}
        for _ in range(T)
    ]


def _check(
    model: nn.Module, inputs, n: int, strategy: str = "auto", blocks="tensor", seed: int = 0, atol: float = 1e-11
):
    model = model.double().eval()
    cm = ComposedModel(model, _taus(model, seed), strategy=strategy, blocks=blocks)
    g = torch.Generator().manual_seed(seed + 1)
    alpha = (torch.rand(n, T, cm.num_blocks, generator=g, dtype=torch.float64) - 0.3).requires_grad_()
    y = cm(inputs, alpha)
    ref = cm.naive_forward(inputs, alpha)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-10)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((y * w).sum(), alpha)
    (gr,) = torch.autograd.grad((ref * w).sum(), alpha)
    torch.testing.assert_close(ga, gr, atol=atol, rtol=1e-9)
    return cm, alpha


def _img(n: int, c: int = 4, h: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, c, h, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


STRATEGIES = ["linear", "batched", "auto"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_2d_and_3d(strategy: str) -> None:
    _check(nn.Linear(6, 5), torch.randn(4, 6, dtype=torch.float64), 4, strategy)
    _check(nn.Linear(6, 5), torch.randn(4, 7, 6, dtype=torch.float64), 4, strategy)
    _check(nn.Linear(6, 5, bias=False), torch.randn(4, 2, 3, 6, dtype=torch.float64), 4, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "conv",
    [
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "dilation": 2, "bias": False},
        {"in_channels": 4, "out_channels": 6, "kernel_size": 2, "groups": 2, "padding": "same"},
        {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "groups": 4, "padding": 1},  # depthwise, multiplier 2
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 4, "stride": 2},  # depthwise
        {"in_channels": 4, "out_channels": 5, "kernel_size": 1},  # pointwise (batched matmul)
        {"in_channels": 4, "out_channels": 5, "kernel_size": 1, "stride": 2, "bias": False},
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    ],
)
def test_conv2d(conv: dict, strategy: str) -> None:
    _check(nn.Conv2d(**conv), _img(3), 3, strategy)


def test_embedding_with_padding_idx() -> None:
    emb = nn.Embedding(20, 5, padding_idx=0)
    idx = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    idx[:, -2:] = 0
    _check(emb, idx, 4)
    _check(nn.Embedding(20, 5), idx[:1], 1)


def test_embedding_padding_row_passes_no_gradient() -> None:
    emb = nn.Embedding(5, 3, padding_idx=0).double()
    taus = [{"weight": torch.ones(5, 3, dtype=torch.float64)} for _ in range(T)]
    cm = ComposedModel(emb, taus)
    alpha = torch.rand(2, T, 1, dtype=torch.float64, requires_grad=True)
    y = cm(torch.zeros(2, 4, dtype=torch.long), alpha)
    (g,) = torch.autograd.grad(y.sum(), alpha)
    assert torch.count_nonzero(g) == 0
    torch.testing.assert_close(y, cm.naive_forward(torch.zeros(2, 4, dtype=torch.long), alpha))


def test_norm_layers() -> None:
    _check(nn.LayerNorm(6), torch.randn(4, 3, 6, dtype=torch.float64), 4)
    _check(nn.LayerNorm([3, 6]), torch.randn(4, 3, 6, dtype=torch.float64), 4)
    _check(nn.GroupNorm(2, 4), _img(3), 3)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    _check(bn, _img(3), 3)  # running statistics are composed too
    _check(bn, _img(3), 3, blocks="module")


def test_batchnorm_train_mode_is_refused() -> None:
    bn = nn.BatchNorm2d(4).double()
    cm = ComposedModel(bn, _taus(bn, 0))
    bn.train()
    with pytest.raises(TaskVecError, match="eval mode"):
        cm(_img(2), torch.zeros(2, T, cm.num_blocks, dtype=torch.float64))


class SmallCNN(nn.Module):
    """conv / depthwise / BN / pooling / linear, like an EfficientNet block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 5)
        for bn in (self.bn0, self.bn1):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.bn0(self.stem(x)))
        x = torch.nn.functional.silu(self.bn1(self.dw(x)))
        x = self.pw(x).mean((2, 3))
        return self.fc(x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_small_cnn(strategy: str) -> None:
    _check(SmallCNN(), torch.randn(5, 3, 12, 12, dtype=torch.float64), 5, strategy, blocks="module")


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_bert(strategy: str) -> None:
    bert = _tiny_bert()
    ids = torch.randint(1, 40, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    _check(bert, {"input_ids": ids, "attention_mask": mask}, 4, strategy)
    _check(bert, {"input_ids": ids, "attention_mask": mask}, 4, strategy, blocks="module", seed=5)


def test_efficientnet_lite0() -> None:
    """The real model (TF-same-padding conv subclasses, depthwise convs, BN in eval). float32:
    float64 convolutions take PyTorch's slow per-group path (tens of seconds); the small float64
    CNN above covers the same layer types exactly."""
    try:
        from taskvec.bench.assets import load_efficientnet_lite0

        model = load_efficientnet_lite0()
    except Exception as e:  # noqa: BLE001 - the asset package is optional
        pytest.skip(f"EfficientNet-Lite0 not available: {e}")
    taus = _taus(model, 0, scale=0.05, offset=0.0)
    cm = ComposedModel(model, taus)
    assert cm.num_blocks == len([k for k, v in model.state_dict().items() if v.is_floating_point()])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    alpha = torch.rand(3, T, cm.num_blocks, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y, ref = cm(x, alpha), cm.naive_forward(x, alpha)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    (ga,) = torch.autograd.grad(y.sum(), alpha)
    (gr,) = torch.autograd.grad(ref.sum(), alpha)
    torch.testing.assert_close(ga, gr, atol=1e-3 * float(gr.abs().max()), rtol=1e-3)


def test_chunking_and_checkpointing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks and recomputation in backward give the same values and gradients."""
    monkeypatch.setattr(ops, "CHUNK_ELEMS", 40)
    monkeypatch.setattr(ops, "CHECKPOINT_ELEMS", 10)
    _check(nn.Linear(6, 5), torch.randn(7, 4, 6, dtype=torch.float64), 7, "batched")
    _check(SmallCNN(), torch.randn(5, 3, 12, 12, dtype=torch.float64), 5, "batched")


def test_gradcheck_per_sample_coefficients() -> None:
    model = SmallCNN().double().eval()
    cm = ComposedModel(model, _taus(model, 0), blocks="all")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    alpha = torch.rand(2, T, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: cm(x, a), (alpha,))


def test_batched_linear_function_gradcheck() -> None:
    """The custom autograd of per-sample matmuls (weights rebuilt in backward, chunked)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c1 = torch.randn(5, T + 1, generator=g, dtype=torch.float64, requires_grad=True)
    stack = torch.randn(T + 1, 6, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.BatchedLinear.apply(a, b, stack), (x, c1))
    ref = torch.einsum("npi,noi->npo", x, torch.einsum("nk,koi->noi", c1, stack))
    torch.testing.assert_close(ops.BatchedLinear.apply(x, c1, stack), ref)


def test_shared_coefficients_equal_merged_model() -> None:
    """alpha (T, B) uses functional_call on theta0 + sum alpha*tau: equal to TaskVector.apply_to."""
    model = SmallCNN().double().eval()
    taus = _taus(model, 0)
    cm = ComposedModel(model, taus, blocks=["stem*", "bn*", "*"])
    assert cm.blocks.names == ("stem*", "bn*", "*")
    alpha = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6], [1.0, 0.0, 0.2]], dtype=torch.float64)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    tvs = [TaskVector.from_tensors(t) for t in taus]
    merged = model
    for k, tv in enumerate(tvs):
        coef = {p: float(alpha[k, b]) for b, p in enumerate(cm.blocks.names)}
        merged = tv.apply_to(merged, coef)
    torch.testing.assert_close(cm(x, alpha), merged(x), atol=1e-12, rtol=1e-12)
    # and per-sample coefficients that are all equal give the same output
    torch.testing.assert_close(cm(x, alpha.expand(3, -1, -1)), merged(x), atol=1e-12, rtol=1e-12)


def test_task_vector_objects_and_subset() -> None:
    model = SmallCNN().double().eval()
    tvs = [TaskVector.from_tensors(t) for t in _taus(model, 0)]
    cm = ComposedModel(model, tvs, exclude=["bn*"])
    assert all(not k.startswith("bn") for k in cm.keys)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    a = torch.rand(2, T, cm.num_blocks, dtype=torch.float64)
    torch.testing.assert_close(cm(x, a), cm.naive_forward(x, a))


def test_unsupported_use_of_a_composed_tensor_raises() -> None:
    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w.T

    m = Raw().double()
    cm = ComposedModel(m, _taus(m, 0))
    with pytest.raises(TaskVecError, match="'w'"):
        cm(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, T, 1, dtype=torch.float64))
    # the shared path (functional_call) handles any op
    out = cm(torch.randn(2, 3, dtype=torch.float64), torch.zeros(T, 1, dtype=torch.float64))
    assert out.shape == (2, 4)


def test_shape_errors() -> None:
    m = nn.Linear(3, 2).double()
    cm = ComposedModel(m, _taus(m, 0))
    with pytest.raises(ShapeMismatchError):
        cm(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, T + 1, 2, dtype=torch.float64))
    with pytest.raises(TaskVecError, match="batch-first"):
        cm(torch.randn(3, 3, dtype=torch.float64), torch.zeros(2, T, 2, dtype=torch.float64))


def test_make_blocks_rules() -> None:
    keys = ["a.weight", "a.bias", "b.weight"]
    assert make_blocks(keys, "tensor").names == tuple(keys)
    assert make_blocks(keys, "module").names == ("a", "b")
    assert make_blocks(keys, "all").index == {k: 0 for k in keys}
    spec = make_blocks(keys, {"first": ["a.*"], "rest": ["*"]})
    assert spec.index == {"a.weight": 0, "a.bias": 0, "b.weight": 1}
    with pytest.raises(TaskVecError, match="no pattern"):
        make_blocks(keys, ["a.*"])
