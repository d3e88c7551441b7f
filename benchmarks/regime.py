#!/usr/bin/env python3
"""Which fine-tuning recipe puts a suite in the field's regime? A sweep chosen on validation only.

For each recipe (learning rate x epochs) the suite's tasks are fine-tuned (cached per recipe, as
`taskvec bench run` does), then composed by task arithmetic and TIES with λ chosen on validation.
The recipe is chosen on the VALIDATION splits by a rule fixed before any run:

    keep the recipes whose fine-tuning gains >= 15 points of average validation accuracy and
    where task arithmetic keeps 20-60 % of that gain on validation; among them take the one
    where task arithmetic keeps the most.

Test accuracy is reported beside it (the regime-sensitivity table: recipe vs gain kept per
method), never used to choose. `--learned` adds learned composers (seed 0; they train on the
validation splits, so only their test numbers are shown).

    python3 benchmarks/regime.py tiny --learned atlas_block variational
    python3 benchmarks/regime.py vision-6

Writes benchmarks/results/regime_<suite>.md and .json (one entry per finished recipe: a rerun
resumes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from taskvec.bench.prepare import prepare
from taskvec.bench.report import scores
from taskvec.bench.run import run_method
from taskvec.bench.suite import SuiteSpec, load_suite
from taskvec.io.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("5e-4:4", "1e-4:4", "5e-5:4", "5e-5:8")
STATIC = ("task_arithmetic", "ties")
MIN_FT_GAIN, TA_KEPT = 0.15, (0.20, 0.60)


def with_recipe(suite: str, recipe: str) -> SuiteSpec:
    """The suite with its fine-tuning learning rate and epochs replaced ("lr:epochs")."""
    lr, epochs = recipe.split(":")
    spec = load_suite(suite)
    spec.finetune = spec.finetune.model_copy(update={"lr": float(lr), "epochs": int(epochs)})
    return spec


def sweep_one(suite: str, recipe: str, learned: list[str]) -> dict[str, Any]:
    """Fine-tune (or read from the cache) with one recipe; validation and test numbers."""
    from taskvec.bench.learned import run_learned, suite_data

    t0 = time.perf_counter()
    prep = prepare(with_recipe(suite, recipe), progress=False)
    out: dict[str, Any] = {
        "recipe": recipe,
        "finetune_seconds": prep.finetune_seconds,
        "val": {"pretrained": prep.evaluate(prep.pretrained, "val"), "finetuned": prep.finetuned_accuracy("val")},
        "test": {"pretrained": prep.evaluate(prep.pretrained, "test"), "finetuned": prep.finetuned_accuracy("test")},
        "lambda": {},
    }
    for m in STATIC:
        r = run_method(prep, m, prep.suite.compose.params(m))
        out["lambda"][m] = r["lambda"]
        out["val"][m] = r["val"][str(r["lambda"])]
        out["test"][m] = r["test"]
    if learned:
        val, test = suite_data(prep, "val"), suite_data(prep, "test")
        for name in learned:
            r = run_learned(prep, name, 0, val, test, init_coef=float(out["lambda"]["task_arithmetic"]), progress=False)
            out["test"][name] = r["test"]
    out["seconds"] = time.perf_counter() - t0
    return out


def gains(split: dict[str, Any]) -> dict[str, float]:
    """Fine-tuning gain (points of average accuracy) and each method's share of it kept."""
    pre, ft = split["pretrained"], split["finetuned"]
    out = {"ft_gain": 100 * (scores(ft, pre, ft)["avg"] - scores(pre, pre, ft)["avg"])}
    out |= {m: 100 * scores(acc, pre, ft)["gain"] for m, acc in split.items() if m not in ("pretrained", "finetuned")}
    return out


def choose(results: list[dict[str, Any]]) -> str | None:
    """The rule of the module docstring, on validation numbers only."""
    ok = []
    for r in results:
        g = gains(r["val"])
        if g["ft_gain"] >= 100 * MIN_FT_GAIN and 100 * TA_KEPT[0] <= g["task_arithmetic"] <= 100 * TA_KEPT[1]:
            ok.append((g["task_arithmetic"], r["recipe"]))
    return max(ok)[1] if ok else None


