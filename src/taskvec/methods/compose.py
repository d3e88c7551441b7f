"""`compose`: merge task vectors with a registered method into one lazy task vector."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from taskvec.core.coef import Coef, check_coef_map, resolve
from taskvec.core.stream import CHUNK_ELEMS, chunks, prefetch, read_into
from taskvec.core.taskvector import TaskVector, all_finite, check_same_tensors, compute_dtype
from taskvec.errors import ConfigError
from taskvec.io import Source, TensorSpec
from taskvec.methods.onepass import Trim, block_layout, combine_fn, merge_tensor
from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, get_method, parse_params
from taskvec.methods.selection import BLOCK, magnitude_threshold, select_threshold


def _nan_as_zero(x: torch.Tensor) -> torch.Tensor:
    """NaN (only in task vectors read with allow_nonfinite) ranks as 0 when thresholds are found:
    it is never among the kept entries' order statistics, and the threshold search stays defined."""
    return x if all_finite(x) or not bool(torch.isnan(x).any()) else torch.where(torch.isnan(x), 0.0, x)


class ComposedSource:
    """The merged delta, computed slice by slice from the task vectors' slices."""

    def __init__(
        self,
        tvs: Sequence[TaskVector],
        method: MergeMethod,
        params: MethodParams,
        weights: Sequence[Coef],
        device: torch.device | None = None,
    ):
        if not tvs:
            raise ValueError("compose needs at least one task vector")
        for tv in tvs[1:]:
            check_same_tensors(tvs[0].source, tv.source)
        self.tvs, self.method, self.params, self.weights = list(tvs), method, params, list(weights)
        for w, tv in zip(self.weights, self.tvs, strict=True):
            check_coef_map(w, tvs[0].keys(), f"weight map of {tv.name}")
        self.device = device or torch.device("cpu")  # where the per-slice arithmetic runs
        self.name = (
            f"{method.name}({', '.join(tv.name for tv in tvs)})" if len(tvs) < 4 else f"{method.name} of {len(tvs)}"
        )
        self._thresholds: dict[str, torch.Tensor] = {}
        self._buffers: list[torch.Tensor] = []  # see `_buffer`
        self._lock = threading.Lock()
        # trimming methods on the CPU merge each tensor whole, in one pass over the inputs (`onepass`)
        self._combine = combine_fn(method, params) if self.device.type == "cpu" else None
        self._held: dict[str, _Held] = {}
        self._held_lock = threading.Lock()

    def keys(self) -> list[str]:
        return self.tvs[0].keys()

    def spec(self, key: str) -> TensorSpec:
        specs = [tv.spec(key) for tv in self.tvs]
        return TensorSpec(specs[0].shape, compute_dtype(*(s.dtype for s in specs)))

    def thresholds(self, key: str) -> torch.Tensor:
        """Per-task (threshold, cut) of the whole tensor (see `magnitude_threshold`)."""
        with self._lock:  # one computation per tensor even when its slices are merged in parallel
            return self._thresholds_locked(key)

    def _thresholds_locked(self, key: str) -> torch.Tensor:
        if key not in self._thresholds:
            assert self.method.magnitude_density is not None
            density = self.method.magnitude_density(self.params)
            spec = self.spec(key)
            nbytes = spec.numel * spec.dtype.itemsize if spec.numel * spec.dtype.itemsize <= WHOLE_TENSOR_BYTES else 0
            free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
            for i in range(min(THRESHOLD_WORKERS, len(self.tvs))):
                free.put(self._buffer(i, nbytes))

            def one(tv: TaskVector) -> tuple[float, float]:
                buf = free.get()
                try:
                    return tensor_threshold(tv.source, key, density, self.device, buffer=buf)
                finally:
                    free.put(buf)

            with ThreadPoolExecutor(THRESHOLD_WORKERS, thread_name_prefix="taskvec-threshold") as pool:
                vals = list(pool.map(one, self.tvs))
            if len(self._thresholds) >= 8:  # a few tensors' worth: slices of neighbouring tensors run in parallel
                self._thresholds.pop(next(iter(self._thresholds)))
            self._thresholds[key] = torch.tensor(vals, dtype=torch.float64)
        return self._thresholds[key]

    def _buffer(self, i: int, nbytes: int) -> torch.Tensor:
        """Whole-tensor buffer `i` of the threshold computations, of at least `nbytes`, reused from
        tensor to tensor: a new buffer that large would be mapped fresh from the system each time,
        and page-faulting it in costs more CPU than the selection."""
        while len(self._buffers) <= i:
            self._buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._buffers[i].numel() < nbytes:
            self._buffers[i] = torch.empty(0, dtype=torch.uint8, device=self.device)  # freed before the new one
            self._buffers[i] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._buffers[i]

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        for tv in self.tvs:
            prefetch(tv.source, key, start, stop)

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        spec = self.spec(key)
        stop = spec.numel if stop is None else stop
        if self._combine is not None:
            return self._read_held(key, start, stop)
        return self._merge_slice(key, start, stop)

    def _read_held(self, key: str, start: int, stop: int) -> torch.Tensor:
        """A slice of the whole merged tensor: the first slice asked for merges it (the others
        wait), and it is let go once every element has been read."""
        with self._held_lock:
            held = self._held.get(key)
            owner = held is None
            if held is None:
                held = self._held[key] = _Held()
        if owner:
            try:
                held.out = self._merge_whole(key)
            except BaseException as e:
                held.error = e
                with self._held_lock:
                    self._held.pop(key, None)
                raise
            finally:
                held.done.set()
        held.done.wait()
        if held.error is not None:
            raise held.error
        assert held.out is not None
        with self._held_lock:
            held.served += stop - start
            if held.served >= held.out.numel() and self._held.get(key) is held:
                del self._held[key]
        return held.out[start:stop]

    def _merge_whole(self, key: str) -> torch.Tensor:
        """Tensor `key` merged in one pass (`onepass.merge_tensor`), or in two when that gives up."""
        assert self._combine is not None and self.method.magnitude_density is not None
        spec = self.spec(key)
        weights = torch.tensor([resolve(w, key) for w in self.weights], dtype=spec.dtype)
        layout = block_layout(spec.numel, CHUNK_ELEMS, _merge_block(len(self.tvs), spec.dtype))
        out = torch.empty(spec.numel, dtype=spec.dtype)
        density = self.method.magnitude_density(self.params)
        sources = [tv.source for tv in self.tvs]
        table = merge_tensor(Trim(sources, key, spec.numel, spec.dtype, weights, density, self._combine, layout, out))
        if table is None:
            for s, e in chunks(spec.numel):
                out[s:e] = self._merge_slice(key, s, e)
        else:
            with self._lock:
                if len(self._thresholds) >= 8:
                    self._thresholds.pop(next(iter(self._thresholds)))
                self._thresholds[key] = table
        return out

    def _merge_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Slice [start, stop) of tensor `key` merged block by block (thresholds from a first pass)."""
        spec = self.spec(key)
        dev = self.device
        weights = torch.tensor([resolve(w, key) for w in self.weights], dtype=spec.dtype).to(dev)
        thresholds = self.thresholds(key).to(dev) if self.method.magnitude_density is not None else None
        # The method works entry by entry: merge in blocks whose stacked deltas stay small, in a
        # buffer reused from block to block (no large allocation, and the data stays in cache).
        t = len(self.tvs)
        block = _merge_block(t, spec.dtype)
        buf = _scratch((t, min(block, stop - start)), spec.dtype)
        out = torch.empty(stop - start, dtype=spec.dtype)
        for s in range(start, max(stop, start + 1), block):
            e = min(stop, s + block)
            deltas = buf[:, : e - s]
            for i, tv in enumerate(self.tvs):
                read_into(tv.source, key, s, e, deltas[i])
            ctx = SliceContext(key=key, start=s, stop=e, numel=spec.numel, thresholds=thresholds)
            out[s - start : e - start] = self.method.merge(deltas.to(dev), weights, self.params, ctx).cpu()
        return out


def _merge_block(t: int, dtype: torch.dtype) -> int:
    """Columns per merge block: T of them take about `MERGE_BLOCK_BYTES`."""
    return max(1 << 12, MERGE_BLOCK_BYTES // (t * dtype.itemsize))


class _Held:
    """A merged tensor held while its slices are read."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.served = 0


