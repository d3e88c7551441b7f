#!/usr/bin/env python3
"""Low-rank task vectors: accuracy against rank on a real suite, and the per-sample composed forward's cost.

accuracy SUITE
    The suite's fine-tuned task vectors (cached by `taskvec bench run SUITE`, $TASKVEC_CACHE), each
    stored by `taskvec.core.lowrank.compress` at every --ranks (float32 factors), composed by task
    arithmetic and TIES (density 0.2; lambda chosen on validation, test reported once, as in
    `taskvec bench run`) and by the variational composer (the suite's `compose` settings, seeds
    0..--seeds-1, starting at dense task arithmetic's lambda; trained on validation, scored on test;
    --no-variational leaves it out), against the dense task vectors. Reports test accuracy (mean
    over tasks), the stored size against the dense float32 task vectors, and the smallest rank
    keeping >= 99 % of every dense result.
    Results: benchmarks/results/lowrank_<suite>.md (each finished row also in --work/<suite>/rows.json,
    so an interrupted run resumes).

forward-suite SUITE
    The composed forward on a real suite's backbone with its task vectors at each of --ranks and the
    coefficients a trained variational composer (seed 0) gives a batch of its test inputs: the gated
    low-rank forward (zero terms skipped), the same computing every term, dense task vectors, and the
    backbone alone. Results: benchmarks/results/lowrank_forward_<suite>.md.

forward
    Samples/s of the composed MiniLM (all-MiniLM-L6-v2, 32 tokens, mean pooled) with per-sample
    coefficients (one block per tensor), T task vectors, batch 1/32/256, inference: the base model
    alone, dense task vectors (ComposedModel's batched per-sample forward) and low-rank task vectors
    of each rank in --ranks (random factors; the per-sample forward through the factors), with every
    coefficient nonzero or, for each share in --active, that share of them nonzero at random (as the
    variational composer's gate leaves them). Least process CPU time of --repeats runs after a
    warm-up, one thread. Results: benchmarks/results/lowrank_forward.md.

    python3 benchmarks/lowrank.py accuracy tiny --ranks 4 8 16 32 --seeds 5
    python3 benchmarks/lowrank.py forward --ranks 4 8 16 --tasks 4 8 16 --active 1.0 0.3
    python3 benchmarks/lowrank.py forward-suite vision-6 --ranks 8 16
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
LABELS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "variational": "variational"}


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


def compress_at(
    folder: Path, rank: int, names: list[str], tvs: list[TaskVector]
) -> tuple[list[TaskVector], float, int]:
    """Each task vector stored at `rank` as folder/r<rank>/<task>.safetensors (replacing an earlier
    one): the stored task vectors, their mean relative error and the bytes stored."""
    from taskvec.core.lowrank import compress

    paths = [folder / f"r{rank}" / f"{t}.safetensors" for t in names]
    reports = [compress(tv, path, rank=rank, overwrite=True) for tv, path in zip(tvs, paths, strict=True)]
    return (
        [TaskVector.load(path) for path in paths],
        statistics.fmean(r.rel_error for r in reports),
        sum(r.stored_bytes for r in reports),
    )


def accuracy(args: argparse.Namespace) -> None:
    from taskvec.bench.learned import learned_config, suite_data, task_parts
    from taskvec.bench.models import forward_features
    from taskvec.bench.prepare import prepare
    from taskvec.bench.run import choose_lambda
    from taskvec.variational import evaluate_composer, train_composer

    prep = prepare(args.suite)
    names = list(prep.tasks)
    dense_tvs, heads = task_parts(prep)
    val, test = suite_data(prep, "val"), suite_data(prep, "test")
    work = Path(args.work) / args.suite
    store = work / "rows.json"
    rows: dict[str, Any] = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    dense_bytes = sum(tv.numel() * 4 for tv in dense_tvs)

    def tvs_at(label: str) -> list[TaskVector]:
        if label == "dense":
            return dense_tvs
        return [TaskVector.load(work / f"r{label}" / f"{t}.safetensors") for t in names]

    def statics(tvs: list[TaskVector]) -> dict[str, float]:
        out: dict[str, float] = {}
        for method in ("task_arithmetic", "ties"):
            r = choose_lambda(prep, compose(tvs, method, **prep.suite.compose.params(method)))
            out[method] = 100 * statistics.fmean(r["test"].values())  # type: ignore[union-attr]
            out[f"{method}_lambda"] = float(r["lambda"])  # type: ignore[arg-type]
        return out

    def variational(tvs: list[TaskVector], seed: int) -> dict[str, float]:
        # the suite's own settings (as `taskvec bench run`), starting at dense task arithmetic's lambda
        cfg = learned_config(prep, "variational", seed, rows["dense"]["task_arithmetic_lambda"], progress=False)
        prep.backbone.load_state_dict(prep.pretrained)
        t0 = time.perf_counter()
        comp = train_composer(prep.backbone, tvs, heads, val, cfg, forward_fn=forward_features, task_names=names)
        seconds = time.perf_counter() - t0
        res = evaluate_composer(comp, test)
        return {
            "accuracy": 100 * statistics.fmean(res.accuracy.values()),
            "active": statistics.fmean(res.active.values()),
            "seconds": seconds,
            "lowrank_tensors": len(comp.model.lowrank_keys),
        }

    if "reference" not in rows:
        rows["reference"] = {
            "pretrained": 100 * statistics.fmean(prep.evaluate(prep.pretrained, "test").values()),
            "finetuned": 100 * statistics.fmean(prep.finetuned_accuracy().values()),
        }
    for label in ["dense", *[str(r) for r in args.ranks]]:
        if label not in rows:
            t0 = time.perf_counter()
            if label == "dense":
                tvs, error, nbytes = dense_tvs, 0.0, dense_bytes
            else:
                tvs, error, nbytes = compress_at(work, int(label), names, dense_tvs)
            info = {"rel_error": error, "bytes": nbytes, "compress_seconds": time.perf_counter() - t0}
            rows[label] = {**info, **statics(tvs), "variational_runs": {}}
            write_text_atomic(store, json.dumps(rows, indent=1))
        runs = rows[label]["variational_runs"]
        for seed in range(args.seeds if args.variational else 0):
            if str(seed) not in runs:
                runs[str(seed)] = variational(tvs_at(label), seed)
                print(label, seed, runs[str(seed)], flush=True)
                write_text_atomic(store, json.dumps(rows, indent=1))
    write_text_atomic(RESULTS / f"lowrank_{args.suite}.md", accuracy_table(args, rows, dense_bytes, names))
    print((RESULTS / f"lowrank_{args.suite}.md").read_text())


def variational_stats(row: dict[str, Any], seeds: int) -> dict[str, float]:
    """Mean and sd over the first `seeds` variational runs of a row: accuracy, active fraction, seconds."""
    from taskvec.bench.report import mean_sd

    runs = [row["variational_runs"][str(s)] for s in range(seeds)]
    mean, sd = mean_sd([r["accuracy"] for r in runs])
    return {
        "mean": mean,
        "sd": sd,
        "active": statistics.fmean(r["active"] for r in runs),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
        "lowrank_tensors": runs[0]["lowrank_tensors"],
    }


def accuracy_table(args: argparse.Namespace, rows: dict[str, Any], dense_bytes: int, names: list[str]) -> str:
    statics = ("task_arithmetic", "ties")
    ranks = sorted(args.ranks)
    labels = ["dense", *map(str, ranks)]
    var = {label: variational_stats(rows[label], args.seeds) for label in labels} if args.variational else {}
    d = rows["dense"]

    def kept(label: str) -> dict[str, float]:
        r = rows[label]
        out = {m: r[m] / d[m] for m in statics}
        if var:
            out["variational"] = var[label]["mean"] / var["dense"]["mean"]
        return out

    ok = {r: all(v >= 0.99 for v in kept(str(r)).values()) for r in ranks}
    keep = [r for r in ranks if all(ok[q] for q in ranks if q >= r)]  # this rank and every larger one tried
    best = min(keep) if keep else None
    seeds = f"seeds 0-{args.seeds - 1}, mean ± sd" if args.seeds > 1 else "seed 0"
    command = f"benchmarks/lowrank.py accuracy {args.suite} --ranks {' '.join(map(str, ranks))}" + (
        f" --seeds {args.seeds}" if var else " --no-variational"
    )
    lines = [
        f"# Low-rank task vectors on {args.suite}: accuracy against rank",
        "",
        (
            f"{datetime.date.today()}, CPU ({os.cpu_count()} cores shared), torch {torch.__version__}. Tasks: "
            f"{', '.join(names)}. Each fine-tuned task vector stored by `taskvec.core.lowrank.compress` at rank r "
            "(float32 factors of every matrix and conv kernel; 1-D tensors and tensors whose factors would be larger "
            "stay dense). Test accuracy (%), mean over tasks; task arithmetic and TIES (density 0.2) with lambda "
            "chosen on validation"
            + (
                "; variational composer with the suite's `compose` settings (as `taskvec bench run`), "
                f"{seeds}, starting at dense task arithmetic's lambda, trained on validation; active = the share of "
                "its test-time coefficients the gate keeps (nonzero), mean over tasks and seeds"
                if var
                else " (the variational composer is not run on this suite)"
            )
            + ". Relative error = ||tau - tau_r|| / ||tau||, mean over tasks. Memory = "
            f"stored bytes / dense float32 bytes ({dense_bytes / 1e6:.1f} MB for {len(names)} task vectors). "
            f"`python3 {command}`."
        ),
        "",
        (
            "For scale: the pretrained model (the suite's frozen heads) scores "
            f"{rows['reference']['pretrained']:.1f}, the "
            f"fine-tuned models (one per task) {rows['reference']['finetuned']:.1f}."
        ),
        "",
    ]
    if var:
        lines += [
            "| task vectors | relative error | memory | task arithmetic | TIES | variational | variational / dense | "
            "active | tensors composed from factors | variational train s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| task vectors | relative error | memory | task arithmetic | TIES | task arithmetic / dense | "
            "TIES / dense |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
    for label in labels:
        r = rows[label]
        head = (
            f"| {'dense' if label == 'dense' else 'rank ' + label} | {r['rel_error']:.3f} | "
            f"{r['bytes'] / dense_bytes:.1%} | {r['task_arithmetic']:.1f} | {r['ties']:.1f} |"
        )
        if not var:
            k = kept(label)
            lines.append(f"{head} {k['task_arithmetic']:.1%} | {k['ties']:.1%} |")
            continue
        v = var[label]
        sd = f" ± {v['sd']:.1f}" if args.seeds > 1 else ""
        lines.append(
            f"{head} {v['mean']:.1f}{sd} | {kept(label)['variational']:.1%} | {v['active']:.1%} | "
            f"{v['lowrank_tensors']} | {v['seconds']:.0f} |"
        )
    lines.append("")
    pre = rows["reference"]["pretrained"]
    gains = {m: d[m] - pre for m in statics}
    if var:
        gains["variational"] = var["dense"]["mean"] - pre
    lines.append(
        "Dense composition over the pretrained model: "
        + ", ".join(f"{LABELS[m]} {g:+.1f}" for m, g in gains.items())
        + " points."
    )
    lines.append("")
    what = "all three methods" if var else "task arithmetic and TIES"
    if best is None:
        lines.append(f"No rank tried (nor any larger one) keeps >= 99 % of the dense result of {what}.")
    else:
        k = kept(str(best))
        lines.append(
            f"Smallest rank from which every rank tried keeps >= 99 % of the dense result of {what}"
            f"{' (the variational composer by its mean over seeds)' if var and args.seeds > 1 else ''}: **r = "
            f"{best}** ("
            + ", ".join(f"{LABELS[m]} {v:.1%}" for m, v in k.items())
            + f" of dense), memory {rows[str(best)]['bytes'] / dense_bytes:.1%} of the dense task vectors."
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
                g = torch.Generator().manual_seed(n)
                alpha = 0.5 * torch.rand(n, t, lr.num_blocks, generator=g)
                keep = torch.rand(alpha.shape, generator=g)
                fns: dict[str, Callable[[], Any]] = {"base": lambda x=x: default_forward(model, x)}
                for share in args.active:  # the gate keeps each coefficient with this probability
                    a = alpha * (keep < share)
                    fns[f"lowrank@{share}"] = lambda x=x, a=a, m=lr: m(x, a)
                if dense is not None and n not in t_dense:
                    fns["dense"] = lambda x=x, a=alpha, m=dense: m(x, a)
                with torch.no_grad():
                    secs = best_times(fns, args.repeats)
                tb = secs["base"]
                if "dense" in secs:
                    t_dense[n] = secs["dense"] / tb  # kept as a ratio to the base of the same rounds
                td = t_dense[n] * tb if dense is not None else float("nan")
                for share in args.active:
                    tl = secs[f"lowrank@{share}"]
                    rows.append(
                        {
                            "T": t,
                            "rank": rank,
                            "batch": n,
                            "active": share,
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
            "embeddings included), 1-D tensors dense. Active = the share of nonzero coefficients: 1.0 is every "
            "coefficient nonzero (any learned composer); below 1, each (sample, task, block) coefficient is kept "
            "with that probability, as the variational composer's gate leaves them (it keeps 24-38 % at test time "
            "on the suites, section 7), and the low-rank layers skip the zero terms. The dense forward is timed once "
            "per T and batch (beside the first rank) and shown against the base model of its own rounds. Dense = "
            "the same task vectors as dense tensors (the batched per-sample forward, timed with every coefficient "
            "nonzero). "
            "Samples/s; ratios are times against the base model. No GPU on this machine: GPU rows not measured. "
            f"`python3 benchmarks/lowrank.py forward --ranks {' '.join(map(str, args.ranks))} --tasks "
            f"{' '.join(map(str, args.tasks))} --active {' '.join(map(str, args.active))}`."
        ),
        "",
        "| T | rank r | batch | active | base | low-rank composed | low-rank / base time | dense composed | "
        "dense / base time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['rank']} | {r['batch']} | {r['active']:g} | {r['base']:.1f} | {r['lowrank']:.1f} | "
            f"{r['lr_ratio']:.2f}x | {r['dense']:.1f} | {r['dense_ratio']:.2f}x |"
        )
    big = max(args.batches)
    for rank in args.ranks:
        for share in args.active:
            at = [r for r in rows if r["rank"] == rank and r["batch"] == big and r["active"] == share]
            got = {r["T"]: r["lr_ratio"] for r in at}
            goals = [(t, g) for t, g in ((8, 1.3), (16, 1.5)) if t in got]
            if goals:
                lines.append("")
                lines.append(
                    f"Rank {rank}, batch {big}, active {share:g}: "
                    + "; ".join(
                        f"T = {t}: {got[t]:.2f}x the base model (goal <= {g}x: {'met' if got[t] <= g else 'not met'})"
                        for t, g in goals
                    )
                    + "."
                )
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(args.out, text)


def forward_suite(args: argparse.Namespace) -> None:
    """The composed forward on a real suite: its backbone, its task vectors at each of --ranks, the
    coefficients a trained variational composer gives its test inputs, against the backbone alone."""
    from taskvec.bench.learned import learned_config, suite_data, task_parts
    from taskvec.bench.models import forward_features
    from taskvec.bench.prepare import prepare
    from taskvec.bench.run import choose_lambda
    from taskvec.variational import ComposedModel, ops, train_composer
    from taskvec.variational.engine import take

    prep = prepare(args.suite)
    names = list(prep.tasks)
    dense_tvs, heads = task_parts(prep)
    val, test = suite_data(prep, "val"), suite_data(prep, "test")
    lam = float(choose_lambda(prep, compose(dense_tvs, "task_arithmetic"))["lambda"])  # type: ignore[arg-type]
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.batch]  # tasks mixed
    x = take(test.inputs, index)
    rows = []
    for rank in args.ranks:
        tvs = compress_at(Path(args.work) / args.suite, rank, names, dense_tvs)[0]
        torch.set_num_threads(args.train_threads)
        cfg = learned_config(prep, "variational", 0, lam, progress=False)
        prep.backbone.load_state_dict(prep.pretrained)
        comp = train_composer(prep.backbone, tvs, heads, val, cfg, forward_fn=forward_features, task_names=names)
        comp.eval()
        lr = comp.model
        dense = ComposedModel(
            prep.backbone,
            dense_tvs,
            blocks=lr.blocks,
            include=cfg.composer.include,
            exclude=cfg.composer.exclude or None,
            strategy=cfg.composer.strategy,
            forward_fn=forward_features,
            task_names=names,
            lowrank=False,
        )
        torch.set_num_threads(args.threads)
        with torch.no_grad():
            alpha = comp.coefficients(test.features[index])

            def all_terms(alpha: torch.Tensor = alpha, lr: ComposedModel = lr) -> Any:
                before, ops.SPARSE_SHARE, lr.skip_gated = ops.SPARSE_SHARE, 0.0, False
                try:
                    return lr(x, alpha)
                finally:
                    ops.SPARSE_SHARE, lr.skip_gated = before, True

            fns: dict[str, Callable[[], Any]] = {
                "base": lambda: forward_features(prep.backbone, x),
                "lowrank": lambda alpha=alpha, lr=lr: lr(x, alpha),
                "lowrank_all": all_terms,
                "dense": lambda alpha=alpha, dense=dense: dense(x, alpha),
            }
            secs = best_times(fns, args.repeats)
            gap = float((lr(x, alpha) - all_terms()).abs().max())
        per_block = (alpha != 0).double().mean((0, 1))
        rows.append(
            {
                "rank": rank,
                "secs": secs,
                "gap": gap,
                "active": float((alpha != 0).double().mean()),
                "block_min": float(per_block.min()),
                "block_max": float(per_block.max()),
                "blocks_off": int((per_block == 0).sum()),
                "blocks": int(per_block.numel()),
                "lowrank_keys": len(lr.lowrank_keys),
                "keys": len(lr.keys),
            }
        )
        print(rows[-1], flush=True)
    lines = [
        f"# Composed forward on {args.suite}: low-rank task vectors and the variational composer's gate",
        "",
        (
            f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{args.threads} CPU thread(s). The suite's backbone and its {len(names)} fine-tuned task vectors "
            "stored at rank r (some tensors from factors, the rest dense, as the table says), a variational composer "
            "trained on validation for each rank (seed 0, the suite's settings), and "
            f"{args.batch} test inputs drawn across the tasks, with the coefficients the composer gives them. "
            f"Inference (no_grad); least process CPU time of {args.repeats} rounds after a warm-up, each round "
            "running the four forwards in turn; times against the backbone alone. `python3 benchmarks/lowrank.py "
            f"forward-suite {args.suite} --ranks {' '.join(map(str, args.ranks))}`."
        ),
        "",
        "| rank r | tensors from factors | coefficients kept by the gate (per block) | blocks gated out for the batch "
        "| base samples/s | low-rank, zero terms skipped | low-rank, every term | dense task vectors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["secs"]
        lines.append(
            f"| {r['rank']} | {r['lowrank_keys']} of {r['keys']} | {r['active']:.1%} ({r['block_min']:.0%}-"
            f"{r['block_max']:.0%}) | {r['blocks_off']} of {r['blocks']} | {args.batch / t['base']:.1f} | "
            f"{t['lowrank'] / t['base']:.2f}x | "
            f"{t['lowrank_all'] / t['base']:.2f}x | {t['dense'] / t['base']:.2f}x |"
        )
    lines += [
        "",
        "Largest difference between the two low-rank forwards (skipped vs every term): "
        + ", ".join(f"r = {r['rank']}: {r['gap']:.1e}" for r in rows)
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(RESULTS / f"lowrank_forward_{args.suite}.md", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("suite")
    a.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    a.add_argument("--work", default="/tmp/taskvec-lowrank", help="where the compressed task vectors are written")
    a.add_argument("--seeds", type=int, default=1, help="variational runs per rank (seeds 0..N-1)")
    a.add_argument("--no-variational", dest="variational", action="store_false", help="task arithmetic and TIES only")
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
    f.add_argument(
        "--active",
        type=float,
        nargs="+",
        default=[1.0],
        help="shares of nonzero coefficients to time (1.0: every coefficient nonzero; the gated variational "
        "composer keeps about 0.3)",
    )
    f.add_argument("--out", type=Path, default=RESULTS / "lowrank_forward.md")
    fs = sub.add_parser("forward-suite")
    fs.add_argument("suite")
    fs.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    fs.add_argument("--batch", type=int, default=256)
    fs.add_argument("--repeats", type=int, default=15)
    fs.add_argument("--threads", type=int, default=1, help="threads of the timed forwards")
    fs.add_argument("--train-threads", type=int, default=2, help="threads while the composer trains")
    fs.add_argument("--work", default="/tmp/taskvec-lowrank", help="where the compressed task vectors are written")
    args = ap.parse_args()
    if args.cmd == "forward-suite":
        forward_suite(args)
    elif args.cmd == "accuracy":
        if args.threads:
            torch.set_num_threads(args.threads)
        accuracy(args)
    else:
        forward(args)


if __name__ == "__main__":
    main()
