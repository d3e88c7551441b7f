"""Layer operations with per-sample composed weights, computed without per-sample weight loops.

Every function takes the base tensors (theta0), the stacked task vectors `t*` of shape (T, *shape)
and per-sample coefficients `c*` of shape (N, T) (None: that tensor is not composed; linear and
conv layers take them bundled as `Params`), and returns exactly f(x_n; theta0 + sum_k c_nk tau_k)
for every sample n. Two strategies:

* "linear":  f is linear in its weight, so y = f(x; W0) + sum_k c_nk f(x; tau_k): one wide op on
  the weights stacked along the output axis, then a per-sample contraction. Costs (T+1) times the
  base op; best when each sample has few positions (pooled features, late 2x2 conv maps).
* "batched": build W_n = W0 + c_n @ tau for a chunk of samples (one GEMM of depth T) and run one
  batched op (bmm, or a grouped convolution with N*groups groups). Costs the base op plus
  N*T*|W| multiply-adds; best when each sample has many positions (tokens, pixels).

Norm layers are exact and cheap either way: normalise with no affine, then apply the per-sample
(N, C) scale and shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from taskvec.errors import TaskVecError

Strategy = Literal["auto", "linear", "batched"]
IntPair = int | tuple[int, ...]
"""A conv stride, dilation or padding: one int for both spatial axes, or one per axis."""

CHUNK_ELEMS = 1 << 22
"""Per-sample weights are built for chunks of samples holding at most this many elements (16 MB f32)."""
CHECKPOINT_ELEMS = 1 << 26
"""With gradients on, batched weights larger than this (for the whole batch) are recomputed in backward."""
AUTO_POSITIONS = 2.0
AUTO_ROWS = 64
"""'auto' picks 'batched' when positions per sample >= AUTO_POSITIONS * T or the batch has fewer
than AUTO_ROWS positions in all, else 'linear' (the faster of the two on CPU in benchmarks/composed_forward.py)."""


class Params(NamedTuple):
    """A linear or conv layer's parameters, composed per sample: base weight `w0` and bias `b0`, each
    with its coefficients `c*` (N, T) and stacked task vectors `t*` (T, *shape), None where that
    tensor is not composed; `n` is N. Low-rank task vectors have no stack (`tw` None): their
    factors are passed beside."""

    w0: torch.Tensor
    b0: torch.Tensor | None
    cw: torch.Tensor | None
    tw: torch.Tensor | None
    cb: torch.Tensor | None
    tb: torch.Tensor | None
    n: int


def delta(c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """sum_k c_nk tau_k for every sample: (N, T) x (T, *shape) -> (N, *shape), one GEMM."""
    return (c @ tau.reshape(tau.shape[0], -1)).reshape(c.shape[0], *tau.shape[1:])


def composed(base: torch.Tensor, c: torch.Tensor | None, tau: torch.Tensor | None, n: int) -> torch.Tensor:
    """theta0 + sum_k c_nk tau_k as (N, *shape); the base broadcast as (1, *shape) when not composed."""
    if c is None or tau is None:
        return base.unsqueeze(0)
    return torch.addmm(base.reshape(1, -1), c, tau.reshape(tau.shape[0], -1)).reshape(n, *base.shape)


def batch_first(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """x with leading dimension n: a leading 1 is broadcast (shared inputs such as position ids)."""
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise TaskVecError(
        f"per-sample composition of {what}: its input has leading dimension {x.shape[0]} but there are "
        f"{n} coefficient rows; the model must be batch-first (batch on dimension 0 of every layer input)"
    )


def pick(strategy: Strategy, positions: int, t: int, n: int) -> Literal["linear", "batched"]:
    """'auto': batched when each sample has many positions (the T+1 wide op would cost more than
    building weights) or when the whole batch has few rows (small GEMMs are slow anyway)."""
    if strategy != "auto":
        return strategy
    return "batched" if positions >= AUTO_POSITIONS * t or n * positions < AUTO_ROWS else "linear"


def build(c1: torch.Tensor, stack: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weights [1, c_n] @ [W0; tau_1..T]: (n, T+1) x (T+1, *shape) -> (n, *shape).
    One GEMM of depth T+1 with no bias term (an addmm would first copy W0 into every row)."""
    flat = stack.reshape(stack.shape[0], -1)
    w = c1 @ flat if buf is None else torch.mm(c1, flat, out=buf[: c1.shape[0]])
    return w.reshape(c1.shape[0], *stack.shape[1:])