THRESHOLD_WORKERS = 2  # task vectors whose thresholds are computed at once (each holds one tensor)
MERGE_BLOCK_BYTES = 8 << 20  # stacked deltas per merge block
_local = threading.local()


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of at least `shape`, reused across slices."""
    buf = getattr(_local, "buf", None)
    n = shape[0] * shape[1]
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _local.buf = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def tensor_threshold(
    source: Source,
    key: str,
    density: float,
    device: torch.device | None = None,
    *,
    buffer: torch.Tensor | None = None,
) -> tuple[float, float]:
    """`magnitude_threshold` of tensor `key` of `source`, read slice by slice: into one buffer of
    the whole tensor (on `device`) when it is small enough, else re-read on each pass. `buffer`
    (flat uint8, on `device`) is used for the whole tensor when it holds enough bytes."""
    spec = source.spec(key)
    n = spec.numel
    nbytes = n * spec.dtype.itemsize
    if nbytes <= WHOLE_TENSOR_BYTES:
        if buffer is not None and buffer.numel() >= nbytes and buffer.dtype == torch.uint8:
            whole = buffer[:nbytes].view(spec.dtype)
        else:
            whole = torch.empty(n, dtype=spec.dtype, device=device)
        for s, e in chunks(n):
            read_into(source, key, s, e, whole[s:e])
        return magnitude_threshold(_nan_as_zero(whole), density)
    blocks = lambda: (_nan_as_zero(source.read_flat(key, s, e).to(device)) for s, e in chunks(n, BLOCK))  # noqa: E731
    return select_threshold(blocks, n, spec.dtype, density)


WHOLE_TENSOR_BYTES = 256 << 20


def compose(
    task_vectors: Sequence[TaskVector],
    method: str = "task_arithmetic",
    weights: Coef | Sequence[Coef] | None = None,
    *,
    device: str | torch.device | None = None,
    **params: object,
) -> TaskVector:
    """Merge `task_vectors` with a registered method into one lazy task vector.

    `weights`: one coefficient for all, or one per task vector (a number or a {glob: number} map).
    `params`: the method's options, e.g. `density=0.2` for TIES; unknown options are errors.
    `device`: where the per-slice arithmetic runs (e.g. "cuda"); reading and writing stay on the CPU.
    Apply the result with `merged.apply_to(base, coef=lam)`.
    """
    m = get_method(method)
    p = parse_params(m, dict(params))
    if weights is None:
        ws: list[Coef] = [1.0] * len(task_vectors)
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        ws = list(weights)
    else:
        ws = [weights] * len(task_vectors)
    if len(ws) != len(task_vectors):
        raise ValueError(f"{len(task_vectors)} task vectors but {len(ws)} weights")
    return TaskVector(ComposedSource(task_vectors, m, p, ws, resolve_device(device)))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device that exists here; a clear error otherwise."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected cpu or cuda")
    return dev
