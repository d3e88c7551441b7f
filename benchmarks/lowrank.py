#!/usr/bin/env python3
"""Low-rank task vectors: accuracy against rank on a real suite, and the per-sample composed forward's cost.

accuracy SUITE
    The suite's fine-tuned task vectors (cached by `taskvec bench run SUITE`, $TASKVEC_CACHE), each
    stored by `taskvec.core.lowrank.compress` at every --ranks (float32 factors), composed by task
    arithmetic and TIES (density 0.2; lambda chosen on validation, test reported once, as in
    `taskvec bench run`) and by the variational composer (the suite's `compose` settings, seed 0,
    starting at dense task arithmetic's lambda; trained on validation, scored on test),
    against the dense task vectors. Reports test accuracy (mean over tasks), the stored size against
    the dense float32 task vectors, and the smallest rank keeping >= 99 % of every dense result.
    Results: benchmarks/results/lowrank_<suite>.md (each finished row also in --work/<suite>/rows.json,
    so an interrupted run resumes).

forward
    Samples/s of the composed MiniLM (all-MiniLM-L6-v2, 32 tokens, mean pooled) with per-sample
    coefficients (one block per tensor), T task vectors, batch 1/32/256, inference: the base model
    alone, dense task vectors (ComposedModel's batched per-sample forward) and low-rank task vectors
    of each rank in --ranks (random factors; the per-sample forward through the factors). Least process CPU
    time of --repeats runs after a warm-up, one thread. Results: benchmarks/results/lowrank_forward.md.

    python3 benchmarks/lowrank.py accuracy tiny --ranks 1 2 4 8 16 32
    python3 benchmarks/lowrank.py forward --ranks 4 8 --tasks 4 8 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from taskvec import TaskVector, compose
from taskvec.io.atomic import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def best_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Least process CPU time of one call of each function, over a warm-up and `repeats` rounds
    that run them in turn (so a change in the machine's load hits all alike); one thread: the
    time other jobs on the shared cores hold the CPU is not counted."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats + 1):
        for k, fn in fns.items():
            times[k] += timeit.repeat(fn, timer=time.process_time, repeat=1, number=1)
    return {k: min(v) for k, v in times.items()}


# --------------------------------------------------------------------------- accuracy vs rank


def accuracy(args: argparse.Namespace) -> None:
    from taskvec.bench.compose import learned_config, suite_data, task_parts
    from taskvec.bench.models import forward_features
    from taskvec.bench.run import DEFAULT_PARAMS, choose_lambda, prepare
    from taskvec.core.lowrank import compress
    from taskvec.variational import evaluate_composer, train_composer

    prep = prepare(args.suite)
    names = list(prep.tasks)
    dense_tvs, heads = task_parts(prep)
    val, test = suite_data(prep, "val"), suite_data(prep, "test")
    work = Path(args.work) / args.suite
    store = work / "rows.json"
    rows: dict[str, Any] = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    dense_bytes = sum(tv.numel() * 4 for tv in dense_tvs)

    def evaluate(tvs: list[TaskVector]) -> dict[str, float]:
        out: dict[str, float] = {}
        for method in ("task_arithmetic", "ties"):
            r = choose_lambda(prep, compose(tvs, method, **DEFAULT_PARAMS.get(method, {})))
            out[method] = 100 * statistics.fmean(r["test"].values())  # type: ignore[union-attr]
            out[f"{method}_lambda"] = float(r["lambda"])  # type: ignore[arg-type]
        # the suite's own settings (as `taskvec bench run`), starting at dense task arithmetic's lambda
        init = rows["dense"]["task_arithmetic_lambda"] if "dense" in rows else out["task_arithmetic_lambda"]
        cfg = learned_config(prep, "variational", 0, init, progress=False)
        prep.backbone.load_state_dict(prep.pretrained)
        t0 = time.perf_counter()
        comp = train_composer(prep.backbone, tvs, heads, val, cfg, forward_fn=forward_features, task_names=names)
        out["variational_seconds"] = time.perf_counter() - t0
        out["variational"] = 100 * statistics.fmean(evaluate_composer(comp, test).accuracy.values())
        out["lowrank_tensors"] = len(comp.model.lowrank_keys)
        return out

    if "reference" not in rows:
        rows["reference"] = {
            "pretrained": 100 * statistics.fmean(prep.evaluate(prep.pretrained, "test").values()),
            "finetuned": 100 * statistics.fmean(prep.finetuned_accuracy().values()),
        }
    for label in ["dense", *[str(r) for r in args.ranks]]:
        if label in rows:
            continue
        t0 = time.perf_counter()
        if label == "dense":
            tvs, info = dense_tvs, {"rel_error": 0.0, "bytes": dense_bytes}
        else:
            tvs, errs, nbytes = [], [], 0
            for t, tv in zip(names, dense_tvs, strict=False):
                path = work / f"r{label}" / f"{t}.safetensors"
                rep = compress(tv, path, rank=int(label), overwrite=True)
                errs.append(rep.rel_error)
                nbytes += rep.stored_bytes
                tvs.append(TaskVector.load(path))
            info = {"rel_error": statistics.fmean(errs), "bytes": nbytes}
        compress_s = time.perf_counter() - t0
        rows[label] = {**info, **evaluate(tvs), "compress_seconds": compress_s}
        print(label, rows[label], flush=True)
        write_text_atomic(store, json.dumps(rows, indent=1))
    write_text_atomic(RESULTS / f"lowrank_{args.suite}.md", accuracy_table(args, rows, dense_bytes, names))
    print((RESULTS / f"lowrank_{args.suite}.md").read_text())


def accuracy_table(args: argparse.Namespace, rows: dict[str, Any], dense_bytes: int, names: list[str]) -> str:
    methods = ("task_arithmetic", "ties", "variational")
    d = rows["dense"]
    ranks = sorted(int(k) for k in rows if k not in ("dense", "reference"))
    ok = {r: all(rows[str(r)][m] >= 0.99 * d[m] for m in methods) for r in ranks}
    keep = [r for r in ranks if all(ok[q] for q in ranks if q >= r)]  # this rank and every larger one tried
    best = min(keep) if keep else None
    lines = [
        f"# Low-rank task vectors on {args.suite}: accuracy against rank",
        "",
        (
            f"{datetime.date.today()}, CPU ({os.cpu_count()} cores shared), torch {torch.__version__}. Tasks: "
            f"{', '.join(names)}. Each fine-tuned task vector stored by `taskvec.core.lowrank.compress` at rank r "
            "(float32 factors of every matrix and conv kernel; 1-D tensors and tensors whose factors would be larger "
            "stay dense). Test accuracy (%), mean over tasks; task arithmetic and TIES (density 0.2) with lambda "
            "chosen on validation; variational composer with the suite's `compose` settings (as `taskvec bench run`), "
            "seed 0, starting at dense task arithmetic's lambda, trained on validation. "
            "Relative error = ||tau - tau_r|| / ||tau||, mean over tasks. Memory = "
            f"stored bytes / dense float32 bytes ({dense_bytes / 1e6:.1f} MB for {len(names)} task vectors). `python3 "
            f"benchmarks/lowrank.py accuracy {args.suite} --ranks {' '.join(map(str, ranks))}`."
        ),
        "",
        (
            "For scale: the pretrained model (the suite's frozen heads) scores "
            f"{rows['reference']['pretrained']:.1f}, the "
            f"fine-tuned models (one per task) {rows['reference']['finetuned']:.1f}."
        ),
        "",
        "| task vectors | relative error | memory | task arithmetic | TIES | variational | variational: tensors "
        "composed from factors | variational train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in ["dense", *map(str, ranks)]:
        r = rows[label]
        lines.append(
            f"| {'dense' if label == 'dense' else 'rank ' + label} | {r['rel_error']:.3f} | "
            f"{r['bytes'] / dense_bytes:.1%} | {r['task_arithmetic']:.1f} | {r['ties']:.1f} | {r['variational']:.1f} | "
            f"{r['lowrank_tensors']} | {r['variational_seconds']:.0f} |"
        )
    lines.append("")
    pre = rows["reference"]["pretrained"]
    gains = {m: d[m] - pre for m in methods}
    lines.append(
        "Dense composition over the pretrained model: "
        + ", ".join(f"{m.replace('_', ' ')} {g:+.1f}" for m, g in gains.items())
        + " points."
        + (
            " With gains under 2 points the suite cannot tell ranks apart (the largest gap to dense at any rank tried "
            f"is {max(abs(rows[str(r)][m] - d[m]) for r in ranks for m in methods):.1f} points, in either direction): "
            "the rank below reflects this suite's noise rather than a measured need."
            if max(abs(g) for g in gains.values()) < 2
            else ""
        )
    )
    lines.append("")
    if best is None:
        lines.append("No rank tried (nor any larger one) keeps >= 99 % of every dense result.")
    else:
        b = rows[str(best)]
        lines.append(
            "Smallest rank from which every rank tried keeps >= 99 % of the dense result of all three methods: **r = "
            f"{best}** (task arithmetic {b['task_arithmetic'] / d['task_arithmetic']:.1%}, TIES "
            f"{b['ties'] / d['ties']:.1%}, variational {b['variational'] / d['variational']:.1%} of dense), memory "
            f"{b['bytes'] / dense_bytes:.1%} of the dense task vectors."
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- composed forward


def random_lowrank(model: torch.nn.Module, t: int, rank: int) -> list[TaskVector]:
    """T task vectors with random rank-`rank` factors for every matrix, of about 1 % of each weight's norm."""
    from taskvec.io.lowrank import Factors, factored_from_tensors

    g = torch.Generator().manual_seed(1)
    tvs = []
    for k in range(t):
        factors, dense = {}, {}
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2 and rank * (p.shape[0] + p[0].numel()) < p.numel():
                m, n = p.shape[0], p[0].numel()
                u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
                v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
                s = torch.full((rank,), 0.01 * float(p.norm()) / rank**0.5)
                factors[name] = Factors(u, s, v, tuple(p.shape))
            else:
                dense[name] = 0.01 * p.abs() * torch.randn(p.shape, generator=g)
        tvs.append(TaskVector(factored_from_tensors(factors, dense), name=f"task{k}"))
    return tvs


