#!/usr/bin/env python3
"""Streaming-merge benchmark: taskvec vs. mergekit on a synthetic ~1B-parameter fp16 Llama.

Merges N = 8 fine-tuned checkpoints into their base (sharded safetensors, generated here with
taskvec's own writer) with task arithmetic, TIES and magnitude pruning, and reports wall time,
CPU time and peak RSS beside the limits measured in the same run on the same disk: a
sequential read of the inputs and a sequential write of one output. mergekit (task arithmetic
and TIES, in its own virtual environment) runs on the same inputs in the same invocation.

Usage
-----
    python3 benchmarks/streaming_merge.py                              # full run (~18 GiB of inputs)
    python3 benchmarks/streaming_merge.py --params 5e7 --n-models 2    # quick smoke run
    python3 benchmarks/streaming_merge.py --skip-mergekit              # only taskvec

Everything heavy lives under ``--workdir`` (default /tmp/taskvec-bench). Generation is
deterministic and skipped when the files are already there. The page cache is dropped before
every timed step, after writeback has settled (``sync``, then until /proc/meminfo shows little
dirty data; then ``echo 3 > /proc/sys/vm/drop_caches``, needs root; otherwise each input is
evicted with ``posix_fadvise(DONTNEED)``). The sequential read of the inputs is measured the same
way at the start and again at the end, and reported in GB/s beside the ratios. Each merge runs as a child process under
``/usr/bin/time -v`` while the RSS of its process tree is polled every 50 ms. The Markdown report
goes to ``benchmarks/results/streaming_merge.md`` and stdout.
"""

from __future__ import annotations

import argparse
import json
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

import psutil
import torch

from measure import cold_read, drop_caches, load_average, sequential_write
from taskvec.io import CheckpointWriter, TensorSpec, open_checkpoint, read

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("/tmp/taskvec-bench")
DEFAULT_MERGEKIT_VENV = Path("/tmp/mergekit-venv")
GiB = 1024**3
GB = 1e9
METHODS = ("task_arithmetic", "ties", "magnitude")
MERGEKIT_METHODS = ("task_arithmetic", "ties")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ mergekit environment
def ensure_mergekit_env(venv: Path) -> str:
    """mergekit in its own venv that sees this interpreter's packages, with torch pinned to the
    installed version (mergekit must not replace it). Returns "mergekit-version torch-version"."""
    py, mk = venv / "bin" / "python", venv / "bin" / "mergekit-yaml"
    if not mk.exists():
        log(f"creating mergekit venv at {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__}\n")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "-c", str(constraints), "mergekit"], check=True)
    r = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


# ------------------------------------------------------------------ synthetic checkpoints
_PRESETS = [(2048, 5632, 16, 4), (1024, 2816, 16, 4), (512, 1408, 8, 4), (256, 704, 4, 2), (128, 352, 4, 2)]