def markdown(suite: str, results: list[dict[str, Any]], chosen: str | None) -> str:
    methods = [m for m in results[0]["test"] if m not in ("pretrained", "finetuned")]
    lines = [
        f"### {suite}: fine-tuning recipe vs share of the gain kept (%), validation (chooses) and test (reported)",
        "",
        "| recipe (lr, epochs) | val FT gain | "
        + " | ".join(f"val {m}" for m in STATIC)
        + " | test FT gain | "
        + " | ".join(f"test {m}" for m in methods)
        + " | λ TA | fine-tune s |",
        "|---|" + "---:|" * (2 + len(STATIC) + len(methods) + 1 + 1),
    ]
    for r in results:
        v, t = gains(r["val"]), gains(r["test"])
        lr, ep = r["recipe"].split(":")
        mark = " (chosen)" if r["recipe"] == chosen else ""
        cells = [f"{lr}, {ep}{mark}", f"+{v['ft_gain']:.1f}", *(f"{v[m]:.1f}" for m in STATIC)]
        cells += [f"+{t['ft_gain']:.1f}", *(f"{t[m]:.1f}" for m in methods)]
        cells += [f"{r['lambda']['task_arithmetic']:g}", f"{sum(r['finetune_seconds'].values()):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    rule = (
        f"Rule (fixed before the runs, validation only): fine-tuning gains >= {100 * MIN_FT_GAIN:.0f} points "
        f"and task arithmetic keeps {100 * TA_KEPT[0]:.0f}-{100 * TA_KEPT[1]:.0f} % of the gain; among those, "
        f"the most kept by task arithmetic. Chosen: {chosen or 'none'}."
    )
    return "\n".join([*lines, "", rule, ""])


def sensitivity(suite: str, runs: list[str]) -> str:
    """Test gain kept (%) per method for whole `bench run` results, one row per "recipe=results.json"."""
    from taskvec.bench.report import rows, summary

    table: list[tuple[str, dict[str, str]]] = []
    for item in runs:
        recipe, path = item.split("=", 1)
        r = json.loads(Path(path).read_text())
        cells = {}
        for row in rows(r)[2:]:
            name = row.label.split(" (")[0].removeprefix("bank of ").split(" = ")[0]
            mean, sd = summary(r, row)["gain"]
            n = len(row.runs)
            cells["bank" if row.kind == "bank" else name] = f"{100 * mean:.1f}" + (
                f" ± {100 * sd:.1f} ({n})" if n > 1 else ""
            )
        pre, ft = r["pretrained"], r["finetuned"]
        cells["FT gain"] = f"+{100 * (scores(ft, pre, ft)['avg'] - scores(pre, pre, ft)['avg']):.1f}"
        table.append((recipe, cells))
    cols = list(dict.fromkeys(c for _, cells in table for c in cells))
    cols = ["FT gain", *[c for c in cols if c != "FT gain"]]
    lines = [
        f"### {suite}: recipe vs test gain kept (%); learned: mean ± sd (seeds)",
        "",
        "| recipe (lr, epochs) | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    lines += ["| " + " | ".join([recipe, *(cells.get(c, "") for c in cols)]) + " |" for recipe, cells in table]
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite")
    ap.add_argument("--sensitivity", nargs="+", default=None, help="recipe=results.json of whole runs: table only")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help="lr:epochs")
    ap.add_argument("--learned", nargs="*", default=[])
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args()
    if args.sensitivity:
        md = sensitivity(args.suite, args.sensitivity)
        write_text_atomic(args.out or REPO / "benchmarks" / "results" / f"regime_sensitivity_{args.suite}.md", md)
        print(md)
        return
    out = args.out or REPO / "benchmarks" / "results" / f"regime_{args.suite}"
    saved = out.with_suffix(".json")
    done = {r["recipe"]: r for r in json.loads(saved.read_text())["recipes"]} if saved.exists() else {}
    results = []
    for recipe in args.recipes:
        key = f"{recipe}|{','.join(args.learned)}"
        r = done.get(recipe)
        if r is None or r.get("key") != key:
            r = {"key": key, **sweep_one(args.suite, recipe, args.learned)}
        results.append(r)
        done[recipe] = r
        chosen = choose(results)
        doc = {"suite": args.suite, "threads": torch.get_num_threads(), "chosen": chosen, "recipes": results}
        write_text_atomic(saved, json.dumps(doc, indent=1))
        md = markdown(args.suite, results, chosen)
        write_text_atomic(out.with_suffix(".md"), md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
