#!/usr/bin/env python3
"""How well do the frozen pretrained features f0(x) tell which task an input comes from?

A sample-specific composer sees only f0(x); if f0 cannot tell the tasks' inputs apart, a per-input
alpha(x) has little to route on and can at best match shared (block-level) coefficients. This
measures it: a multinomial logistic regression (scikit-learn) from f0(x) to the task index, fitted
on the suite's validation splits (the composers' training data) and scored on its test splits;
the last column fits it on the larger training splits instead, to tell a weak signal from a
small sample.

    python3 benchmarks/routing_signal.py vision-4 text-3

Writes benchmarks/results/routing_signal.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from taskvec.bench.learned import suite_data
from taskvec.bench.prepare import prepare
from taskvec.io.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def task_id_accuracy(suite: str, cs: tuple[float, ...]) -> dict[str, object]:
    from sklearn.linear_model import LogisticRegression

    prep = prepare(suite)
    val, test = suite_data(prep, "val", labels=False), suite_data(prep, "test", labels=False)
    xv, yv, xt, yt = val.features.numpy(), val.tasks.numpy(), test.features.numpy(), test.tasks.numpy()
    scores = {c: LogisticRegression(C=c, max_iter=5000).fit(xv, yv).score(xt, yt) for c in cs}
    # is the signal only short of data? the same regression fitted on the (larger) training splits
    train = suite_data(prep, "train", labels=False)
    on_train = LogisticRegression(C=1.0, max_iter=5000).fit(train.features.numpy(), train.tasks.numpy()).score(xt, yt)
    chance = float(np.bincount(yt).max() / len(yt))
    return {
        "tasks": list(prep.tasks),
        "scores": scores,
        "chance": chance,
        "n_val": len(yv),
        "n_test": len(yt),
        "on_train": on_train,
        "n_train": len(train.tasks),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("suites", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "routing_signal.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cs = (0.1, 1.0, 10.0)
    lines = [
        "# Task identity from frozen pretrained features",
        "",
        "Logistic regression f0(x) → task index, fitted on the validation splits, test accuracy (%).",
        "",
        "| suite | tasks | val / test items | majority class | "
        + " | ".join(f"C = {c:g}" for c in cs)
        + " | fitted on the training splits instead (items), C = 1 |",
        "|---|---|---|---|" + "---|" * (len(cs) + 1),
    ]
    for s in args.suites:
        r = task_id_accuracy(s, cs)
        lines.append(
            f"| {s} | {', '.join(r['tasks'])} | {r['n_val']} / {r['n_test']} | {100 * r['chance']:.1f} | "
            + " | ".join(f"{100 * r['scores'][c]:.1f}" for c in cs)
            + f" | {100 * r['on_train']:.1f} ({r['n_train']}) |"
        )
        print(lines[-1], flush=True)
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
