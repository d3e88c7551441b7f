#!/usr/bin/env python3
"""How much can any per-input routing of the task vectors gain over shared coefficients?

A sample-specific composer maps frozen features f0(x) to coefficients alpha(x). Here alpha(x) is
built by hand from a task classifier instead of learned: a logistic regression f0(x) -> task,
fitted on the suite's *training* splits (7-8x the composers' data), gives p_k(x), and

    mix   s:  alpha_k(x) = (1 - s) * lam + s * p_k(x)      (s = 1: pure routing; s = 2 overshoots)
    boost s:  alpha_k(x) = lam + s * (p_k(x) - 1/T)        (task arithmetic tilted toward p)

for every block, with lam = task arithmetic's validated coefficient (s = 0 is task arithmetic).
'oracle' routes by the true task (p = one-hot), which is each task's fine-tuned model. The best
variant on test is an optimistic bound of what routing from f0 is worth on this suite; the variant
chosen on validation is the honest one. Composed forwards use the library's exact per-sample engine.

    python3 benchmarks/routing_ceiling.py text-3 vision-4

Writes benchmarks/results/routing_ceiling.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from taskvec.bench.learned import suite_composer, suite_data, task_parts
from taskvec.bench.models import forward_features
from taskvec.bench.prepare import prepare
from taskvec.io.atomic import write_text_atomic
from taskvec.variational import evaluate_composer
from taskvec.variational.train import build_composer

REPO = Path(__file__).resolve().parents[1]

STEPS = (0.25, 0.5, 1.0, 2.0)


def variants(p: torch.Tensor, lam: float) -> dict[str, tuple[float, torch.Tensor]]:
    """name -> (strength s, per-sample coefficients (N, T)); s = 0 is task arithmetic."""
    n, t = p.shape
    out = {"task arithmetic": (0.0, torch.full((n, t), lam))}
    out |= {f"mix s={s:g}": (s, (1 - s) * lam + s * p) for s in STEPS}
    out |= {f"boost s={s:g}": (s, lam + s * (p - 1 / t)) for s in STEPS}
    return out


def ceiling(suite: str, lam: float | None) -> dict[str, object]:
    from sklearn.linear_model import LogisticRegression

    prep = prepare(suite)
    if lam is None:
        static = json.loads((REPO / "benchmarks" / "results" / "suites" / suite / "results.json").read_text())
        lam = float(static["methods"]["task_arithmetic"]["lambda"])
    train = suite_data(prep, "train", labels=False)
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(train.features.numpy(), train.tasks.numpy())
    tvs, heads = task_parts(prep)
    composer = build_composer(
        prep.backbone,
        tvs,
        heads,
        train.features.shape[1],
        suite_composer("atlas_block"),
        forward_fn=forward_features,
        task_names=list(prep.tasks),
    )
    rows: dict[str, dict[str, list[float]]] = {}
    routing: dict[str, float] = {}
    for split in ("val", "test"):
        data = suite_data(prep, split)
        p = torch.tensor(clf.predict_proba(data.features.numpy()), dtype=torch.float32)
        routing[split] = 100 * float((p.argmax(1) == data.tasks).double().mean())
        named = variants(p, lam)
        steps = {name: s for name, (s, _) in named.items()}
        named["oracle (true task)"] = (1.0, torch.nn.functional.one_hot(data.tasks, p.shape[1]).float())
        for name, (_, a) in named.items():
            alpha = a[:, :, None].expand(-1, -1, composer.model.num_blocks)  # the same coefficient for every block
            acc = evaluate_composer(composer, data, coefficients=alpha, batch_size=128).accuracy
            rows.setdefault(name, {})[split] = [100 * acc[k] for k in range(len(acc))]
            print(f"{suite} {split} {name}: {sum(rows[name][split]) / len(rows[name][split]):.2f}", flush=True)
    avg = {name: {s: sum(v) / len(v) for s, v in r.items()} for name, r in rows.items()}
    routed = [n for n in steps if n != "task arithmetic"]
    chosen = max(routed, key=lambda n: (avg[n]["val"], -steps[n]))  # ties: the weaker routing
    best_test = max(routed, key=lambda n: avg[n]["test"])
    return {
        "suite": suite,
        "tasks": list(prep.tasks),
        "lambda": lam,
        "routing_accuracy": routing,
        "n_train": len(train.tasks),
        "rows": rows,
        "avg": avg,
        "chosen_on_val": chosen,
        "best_on_test": best_test,
    }


def markdown(r: dict[str, object]) -> list[str]:
    rows, avg, tasks = r["rows"], r["avg"], r["tasks"]
    ta = avg["task arithmetic"]["test"]  # type: ignore[index]
    lines = [
        (
            f"### {r['suite']}: routing by a task classifier (fitted on {r['n_train']} training items; task "
            f"identified on test {r['routing_accuracy']['test']:.1f} %), λ = {r['lambda']:g}"
        ),
        "",
        "| α(x) | val avg | " + " | ".join(f"test {t}" for t in tasks) + " | test avg | test − task arithmetic |",
        "|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for name, split in rows.items():  # type: ignore[union-attr]
        tag = " (chosen on val)" if name == r["chosen_on_val"] else ""
        lines.append(
            f"| {name}{tag} | {avg[name]['val']:.2f} | "
            + " | ".join(f"{a:.1f}" for a in split["test"])
            + f" | {avg[name]['test']:.2f} | {avg[name]['test'] - ta:+.2f} |"
        )
    best, chosen = r["best_on_test"], r["chosen_on_val"]
    lines += [
        "",
        (
            f"Best routed variant on test: {best}, {avg[best]['test'] - ta:+.2f} points over task arithmetic "
            f"(an optimistic bound: picked on test); chosen on validation: {chosen}, "
            f"{avg[chosen]['test'] - ta:+.2f}."
        ),
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("suites", nargs="+")
    ap.add_argument("--lam", type=float, default=None, help="task arithmetic's λ (default: the suite's validated one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "routing_ceiling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [ceiling(s, args.lam) for s in args.suites]
    lines = ["# What per-input routing of task vectors is worth", ""]
    for r in results:
        lines += markdown(r)
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines))
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