_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable scratch buffer for per-sample weights without gradients. Allocating a fresh
    multi-megabyte tensor per layer costs page faults that take longer than the GEMM filling it."""
    buf = _WORKSPACE.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[(device, dtype)] = torch.empty(max(numel, CHUNK_ELEMS), dtype=dtype, device=device)
    return buf[:numel]


def release_workspace() -> None:
    _WORKSPACE.clear()


def _chunked(
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, c1: torch.Tensor, stack: torch.Tensor
) -> torch.Tensor:
    """apply(x_chunk, W_chunk) over chunks of samples with W built per chunk, concatenated.

    Without gradients the weights go to a reused workspace; with gradients, batches whose
    per-sample weights exceed CHECKPOINT_ELEMS are checkpointed (weights rebuilt in backward)."""
    n, numel = x.shape[0], stack[0].numel()
    size = max(1, CHUNK_ELEMS // max(numel, 1))
    grad = torch.is_grad_enabled() and (c1.requires_grad or x.requires_grad)
    outs = []
    if not grad:
        buf = workspace(min(size, n) * numel, stack.dtype, stack.device).view(-1, numel)
        for s in range(0, n, size):
            outs.append(apply(x[s : s + size], build(c1[s : s + size], stack, buf)))
    else:
        ckpt = n * numel > CHECKPOINT_ELEMS

        def fn(xs: torch.Tensor, cs: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
            return apply(xs, build(cs, st))

        for s in range(0, n, size):
            xs, cs = x[s : s + size], c1[s : s + size]
            outs.append(checkpoint(_plain, fn, xs, cs, stack, use_reentrant=False) if ckpt else fn(xs, cs, stack))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class BatchedLinear(torch.autograd.Function):
    """y_n = x_n @ W_n^T with W_n = [1, c_n] @ stack, for x (N, P, in), c1 (N, T+1), stack (T+1, out, in).

    Per-sample weights live only in a reused workspace, chunk by chunk, in forward and backward
    alike (nothing of size N*|W| is kept for backward). Backward rebuilds W_n per chunk:
      dx_n = dy_n @ W_n,     dc1_n = <dy_n^T x_n, stack_k>_k  (one bmm, then one GEMM against the stack)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, c1: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, c1, stack)
        n, numel = x.shape[0], stack[0].numel()
        size = max(1, CHUNK_ELEMS // max(numel, 1))
        buf = workspace(min(size, n) * numel, stack.dtype, stack.device).view(-1, numel)
        out = x.new_empty(n, x.shape[1], stack.shape[1])
        for s in range(0, n, size):
            w = build(c1[s : s + size], stack, buf)
            torch.bmm(x[s : s + size], w.transpose(1, 2), out=out[s : s + size])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, c1, stack = ctx.saved_tensors
        n, numel = x.shape[0], stack[0].numel()
        size = max(1, CHUNK_ELEMS // max(numel, 1))
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        buf = workspace(2 * min(size, n) * numel, stack.dtype, stack.device).view(2, -1, numel)
        dx = torch.empty_like(x) if need_x else None
        dc = torch.empty_like(c1) if need_c else None
        flat = stack.reshape(stack.shape[0], -1)
        dy = dy.contiguous()
        for s in range(0, n, size):
            e = min(n, s + size)
            if need_x:
                w = build(c1[s:e], stack, buf[0])
                torch.bmm(dy[s:e], w, out=dx[s:e])  # type: ignore[index]
            if need_c:
                g = buf[1][: e - s].view(e - s, *stack.shape[1:])
                torch.bmm(dy[s:e].transpose(1, 2), x[s:e], out=g)  # (chunk, out, in)
                torch.mm(g.reshape(e - s, -1), flat.T, out=dc[s:e])  # type: ignore[index]
        return dx, dc, None


def _batched_matmul(x: torch.Tensor, c1: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """x (N, P, in) -> (N, P, out) with per-sample weights; the custom autograd path when it is needed."""
    if torch.is_grad_enabled() and (x.requires_grad or c1.requires_grad):
        with torch._C.DisableTorchFunction():
            return BatchedLinear.apply(x.contiguous(), c1, stack)
    return _chunked(lambda xs, w: torch.bmm(xs, w.transpose(1, 2)), x, c1, stack)


def _plain(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    # checkpoint recomputes this in backward, possibly while a composition mode is active: keep it out
    with torch._C.DisableTorchFunction():
        return fn(*args)


def _combine(z: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """z (N, M, T+1, P) contracted with c1 (N, T+1) over the T+1 axis -> (N, M, P)."""
    return torch.einsum("nmtp,nt->nmp", z, c1)


def _with_one(c: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones_like(c[:, :1]), c], dim=1)


# --------------------------------------------------------------------------- linear


def linear(
    x: torch.Tensor, layer: Params, strategy: Strategy = "auto", stacked: Callable[[str], torch.Tensor] | None = None
) -> torch.Tensor:
    """F.linear(x_n, W_n, b_n) for every sample; x is (N, ..., in). `stacked(layout)` gives cached
    weights: 'stack' (T+1, out, in) = [W0; tau], 'interleaved' ((out*(T+1)), in), row o*(T+1)+k."""
    w0, cw, tw, n = layer.w0, layer.cw, layer.tw, layer.n
    x = batch_first(x, n, "a linear layer")
    lead = x.shape[:-1]
    if cw is None or tw is None:
        y = F.linear(x, w0)
    else:
        xf = x.reshape(n, -1, x.shape[-1])
        p, t, out = xf.shape[1], tw.shape[0], w0.shape[0]
        get = stacked or (lambda layout: stack_weights(w0, tw, layout))
        if pick(strategy, p, t, n) == "batched":
            y = _batched_matmul(xf, _with_one(cw), get("stack"))
        else:
            wcat = get("interleaved").reshape(-1, w0.shape[1])
            z = F.linear(xf, wcat).reshape(n, p, out, t + 1)  # (n, p, out, T+1)
            y = (z @ _with_one(cw).reshape(n, 1, t + 1, 1)).reshape(n, p, out)
        y = y.reshape(*lead, out)
    return _add_bias(y, layer, channel_dim=-1)


def _add_bias(y: torch.Tensor, layer: Params, channel_dim: int) -> torch.Tensor:
    """y plus the per-sample bias b_n (n|1, out) along `channel_dim`: -1 for linear, 1 for conv."""
    if layer.b0 is None:
        return y
    b = composed(layer.b0, layer.cb, layer.tb, layer.n)
    lead = [1] * (y.dim() - 2)
    return y + (b.reshape(b.shape[0], *lead, -1) if channel_dim == -1 else b.reshape(b.shape[0], -1, *lead))


# --------------------------------------------------------------------------- conv2d


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _is_pointwise(w0: torch.Tensor, padding: str | IntPair, dilation: IntPair, groups: int) -> bool:
    if groups != 1 or w0.shape[-2:] != (1, 1):
        return False
    return padding in ("valid", "same") if isinstance(padding, str) else _pair(padding) == (0, 0)


def _conv_batched(
    x: torch.Tensor,
    w: torch.Tensor,
    w0: torch.Tensor,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    n = x.shape[0]  # w: (n, out, in/g, kh, kw)
    if _is_pointwise(w0, padding, dilation, groups):  # 1x1: a batched matmul per sample
        if stride != (1, 1):
            x = x[:, :, :: stride[0], :: stride[1]]
        h, wd = x.shape[-2:]
        y = torch.bmm(w.reshape(n, w0.shape[0], w0.shape[1]), x.reshape(n, x.shape[1], h * wd))
        return y.reshape(n, w0.shape[0], h, wd)
    y = F.conv2d(
        x.reshape(1, -1, *x.shape[-2:]), w.reshape(-1, *w0.shape[1:]), None, stride, padding, dilation, groups * n
    )
    return y.reshape(n, w0.shape[0], *y.shape[-2:])


def conv2d(
    x: torch.Tensor,
    layer: Params,
    stride: IntPair = 1,
    padding: str | IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    strategy: Strategy = "auto",
    stacked: Callable[[str], torch.Tensor] | None = None,
) -> torch.Tensor:
    """F.conv2d with per-sample weights (any groups, incl. depthwise); x is (N, C, H, W).
    `stacked(layout)` as for `linear` ('interleaved' keeps each group's output channels together)."""
    w0, cw, tw, n = layer.w0, layer.cw, layer.tw, layer.n
    x = batch_first(x, n, "a conv2d layer")
    if x.dim() != 4:
        raise TaskVecError(f"per-sample conv2d needs (N, C, H, W) inputs, got shape {tuple(x.shape)}")
    st, dl = _pair(stride), _pair(dilation)
    pad = padding if isinstance(padding, str) else _pair(padding)
    if cw is None or tw is None:
        y = F.conv2d(x, w0, None, st, pad, dl, groups)
    else:
        t, out = tw.shape[0], w0.shape[0]
        depthwise = groups > 1 and w0.shape[1] == 1
        # positions per sample of the output map (same-size estimate for string padding)
        hs = [math.ceil(x.shape[i + 2] / st[i]) for i in range(2)]
        positions = hs[0] * hs[1]
        mode = "batched" if (strategy == "auto" and depthwise) else pick(strategy, positions, t, n)
        get = stacked or (lambda layout: stack_weights(w0, tw, layout))
        grad = torch.is_grad_enabled() and (x.requires_grad or cw.requires_grad)
        if mode == "batched" and grad and _is_pointwise(w0, pad, dl, groups):  # custom backward, channels last
            xs = x[:, :, :: st[0], :: st[1]] if st != (1, 1) else x
            h, wd = xs.shape[-2:]
            stack = get("stack").reshape(t + 1, out, w0.shape[1])
            y = _batched_matmul(xs.reshape(n, xs.shape[1], h * wd).transpose(1, 2), _with_one(cw), stack)
            y = y.transpose(1, 2).reshape(n, out, h, wd)
        elif mode == "batched":
            y = _chunked(lambda xs, w: _conv_batched(xs, w, w0, st, pad, dl, groups), x, _with_one(cw), get("stack"))
        elif _is_pointwise(w0, pad, dl, groups):  # 1x1: one GEMM over all positions, channels last
            xs = x[:, :, :: st[0], :: st[1]] if st != (1, 1) else x
            h, wd = xs.shape[-2:]
            z = F.linear(xs.permute(0, 2, 3, 1), get("interleaved").reshape(-1, w0.shape[1]))
            z = z.reshape(n, h * wd, out, t + 1) @ _with_one(cw).reshape(n, 1, t + 1, 1)
            y = z.reshape(n, h, wd, out).permute(0, 3, 1, 2)
        else:
            wcat = get("interleaved")
            z = F.conv2d(x, wcat, None, st, pad, dl, groups)  # (n, out*(T+1), h, w)
            h, wd = z.shape[-2:]
            y = _combine(z.reshape(n, out, t + 1, h * wd), _with_one(cw)).reshape(n, out, h, wd)
    return _add_bias(y, layer, channel_dim=1)


def stack_weights(w0: torch.Tensor, tau: torch.Tensor, layout: str) -> torch.Tensor:
    """[W0; tau_1..T] as 'stack' (T+1, out, ...) or 'interleaved' (out*(T+1), ...), row o*(T+1)+k:
    the interleaved layout keeps each conv group's output channels together."""
    if layout == "stack":
        return torch.cat([w0.unsqueeze(0), tau])
    return torch.cat([w0.unsqueeze(1), tau.transpose(0, 1)], 1).reshape(-1, *w0.shape[1:])


# --------------------------------------------------------------------------- embedding


def embedding(
    idx: torch.Tensor,
    w0: torch.Tensor,
    cw: torch.Tensor,
    tw_rows: torch.Tensor,
    n: int,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """F.embedding(idx_n, W_n): base rows plus the T task-vector rows gathered at once and mixed per
    sample. `tw_rows` is tau laid out (V, T*D). Rows at `padding_idx` pass no gradient to the
    coefficients, as F.embedding passes none to that weight row."""
    idx = batch_first(idx, n, "an embedding")
    t, d = cw.shape[1], w0.shape[1]
    if w0.shape[0] <= idx[0].numel() and not cw.requires_grad:
        # fewer rows than indices per sample (token types): per-sample tables, then one gather each
        tables = composed(w0, cw, tw_rows.reshape(w0.shape[0], t, d).transpose(0, 1), n)  # (n, V, D)
        return tables[torch.arange(n, device=idx.device).reshape(n, *([1] * (idx.dim() - 1))), idx]
    base = F.embedding(idx, w0, padding_idx)
    g = F.embedding(idx, tw_rows).reshape(n, -1, t, d)  # (n, L, T, D)
    mix = (cw.reshape(n, 1, 1, t) @ g).reshape(base.shape)
    return base + _no_pad_grad(mix, idx, padding_idx, w0.shape[0])


def _no_pad_grad(mix: torch.Tensor, idx: torch.Tensor, padding_idx: int | None, rows: int) -> torch.Tensor:
    """`mix` with no gradient at positions reading the padding row."""
    if padding_idx is None or not mix.requires_grad:
        return mix
    pad = (idx == (padding_idx % rows)).unsqueeze(-1)
    return torch.where(pad, mix.detach(), mix)


# --------------------------------------------------------------------------- norms


def _affine(y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, channel_dims: int) -> torch.Tensor:
    """y * w + b with w, b of shape (N|1, *channel shape) placed right after the batch axis
    (channel_dims=1 for BatchNorm/GroupNorm) or at the end (channel_dims=0, LayerNorm)."""

    def shape(v: torch.Tensor) -> torch.Tensor:
        if channel_dims:
            return v.reshape(v.shape[0], -1, *([1] * (y.dim() - 2)))
        return v.reshape(v.shape[0], *([1] * (y.dim() - v.dim())), *v.shape[1:])

    if w is not None and b is not None:
        return torch.addcmul(shape(b), y, shape(w))  # one pass over y
    if w is not None:
        y = y * shape(w)
    if b is not None:
        y = y + shape(b)
    return y


def layer_norm(
    x: torch.Tensor, shape: list[int], w: torch.Tensor | None, b: torch.Tensor | None, eps: float, n: int
) -> torch.Tensor:
    """Per-sample LayerNorm: normalise, then per-sample weight (N, *shape) and bias."""
    x = batch_first(x, n, "a layer norm")
    return _affine(F.layer_norm(x, shape, None, None, eps), w, b, 0)


def group_norm(
    x: torch.Tensor, groups: int, w: torch.Tensor | None, b: torch.Tensor | None, eps: float, n: int
) -> torch.Tensor:
    x = batch_first(x, n, "a group norm")
    return _affine(F.group_norm(x, groups, None, None, eps), w, b, 1)


def batch_norm_eval(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    eps: float,
    n: int,
) -> torch.Tensor:
    """Per-sample BatchNorm in eval mode: running statistics and affine all (N|1, C).
    y = x * s + (b - mean * s) with s = w / sqrt(var + eps): one scale and one shift per channel."""
    x = batch_first(x, n, "a batch norm")
    s = torch.rsqrt(var + eps)
    if w is not None:
        s = s * w
    shift = -mean * s
    if b is not None:
        shift = shift + b
    return _affine(x, s, shift, 1)


# --------------------------------------------------------------------------- low-rank task vectors


def lowrank_coef(c: torch.Tensor, s: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of every factor column: c[n, task of column] * s[column], (N, R)."""
    return c[:, col] * s


def lowrank_merged(w0: torch.Tensor, a: torch.Tensor, fac: Factored) -> torch.Tensor:
    """W0 + sum_k a_k U_k diag(s_k) V_k^T for shared coefficients a (T,), in W0's shape."""
    u, s, v, col = fac
    return w0 + ((u * (a[col] * s)) @ v.T).reshape(w0.shape)


Factored = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(u, s, v, col): T task vectors' factors concatenated along the rank axis, u (out, R), s (R,),
v (in, R), col (R,) the task of each column; tau_k = u[:, col==k] diag(s[col==k]) v[:, col==k]^T."""


def _lowrank_scale(layer: Params, fac: Factored) -> torch.Tensor:
    """lowrank_coef of the weight's coefficients, which low-rank task vectors always have: (N, R)."""
    if layer.cw is None:
        raise TaskVecError("a low-rank composed weight needs its per-sample coefficients")
    return lowrank_coef(layer.cw, fac[1], fac[3])


SPARSE_SHARE = 0.35
SPARSE_MIN_RANK = 12
"""Without gradients to the coefficients, a low-rank layer computes each task's factors only for
the samples whose coefficient is nonzero when at most SPARSE_SHARE of its (sample, task) pairs are
nonzero and its tasks' factors have SPARSE_MIN_RANK columns or more on average. The gated
variational composer keeps about a quarter to a third of its coefficients at test time. With
fewer columns the gather and scatter of each task's rows cost more than the skipped products
(measured on CPU in benchmarks/lowrank.py forward)."""


class TaskRows(NamedTuple):
    """One task's factor columns `cols` and the samples `rows` with a nonzero coefficient (None: all)."""

    task: int
    cols: slice
    rows: torch.Tensor | None


def active_tasks(c: torch.Tensor, col: torch.Tensor) -> list[TaskRows] | None:
    """The per-task work of a low-rank layer whose coefficients c (N, T) are mostly zero; None when
    the all-samples path is the one to take (a gradient to c is needed, or few coefficients are zero)."""
    if torch.is_grad_enabled() and c.requires_grad:
        return None
    n, t = c.shape
    if col.shape[0] < SPARSE_MIN_RANK * t:
        return None
    active = c != 0
    counts = active.sum(0).tolist()
    if sum(counts) > SPARSE_SHARE * n * t:
        return None
    ranks = torch.bincount(col, minlength=t).tolist()
    out, start = [], 0
    for k in range(t):
        cols, start = slice(start, start + ranks[k]), start + ranks[k]
        if counts[k]:
            out.append(TaskRows(k, cols, None if counts[k] == n else active[:, k].nonzero().squeeze(1)))
    return out


FactorRows = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""u and v of a `Factored` as contiguous rows, (R, out) and (R, in), so that one task's factors
are a contiguous block: given by the caller, which forms them once (`ComposedModel.factor_rows`)."""


def _factor_rows(fac: Factored, rows: FactorRows | None) -> tuple[torch.Tensor, torch.Tensor]:
    return rows() if rows is not None else (fac[0].T.contiguous(), fac[2].T.contiguous())


def lowrank_linear(x: torch.Tensor, layer: Params, fac: Factored, rows: FactorRows | None = None) -> torch.Tensor:
    """F.linear(x_n, W0 + sum_k c_nk U_k diag(s_k) V_k^T, b_n) without forming any weight:
    y = b_n + x W0^T + ((x V) * (c_n[col] s)) U^T, with the task factors concatenated along the
    rank axis (`Factored`): the low-rank part is one GEMM of depth R added in place to the base
    output. Costs R (in + out) multiply-adds per position beside the base's in * out; with mostly
    zero coefficients and no gradient to them, each task's factors touch only its samples."""
    u, s, v, col = fac
    w0, b0, n = layer.w0, layer.b0, layer.n
    x = batch_first(x, n, "a linear layer")
    lead, d_in, d_out = x.shape[:-1], x.shape[-1], w0.shape[0]
    xf = x.reshape(-1, d_in)
    p = xf.shape[0] // n
    if b0 is not None and layer.cb is not None and layer.tb is not None:
        # the output starts as each sample's bias, as F.linear starts from its bias: no extra pass
        b = composed(b0, layer.cb, layer.tb, n)
        y = b.repeat_interleave(p, 0).addmm_(xf, w0.T)  # a new (n * P, out) tensor, row i = b_{i // P}
    else:
        y = F.linear(xf, w0, b0)
    cw = layer.cw
    tasks = active_tasks(cw, col) if cw is not None else None
    if tasks is None:
        z = (xf @ v).reshape(n, p, -1) * _lowrank_scale(layer, fac).unsqueeze(1)  # (n, P, R)
        return y.addmm_(z.reshape(n * p, -1), u.T).reshape(*lead, d_out)
    assert cw is not None
    x3, y3 = xf.view(n, p, d_in), y.view(n, p, d_out)
    ut, vt = _factor_rows(fac, rows)  # a task's factors as contiguous row blocks
    for k, cols, rows_k in tasks:
        if rows_k is None:
            z = (xf @ vt[cols].T).view(n, p, -1) * (cw[:, k, None] * s[cols]).unsqueeze(1)
            y.addmm_(z.view(n * p, -1), ut[cols])
            continue
        m = rows_k.shape[0]
        z = (x3.index_select(0, rows_k).view(-1, d_in) @ vt[cols].T).view(m, p, -1)
        z = z * (cw[rows_k, k, None] * s[cols]).unsqueeze(1)
        y3.index_add_(0, rows_k, (z.view(m * p, -1) @ ut[cols]).view(m, p, d_out))
    return y.reshape(*lead, d_out)


def lowrank_embedding(
    idx: torch.Tensor, w0: torch.Tensor, cw: torch.Tensor, fac: Factored, n: int, padding_idx: int | None = None
) -> torch.Tensor:
    """F.embedding(idx_n, W0 + sum_k c_nk U_k diag(s_k) V_k^T): gather the R factor entries of each
    index (rows of U), weight them per sample, and map them out with V; rows at `padding_idx`
    pass no gradient to the coefficients (as `embedding` does)."""
    u, s, v, col = fac
    idx = batch_first(idx, n, "an embedding")
    base = F.embedding(idx, w0, padding_idx)
    g = F.embedding(idx, u).reshape(n, -1, u.shape[1]) * lowrank_coef(cw, s, col).unsqueeze(1)
    return base + _no_pad_grad((g @ v.T).reshape(base.shape), idx, padding_idx, w0.shape[0])


def lowrank_conv2d(
    x: torch.Tensor,
    layer: Params,
    fac: Factored,
    stride: IntPair = 1,
    padding: str | IntPair = 0,
    dilation: IntPair = 1,
    rows: FactorRows | None = None,
) -> torch.Tensor:
    """F.conv2d (groups = 1) with per-sample W0 + sum_k c_nk U_k diag(s_k) V_k^T, the factors of
    the (out, in*kh*kw) matrix: a conv with the R kernels V^T, a per-sample scale of its R
    channels, and a 1x1 conv with U (LoRA's form)."""
    u, s, v, col = fac
    w0, n = layer.w0, layer.n
    x = batch_first(x, n, "a conv2d layer")
    st, dl = _pair(stride), _pair(dilation)
    pad = padding if isinstance(padding, str) else _pair(padding)
    r = v.shape[1]
    kernels = _factor_rows(fac, rows)[1].view(r, *w0.shape[1:])
    y = F.conv2d(x, w0, None, st, pad, dl)
    cw = layer.cw
    tasks = active_tasks(cw, col) if cw is not None else None
    if tasks is None:
        z = F.conv2d(x, kernels, None, st, pad, dl)  # (n, R, h, w)
        z = z * _lowrank_scale(layer, fac).reshape(n, r, 1, 1)
        y = y + F.conv2d(z, u.reshape(*u.shape, 1, 1))
    else:
        assert cw is not None
        for k, cols, rows_k in tasks:
            xs = x if rows_k is None else x.index_select(0, rows_k)
            ck = cw[:, k] if rows_k is None else cw[rows_k, k]
            z = F.conv2d(xs, kernels[cols], None, st, pad, dl)
            z = z * (ck[:, None] * s[cols]).reshape(*z.shape[:2], 1, 1)
            d = F.conv2d(z, u[:, cols].reshape(u.shape[0], -1, 1, 1))
            y = y + d if rows_k is None else y.index_add_(0, rows_k, d)
    return _add_bias(y, layer, channel_dim=1)
