#!/usr/bin/env python3
"""Streaming-merge benchmark: taskvec vs. mergekit on a synthetic ~1B-parameter fp16 Llama.

Requirement measured
--------------------
Streaming merge of N = 8 task vectors into a synthetic 1B-parameter fp16 checkpoint
(sharded safetensors, generated here): wall time and peak RSS.  Peak RSS must stay
under 2 GiB while every checkpoint is 2 GiB (18 GiB of inputs: base + 8 fine-tuned).
Throughput is reported in GB/s of input read, beside the machine's measured sequential
read speed of the same files (the upper limit).  The same merges with mergekit
(``task_arithmetic`` and ``ties``), installed in its own virtual environment, run in
the same invocation: our time / mergekit's time and the peak memory of both.

Usage
-----
    python3 benchmarks/streaming_merge.py                       # full run (~18 GiB inputs)
    python3 benchmarks/streaming_merge.py --params 5e7 --n-models 2   # quick smoke run
    python3 benchmarks/streaming_merge.py --skip-mergekit       # only taskvec

Everything heavy lives under ``--workdir`` (default /tmp/taskvec-bench), never inside the
repository.  Generation is deterministic (fixed seeds) and re-runnable: shards that
already exist are skipped.  The Markdown report goes to
``benchmarks/results/streaming_merge.md`` (and stdout); raw numbers to a JSON file beside it.

Measurement
-----------
* Page cache is dropped before every timed run (``sync; echo 3 > /proc/sys/vm/drop_caches``,
  needs root); if that is refused, every input file is evicted with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` instead, and the report says so.
* Each merge runs as a child process under ``/usr/bin/time -v`` (kernel high-water RSS of
  the largest process in the tree) while a thread polls ``/proc/<pid>/status`` of the whole
  process tree every 50 ms (sum of VmRSS, split into anonymous and file-backed pages).
  "peak RSS" in the table is the larger of the two.  File-backed RSS (mmap'd safetensors
  pages) is reclaimable page cache but it *is* counted in RSS, so it is shown separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("/tmp/taskvec-bench")
DEFAULT_MERGEKIT_VENV = Path("/tmp/mergekit-venv")
TORCH_PIN = "torch==2.13.0"
GiB = 1024**3
GB = 1e9

METHODS = ("task_arithmetic", "ties")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# mergekit environment
# --------------------------------------------------------------------------------------


def ensure_mergekit_env(venv: Path = DEFAULT_MERGEKIT_VENV) -> str:
    """Create mergekit's own venv if missing; return the installed mergekit version.

    torch is installed first and pinned (an unpinned torch would pull a multi-GB CUDA
    build); a constraints file keeps mergekit's dependencies from replacing it.
    """
    py = venv / "bin" / "python"
    mk = venv / "bin" / "mergekit-yaml"
    if not mk.exists():
        log(f"creating mergekit venv at {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        pip = [str(py), "-m", "pip", "install", "--quiet"]
        subprocess.run(pip + ["--upgrade", "pip", "wheel"], check=True)
        subprocess.run(pip + [TORCH_PIN], check=True)
        subprocess.run(pip + ["-c", str(constraints), "mergekit"], check=True)
    r = subprocess.run([str(mk), "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`mergekit-yaml --help` failed:\n{r.stdout}\n{r.stderr}")
    r = subprocess.run(
        [str(py), "-c",
         "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True, text=True, check=True,
    )
    return r.stdout.strip()


# --------------------------------------------------------------------------------------
# synthetic checkpoint
# --------------------------------------------------------------------------------------

# (hidden, intermediate, heads, kv_heads) presets, widest first.
_PRESETS = [
    (2048, 5632, 16, 4),   # TinyLlama-1.1B widths
    (1024, 2816, 16, 4),
    (512, 1408, 8, 4),
    (256, 704, 4, 2),
    (128, 352, 4, 2),
]


def llama_config(target_params: float) -> dict:
    """Llama config whose parameter count is close to ``target_params``.

    Widths come from the widest preset whose embeddings stay a minority of the model;
    the layer count and then the vocabulary size (multiple of 64) absorb the rest, so
    1.0737e9 (= 2 GiB in fp16) is hit within a few MB.
    """
    for hidden, inter, heads, kv in _PRESETS:
        head_dim = hidden // heads
        per_layer = (2 * hidden * hidden + 2 * hidden * kv * head_dim
                     + 3 * hidden * inter + 2 * hidden)
        vocab0 = 32000
        layers = round((target_params - 2 * vocab0 * hidden - hidden) / per_layer)
        if layers >= 2 and 2 * vocab0 * hidden <= 0.5 * target_params:
            break
    else:
        hidden, inter, heads, kv = _PRESETS[-1]
        head_dim = hidden // heads
        per_layer = (2 * hidden * hidden + 2 * hidden * kv * head_dim
                     + 3 * hidden * inter + 2 * hidden)
        layers = 2
    rest = target_params - layers * per_layer - hidden
    vocab = max(1024, int(round(rest / (2 * hidden) / 64)) * 64)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "use_cache": True,
    }


def llama_tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kvd, h)),
            (p + "self_attn.v_proj.weight", (kvd, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def shard_plan(specs, shard_bytes: int, itemsize: int = 2) -> list[list[tuple[str, tuple]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _seed(model_idx: int, tensor_idx: int) -> int:
    return 1_000_003 * (model_idx + 1) + 7919 * tensor_idx + 12345


def generate_model(out: Path, cfg: dict, model_idx: int, base_dir: Path | None,
                   shard_bytes: int, delta_std: float) -> None:
    """Write one sharded HF folder, one tensor at a time (at most one shard in memory).

    model_idx 0 is the base: N(0, 0.02) matrices, ones for RMSNorm weights.
    model_idx k >= 1: base + N(0, (delta_std * (1 + (k-1)/4))^2), cast to fp16.
    Shards are written atomically (tmp + rename) and skipped when already present.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "model.safetensors.index.json"
    specs = llama_tensor_specs(cfg)
    plan = shard_plan(specs, shard_bytes)
    n = len(plan)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    if index_path.exists() and all((out / nm).exists() for nm in names):
        return
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    weight_map: dict[str, str] = {}
    total = 0
    base_index = None
    if base_dir is not None:
        base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    scale = delta_std * (1.0 + (model_idx - 1) / 4.0)
    tidx = 0
    for shard, fname in zip(plan, names):
        for name, shape in shard:
            weight_map[name] = fname
            total += math.prod(shape) * 2
        path = out / fname
        if path.exists():
            tidx += len(shard)
            continue
        tensors = {}
        for name, shape in shard:
            g = torch.Generator().manual_seed(_seed(model_idx, tidx))
            tidx += 1
            if base_dir is None:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.float16)
                else:
                    t = (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
            else:
                with safe_open(str(base_dir / base_index[name]), framework="pt") as f:
                    b = f.get_tensor(name)
                d = torch.randn(shape, generator=g).mul_(scale)
                t = d.add_(b.float()).to(torch.float16)
                del b, d
            tensors[name] = t.contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def generate_all(workdir: Path, n_models: int, params: float, shard_bytes: int,
                 delta_std: float) -> tuple[Path, list[Path], dict]:
    cfg = llama_config(params)
    models = workdir / "models"
    base = models / "base"
    fts = [models / f"ft{k}" for k in range(1, n_models + 1)]
    # A changed config (e.g. another --params) must not reuse stale shards.
    stamp = models / "generation.json"
    meta = {"config": cfg, "n_models": n_models, "shard_bytes": shard_bytes,
            "delta_std": delta_std, "version": 1}
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("config") != cfg or old.get("shard_bytes") != shard_bytes or \
                old.get("delta_std") != delta_std or old.get("version") != 1:
            log(f"generation parameters changed: removing {models}")
            shutil.rmtree(models)
    models.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(meta, indent=2) + "\n")
    nparams = sum(math.prod(s) for _, s in llama_tensor_specs(cfg))
    log(f"synthetic Llama: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}: {nparams:,} params = {nparams * 2 / GiB:.3f} GiB fp16")
    for k, d in enumerate([base] + fts):
        t0 = time.time()
        generate_model(d, cfg, k, None if k == 0 else base, shard_bytes, delta_std)
        dt = time.time() - t0
        if dt > 1:
            log(f"generated {d.name} in {dt:.1f} s")
    return base, fts, cfg


