#!/usr/bin/env python3
"""Task vector bases on a real suite: accuracy and memory of addition and negation for M = 1..T.

What it measures
----------------
For every M from 1 to T, a bank of M bases is built from the suite's T real task vectors (spectral
clustering on cosine similarity, each cluster merged by its mean; or `--method learned` / `pca`),
stored in float32 like the fine-tuned checkpoints. From the bank we do
  * task addition: theta0 + lambda * sum_i recon(tau_i), lambda chosen on the validation splits
    (mean accuracy over tasks), test accuracy reported;
  * task negation of each task: theta0 - lambda * recon(tau_target), lambda chosen on validation
    as the largest drop of the target with every control task >= 95% of its pretrained accuracy.
The same two operations with the full task vectors give the reference row. Memory is exact: the
bank's files on disk (bases + manifest) against T float32 task vectors (T * numel * 4 bytes).

Usage
-----
    python3 benchmarks/bases_suites.py vision-4
    python3 benchmarks/bases_suites.py text-3 --method learned
Writes benchmarks/results/bases_<suite>[_<method>].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from taskvec.bases import Bank, build_bank
from taskvec.bench.prepare import prepare
from taskvec.bench.run import choose_lambda, negate
from taskvec.core import TaskVector
from taskvec.io.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]

ADD_LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5)
NEG_LAMBDAS = (0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


def score(
    prep: Any,
    add_tv: TaskVector,
    neg_tvs: dict[str, TaskVector],
    pre_val: dict[str, float],
    grids: dict[str, tuple[float, ...]],
) -> dict[str, Any]:
    """Addition of add_tv and negation of each target with its stand-in (a tau or its reconstruction)."""
    return {
        "addition": choose_lambda(prep, add_tv, grids["addition"]),
        "negation": {t: negate(prep, t, tv, pre_val, grids["negation"]) for t, tv in neg_tvs.items()},
    }


def markdown(r: dict[str, Any]) -> str:
    names = r["tasks"]
    pre, ft = r["pretrained"], r["finetuned"]
    lines = [
        f"### {r['suite']}: bases bank ({r['method']}) vs full task vectors, test accuracy (%)",
        "",
        "| task vectors | memory (MiB) | of full | addition λ | addition avg | addition normalized | "
        "negation: target acc (mean) | negation: control kept (min) | max recon. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        add, neg = row["addition"], row["negation"]
        avg = 100 * statistics.fmean(add["test"].values())
        normd = 100 * statistics.fmean(add["test"][t] / ft[t] for t in names)
        tgt = 100 * statistics.fmean(n["target"] for n in neg.values())
        kept = 100 * min(n["controls"][c] / pre[c] for n in neg.values() for c in n["controls"])
        err = max(row["errors"].values()) if row.get("errors") else 0.0
        lines.append(
            f"| {row['label']} | {row['bytes'] / 2**20:.1f} | {100 * row['bytes'] / r['full_bytes']:.0f}% | "
            f"{add['lambda']} | {avg:.1f} | {normd:.1f} | {tgt:.1f} | {kept:.1f}% | {err:.3f} |"
        )
    lines += [
        "",
        f"Pretrained accuracy (avg over tasks, = the negation targets' accuracy before negation) "
        f"{100 * statistics.fmean(pre.values()):.1f}; fine-tuned avg {100 * statistics.fmean(ft.values()):.1f}. "
        "Memory: bank files on disk (bases + manifest) vs T float32 task vectors. Adding all T tasks from a "
        "bank of cluster means equals task arithmetic exactly for every M: within cluster k, "
        "sum_i d_i s_k = <s_k, sum_i tau_i>/|s_k|^2 s_k = n_k s_k = sum_i tau_i. The bases matter for "
        "operations on single tasks (negation) and for memory; max recon. error = the worst task's "
        "|tau - recon(tau)| / |tau|.",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = r["tasks"]
    bank_rows = [row for row in r["rows"] if row["m"] is not None]
    full = next((row for row in r["rows"] if row["m"] is None), bank_rows[-1])
    ms = [row["m"] for row in bank_rows]

    def add_avg(row: dict[str, Any]) -> float:
        return 100 * statistics.fmean(row["addition"]["test"].values())

    def neg_tgt(row: dict[str, Any]) -> float:
        return 100 * statistics.fmean(n["target"] for n in row["negation"].values())

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ms, [add_avg(x) for x in bank_rows], "o-", label="addition from bank (avg acc)")
    ax[0].axhline(add_avg(full), ls="--", color="C0", label="addition, full task vectors")
    ax[0].plot(ms, [neg_tgt(x) for x in bank_rows], "s-", color="C3", label="negation: target acc (mean)")
    ax[0].axhline(neg_tgt(full), ls="--", color="C3", label="negation, full task vectors")
    ax[0].axhline(100 * statistics.fmean(r["pretrained"][t] for t in names), ls=":", color="gray", label="pretrained")
    ax[0].set_xlabel("number of bases M")
    ax[0].set_ylabel("test accuracy (%)")
    ax[0].set_xticks(ms)
    ax[0].legend(fontsize=7)
    ax[1].plot(ms, [row["bytes"] / 2**20 for row in bank_rows], "o-", label="bank")
    ax[1].axhline(r["full_bytes"] / 2**20, ls="--", label="T full task vectors")
    ax[1].set_xlabel("number of bases M")
    ax[1].set_ylabel("MiB")
    ax[1].set_xticks(ms)
    ax[1].legend(fontsize=7)
    fig.suptitle(f"{r['suite']}: task vector bases ({r['method']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite")
    ap.add_argument("--method", default="cluster", choices=["cluster", "learned", "pca"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--add-lambdas", type=float, nargs="+", default=None, help=f"default {ADD_LAMBDAS}")
    ap.add_argument("--neg-lambdas", type=float, nargs="+", default=None, help=f"default {NEG_LAMBDAS}")
    ap.add_argument(
        "--no-full",
        action="store_true",
        help="skip the full-task-vector row: with clustering, M = T (one task per basis, decoder 1) "
        "is the full task vectors up to float32 storage",
    )
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grids = {"addition": tuple(args.add_lambdas or ADD_LAMBDAS), "negation": tuple(args.neg_lambdas or NEG_LAMBDAS)}
    tag = f"bases_{args.suite}" + ("" if args.method == "cluster" else f"_{args.method}")
    work = args.out / tag
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(args.suite)
    names = list(prep.tasks)
    tvs = [prep.task_vector(t) for t in names]
    numel = tvs[0].numel()
    pre_val, pre_test = prep.evaluate(prep.pretrained, "val"), prep.evaluate(prep.pretrained, "test")
    ft = prep.finetuned_accuracy()
    r: dict[str, Any] = {
        "suite": args.suite,
        "method": args.method,
        "tasks": names,
        "numel": numel,
        "full_bytes": len(tvs) * numel * 4,
        "pretrained": pre_test,
        "finetuned": ft,
        "rows": [],
    }
    t0 = time.perf_counter()
    r["grids"] = grids
    if not args.no_full:
        print(f"[{time.strftime('%H:%M:%S')}] full task vectors", flush=True)
        full = score(prep, TaskVector.sum(tvs), dict(zip(names, tvs, strict=True)), pre_val, grids)
        r["rows"].append({"label": f"full (T = {len(tvs)})", "m": None, "bytes": r["full_bytes"], **full})
    for m in range(1, len(tvs) + 1):
        print(f"[{time.strftime('%H:%M:%S')}] M = {m}", flush=True)
        path = work / f"bank-m{m}"
        opts: dict[str, Any] = {"merge": "mean"} if args.method == "cluster" else {}
        bank = Bank.load(path) if path.exists() else None
        if bank is None or bank.names != names or bank.method != args.method:  # missing, or left by other tasks
            bank = build_bank(tvs, names, args.method, m, out=path, dtype=torch.float32, overwrite=True, **opts)
        res = score(prep, bank.addition(names), {t: bank.reconstruct(t) for t in names}, pre_val, grids)
        row = {
            "label": f"bank M = {m}",
            "m": m,
            "bytes": bank.memory().bank,
            "errors": bank.relative_errors(),
            "assignments": bank.manifest.assignments,
            **res,
        }
        r["rows"].append(row)
    r["seconds"] = time.perf_counter() - t0
    write_text_atomic(args.out / f"{tag}.json", json.dumps(r, indent=1))
    md = markdown(r)
    write_text_atomic(args.out / f"{tag}.md", md)
    plot(r, args.out / f"{tag}.png")
    print(md)


if __name__ == "__main__":
    main()
