"""The composed model: theta(x) = theta0 + sum_k sum_b alpha_kb(x) tau_kb, run efficiently.

`ComposedModel` wraps a frozen backbone and T task vectors. `model(inputs, alpha)` runs the
backbone with
  * shared coefficients, alpha of shape (T, B): one `torch.func.functional_call` with the merged
    weights theta0 + sum alpha * tau (any layer type; used by the learned-coefficient baselines);
  * per-sample coefficients, alpha of shape (N, T, B): a TorchFunctionMode intercepts the layer
    functions that read a composed tensor (F.linear, F.conv2d, F.embedding, F.layer_norm,
    F.group_norm, F.batch_norm in eval mode; a class token's Tensor.expand over the batch) and runs
    them with per-sample weights through `taskvec.variational.ops`, never looping over samples. The
    mode sees the functional call, so subclasses with their own forward (TF "same"-padding convs, HF
    layers) work unchanged. Any other op that reads a composed tensor raises, naming the tensor,
    instead of silently using theta0.

`naive_forward` is the reference: a Python loop of functional_call per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from taskvec.core.coef import matches
from taskvec.core.factored import factors_of
from taskvec.core.taskvector import TaskVector
from taskvec.errors import KeyMismatchError, ShapeMismatchError, TaskVecError
from taskvec.variational import ops
from taskvec.variational.blocks import BlockRule, BlockSpec, make_blocks

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]
TaskVectorLike = TaskVector | Mapping[str, torch.Tensor]


def default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """model(x) for a tensor; model(**x) for a dict, mean-pooled over the attention mask when the
    output has `last_hidden_state` (sentence features of a transformers encoder)."""
    if isinstance(inputs, Mapping):
        out = model(**inputs)
        if hasattr(out, "last_hidden_state"):
            h = out.last_hidden_state
            mask = inputs.get("attention_mask")
            if mask is None:
                return h.mean(1)
            m = mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return out
    return model(inputs)


def take(inputs: Any, index: torch.Tensor | slice) -> Any:
    """Rows `index` of a tensor, or of every tensor in a dict (batch on dimension 0)."""
    if isinstance(inputs, Mapping):
        return {k: take(v, index) for k, v in inputs.items()}
    return inputs[index]


def to_device(inputs: Any, device: torch.device | str) -> Any:
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def _read(tv: TaskVectorLike, key: str) -> torch.Tensor:
    return tv[key]


def _keys(tv: TaskVectorLike) -> list[str]:
    return list(tv.keys())


class ComposedModel(nn.Module):
    """A frozen backbone plus stacked task vectors; forward(inputs, alpha) runs theta(alpha).

    Composed tensors: the floating parameters and buffers of `backbone` that every task vector
    holds (narrowed by `include`/`exclude` globs). Task vector tensors the backbone lacks are an
    error unless excluded. `blocks` groups tensors into the B coefficient columns (see BlockRule).
    `strategy` ('auto', 'linear', 'batched', or a {glob: strategy} map) picks the per-sample
    algorithm per layer. The backbone's parameters are frozen (requires_grad=False).
    With `lowrank` (default), a tensor that every task vector holds as factors (a low-rank task
    vector, a LoRA adapter) is kept as those factors: linear and ungrouped conv layers then run
    y = W0 x + sum_k alpha_k U_k (s_k * (V_k^T x)) without forming weights (shared coefficients
    merge from the factors); other layers reading it get dense weights formed once.
    """

    def __init__(
        self,
        backbone: nn.Module,
        task_vectors: Sequence[TaskVectorLike],
        *,
        blocks: BlockRule | BlockSpec = "tensor",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        strategy: ops.Strategy | Mapping[str, ops.Strategy] = "auto",
        forward_fn: ForwardFn = default_forward,
        task_names: Sequence[str] | None = None,
        lowrank: bool = True,
    ):
        super().__init__()
        if not task_vectors:
            raise ValueError("a composed model needs at least one task vector")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.forward_fn = forward_fn
        self.strategy = strategy
        self.skip_gated = True
        """Per-sample forwards run a linear, conv or embedding layer as the base layer when every
        coefficient of its block is zero and no gradient to them is needed (False: compose it anyway)."""
        own: dict[str, torch.Tensor] = dict(backbone.named_parameters(remove_duplicate=False))
        own.update(dict(backbone.named_buffers(remove_duplicate=False)))
        common = set(_keys(task_vectors[0]))
        for tv in task_vectors[1:]:
            common &= set(_keys(tv))
        wanted = [k for k in _keys(task_vectors[0]) if k in common and matches(k, include, exclude)]
        missing = [k for k in wanted if k not in own]
        if missing:
            raise KeyMismatchError(
                f"task vector tensors not in the backbone: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                "(exclude them, or pass the backbone they belong to)"
            )
        order = {k: i for i, k in enumerate(own)}
        keys = sorted((k for k in wanted if own[k].is_floating_point()), key=order.__getitem__)
        if not keys:
            raise KeyMismatchError("the task vectors share no floating tensor with the backbone")
        self.keys: list[str] = keys
        self.blocks: BlockSpec = blocks if isinstance(blocks, BlockSpec) else make_blocks(keys, blocks)
        if set(self.blocks.index) != set(keys):
            raise KeyMismatchError("the block spec does not cover exactly the composed tensors")
        self.num_tasks = len(task_vectors)
        self.task_names = (
            list(task_names)
            if task_names is not None
            else [getattr(tv, "name", f"task{i}") for i, tv in enumerate(task_vectors)]
        )
        self._slot: dict[str, int] = {}
        self._lowrank: set[str] = set()
        for i, k in enumerate(keys):
            ref = own[k]
            if lowrank and self._store_factors(i, k, ref, task_vectors):
                continue
            taus = []
            for tv in task_vectors:
                t = _read(tv, k)
                if tuple(t.shape) != tuple(ref.shape):
                    raise ShapeMismatchError(
                        f"tensor {k!r}: task vector shape {list(t.shape)}, backbone {list(ref.shape)}"
                    )
                taus.append(t.to(device=ref.device, dtype=ref.dtype))
            # stored as [theta0; tau_1..T] (T+1, *shape): the batched per-sample forward builds
            # W_n = [1, c_n] @ stack in one GEMM; tau(k) is a view of rows 1..T
            self.register_buffer(f"stack_{i}", torch.stack([ref.detach().clone(), *taus]), persistent=False)
            self._slot[k] = i
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def _store_factors(self, i: int, key: str, ref: torch.Tensor, task_vectors: Sequence[TaskVectorLike]) -> bool:
        """Keep tensor `key` as the task vectors' factors, concatenated along the rank axis, if
        every task vector holds it as factors: u (out, R), s (R,), v (in, R), col (R,) = task."""
        if ref.dim() < 2:
            return False
        found = [factors_of(tv, key) if isinstance(tv, TaskVector) else None for tv in task_vectors]
        fs = [f for f in found if f is not None and tuple(f.shape) == tuple(ref.shape)]
        if len(fs) != len(found):
            return False
        dev, dt = ref.device, ref.dtype
        self.register_buffer(f"lr_u_{i}", torch.cat([f.u.to(dev, dt) for f in fs], 1), persistent=False)
        self.register_buffer(f"lr_s_{i}", torch.cat([f.s.to(dev, dt) for f in fs]), persistent=False)
        self.register_buffer(f"lr_v_{i}", torch.cat([f.v.to(dev, dt) for f in fs], 1), persistent=False)
        col = torch.cat([torch.full((f.rank,), t, dtype=torch.long) for t, f in enumerate(fs)])
        self.register_buffer(f"lr_col_{i}", col.to(dev), persistent=False)
        self._slot[key] = i
        self._lowrank.add(key)
        return True

    # ----- access
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def lowrank_keys(self) -> list[str]:
        """Composed tensors held as the task vectors' factors (their per-sample forward never forms weights)."""
        return [k for k in self.keys if k in self._lowrank]

    def factors(self, key: str) -> ops.Factored:
        """(u, s, v, col) of a low-rank tensor: tau_k = u[:, col==k] diag(s[col==k]) v[:, col==k]^T."""
        i = self._slot[key]
        return (
            getattr(self, f"lr_u_{i}"),
            getattr(self, f"lr_s_{i}"),
            getattr(self, f"lr_v_{i}"),
            getattr(self, f"lr_col_{i}"),
        )

    def factor_rows(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """u and v of a low-rank tensor as contiguous rows, (R, out) and (R, in), formed once."""
        u, _, v, _ = self.factors(key)
        return self.cached("lr_ut", key, lambda: u.T.contiguous()), self.cached("lr_vt", key, lambda: v.T.contiguous())

    def tau(self, key: str) -> torch.Tensor:
        """Stacked task vectors of tensor `key`: (T, *shape) (a low-rank tensor's formed from its
        factors, each call)."""
        if key in self._lowrank:  # formed on demand, not kept
            return self._dense_stack(key)[1:]
        return getattr(self, f"stack_{self._slot[key]}")[1:]

    def stack(self, key: str) -> torch.Tensor:
        """[theta0; tau_1..T] of tensor `key`: (T+1, *shape) (theta0 copied when the model was built;
        for a low-rank tensor, formed once from the factors for the layers that need dense weights)."""
        if key in self._lowrank:
            return self.cached("stack", key, lambda: self._dense_stack(key))
        return getattr(self, f"stack_{self._slot[key]}")

    def _dense_stack(self, key: str) -> torch.Tensor:
        u, s, v, col = self.factors(key)
        w0 = self.named_base()[key].detach()
        taus = [((u[:, col == t] * s[col == t]) @ v[:, col == t].T).reshape(w0.shape) for t in range(self.num_tasks)]
        return torch.stack([w0, *taus])

    def clear_cache(self) -> None:
        """Forget derived weight layouts (call after changing the backbone's weights in place)."""
        self._cache.clear()

    def named_base(self) -> dict[str, torch.Tensor]:
        own: dict[str, torch.Tensor] = dict(self.backbone.named_parameters(remove_duplicate=False))
        own.update(dict(self.backbone.named_buffers(remove_duplicate=False)))
        return own

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> ComposedModel:
        self._cache.clear()
        return super()._apply(fn, recurse)

    def cached(self, kind: str, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A derived, frozen tensor (stacked weights, row layouts), built once per device/dtype."""
        t = self._cache.get((kind, key))
        if t is None:
            t = self._cache[(kind, key)] = make()
        return t

    def strategy_for(self, key: str) -> ops.Strategy:
        if isinstance(self.strategy, str):
            return self.strategy
        for pattern, s in self.strategy.items():
            from fnmatch import fnmatchcase

            if fnmatchcase(key, pattern):
                return s
        return "auto"

    # ----- composition
    def merged(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta0 + sum_kb alpha_kb tau_kb for shared coefficients alpha (T, B), composed tensors only."""
        self._check(alpha, shared=True)
        c1 = torch.cat([alpha.new_ones(1, alpha.shape[1]), alpha]).T  # (B, T+1): [1, alpha_b]
        base = self.named_base() if self._lowrank else {}
        return {
            k: ops.lowrank_merged(base[k], alpha[:, self.blocks.index[k]], self.factors(k))
            if k in self._lowrank
            else ops.build(c1[self.blocks.index[k]].unsqueeze(0), self.stack(k))[0]
            for k in self.keys
        }

    def forward(self, inputs: Any, alpha: torch.Tensor) -> torch.Tensor:
        """Backbone output under coefficients alpha: (T, B) shared by all samples or (N, T, B) per sample."""
        if alpha.dim() == 2:
            return self._call_merged(inputs, alpha)
        self._check(alpha, shared=False)
        with self.per_sample(alpha):
            return self.forward_fn(self.backbone, inputs)

    def _call_merged(self, inputs: Any, alpha: torch.Tensor) -> torch.Tensor:
        """forward_fn(backbone, inputs) under torch.func.functional_call with the merged weights."""
        params = {f"backbone.{k}": v for k, v in self.merged(alpha).items()}
        with _EvalBatchNorm():
            return torch.func.functional_call(_Runner(self.backbone, self.forward_fn), params, (inputs,), strict=False)

    @contextmanager
    def per_sample(self, alpha: torch.Tensor) -> Iterator[None]:
        """Inside this context the backbone (called any way) runs with per-sample coefficients."""
        with _PerSampleMode(self, alpha):
            yield

    def _check(self, alpha: torch.Tensor, shared: bool) -> None:
        want = (self.num_tasks, self.num_blocks)
        got = tuple(alpha.shape[-2:])
        if got != want or alpha.dim() != (2 if shared else 3):
            raise ShapeMismatchError(
                f"coefficients must have shape {'(T, B)' if shared else '(N, T, B)'} = {'' if shared else '(N, '}"
                f"{want[0]}, {want[1]}), got {tuple(alpha.shape)}"
            )

    def naive_forward(self, inputs: Any, alpha: torch.Tensor) -> torch.Tensor:
        """Reference: one functional_call with merged weights per sample (slow, for tests and benchmarks)."""
        self._check(alpha, shared=False)
        outs = []
        for n in range(alpha.shape[0]):
            outs.append(self._call_merged(take(inputs, slice(n, n + 1)), alpha[n]))
        return torch.cat(outs)


class _Runner(nn.Module):
    """forward_fn(backbone, inputs) as a module, so that functional_call can run any forward function."""

    def __init__(self, backbone: nn.Module, forward_fn: ForwardFn):
        super().__init__()
        self.backbone = backbone
        self.forward_fn = forward_fn

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.forward_fn(self.backbone, inputs)


class _EvalBatchNorm(TorchFunctionMode):
    """Eval-mode F.batch_norm written out, so that merged running statistics can carry gradient
    (the native kernel refuses gradients w.r.t. running_mean/running_var)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            rm, rv = _get(args, kwargs, 1, "running_mean"), _get(args, kwargs, 2, "running_var")
            training = _get(args, kwargs, 5, "training", False)
            if not training and rm is not None and rv is not None and (rm.requires_grad or rv.requires_grad):
                x, w, b = _get(args, kwargs, 0, "input"), _get(args, kwargs, 3, "weight"), _get(args, kwargs, 4, "bias")

                def f(t: torch.Tensor | None) -> torch.Tensor | None:
                    return None if t is None else t.unsqueeze(0)

                return ops.batch_norm_eval(
                    x, rm.unsqueeze(0), rv.unsqueeze(0), f(w), f(b), _get(args, kwargs, 7, "eps", 1e-5), x.shape[0]
                )
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the per-sample mode


def _get(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


_Weighted = tuple[Any, str | None, ops.Params]


class _PerSampleMode(TorchFunctionMode):
    def __init__(self, model: ComposedModel, alpha: torch.Tensor):
        super().__init__()
        self.model = model
        self.n = alpha.shape[0]
        self.coef = alpha.permute(2, 0, 1)  # (B, N, T): coef[b] is (N, T)
        base = model.named_base()
        self.key_of = {id(base[k]): k for k in model.keys}
        # linear, conv and embedding layers of blocks whose coefficients are all zero (gated out for the
        # whole batch) run as the base layer, unless the coefficients need their gradient
        skip = model.skip_gated and not (torch.is_grad_enabled() and alpha.requires_grad)
        self.off: set[int] = set(torch.nonzero(~self.coef.flatten(1).any(1)).flatten().tolist()) if skip else set()

    # (N, T) coefficients and stacked taus of a tensor argument, or (None, None) if not composed
    def _ct(
        self, t: Any, dense: bool = True, skip_off: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
        k = self.key_of.get(id(t)) if isinstance(t, torch.Tensor) else None
        if k is None or (skip_off and self.model.blocks.index[k] in self.off):
            return None, None, None
        if k in self.model._lowrank:  # None: the caller composes from the factors; else dense weights formed once
            return self.coef[self.model.blocks.index[k]], None if not dense else self.model.stack(k)[1:], k
        tau = self.model.tau(k)
        return self.coef[self.model.blocks.index[k]], tau, k

    def _gated_out(self, *ts: Any) -> bool:
        """True if one of the tensors is composed but its block's coefficients are all zero."""
        return any(isinstance(t, torch.Tensor) and id(t) in self.key_of for t in ts)

    @overload
    def _full(self, t: torch.Tensor) -> torch.Tensor: ...
    @overload
    def _full(self, t: None) -> None: ...
    def _full(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """(N|1, *shape) per-sample tensor (composed) or the base with a leading 1."""
        if t is None:
            return None
        c, tau, _ = self._ct(t)
        return ops.composed(t, c, tau, self.n)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(self, args, kwargs)
            if out is not NotImplemented:
                return out
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and self.key_of:
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    if isinstance(t, torch.Tensor) and id(t) in self.key_of:
                        name = getattr(func, "__name__", str(func))
                        raise TaskVecError(
                            f"composed tensor {self.key_of[id(t)]!r} is used by {name}, which per-sample composition "
                            "does not support (supported: linear, conv2d, embedding, layer_norm, group_norm, "
                            "batch_norm in eval mode, expand over the batch); exclude it from the composition"
                        )
        return out

    def _stacked(
        self, key: str | None, w: torch.Tensor, tau: torch.Tensor | None
    ) -> Callable[[str], torch.Tensor] | None:
        if key is None or tau is None:
            return None
        return lambda layout: (
            self.model.stack(key)
            if layout == "stack"
            else self.model.cached(layout, key, lambda: ops.stack_weights(w, tau, layout))
        )

    def _weighted(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _Weighted | None:
        """Input, the weight's key, and the weight and bias with their coefficients and taus, of a
        linear or conv call; None when neither weight nor bias is composed."""
        x, w, b = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight"), _get(args, kwargs, 2, "bias")
        cw, tw, kw = self._ct(w, dense=False, skip_off=True)
        cb, tb, _ = self._ct(b, skip_off=True)
        if kw is None and cb is None:
            if self._gated_out(w, b):  # the base layer, on inputs that must still match the coefficients
                ops.batch_first(x, self.n, "a linear or conv layer")
            return None
        return x, kw, ops.Params(w, b, cw, tw, cb, tb, self.n)

    # ----- handlers: return NotImplemented when no argument is composed
    def linear(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        got = self._weighted(args, kwargs)
        if got is None:
            return NotImplemented
        x, kw, p = got
        if p.cw is not None and p.tw is None:  # low-rank task vectors: never form the weights
            assert kw is not None  # a weight's coefficients come with its key
            return ops.lowrank_linear(x, p, self.model.factors(kw), lambda: self.model.factor_rows(kw))
        return ops.linear(x, p, self.model.strategy_for(kw or ""), self._stacked(kw, p.w0, p.tw))

    def conv2d(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        got = self._weighted(args, kwargs)
        if got is None:
            return NotImplemented
        x, kw, p = got
        stride, padding = _get(args, kwargs, 3, "stride", 1), _get(args, kwargs, 4, "padding", 0)
        dilation, groups = _get(args, kwargs, 5, "dilation", 1), _get(args, kwargs, 6, "groups", 1)
        if p.cw is not None and p.tw is None:
            assert kw is not None  # a weight's coefficients come with its key
            if groups == 1:  # low-rank task vectors: never form the weights
                rows = lambda: self.model.factor_rows(kw)  # noqa: E731
                return ops.lowrank_conv2d(x, p, self.model.factors(kw), stride, padding, dilation, rows)
            p = p._replace(tw=self.model.stack(kw)[1:])
        stacked = self._stacked(kw, p.w0, p.tw)
        strategy = self.model.strategy_for(kw or "")
        return ops.conv2d(x, p, stride, padding, dilation, groups, strategy, stacked)

    def embedding(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        idx, w = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight")
        cw, tw, kw = self._ct(w, dense=False, skip_off=True)
        if kw is None:
            if self._gated_out(w):
                ops.batch_first(idx, self.n, "an embedding")
            return NotImplemented
        assert cw is not None  # a composed weight has coefficients
        if _get(args, kwargs, 3, "max_norm") is not None:
            raise TaskVecError(
                f"embedding {kw!r} uses max_norm (renormalises weights in place): not composable per sample"
            )
        if tw is None:  # low-rank task vectors: never form the weights
            pad = _get(args, kwargs, 2, "padding_idx")
            return ops.lowrank_embedding(idx, w, cw, self.model.factors(kw), self.n, pad)
        rows = self.model.cached("rows", kw, lambda: tw.transpose(0, 1).reshape(tw.shape[1], -1).contiguous())
        return ops.embedding(idx, w, cw, rows, self.n, _get(args, kwargs, 2, "padding_idx"))

    def layer_norm(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        x, shape = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "normalized_shape")
        w, b, eps = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "bias"), _get(args, kwargs, 4, "eps", 1e-5)
        if self._ct(w)[2] is None and self._ct(b)[2] is None:
            return NotImplemented
        return ops.layer_norm(x, list(shape), self._full(w), self._full(b), eps, self.n)

    def group_norm(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        x, g = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "num_groups")
        w, b, eps = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "bias"), _get(args, kwargs, 4, "eps", 1e-5)
        if self._ct(w)[2] is None and self._ct(b)[2] is None:
            return NotImplemented
        return ops.group_norm(x, g, self._full(w), self._full(b), eps, self.n)

    def batch_norm(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        x, rm, rv = (
            _get(args, kwargs, 0, "input"),
            _get(args, kwargs, 1, "running_mean"),
            _get(args, kwargs, 2, "running_var"),
        )
        w, b = _get(args, kwargs, 3, "weight"), _get(args, kwargs, 4, "bias")
        training, eps = _get(args, kwargs, 5, "training", False), _get(args, kwargs, 7, "eps", 1e-5)
        if all(self._ct(t)[2] is None for t in (rm, rv, w, b)):
            return NotImplemented
        if training or rm is None or rv is None:
            raise TaskVecError(
                "per-sample composition of batch norm needs eval mode with running statistics "
                "(call backbone.eval(); batch statistics would mix the samples' compositions)"
            )
        return ops.batch_norm_eval(x, self._full(rm), self._full(rv), self._full(w), self._full(b), eps, self.n)

    def expand(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """A composed tensor broadcast over the batch, such as a ViT's class token
        `cls.expand(batch, 1, -1)`: the per-sample tensors (N, *shape), expanded to the sizes."""
        t = args[0]
        c, tau, k = self._ct(t)
        if k is None:
            return NotImplemented
        sizes = list(args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:])
        sizes = list(kwargs.get("size", sizes))
        lead = len(sizes) - t.dim()
        if lead < 1 or sizes[0] != self.n:
            raise TaskVecError(
                f"composed tensor {k!r} is expanded to {tuple(sizes)}: per-sample composition needs the batch "
                f"({self.n}) as a new leading dimension; exclude it from the composition"
            )
        full = ops.composed(t, c, tau, self.n)
        return full.view(self.n, *([1] * (lead - 1)), *t.shape).expand(*sizes)


_HANDLERS: dict[Any, Callable[[_PerSampleMode, tuple[Any, ...], Mapping[str, Any]], Any]] = {
    torch.Tensor.expand: _PerSampleMode.expand,
    F.linear: _PerSampleMode.linear,
    F.conv2d: _PerSampleMode.conv2d,
    F.embedding: _PerSampleMode.embedding,
    F.layer_norm: _PerSampleMode.layer_norm,
    F.group_norm: _PerSampleMode.group_norm,
    F.batch_norm: _PerSampleMode.batch_norm,
}