def forward(args: argparse.Namespace) -> None:
    from taskvec.bench.assets import load_minilm
    from taskvec.variational import ComposedModel
    from taskvec.variational.engine import default_forward, take

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    model, _ = load_minilm()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_max = max(args.batches)
    ids = torch.randint(1000, 30000, (n_max, args.seq_len), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = []
    for t in args.tasks:
        dense = None
        for rank in args.ranks:
            lr_tvs = random_lowrank(model, t, rank)
            lr = ComposedModel(model, lr_tvs)
            if dense is None and not args.no_dense:  # the dense cost does not depend on the rank
                dense = ComposedModel(model, lr_tvs, lowrank=False)
                t_dense: dict[int, float] = {}
            for n in args.batches:
                x = take(inputs, slice(0, n))
                alpha = 0.5 * torch.rand(n, t, lr.num_blocks, generator=torch.Generator().manual_seed(n))
                fns: dict[str, Callable[[], Any]] = {
                    "base": lambda x=x: default_forward(model, x),
                    "lowrank": lambda x=x, a=alpha, m=lr: m(x, a),
                }
                if dense is not None and n not in t_dense:
                    fns["dense"] = lambda x=x, a=alpha, m=dense: m(x, a)
                with torch.no_grad():
                    secs = best_times(fns, args.repeats)
                tb, tl = secs["base"], secs["lowrank"]
                if "dense" in secs:
                    t_dense[n] = secs["dense"] / tb  # kept as a ratio to the base of the same rounds
                td = t_dense[n] * tb if dense is not None else float("nan")
                rows.append(
                    {
                        "T": t,
                        "rank": rank,
                        "batch": n,
                        "base": n / tb,
                        "lowrank": n / tl,
                        "dense": n / td,
                        "lr_ratio": tl / tb,
                        "dense_ratio": td / tb,
                        "lr_keys": len(lr.lowrank_keys),
                        "keys": len(lr.keys),
                    }
                )
                print(rows[-1], flush=True)
            del lr
        del dense
    load1 = os.getloadavg()[0]
    lines = [
        "# Composed forward with low-rank task vectors: per-sample coefficients vs. the base model",
        "",
        (
            f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{args.threads} CPU thread(s), {os.cpu_count()} cores shared with other jobs (1-min load average "
            f"{load0:.1f} at start, {load1:.1f} at end). all-MiniLM-L6-v2, {args.seq_len} tokens, mean pooled; "
            f"per-sample alpha, one block per tensor; inference (no_grad); least process CPU time of {args.repeats} "
            "rounds after a warm-up, each round running base, low-rank and dense in turn. Task vectors: random "
            f"factors of rank r for every matrix ({rows[0]['lr_keys']} of {rows[0]['keys']} composed tensors; the "
            "embeddings included), 1-D tensors dense. The dense forward is timed once per T and batch (beside the "
            "first rank) and shown against the base model of its own rounds. Dense = the same task vectors as dense "
            "tensors (the batched per-sample forward). Samples/s; ratios are times against the base model. No GPU on "
            "this machine: GPU rows not measured. `python3 benchmarks/lowrank.py forward --ranks "
            f"{' '.join(map(str, args.ranks))} --tasks {' '.join(map(str, args.tasks))}`."
        ),
        "",
        "| T | rank r | batch | base | low-rank composed | low-rank / base time | dense composed | dense / base time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['rank']} | {r['batch']} | {r['base']:.1f} | {r['lowrank']:.1f} | {r['lr_ratio']:.2f}x | "
            f"{r['dense']:.1f} | {r['dense_ratio']:.2f}x |"
        )
    big = max(args.batches)
    for rank in args.ranks:
        got = {r["T"]: r["lr_ratio"] for r in rows if r["rank"] == rank and r["batch"] == big}
        goals = [(t, g) for t, g in ((8, 1.3), (16, 1.5)) if t in got]
        if goals:
            lines.append("")
            lines.append(
                f"Rank {rank}, batch {big}: "
                + "; ".join(
                    f"T = {t}: {got[t]:.2f}x the base model (goal <= {g}x: {'met' if got[t] <= g else 'not met'})"
                    for t, g in goals
                )
                + "."
            )
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(args.out, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("suite")
    a.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    a.add_argument("--work", default="/tmp/taskvec-lowrank", help="where the compressed task vectors are written")
    a.add_argument("--fresh", action="store_true", help="ignore finished rows of an earlier run")
    a.add_argument("--threads", type=int, default=None)
    f = sub.add_parser("forward")
    f.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    f.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 16])
    f.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    f.add_argument("--seq-len", type=int, default=32)
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--no-dense", action="store_true")
    f.add_argument("--out", type=Path, default=RESULTS / "lowrank_forward.md")
    args = ap.parse_args()
    if args.cmd == "accuracy":
        if args.threads:
            torch.set_num_threads(args.threads)
        accuracy(args)
    else:
        forward(args)


if __name__ == "__main__":
    main()