def llama_config(target_params: float) -> dict:
    """A Llama config close to `target_params`: the widest preset whose embeddings stay a minority,
    then the layer count and the vocabulary size (multiple of 64) absorb the rest."""
    for hidden, inter, heads, kv in _PRESETS:
        per_layer = 2 * hidden * hidden + 2 * hidden * kv * (hidden // heads) + 3 * hidden * inter + 2 * hidden
        layers = round((target_params - 2 * 32000 * hidden - hidden) / per_layer)
        if layers >= 2 and 2 * 32000 * hidden <= 0.5 * target_params:
            break
    else:
        layers = 2
    vocab = max(1024, int(round((target_params - layers * per_layer - hidden) / (2 * hidden) / 64)) * 64)
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


def llama_specs(cfg: dict) -> dict[str, TensorSpec]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kvd, h),
            p + "self_attn.v_proj.weight": (kvd, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return {k: TensorSpec(s, torch.float16) for k, s in shapes.items()}


def generate_model(out: Path, cfg: dict, model_idx: int, base: Path | None, shard_bytes: int, delta_std: float) -> None:
    """One HF shard folder written by taskvec's streaming writer. Model 0 is the base (N(0, 0.02)
    matrices, ones for norms); model k >= 1 is base + N(0, (delta_std * (1 + (k - 1) / 4))^2)."""
    if (out / "config.json").exists():
        return
    shutil.rmtree(out, ignore_errors=True)
    specs = llama_specs(cfg)
    src = open_checkpoint(base) if base is not None else None
    scale = delta_std * (1.0 + (model_idx - 1) / 4.0)
    with CheckpointWriter(out, specs, max_shard_bytes=shard_bytes) as w:
        for tidx, name in enumerate(specs):
            shape = specs[name].shape
            g = torch.Generator().manual_seed(1_000_003 * (model_idx + 1) + 7919 * tidx + 12345)
            if src is None:
                t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            else:
                t = torch.randn(shape, generator=g).mul_(scale).add_(read(src, name).float())
            w.write(name, t.half())
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # last: marks the folder complete


def generate_all(
    work: Path, n_models: int, params: float, shard_bytes: int, delta_std: float
) -> tuple[Path, list[Path], dict]:
    cfg = llama_config(params)
    models = work / "models"
    stamp = models / "generation.json"
    meta = {"config": cfg, "n_models": n_models, "shard_bytes": shard_bytes, "delta_std": delta_std, "version": 1}
    if stamp.exists() and {k: v for k, v in json.loads(stamp.read_text()).items() if k != "n_models"} != {
        k: v for k, v in meta.items() if k != "n_models"
    }:
        log(f"generation parameters changed: removing {models}")
        shutil.rmtree(models)
    models.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(meta, indent=2) + "\n")
    n = sum(s.numel for s in llama_specs(cfg).values())
    log(
        f"synthetic Llama: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}: {n:,} params = "
        f"{n * 2 / GiB:.3f} GiB fp16"
    )
    dirs = [models / "base"] + [models / f"ft{k}" for k in range(1, n_models + 1)]
    for k, d in enumerate(dirs):
        generate_model(d, cfg, k, None if k == 0 else dirs[0], shard_bytes, delta_std)
    return dirs[0], dirs[1:], cfg


# ------------------------------------------------------------------ measurement
@dataclass
class RunResult:
    cmd: list[str]
    rc: int
    wall_s: float
    peak_rss: int = 0  # bytes: max of the polled tree sum and the kernel's high-water mark
    user_s: float = 0.0
    sys_s: float = 0.0
    loadavg: str = ""
    log: str = ""
    extra: dict = field(default_factory=dict)


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None, poll_s: float = 0.05) -> RunResult:
    """Run `cmd` under /usr/bin/time -v while polling the RSS of its whole process tree."""
    timev = log_path.with_suffix(".timev")
    full = ["/usr/bin/time", "-v", "-o", str(timev)] + cmd if Path("/usr/bin/time").exists() else cmd
    peak = [0]
    stop = threading.Event()
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def poll() -> None:
            root = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
                except psutil.Error:
                    pass
                stop.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    res = RunResult(
        cmd=cmd,
        rc=rc,
        wall_s=wall,
        peak_rss=peak[0],
        log=str(log_path),
        loadavg=" / ".join(f"{x:.1f}" for x in os.getloadavg()),
    )
    if timev.exists():
        txt = timev.read_text()
        for attr, pat, mul in (
            ("peak_rss", r"Maximum resident set size \(kbytes\): (\d+)", 1024),
            ("user_s", r"User time \(seconds\): ([\d.]+)", 1),
            ("sys_s", r"System time \(seconds\): ([\d.]+)", 1),
        ):
            m = re.search(pat, txt)
            if m:
                v = float(m.group(1)) * mul
                setattr(res, attr, max(getattr(res, attr), int(v)) if attr == "peak_rss" else v)
    return res


# ------------------------------------------------------------------ the two tools
def taskvec_config(method: str, base: Path, fts: list[Path], density: float) -> str:
    lines = [f"method: {method}", f"base: {base}", "models:"] + [f"  - finetuned: {ft}\n    weight: 1.0" for ft in fts]
    if method in ("ties", "magnitude"):
        lines.append(f"params: {{density: {density}}}")
    return "\n".join(lines + ["scale: 1.0", "dtype: float16", "shard_size: 1GB"]) + "\n"


def mergekit_config(method: str, base: Path, fts: list[Path], density: float, dtype: str) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for ft in fts:
        params = "weight: 1.0" + (f", density: {density}" if method == "ties" else "")
        lines += [f"  - model: {ft}", f"    parameters: {{{params}}}"]
    # ties: TIES-paper sign election and disjoint mean (normalize: true); task arithmetic: plain sum
    normalize = "true" if method == "ties" else "false"
    return (
        "\n".join(
            lines
            + [f"dtype: {dtype}", "out_dtype: float16", "parameters:", f"  normalize: {normalize}", "  lambda: 1.0"]
        )
        + "\n"
    )


