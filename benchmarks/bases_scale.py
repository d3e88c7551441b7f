#!/usr/bin/env python3
"""Task vector bases at scale: T = 64 task vectors of a synthetic 100M-parameter model.

Requirement measured
--------------------
Build banks of bases (cluster / learned / pca) from T = 64 fp16 task vectors of a ~100M-parameter
model (12.8 GB of task vectors on disk, one safetensors file per task), streamed, with peak RSS
under 4 GiB; report wall time and peak RSS of every phase, the bank sizes against the task
vectors' (exact byte accounting, checked against the files on disk), and the reconstruction errors.

Synthetic data
--------------
Low-rank-ish with planted structure, so clustering is meaningful: K = 8 groups of 8 tasks;
tau_t = c_{k(t)} + 0.3 * s + 0.5 * n_t per entry (times 1e-3), with c_k the group centres, s a
direction shared by all tasks and n_t task noise. Expected cosine: ~0.81 within a group, ~0.07
across groups. Centres and shared direction are fresh Gaussian draws per slice (fixed seeds);
n_t is one Gaussian slice rolled by a task-specific shift, which keeps generation cheap (the
rolled copies are uncorrelated). One more task (#64, of group 0) is generated for the continual
`add`. A random fp16 base model is generated for `compose`.

Usage
-----
    python3 benchmarks/bases_scale.py                         # full run
    python3 benchmarks/bases_scale.py --params 2e6 --tasks 16 # quick smoke run

Every phase runs as a child process (2 torch threads by default) whose RSS is polled with psutil
every 20 ms; the child also reports its own ru_maxrss; the table shows the larger. The page cache
is dropped before every phase, after writeback has settled (`sync`, then until /proc/meminfo
shows little dirty data; then `echo 3 > /proc/sys/vm/drop_caches`, needs root, else
posix_fadvise(DONTNEED) of the task vectors), and the sequential read of the task vectors is
measured the same way in the same run, cold, as the limit of the Gram pass: before the phases and
again after them, each reported in GB/s. The Markdown report goes to benchmarks/results/bases_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from measure import cold_read, drop_caches, load_average

REPO = Path(__file__).resolve().parents[1]
WORKDIR = Path("/tmp/taskvec-bases-bench")
GiB = 1024**3
GROUPS = 8
SCALE = 1e-3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ synthetic model
def model_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """A GPT-2-like layout (d = 768, vocab 32000) with as many layers as fit `params`."""
    d, vocab = 768, 32000
    if params < 5e7:  # smoke runs: a narrower model
        d, vocab = 128, 4000
    layer = {
        "ln_1.weight": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "ln_2.weight": (d,),
        "mlp.c_fc.weight": (d, 4 * d),
        "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (4 * d, d),
    }
    per = sum(_numel(s) for s in layer.values())
    n_layers = max(1, round((params - vocab * d - d) / per))
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d)}
    for i in range(n_layers):
        shapes.update({f"h.{i}.{k}": s for k, s in layer.items()})
    shapes["ln_f.weight"] = (d,)
    return shapes


def _numel(s: tuple[int, ...]) -> int:
    n = 1
    for x in s:
        n *= x
    return n


def tv_path(work: Path, t: int) -> Path:
    return work / "task_vectors" / f"tv-{t:03d}.safetensors"


def generate(work: Path, params: float, tasks: int) -> dict:
    """Write tasks + 1 fp16 task vectors and an fp16 base model, streamed slice by slice."""
    import torch

    from taskvec.core.stream import chunks
    from taskvec.io import CheckpointWriter, TensorSpec

    shapes = model_shapes(params)
    marker = work / "generated.json"
    want = {"params": params, "tasks": tasks, "numel": sum(_numel(s) for s in shapes.values()), "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        log("synthetic task vectors already there")
        return {**want, "skipped": True}
    (work / "task_vectors").mkdir(parents=True, exist_ok=True)
    specs = {k: TensorSpec(s, torch.float16) for k, s in shapes.items()}
    n_out = tasks + 1
    shifts = [int(x) for x in torch.randint(1, 1 << 30, (n_out,), generator=torch.Generator().manual_seed(7))]
    chunk = 1 << 20
    with ExitStack() as stack:
        writers = [stack.enter_context(CheckpointWriter(tv_path(work, t), specs, overwrite=True)) for t in range(n_out)]
        base = stack.enter_context(CheckpointWriter(work / "base.safetensors", specs, overwrite=True))
        for ki, key in enumerate(writers[0].order):
            n = specs[key].numel
            for s, e in chunks(n, chunk):
                g = torch.Generator().manual_seed(1_000_003 * ki + s)
                centres = torch.randn(GROUPS, e - s, generator=g)
                shared = torch.randn(e - s, generator=g)
                noise = torch.randn(e - s, generator=g)
                base.write(key, 0.02 * torch.randn(e - s, generator=g))
                common = 0.3 * shared
                for t, w in enumerate(writers):
                    group = (t % tasks) // (tasks // GROUPS) if t < tasks else 0
                    x = centres[group] + common
                    x.add_(torch.roll(noise, shifts[t] % (e - s)), alpha=0.5).mul_(SCALE)
                    w.write(key, x)
    marker.write_text(json.dumps(want))
    return want


# ------------------------------------------------------------------ phases (run in a child)
def load_tvs(work: Path, tasks: int):
    from taskvec.core import TaskVector

    return [TaskVector.load(tv_path(work, t)) for t in range(tasks)], [f"task{t:02d}" for t in range(tasks)]


def phase(name: str, work: Path, tasks: int, m: int | None) -> dict:
    import torch

    from taskvec.bases import Bank, affinity, build_bank, cosine_from_gram, eigengap, gram

    out: dict = {}
    if name == "gram":
        tvs, _ = load_tvs(work, tasks)
        t0, c0 = time.perf_counter(), time.process_time()
        g = gram(tvs)
        out["gram_s"], out["gram_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        torch.save(g, work / "gram.pt")
        mm, _ = eigengap(affinity(cosine_from_gram(g)))
        cos = cosine_from_gram(g)
        out.update(eigengap_m=mm, cos_min=float(cos.min()), cos_max_offdiag=float((cos - 2 * torch.eye(tasks)).max()))
        from taskvec.bases.fit import fit_structure

        names = [f"task{t:02d}" for t in range(tasks)]
        sweep = {}
        for m_ in sorted({1, 2, 4, 8, 16, 32, mm} & set(range(1, tasks + 1))):
            row = {}
            for method in ("pca", "learned"):  # errors from G alone: no pass over the task vectors
                err = fit_structure(g, names, method, m_).relative_errors()
                row[method] = (float(err.mean()), float(err.max()))
            sweep[m_] = row
        out["sweep"] = sweep
        out["sweep_s"] = time.perf_counter() - t0 - out["gram_s"]
    elif name.startswith("build-"):
        method = name.split("-", 1)[1]
        merge = "mean"
        if method == "ties":
            method, merge = "cluster", "ties"
        tvs, names = load_tvs(work, tasks)
        g = torch.load(work / "gram.pt", weights_only=True)
        opts = {"merge": merge} if method == "cluster" else {}
        bank = build_bank(tvs, names, method, m, out=work / f"bank-{name[6:]}", gram_matrix=g, overwrite=True, **opts)
        errs = list(bank.relative_errors().values())
        mem = bank.memory()
        on_disk = sum(p.stat().st_size for p in bank.path.rglob("*") if p.is_file())
        tv_data = 0
        from taskvec.io.safetensors_file import read_header

        for t in range(tasks):
            _, _, start = read_header(tv_path(work, t))
            tv_data += tv_path(work, t).stat().st_size - start
        out.update(
            m=bank.m,
            mean_err=sum(errs) / len(errs),
            max_err=max(errs),
            tv_bytes=mem.task_vectors,
            tv_bytes_on_disk=tv_data,
            bank_bytes=mem.bank,
            bank_on_disk=on_disk,
            ratio=mem.ratio,
            assignments=bank.manifest.assignments,
        )
    elif name == "add":
        from taskvec.core import TaskVector

        bank = Bank.load(work / "bank-cluster")
        k = bank.add(TaskVector.load(tv_path(work, tasks)), "new-task")
        out.update(basis=k, err=bank.relative_errors()["new-task"], m=bank.m, t=bank.t)
    elif name == "compose":
        bank = Bank.load(work / "bank-cluster")
        per = tasks // GROUPS  # one task from each of groups 0 and 1 added, one of group 2 negated
        tv = bank.combine(add=["task00", f"task{per:02d}"], negate=[f"task{2 * per:02d}"])
        tv.apply_to(work / "base.safetensors", 0.5, out=work / "composed.safetensors", overwrite=True)
    else:
        raise SystemExit(f"unknown phase {name}")
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_child(args: argparse.Namespace, name: str) -> dict:
    """Run one phase in a child process, cold cache; poll its RSS (psutil) while it runs."""
    from taskvec._optional import require

    psutil = require("psutil", "bench")

    if name != "generate":
        drop_caches([tv_path(args.workdir, t) for t in range(args.tasks + 1)])

    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--workdir",
        str(args.workdir),
        "--params",
        str(args.params),
        "--tasks",
        str(args.tasks),
        "--threads",
        str(args.threads),
    ] + (["--m", str(args.m)] if args.m else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO)
    peak = [0]

    def poll() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed with status {proc.returncode}")
    res = json.loads(stdout.decode().strip().splitlines()[-1])
    res.update(
        phase=name,
        wall_s=wall,
        peak_rss=max(peak[0], res["ru_maxrss"]),
        loadavg=load_average(),
    )
    log(f"{name}: {wall:.1f} s, peak RSS {res['peak_rss'] / GiB:.2f} GiB")
    return res


def report(
    args: argparse.Namespace,
    gen: dict,
    gen_res: dict,
    results: list[dict],
    read_s: float,
    read_end_s: float,
    load_start: str,
) -> str:
    numel = gen["numel"]
    tv_gb = numel * 2 * args.tasks / 1e9
    what = {
        "gram": f"similarity analysis: streamed {args.tasks} x {args.tasks} Gram matrix (float32 products, "
        "float64 sums)",
        "build-cluster": "cluster bank: spectral clustering + mean merge per cluster",
        "build-ties": "cluster bank: spectral clustering + TIES merge per cluster",
        "build-learned": "learned convex bases (Adam on G) + one pass writing all M bases",
        "build-pca": "PCA bases through G + one pass writing all M bases",
        "add": "continual add of task #65 to the cluster bank (assign + re-merge its basis)",
        "compose": "compose +2 tasks -1 task from the cluster bank onto the fp16 base (apply_to)",
    }
    lines = [
        "# Task vector bases at scale",
        "",
        (
            f"T = {args.tasks} fp16 task vectors of a synthetic {numel / 1e6:.1f}M-parameter model "
            f"({tv_gb:.1f} GB on disk, one safetensors file each); {GROUPS} planted groups. "
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
            f"torch threads = {args.threads}; page cache dropped before every phase. Generated by "
            "`benchmarks/bases_scale.py`."
        ),
        "",
        (
            f"**Limit measured in the same run, cold cache, writeback settled:** sequential read of the "
            f"{tv_gb:.1f} GB of task vectors {read_s:.1f} s ({tv_gb / read_s:.2f} GB/s); again after the phases "
            f"{read_end_s:.1f} s ({tv_gb / read_end_s:.2f} GB/s). Load average at the start: {load_start}."
        ),
        "",
        "| phase | wall time (s) | peak RSS (GiB) | load avg after | result |",
        "|---|---:|---:|---|---|",
        (
            f"| generate {args.tasks + 1} task vectors + base (input set-up, not a bases phase) | "
            f"{gen_res.get('wall_s', 0):.1f} | {gen_res.get('peak_rss', 0) / GiB:.2f} | | {numel:,} parameters per "
            "task "
            f"vector{' (files already on disk from an earlier run: only checked)' if gen_res.get('skipped') else ''} |"
        ),
    ]
    for r in results:
        if r["phase"] == "gram":
            res = (
                f"Gram pass {r['gram_s']:.1f} s ({tv_gb / r['gram_s']:.2f} GB/s) = {r['gram_s'] / read_s:.2f}x the "
                f"sequential read at {tv_gb / read_s:.2f} GB/s ({r['gram_s'] / read_end_s:.2f}x the one at the end; "
                f"{r['gram_cpu_s']:.1f} CPU s), then the error-vs-M sweep below {r['sweep_s']:.1f} s; "
                f"eigengap M = {r['eigengap_m']}; off-diagonal cosine from {r['cos_min']:.3f} (across groups) to "
                f"{r['cos_max_offdiag']:.3f} (within)"
            )
        elif r["phase"].startswith("build-"):
            res = (
                f"M = {r['m']}; rel. error mean {r['mean_err']:.4f}, max {r['max_err']:.4f}; bank "
                f"{r['bank_bytes'] / 1e6:.1f} MB vs task vectors {r['tv_bytes'] / 1e9:.2f} GB ({r['ratio']:.1f}x "
                "smaller)"
            )
        elif r["phase"] == "add":
            res = f"joined basis {r['basis']}; its rel. error {r['err']:.4f}; bank now T = {r['t']}, M = {r['m']}"
        else:
            res = "wrote composed fp16 model"
        lines.append(f"| {what[r['phase']]} | {r['wall_s']:.1f} | {r['peak_rss'] / GiB:.2f} | {r['loadavg']} | {res} |")
    builds = [r for r in results if r["phase"].startswith("build-")]
    lines += [
        "",
        "Memory accounting (bytes; checked against the files on disk):",
        "",
        "| bank | M | task vectors (data, accounted) | task vectors (data, on disk) | bank (accounted) | bank (on "
        "disk) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in builds:
        lines.append(
            f"| {r['phase'][6:]} | {r['m']} | {r['tv_bytes']:,} | {r['tv_bytes_on_disk']:,} | {r['bank_bytes']:,} | "
            f"{r['bank_on_disk']:,} |"
        )
    for r in results:
        if r["phase"] == "gram" and r.get("sweep"):
            lines += [
                "",
                "Relative reconstruction error vs M, from the Gram matrix alone (mean / max over the tasks):",
                "",
                "| M | pca | learned |",
                "|---:|---|---|",
            ]
            for m_, row in r["sweep"].items():
                lines.append(
                    f"| {m_} | {row['pca'][0]:.4f} / {row['pca'][1]:.4f} | {row['learned'][0]:.4f} / "
                    f"{row['learned'][1]:.4f} |"
                )
    total_build = {r["phase"]: r["wall_s"] for r in results}
    if "gram" in total_build and "build-cluster" in total_build:
        lines += [
            "",
            "End-to-end cluster bank from the task vectors (Gram + build): "
            f"{total_build['gram'] + total_build['build-cluster']:.1f} s.",
        ]
    peak = max(r["peak_rss"] for r in results)
    lines += [
        "",
        f"Largest peak RSS of any bases phase: {peak / GiB:.2f} GiB (goal: < 4 GiB) -> "
        f"{'PASS' if peak < 4 * GiB else 'FAIL'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=WORKDIR)
    ap.add_argument("--params", type=float, default=1e8)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--m", type=int, default=None, help="number of bases (default: eigengap)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phases", default="gram,build-cluster,build-learned,build-pca,add,compose")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bases_scale.md")
    args = ap.parse_args()
    if args.tasks % GROUPS:
        raise SystemExit(f"--tasks must be a multiple of {GROUPS}")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "generate":
            res = generate(args.workdir, args.params, args.tasks)
            res["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            res = phase(args.child, args.workdir, args.tasks, args.m)
        print(json.dumps(res))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    gen_res = run_child(args, "generate")
    gen = {k: gen_res[k] for k in ("params", "tasks", "numel")}
    files = [tv_path(args.workdir, t) for t in range(args.tasks)]
    load_start = load_average()
    read_s, gbps, _ = cold_read(files)
    log(f"sequential read of the task vectors: {read_s:.1f} s ({gbps:.2f} GB/s)")
    results = [run_child(args, p) for p in args.phases.split(",") if p]
    read_end_s, gbps_end, _ = cold_read(files)
    log(f"sequential read again at the end: {read_end_s:.1f} s ({gbps_end:.2f} GB/s)")
    text = report(args, gen, gen_res, results, read_s, read_end_s, load_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