def model_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# --------------------------------------------------------------------------------------
# page cache + measurement
# --------------------------------------------------------------------------------------


def drop_caches(files: list[Path]) -> str:
    """Evict the page cache; returns how ("drop_caches", "fadvise" or "none")."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    ok = True
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return "fadvise" if ok else "none"


def sequential_read(files: list[Path], block: int = 16 * 1024 * 1024) -> tuple[float, int]:
    """Read the files once, in order, with 16 MiB readinto(); returns (seconds, bytes)."""
    buf = bytearray(block)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


def _status_kib(pid: int) -> tuple[int, int, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            txt = f.read()
    except OSError:
        return None
    vals = {}
    for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
        m = re.search(rf"^{key}:\s+(\d+) kB", txt, re.M)
        vals[key] = int(m.group(1)) if m else 0
    return vals["VmRSS"], vals["RssAnon"], vals["RssFile"] + vals["RssShmem"]


@dataclass
class RunResult:
    cmd: list[str]
    rc: int
    wall_s: float
    peak_tree_rss: int = 0        # bytes, polled sum over the process tree
    peak_tree_anon: int = 0
    peak_tree_file: int = 0
    maxrss_kernel: int = 0        # bytes, /usr/bin/time -v (largest single process)
    user_s: float = 0.0
    sys_s: float = 0.0
    cache: str = ""
    log: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def peak_rss(self) -> int:
        return max(self.peak_tree_rss, self.maxrss_kernel)


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None,
                 poll_s: float = 0.05) -> RunResult:
    """Run ``cmd`` under /usr/bin/time -v while polling RSS of its whole process tree."""
    from taskvec._optional import require

    psutil = require("psutil", "bench")

    timev = shutil.which("time") and Path("/usr/bin/time").exists()
    time_out = log_path.with_suffix(".timev")
    full = (["/usr/bin/time", "-v", "-o", str(time_out)] if timev else []) + cmd
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peaks = [0, 0, 0]
    stop = threading.Event()

    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)

        def poll() -> None:
            # Cheap on purpose (the machine has 2 cores): the process tree is re-listed once
            # a second, RSS is read from /proc/<pid>/status every poll_s.
            root = psutil.Process(proc.pid)
            pids: list[int] = [proc.pid]
            listed = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if now - listed >= 1.0:
                    try:
                        pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
                    except psutil.Error:
                        pids = [proc.pid]
                    listed = now
                tot = [0, 0, 0]
                for pid in pids:
                    s = _status_kib(pid)
                    if s:
                        for k in range(3):
                            tot[k] += s[k] * 1024
                for k in range(3):
                    peaks[k] = max(peaks[k], tot[k])
                stop.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, 15)
            raise
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    res = RunResult(cmd=cmd, rc=rc, wall_s=wall, peak_tree_rss=peaks[0],
                    peak_tree_anon=peaks[1], peak_tree_file=peaks[2], log=str(log_path))
    if timev and time_out.exists():
        txt = time_out.read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt)
        if m:
            res.maxrss_kernel = int(m.group(1)) * 1024
        m = re.search(r"User time \(seconds\): ([\d.]+)", txt)
        res.user_s = float(m.group(1)) if m else 0.0
        m = re.search(r"System time \(seconds\): ([\d.]+)", txt)
        res.sys_s = float(m.group(1)) if m else 0.0
    return res


# --------------------------------------------------------------------------------------
# the two tools
# --------------------------------------------------------------------------------------


def mergekit_config(method: str, base: Path, fts: list[Path], density: float,
                    compute_dtype: str) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for ft in fts:
        lines.append(f"  - model: {ft}")
        params = "weight: 1.0" + (f", density: {density}" if method == "ties" else "")
        lines.append(f"    parameters: {{{params}}}")
    # dtype = compute dtype of the merge; out_dtype = what is written.
    lines += [f"dtype: {compute_dtype}", "out_dtype: float16"]
    if method == "ties":
        # mergekit defaults for ties (spelled out): TIES-paper "sum" sign election,
        # normalize=true = disjoint mean (divide by the summed weights of agreeing models).
        lines += ["parameters:", "  normalize: true", "  lambda: 1.0"]
    else:
        lines += ["parameters:", "  normalize: false", "  lambda: 1.0"]
    return "\n".join(lines) + "\n"


def taskvec_config(method: str, base: Path, fts: list[Path], density: float) -> str:
    lines = [f"method: {method}", f"base: {base}", "models:"]
    for ft in fts:
        lines += [f"  - finetuned: {ft}", "    weight: 1.0"]
    if method == "ties":
        lines.append(f"params: {{density: {density}}}")
    lines += ["scale: 1.0", "dtype: float16", "shard_size: 1GB"]
    return "\n".join(lines) + "\n"


def mergekit_cmd(venv: Path, cfg_path: Path, out: Path, shard_params: str,
                 threads: int | None) -> list[str]:
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(cfg_path), str(out),
           "--lazy-unpickle", "--no-cuda", "--device", "cpu",
           "--out-shard-size", shard_params,
           "--no-copy-tokenizer", "--no-write-model-card", "--no-async-write",
           "--quiet"]
    if threads:
        cmd += ["-j", str(threads)]
    return cmd


def taskvec_invocation() -> list[str] | None:
    """How to call our CLI, or None if it is not available yet."""
    if not (REPO_ROOT / "src" / "taskvec" / "cli").exists() and \
            not (REPO_ROOT / "src" / "taskvec" / "cli.py").exists():
        return None
    check = [sys.executable, "-c", "import taskvec"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        if (REPO_ROOT / "pyproject.toml").exists():
            log("taskvec not importable: pip install -e . --no-deps")
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e",
                            str(REPO_ROOT), "--no-deps"], check=False)
    candidates = []
    exe = shutil.which("taskvec")
    if exe:
        candidates.append([exe])
    candidates.append([sys.executable, "-m", "taskvec"])
    for c in candidates:
        r = subprocess.run(c + ["merge", "--help"], capture_output=True, text=True)
        if r.returncode == 0:
            return c
    return None


# --------------------------------------------------------------------------------------
# correctness check
# --------------------------------------------------------------------------------------


def _open_folder(d: Path):
    from safetensors import safe_open

    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
    else:
        wm = {}
        for p in sorted(d.glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    wm[k] = p.name
    if not wm and d.suffix == ".safetensors":
        with safe_open(str(d), framework="pt") as f:
            wm = {k: "" for k in f.keys()}

    def read(key):
        path = d / wm[key] if wm[key] else d
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    return wm, read


def compare_outputs(ours: Path, theirs: Path, cfg: dict) -> dict:
    """Max abs diff on a few tensors (fp16 tolerance: 2 ulp at the tensor's max |x|)."""
    import torch

    wm_a, read_a = _open_folder(ours)
    wm_b, read_b = _open_folder(theirs)
    L = cfg["num_hidden_layers"]
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{L // 2}.mlp.down_proj.weight",
            f"model.layers.{L - 1}.post_attention_layernorm.weight",
            "model.norm.weight", "lm_head.weight"]
    out = {"tensors": {}, "missing": sorted(set(wm_b) ^ set(wm_a)), "ok": True}
    eps = torch.finfo(torch.float16).eps
    for k in keys:
        if k not in wm_a or k not in wm_b:
            out["ok"] = False
            out["tensors"][k] = {"error": "missing"}
            continue
        a, b = read_a(k), read_b(k)
        if a.shape != b.shape:
            out["ok"] = False
            out["tensors"][k] = {"error": f"shape {tuple(a.shape)} vs {tuple(b.shape)}"}
            continue
        a32, b32 = a.float(), b.float()
        diff = (a32 - b32).abs()
        tol = 2 * eps * float(b32.abs().max())
        ent = {"dtype": f"{a.dtype}/{b.dtype}", "max_abs_diff": float(diff.max()),
               "frac_differing": float((diff > 0).float().mean()), "tol": tol}
        ent["ok"] = ent["max_abs_diff"] <= tol and a.dtype == b.dtype
        out["ok"] &= ent["ok"]
        out["tensors"][k] = ent
    return out


def ties_reference_check(base: Path, fts: list[Path], ours: Path | None, theirs: Path | None,
                         cfg: dict, density: float) -> dict:
    """Recompute TIES from the inputs for a few small tensors under both trimming rules.

    * "threshold": keep every entry with |delta| >= the k-th largest |delta| (k = int(density*n));
      with quantized (fp16) deltas many entries equal the threshold, so more than k are kept.
    * "exact-k": keep exactly k entries, ties broken by ``torch.argsort(descending=True)``
      (mergekit's ``sparsify.magnitude``).
    * "exact-k-position": keep exactly k entries, ties at the threshold broken by flat position
      (first ones kept): slice-invariant, what a streaming implementation can do.
    Then TIES-paper sign election (sum of trimmed deltas) and disjoint mean, weights 1.0.
    Reports which rule each output reproduces and how many entries each rule keeps.
    """
    import torch

    _, rbase = _open_folder(base)
    readers = [_open_folder(f)[1] for f in fts]
    outs = {name: _open_folder(p)[1] for name, p in (("taskvec", ours), ("mergekit", theirs)) if p}
    L = cfg["num_hidden_layers"]
    keys = ["model.norm.weight", f"model.layers.{L - 1}.input_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight"]
    res = {}
    for key in keys:
        b = rbase(key).float().reshape(-1)
        d = torch.stack([r(key).float().reshape(-1) - b for r in readers])
        n = d.shape[1]
        k = int(density * n)
        masks = {"threshold": [], "exact-k": [], "exact-k-position": []}
        for t in range(d.shape[0]):
            a = d[t].abs()
            th = torch.kthvalue(a, n - k + 1).values
            masks["threshold"].append(a >= th)
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.argsort(a, descending=True)[:k]] = True
            masks["exact-k"].append(m)
            need = k - int((a > th).sum())
            m = a > th
            m[torch.nonzero(a == th).reshape(-1)[:need]] = True
            masks["exact-k-position"].append(m)
        ent = {"n": n, "k": k}
        refs = {}
        for rule, ms in masks.items():
            tr = d * torch.stack(ms)
            sign = tr.sign()
            elected = torch.where(tr.sum(0) >= 0, 1.0, -1.0)
            agree = sign == elected
            refs[rule] = (b + (tr * agree).sum(0) / agree.sum(0).clamp(min=1)).half()
            ent[f"kept_{rule}"] = [int(m.sum()) for m in ms]
        for tool, read in outs.items():
            o = read(key).reshape(-1)
            ent[tool] = {rule: float((o.float() - r.float()).abs().max()) for rule, r in refs.items()}
        res[key] = ent
    return res


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def fmt_report(ctx: dict, results: dict, seq: dict, checks: dict, ties_ref: dict | None = None) -> str:
    lines = ["# Streaming merge benchmark", ""]
    lines.append(f"- date: {ctx['date']}; host: {ctx['host']}; CPU cores: {ctx['cpus']}; "
                 f"RAM: {ctx['ram_gib']:.1f} GiB")
    lines.append(f"- checkpoint: synthetic LlamaForCausalLM, {ctx['n_params']:,} params "
                 f"({ctx['model_gib']:.2f} GiB fp16, {ctx['n_shards']} shards/model); "
                 f"N = {ctx['n_models']} fine-tuned + base = {ctx['input_gib']:.2f} GiB "
                 f"({ctx['input_gb']:.2f} GB) of inputs")
    mkv = ctx.get("mergekit_version", "n/a").split()
    mkv = f"{mkv[0]} (torch {mkv[1]})" if len(mkv) == 2 else " ".join(mkv)
    if "loadavg" in ctx:
        lines.append(f"- load average (1/5/15 min) at start: {ctx['loadavg']} "
                     "(other jobs share the 2 cores: wall times vary with it, CPU s much less)")
    lines.append(f"- mergekit {mkv} (own venv), compute dtype "
                 f"{ctx['mergekit_dtype']}, options: `{ctx.get('mergekit_opts', '')}`")
    lines.append(f"- taskvec: `{ctx.get('taskvec_cmd', 'n/a')}`")
    lines.append(f"- page cache before each run: {ctx['cache_mode']}, then the tool's modules are "
                 "re-imported once (untimed) so that startup does not re-read torch from disk")
    lines.append("")
    if seq:
        lines.append(f"**Sequential read of the same {seq['gb']:.2f} GB of input files "
                     f"(cold cache, 16 MiB reads): {seq['gbps']:.2f} GB/s "
                     f"({seq['seconds']:.1f} s)** — the upper limit for input GB/s below.")
        lines.append("")
    lines.append("| method | tool | wall s | input GB/s | peak RSS GiB | ours/mergekit time ratio "
                 "| peak anon GiB | peak file-backed GiB | CPU s (user+sys) | status |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for method in METHODS:
        mk = results.get(("mergekit", method))
        for tool in ("taskvec", "mergekit"):
            r = results.get((tool, method))
            if r is None:
                continue
            ratio = ""
            if tool == "taskvec" and mk is not None and mk.rc == 0 and r.rc == 0:
                ratio = f"{r.wall_s / mk.wall_s:.2f}"
            gbps = ctx["input_gb"] / r.wall_s if r.rc == 0 else float("nan")
            status = "ok" if r.rc == 0 else f"FAILED rc={r.rc} (see {r.log})"
            if tool == "taskvec" and r.rc == 0:
                status += "; RSS < 2 GiB" if r.peak_rss < 2 * GiB else "; **RSS >= 2 GiB**"
            lines.append(
                f"| {method} | {tool} | {r.wall_s:.1f} | {gbps:.2f} | {r.peak_rss / GiB:.2f} "
                f"| {ratio} | {r.peak_tree_anon / GiB:.2f} | {r.peak_tree_file / GiB:.2f} "
                f"| {r.user_s + r.sys_s:.0f} | {status} |")
    lines.append("")
    lines.append("CPU s (user+sys, from `/usr/bin/time -v`) is the comparison least affected by "
                 "other load on the machine; wall s and GB/s are what a user waits for.")
    lines.append("")
    lines.append("peak RSS = max(polled sum of VmRSS over the process tree every 50 ms, "
                 "kernel high-water RSS of the largest process from `/usr/bin/time -v`). "
                 "File-backed = mmap'd input pages counted in RSS (reclaimable page cache).")
    if checks:
        lines.append("")
        lines.append("## Correctness: taskvec vs mergekit on the same inputs")
        lines.append("")
        lines.append("| method | tensor | max abs diff | fraction of elements differing | tol (2 ulp fp16) | ok |")
        lines.append("|---|---|---:|---:|---:|---|")
        for method, c in checks.items():
            for k, e in c["tensors"].items():
                if "error" in e:
                    lines.append(f"| {method} | {k} | {e['error']} | | | no |")
                else:
                    verdict = ("yes" if e["ok"] else "no") if method == "task_arithmetic" \
                        else "informational (see below)"
                    lines.append(f"| {method} | `{k}` | {e['max_abs_diff']:.3g} | "
                                 f"{e['frac_differing']:.2e} | {e['tol']:.3g} | {verdict} |")
        if any(c.get("missing") for c in checks.values()):
            for method, c in checks.items():
                if c.get("missing"):
                    lines.append(f"\n{method}: tensors present in only one output: "
                                 f"{c['missing'][:10]}")
        lines.append("")
        lines.append("task_arithmetic must match within fp16 rounding. ties is informational: "
                     "top-k magnitude selection breaks ties between equal |delta| values "
                     "(deltas of fp16 weights are quantized, so equal values are common) in "
                     "implementation-defined order, so a few elements may legitimately differ.")
    if ties_ref:
        lines.append("")
        lines.append("## TIES trimming rule, recomputed from the inputs")
        lines.append("")
        lines.append("max abs diff of each tool's output against TIES recomputed with each trimming "
                     "rule: *thr* keeps every |delta| >= the k-th largest (ties at the threshold "
                     "all kept), *k-argsort* keeps exactly k in `torch.argsort` order (mergekit), "
                     "*k-pos* keeps exactly k, ties at the threshold broken by flat position.")
        lines.append("")
        rules = ("threshold", "exact-k", "exact-k-position")
        short = {"threshold": "thr", "exact-k": "k-argsort", "exact-k-position": "k-pos"}
        head = " | ".join(f"{tool} vs {short[r]}" for tool in ("taskvec", "mergekit") for r in rules)
        lines.append(f"| tensor | n | k | kept per model by *thr* (min..max) | {head} |")
        lines.append("|---|---:|---:|---|" + "---:|" * (2 * len(rules)))
        for key, e in ties_ref.items():
            kt = e["kept_threshold"]
            cells = " | ".join(f"{e[tool][r]:.3g}" if tool in e and r in e[tool] else "n/a"
                               for tool in ("taskvec", "mergekit") for r in rules)
            lines.append(f"| `{key}` | {e['n']} | {e['k']} | {min(kt)}..{max(kt)} "
                         f"({max(kt) / max(e['k'], 1):.2f}x k) | {cells} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-models", type=int, default=8, help="fine-tuned models (default 8)")
    ap.add_argument("--params", type=float, default=1.0737e9,
                    help="parameters per model (default 1.0737e9 = 2 GiB fp16)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--delta-std", type=float, default=1e-3)
    ap.add_argument("--shard-bytes", type=float, default=1e9, help="input shard size (bytes)")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    ap.add_argument("--mergekit-dtype", default="float32",
                    help="mergekit compute dtype (float32 = same arithmetic as taskvec; "
                         "float16 = mergekit's cheapest setting)")
    ap.add_argument("--mergekit-threads", type=int, default=None)
    ap.add_argument("--read-reps", type=int, default=1, help="sequential-read repetitions (best kept)")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help="only write the synthetic checkpoints")
    ap.add_argument("--report-only", action="store_true",
                    help="re-run the correctness checks on the outputs kept by a --keep-outputs run "
                         "and rewrite the report from its JSON (no timing)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep merged outputs (default: deleted after the correctness check)")
    ap.add_argument("--results", type=Path,
                    default=REPO_ROOT / "benchmarks" / "results" / "streaming_merge.md")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = args.workdir.resolve()
    if str(work).startswith(str(REPO_ROOT)):
        ap.error("--workdir must be outside the repository")
    work.mkdir(parents=True, exist_ok=True)

    from taskvec._optional import require

    psutil = require("psutil", "bench")

    ctx: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                 "cpus": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / GiB,
                 "n_models": args.n_models, "mergekit_dtype": args.mergekit_dtype,
                 "loadavg": " / ".join(f"{x:.1f}" for x in os.getloadavg())}

    mk_version = None
    if not args.skip_mergekit:
        mk_version = ensure_mergekit_env(args.mergekit_venv)
        ctx["mergekit_version"] = mk_version
        log(f"mergekit/torch in venv: {mk_version}")

    base, fts, cfg = generate_all(work, args.n_models, args.params, int(args.shard_bytes),
                                  args.delta_std)
    if args.generate_only:
        return 0
    inputs = [f for d in [base] + fts for f in model_files(d)]
    in_bytes = sum(f.stat().st_size for f in inputs)
    n_params = sum(math.prod(s) for _, s in llama_tensor_specs(cfg))
    ctx.update(n_params=n_params, model_gib=n_params * 2 / GiB, n_shards=len(model_files(base)),
               input_gib=in_bytes / GiB, input_gb=in_bytes / GB)

    def evict(warm: list[str] | None = None) -> str:
        """Drop the page cache, then (untimed) re-import the tool about to run, so that its
        timing counts reading the checkpoints, not re-reading torch's libraries from disk."""
        mode = "not dropped (--no-drop-caches)" if args.no_drop_caches else drop_caches(inputs)
        if warm:
            subprocess.run(warm, capture_output=True, check=False)
        return mode

    def finish(ctx: dict, results: dict, seq: dict, methods: list[str]) -> int:
        """Correctness checks on the outputs, then the report (Markdown + JSON)."""
        checks = {}
        for method in methods:
            a, b = results.get(("taskvec", method)), results.get(("mergekit", method))
            if a and b and a.rc == 0 and b.rc == 0:
                try:
                    checks[method] = compare_outputs(outdir / f"taskvec-{method}",
                                                     outdir / f"mergekit-{method}", cfg)
                except Exception as e:  # report, do not lose the timings
                    checks[method] = {"ok": False, "tensors": {"*": {"error": repr(e)}}}
        ties_ref = None
        if "ties" in methods and (("taskvec", "ties") in results or ("mergekit", "ties") in results):
            ok = lambda t: results.get((t, "ties")) is not None and results[(t, "ties")].rc == 0
            try:
                ties_ref = ties_reference_check(
                    base, fts, outdir / "taskvec-ties" if ok("taskvec") else None,
                    outdir / "mergekit-ties" if ok("mergekit") else None, cfg, args.density)
            except Exception as e:
                log(f"ties reference check failed: {e!r}")
        if not args.keep_outputs:
            for method in methods:
                for tool in ("taskvec", "mergekit"):
                    shutil.rmtree(outdir / f"{tool}-{method}", ignore_errors=True)

        report = fmt_report(ctx, results, seq, checks, ties_ref)
        print(report)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report)
        raw = {"context": ctx, "sequential_read": seq,
               "runs": {f"{t}/{m}": vars(r) for (t, m), r in results.items()},
               "checks": checks, "ties_reference": ties_ref}
        args.results.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
        log(f"wrote {args.results}")
        failed = [k for k, r in results.items() if r.rc != 0]
        ta = checks.get("task_arithmetic")
        return 1 if failed or (ta is not None and not ta["ok"]) else 0


    outdir = work / "out"
    if args.report_only:  # rebuild the report from the last run's JSON and kept outputs
        raw = json.loads(args.results.with_suffix(".json").read_text())
        results = {tuple(k.split("/", 1)): RunResult(**r) for k, r in raw["runs"].items()}
        methods = [m for m in METHODS if any(k[1] == m for k in results)]
        args.keep_outputs = True
        return finish(raw["context"], results, raw["sequential_read"], methods)

    # sequential read speed of the same files (the limit)
    best = None
    for _ in range(max(1, args.read_reps)):
        mode = evict()
        secs, nbytes = sequential_read(inputs)
        if best is None or secs < best[0]:
            best = (secs, nbytes)
    seq = {"seconds": best[0], "gb": best[1] / GB, "gbps": best[1] / GB / best[0], "cache": mode}
    ctx["cache_mode"] = mode + (" (root: sync; echo 3 > /proc/sys/vm/drop_caches)"
                                if mode == "drop_caches" else "")
    log(f"sequential read: {seq['gb']:.2f} GB in {seq['seconds']:.1f} s = {seq['gbps']:.2f} GB/s "
        f"(cache: {mode})")

    cfgdir = work / "configs"
    outdir = work / "out"
    logdir = work / "logs"
    for d in (cfgdir, outdir, logdir):
        d.mkdir(parents=True, exist_ok=True)

    tv_cmd = None if args.skip_ours else taskvec_invocation()
    if not args.skip_ours and tv_cmd is None:
        log("taskvec CLI not available yet (src/taskvec/cli missing or `taskvec merge --help` "
            "fails): skipping our half")
    if tv_cmd:
        ctx["taskvec_cmd"] = " ".join(Path(tv_cmd[0]).name if i == 0 else c
                                      for i, c in enumerate(tv_cmd)) + " merge CONFIG.yaml -o OUT"
    results: dict = {}
    shard_params = str(int(args.shard_bytes // 2))
    for method in methods:
        if tv_cmd:
            cp = cfgdir / f"taskvec-{method}.yaml"
            cp.write_text(taskvec_config(method, base, fts, args.density))
            out = outdir / f"taskvec-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cache = evict([sys.executable, "-c", "import taskvec.merge, taskvec.cli"])
            log(f"taskvec {method} ...")
            r = run_measured(tv_cmd + ["merge", str(cp), "-o", str(out)],
                             logdir / f"taskvec-{method}.log")
            r.cache = cache
            results[("taskvec", method)] = r
            log(f"taskvec {method}: rc={r.rc} {r.wall_s:.1f} s, peak RSS {r.peak_rss / GiB:.2f} GiB "
                f"(anon {r.peak_tree_anon / GiB:.2f}, file {r.peak_tree_file / GiB:.2f})")
        if not args.skip_mergekit:
            cp = cfgdir / f"mergekit-{method}.yaml"
            cp.write_text(mergekit_config(method, base, fts, args.density, args.mergekit_dtype))
            out = outdir / f"mergekit-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = mergekit_cmd(args.mergekit_venv, cp, out, shard_params, args.mergekit_threads)
            ctx["mergekit_opts"] = " ".join(cmd[3:])
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       CUDA_VISIBLE_DEVICES="")
            cache = evict([str(args.mergekit_venv / "bin" / "python"), "-c",
                           "import mergekit.merge, mergekit.scripts.run_yaml"])
            log(f"mergekit {method} ...")
            r = run_measured(cmd, logdir / f"mergekit-{method}.log", env=env)
            r.cache = cache
            results[("mergekit", method)] = r
            log(f"mergekit {method}: rc={r.rc} {r.wall_s:.1f} s, peak RSS {r.peak_rss / GiB:.2f} GiB "
                f"(anon {r.peak_tree_anon / GiB:.2f}, file {r.peak_tree_file / GiB:.2f})")
            if r.rc != 0:
                log("mergekit log tail:\n" + "".join(Path(r.log).read_text().splitlines(True)[-20:]))

    return finish(ctx, results, seq, methods)

if __name__ == "__main__":
    sys.exit(main())