def mergekit_cmd(venv: Path, cfg_path: Path, out: Path, shard_params: str) -> list[str]:
    return [
        str(venv / "bin" / "mergekit-yaml"),
        str(cfg_path),
        str(out),
        "--lazy-unpickle",
        "--no-cuda",
        "--device",
        "cpu",
        "--out-shard-size",
        shard_params,
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--no-async-write",
        "--quiet",
    ]


# ------------------------------------------------------------------ correctness
def compare_outputs(ours: Path, theirs: Path, keys: list[str]) -> dict:
    """Max abs difference on a few tensors (tolerance: 2 fp16 ulp at the tensor's max |x|)."""
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    out: dict = {"ok": True, "tensors": {}}
    for k in keys:
        x, y = read(a, k).float(), read(b, k).float()
        d = float((x - y).abs().max())
        tol = 2 * torch.finfo(torch.float16).eps * float(y.abs().max())
        out["tensors"][k] = {
            "max_abs_diff": d,
            "frac_differing": float((x != y).float().mean()),
            "tol": tol,
            "ok": d <= tol,
        }
        out["ok"] &= d <= tol
    return out


def ties_reference(base: Path, fts: list[Path], outputs: dict[str, Path], keys: list[str], density: float) -> dict:
    """TIES recomputed in float32 from the inputs with exactly k = int(density * n) entries kept per
    task: ties at the threshold broken by flat position (*k-pos*) or in `torch.argsort` order
    (*k-argsort*, mergekit's rule). Max abs difference of each output against each."""
    src = open_checkpoint(base)
    fsrc = [open_checkpoint(f) for f in fts]
    res = {}
    for key in keys:
        b = read(src, key).float().reshape(-1)
        d = torch.stack([read(f, key).float().reshape(-1) - b for f in fsrc])
        n, k = d.shape[1], int(density * d.shape[1])
        refs = {}
        for rule in ("k-pos", "k-argsort"):
            masks = []
            for t in range(d.shape[0]):
                a = d[t].abs()
                m = torch.zeros(n, dtype=torch.bool)
                if rule == "k-argsort":
                    m[torch.argsort(a, descending=True)[:k]] = True
                else:
                    th = torch.kthvalue(a, n - k + 1).values
                    m = a > th
                    m[torch.nonzero(a == th).reshape(-1)[: k - int(m.sum())]] = True
                masks.append(m)
            tr = d * torch.stack(masks)
            agree = tr.sign() == torch.where(tr.sum(0) >= 0, 1.0, -1.0)
            refs[rule] = (b + (tr * agree).sum(0) / agree.sum(0).clamp(min=1)).half()
        res[key] = {"n": n, "k": k} | {
            tool: {
                rule: float((read(open_checkpoint(p), key).reshape(-1).float() - r.float()).abs().max())
                for rule, r in refs.items()
            }
            for tool, p in outputs.items()
        }
    return res


# ------------------------------------------------------------------ report
def fmt_report(ctx: dict, seq: dict, results: dict, checks: dict, ties_ref: dict) -> str:
    limit = seq["read_s"] + seq["write_s"]
    lines = [
        "# Streaming merge benchmark",
        "",
        f"- {ctx['date']}; {ctx['cpus']} CPU cores, {ctx['ram_gib']:.1f} GiB RAM; load average (1/5/15 min) at start: "
        f"{ctx['loadavg']}",
        f"- checkpoint: synthetic LlamaForCausalLM, {ctx['n_params']:,} parameters ({ctx['model_gib']:.2f} GiB fp16, "
        f"{ctx['n_shards']} shards per model); N = {ctx['n_models']} fine-tuned + base = {ctx['input_gib']:.2f} GiB of "
        "inputs",
        f"- taskvec: `taskvec merge CONFIG.yaml -o OUT`; mergekit {ctx.get('mergekit_version', 'not run')} (compute "
        f"dtype {ctx['mergekit_dtype']}): `{ctx.get('mergekit_opts', '')}`",
        f"- page cache dropped before every step ({ctx['cache_mode']}); each tool's modules are imported once "
        "beforehand, untimed",
        "",
        f"**Limits measured in the same run, cold cache, writeback settled:** sequential read of the "
        f"{ctx['input_gb']:.2f} GB of inputs {seq['read_s']:.1f} s ({ctx['input_gb'] / seq['read_s']:.2f} GB/s; "
        f"again at the end: {seq.get('read_end_s', 0):.1f} s, {ctx['input_gb'] / seq.get('read_end_s', 1):.2f} GB/s); "
        f"sequential write of one {ctx['model_gib']:.2f} GiB output {seq['write_s']:.1f} s; read + write = "
        f"**{limit:.1f} s**. Load average at the end: {ctx.get('loadavg_end', '')}.",
        "",
        "| method | tool | wall s | inputs GB/s | wall / (read + write) | wall / taskvec task arithmetic | CPU s "
        "(user+sys) | peak RSS GiB | load avg at end | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    ta = results.get(("taskvec", "task_arithmetic"))
    for method in METHODS:
        for tool in ("taskvec", "mergekit"):
            r = results.get((tool, method))
            if r is None:
                continue
            rel = f"{r.wall_s / ta.wall_s:.2f}" if ta is not None and ta.rc == 0 else ""
            status = "ok" if r.rc == 0 else f"FAILED rc={r.rc}"
            lines.append(
                f"| {method} | {tool} | {r.wall_s:.1f} | {ctx['input_gb'] / r.wall_s:.2f} | {r.wall_s / limit:.2f} "
                f"| {rel} | {r.user_s + r.sys_s:.1f} "
                f"| {r.peak_rss / GiB:.2f} | {r.loadavg} | {status} |"
            )
    lines += [
        "",
        "peak RSS: the larger of the polled sum over the process tree (every 50 ms) and the kernel's high-water mark "
        "(`/usr/bin/time -v`). Load average: 1/5/15-minute averages when the step ended; the machine's 2 cores are "
        "shared with other jobs, which lengthens CPU-bound steps.",
    ]
    if checks:
        lines += [
            "",
            "## taskvec vs mergekit on the same inputs",
            "",
            "| method | tensor | max abs diff | fraction of elements differing | tol (2 fp16 ulp) |",
            "|---|---|---:|---:|---:|",
        ]
        for method, c in checks.items():
            for k, e in c["tensors"].items():
                lines.append(
                    f"| {method} | `{k}` | {e['max_abs_diff']:.3g} | {e['frac_differing']:.2e} | {e['tol']:.3g} |"
                )
        lines += [
            "",
            "Task arithmetic must agree within fp16 rounding. TIES keeps exactly k entries per task in both tools, but "
            "breaks ties at the threshold differently (deltas of fp16 weights are quantized, so equal values are "
            "common): taskvec by flat position (independent of how a tensor is sliced), mergekit in `torch.argsort` "
            "order.",
        ]
    if ties_ref:
        tools = sorted({t for e in ties_ref.values() for t in e if t not in ("n", "k")})
        lines += [
            "",
            "## TIES recomputed from the inputs",
            "",
            "Max abs difference of each output against TIES recomputed in float32 with each tie rule.",
            "",
            "| tensor | n | k | " + " | ".join(f"{t} vs k-pos | {t} vs k-argsort" for t in tools) + " |",
            "|---|---:|---:|" + "---:|---:|" * len(tools),
        ]
        for key, e in ties_ref.items():
            cells = " | ".join(f"{e[t]['k-pos']:.3g} | {e[t]['k-argsort']:.3g}" for t in tools)
            lines.append(f"| `{key}` | {e['n']} | {e['k']} | {cells} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-models", type=int, default=8)
    ap.add_argument("--params", type=float, default=1.0737e9, help="parameters per model (default: 2 GiB of fp16)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    ap.add_argument(
        "--mergekit-dtype", default="float32", help="mergekit's compute dtype (float32: the same arithmetic as taskvec)"
    )
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--delta-std", type=float, default=1e-3)
    ap.add_argument("--shard-bytes", type=float, default=1e9, help="input shard size in bytes")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "streaming_merge.md")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = args.workdir.resolve()
    if str(work).startswith(str(REPO_ROOT)):
        ap.error("--workdir must be outside the repository")
    ctx: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / GiB,
        "n_models": args.n_models,
        "mergekit_dtype": args.mergekit_dtype,
        "loadavg": load_average(),
    }
    if not args.skip_mergekit:
        mk, tv = ensure_mergekit_env(args.mergekit_venv).split()
        ctx["mergekit_version"] = f"{mk} (torch {tv})"
    base, fts, cfg = generate_all(work, args.n_models, args.params, int(args.shard_bytes), args.delta_std)
    if args.generate_only:
        return 0
    inputs = [f for d in [base, *fts] for f in sorted(d.glob("*.safetensors"))]
    specs = llama_specs(cfg)
    n_params = sum(s.numel for s in specs.values())
    ctx |= {
        "n_params": n_params,
        "model_gib": n_params * 2 / GiB,
        "n_shards": len(list(base.glob("*.safetensors"))),
        "input_gib": sum(f.stat().st_size for f in inputs) / GiB,
        "input_gb": sum(f.stat().st_size for f in inputs) / GB,
    }
    outdir, cfgdir, logdir = work / "out", work / "configs", work / "logs"
    for d in (outdir, cfgdir, logdir):
        d.mkdir(parents=True, exist_ok=True)

    seq: dict = {}
    seq["read_s"], _, ctx["cache_mode"] = cold_read(inputs)
    drop_caches(inputs)
    seq["write_s"] = sequential_write(outdir / "write-test.bin", n_params * 2)
    log(f"sequential read {seq['read_s']:.1f} s, write {seq['write_s']:.1f} s")

    results: dict = {}
    shard_params = str(int(args.shard_bytes // 2))
    for method in methods:
        runs = [
            (
                "taskvec",
                [shutil.which("taskvec") or "taskvec", "merge"],
                taskvec_config(method, base, fts, args.density),
                [sys.executable, "-c", "import taskvec.merge, taskvec.cli"],
                None,
            )
        ]
        if not args.skip_mergekit and method in MERGEKIT_METHODS:
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
            runs.append(
                (
                    "mergekit",
                    None,
                    mergekit_config(method, base, fts, args.density, args.mergekit_dtype),
                    [
                        str(args.mergekit_venv / "bin" / "python"),
                        "-c",
                        "import mergekit.merge, mergekit.scripts.run_yaml",
                    ],
                    env,
                )
            )
        for tool, prefix, config, warm, env in runs:
            cp, out = cfgdir / f"{tool}-{method}.yaml", outdir / f"{tool}-{method}"
            cp.write_text(config)
            shutil.rmtree(out, ignore_errors=True)
            cmd = (
                prefix + [str(cp), "-o", str(out)]
                if prefix
                else mergekit_cmd(args.mergekit_venv, cp, out, shard_params)
            )
            if tool == "mergekit":
                ctx["mergekit_opts"] = " ".join(cmd[3:])
            drop_caches(inputs)
            subprocess.run(warm, capture_output=True, check=False)
            log(f"{tool} {method} ...")
            r = results[(tool, method)] = run_measured(cmd, logdir / f"{tool}-{method}.log", env=env)
            log(
                f"{tool} {method}: rc={r.rc} {r.wall_s:.1f} s, {r.user_s + r.sys_s:.1f} CPU s, peak RSS "
                f"{r.peak_rss / GiB:.2f} GiB"
            )

    seq["read_end_s"], _, _ = cold_read(inputs)  # the disk may have changed speed meanwhile
    ctx["loadavg_end"] = load_average()
    log(f"sequential read at the end {seq['read_end_s']:.1f} s")
    ok = lambda tool, m: (tool, m) in results and results[(tool, m)].rc == 0  # noqa: E731
    layers = cfg["num_hidden_layers"]
    keys = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{layers // 2}.mlp.down_proj.weight",
        f"model.layers.{layers - 1}.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    checks = {
        m: compare_outputs(outdir / f"taskvec-{m}", outdir / f"mergekit-{m}", keys)
        for m in MERGEKIT_METHODS
        if ok("taskvec", m) and ok("mergekit", m)
    }
    ties_ref = {}
    tie_outs = {t: outdir / f"{t}-ties" for t in ("taskvec", "mergekit") if ok(t, "ties")}
    if tie_outs:
        ties_ref = ties_reference(
            base,
            fts,
            tie_outs,
            [
                "model.norm.weight",
                f"model.layers.{layers - 1}.input_layernorm.weight",
                "model.layers.0.self_attn.k_proj.weight",
            ],
            args.density,
        )
    for method in methods:
        for tool in ("taskvec", "mergekit"):
            shutil.rmtree(outdir / f"{tool}-{method}", ignore_errors=True)
    report = fmt_report(ctx, seq, results, checks, ties_ref)
    print(report)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    log(f"wrote {args.results}")
    failed = [k for k, r in results.items() if r.rc != 0]
    return 1 if failed or ("task_arithmetic" in checks and not checks["task_arithmetic"]["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
