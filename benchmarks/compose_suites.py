#!/usr/bin/env python3
"""Learned composition on a real suite: the variational composer against its baselines, over seeds.

What it measures
----------------
On vision-4 and text-3, for several seeds: task-level and block-level learned coefficients
(aTLAS style, supervised on the validation splits), optionally AdaMerging (entropy on unlabeled
test inputs) and the sample-specific network without prior or gate, and the variational
composer; test accuracy per task, mean, normalized accuracy (merged / fine-tuned), mean and
spread over seeds; the share of gated-out coefficients; a heatmap of the mean test-time alpha per
(task vector, block) for each test task. Task arithmetic and TIES come from the same suite's
`taskvec bench run` results.json (deterministic given the cached task vectors: no seed spread).

With `--bank M` the composer's task vectors are the M bases of a cluster bank built from the
suite's task vectors: the variational composer takes a bank's bases as its task vectors.

Seeds vary the composer's initialization, batch order and noise; every coefficient starts at task arithmetic's
validated λ (read from --static; aTLAS and AdaMerging also start from a task arithmetic
coefficient), so each learned method starts where task arithmetic ends. The fine-tuned task vectors are
the suite's cached ones (one fine-tuning seed). Each finished run is saved at once
(benchmarks/results/compose_<suite>/runs/<preset>-s<seed>.json, atomic), so an interrupted
benchmark resumes where it stopped.

Usage
-----
    python3 benchmarks/compose_suites.py vision-4 --static /tmp/tvruns/vision-4/results.json
    python3 benchmarks/compose_suites.py text-3 --seeds 0 1 2 --presets atlas_task atlas_block variational
    python3 benchmarks/compose_suites.py vision-4 --bank 2 --presets variational --seeds 0

Choosing training settings without looking at test: `--holdout 0.3` trains on 70 % of each
validation split and scores the other 30 % (results under compose_<suite>_tune); `--tuned` then
takes, per preset, the lr / epochs / KL weight / --set options of its best held-out run:

    python3 benchmarks/compose_suites.py vision-4 --holdout 0.3 --seeds 0 --presets variational \
        --lr 1e-3 --kl-weight 1e-4 --tag kl1e-4-lr1e-3
    python3 benchmarks/compose_suites.py vision-4 --static .../results.json --tuned --mc 4

With small validation splits one held-out part decides by a few items; `--folds K` instead trains
every variant K times, holding out each 1/K of the validation splits once (K-fold cross-validation,
`taskvec.variational.holdout_split`; results under compose_<suite>_cvK), and `--tuned cvK` takes
the variant with the best held-out accuracy averaged over its folds:

    python3 benchmarks/compose_suites.py text-3 --folds 3 --seeds 0 --presets atlas_block --lr 2e-2 --tag lr2e-2
    python3 benchmarks/compose_suites.py text-3 --static .../results.json --tuned cv3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from taskvec.bench.learned import run_learned, suite_composer, suite_data
from taskvec.bench.prepare import prepare
from taskvec.bench.report import mean_sd, t_tests
from taskvec.io.atomic import write_text_atomic
from taskvec.variational import (
    ComposeTrainConfig,
    TrainConfig,
    holdout_split,
)
from taskvec.variational.config import PRESETS

REPO = Path(__file__).resolve().parents[1]

DEFAULT_PRESETS = ("atlas_task", "atlas_block", "variational")


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def task_vectors(prep: Any, bank_m: int | None, bank_dir: Path) -> tuple[list[Any], list[str], dict[str, Any]]:
    """The suite's task vectors, or the M bases of a cluster bank built from them."""
    names = list(prep.tasks)
    tvs = [prep.task_vector(t) for t in names]
    if bank_m is None:
        return tvs, names, {}
    from taskvec.bases import Bank, build_bank

    path = bank_dir / f"bank-m{bank_m}"
    bank = (
        Bank.load(path)
        if path.exists()
        else build_bank(tvs, names, "cluster", bank_m, out=path, merge="mean", dtype=torch.float32)
    )
    mem = bank.memory()
    info = {
        "m": bank.m,
        "t": bank.t,
        "assignments": bank.manifest.assignments,
        "bank_bytes": mem.bank,
        "task_vector_bytes": len(tvs) * tvs[0].numel() * 4,  # float32, like the checkpoints
        "relative_errors": bank.relative_errors(),
    }
    return [bank.basis(k) for k in range(bank.m)], [f"basis{k}" for k in range(bank.m)], info


def parse_sets(items: list[str]) -> dict[str, Any]:
    """['prior.pi=0.9', 'kl_weight=1e-4'] -> {'prior': {'pi': 0.9}, 'kl_weight': 0.0001} (values as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. prior.pi=0.9")
        *parents, leaf = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tuned(folder: Path, preset: str) -> dict[str, Any]:
    """lr, epochs, KL weight and --set options of `preset`'s best variant (label) in a tuning folder:
    the highest held-out accuracy, averaged over that variant's runs (seeds and folds)."""
    runs = [json.loads(f.read_text()) for f in (folder / "runs").glob("*.json")]
    runs = [r for r in runs if r["preset"] == preset]
    if not runs:
        raise SystemExit(f"--tuned: no tuning run of {preset!r} under {folder}; run with --holdout first")
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r.get("label", preset), []).append(r)
    score = {lab: statistics.fmean(statistics.fmean(r["test"].values()) for r in rs) for lab, rs in by_label.items()}
    # ties (held-out splits are small) go to the variant with the fewest extra --set options, then by label
    order = sorted(by_label, key=lambda lab: (len(by_label[lab][0].get("set", [])), lab))
    lab = max(order, key=lambda x: score[x])
    best = by_label[lab][0]
    cfg = best["config"]
    return {
        "lr": cfg["train"]["lr"],
        "epochs": cfg["train"]["epochs"],
        "kl_weight": cfg["composer"].get("kl_weight"),  # only the variational kind has one
        "set": best.get("set", []),
        "from": lab,
        "heldout": score[lab],
        "runs": len(by_label[lab]),
    }


def run_config(name: str, seed: int, args: argparse.Namespace) -> ComposeTrainConfig:
    """Preset `name` with the command line's (or its tuned variant's) composer and training settings."""
    hp = args.hp.get(name, {})
    kl_weight = hp.get("kl_weight", args.kl_weight)
    over: dict[str, Any] = {"kl_weight": kl_weight} if name.startswith("variational") and kl_weight is not None else {}
    if args.init_coef is not None:
        over["init_coef"] = args.init_coef
        if name.startswith("variational") and abs(args.init_coef) < 0.3:
            # keep the preset's initial relative uncertainty sigma/|mu| = 0.05/0.3 for small starts
            over["posterior"] = {"init_sigma": abs(args.init_coef) / 6}
    sets = parse_sets(hp.get("set", []) + args.set)
    train_over = sets.pop("train", {})
    over = deep_merge(deep_merge(dict(PRESETS[name]), over), sets)
    return ComposeTrainConfig(
        composer=suite_composer(name, **over),
        train=TrainConfig(
            **{
                "epochs": hp.get("epochs", args.epochs),
                "batch_size": args.batch_size,
                "lr": hp.get("lr", args.lr),
                "seed": seed,
                **train_over,
            }
        ),
    )


def run_one(
    prep: Any, tvs: list[Any], tv_names: list[str], val: Any, test: Any, name: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One training run of preset `name`, with the coefficients and history the report and plots use."""
    cfg = run_config(name, seed, args)
    r = run_learned(prep, name, seed, val, test, config=cfg, task_vectors=(tvs, tv_names), details=True, mc=args.mc)
    r["train_seconds"] = r.pop("seconds")
    return r


def welch_lines(runs: dict[str, list[dict[str, Any]]], ref: str = "variational") -> list[str]:
    """Mean difference of `ref` against every other method with >= 2 seeds, and the one-sided Welch
    t-test p-value of 'ref is better' over the seeds' average test accuracies."""
    if len(runs.get(ref, [])) < 2:
        return []
    avg = {p: [100 * statistics.fmean(r["test"].values()) for r in rs] for p, rs in runs.items()}
    others = {p: xs for p, xs in avg.items() if p != ref and len(xs) >= 2}
    out = [
        f"{ref} − {p}: {d:+.1f} points (one-sided Welch t-test over {len(avg[ref])} vs {len(avg[p])} "
        f"seeds, p = {pv:.3f})"
        for p, d, pv, _ in t_tests(avg[ref], others)
    ]
    return ["", "Seeds' average test accuracy compared:", ""] + [f"* {x}" for x in out] if out else []


def summarize(
    suite: str,
    names: list[str],
    ft: dict[str, float],
    runs: dict[str, list[dict[str, Any]]],
    static: dict[str, Any] | None,
    bank: dict[str, Any],
    holdout: float | None = None,
) -> str:
    what = (
        f"held-out validation accuracy ({100 * holdout:.0f} % of each validation split; normalized by the "
        "fine-tuned accuracy on the whole validation split)"
        if holdout
        else "test accuracy"
    )
    cv = any("fold" in r for rs in runs.values() for r in rs)
    over = "runs (seeds × cross-validation folds)" if cv else "seeds"
    head = f"| method | {'runs' if cv else 'seeds'} | " + " | ".join(names) + " | avg | avg normalized |"
    lines = [
        f"### {suite}: learned composition, {what} (%), mean ± sd over {over}",
        "",
        head,
        "|" + "---|" * (len(names) + 4),
    ]

    def norm(acc: dict[str, float]) -> float:
        return 100 * statistics.fmean(acc[t] / ft[t] for t in names)

    lines.append(
        "| fine-tuned (one model per task) | – | "
        + " | ".join(f"{100 * ft[t]:.1f}" for t in names)
        + f" | {100 * statistics.fmean(ft.values()):.1f} | 100.0 |"
    )
    if static:
        for m, r in static.get("methods", {}).items():
            lines.append(
                f"| {m} (λ={r['lambda']}) | – | "
                + " | ".join(f"{100 * r['test'][t]:.1f}" for t in names)
                + f" | {100 * statistics.fmean(r['test'].values()):.1f} | {norm(r['test']):.1f} |"
            )
    for p, rs in runs.items():
        for key, label in (("test", p), ("test_mc", f"{p} (Monte-Carlo average)")):
            rs_k = [r for r in rs if key in r]
            if not rs_k:
                continue
            cells = []
            for t in names:
                m, s = mean_sd([100 * r[key][t] for r in rs_k])
                cells.append(f"{m:.1f} ± {s:.1f}")
            m, s = mean_sd([100 * statistics.fmean(r[key].values()) for r in rs_k])
            nm, ns = mean_sd([norm(r[key]) for r in rs_k])
            lines.append(
                f"| {label} | {len(rs_k)} | " + " | ".join(cells) + f" | {m:.1f} ± {s:.1f} | {nm:.1f} ± {ns:.1f} |"
            )
    lines += [
        "",
        "Coefficients kept at test time (%, mean over seeds; the rest are gated out), and the training "
        "settings (KL weight: variational only):",
        "",
        "| method | " + " | ".join(names) + " | lr | epochs | KL weight | other settings | train s (mean) |",
        "|" + "---|" * (len(names) + 6),
    ]
    for p, rs in runs.items():
        cells = [f"{100 * statistics.fmean(r['kept'].get(t, 1.0) for r in rs):.1f}" for t in names]
        tr, co = rs[0]["config"]["train"], rs[0]["config"]["composer"]
        kl = f"{co['kl_weight']:g}" if co["method"] == "variational" else "–"
        other = ", ".join(rs[0].get("set", [])) or "–"
        lines.append(
            f"| {p} | " + " | ".join(cells) + f" | {tr['lr']:g} | {tr['epochs']} | {kl} | {other} | "
            f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} |"
        )
    lines += welch_lines(runs)
    if bank:
        lines += [
            "",
            f"Task vectors: the M = {bank['m']} bases of a cluster bank of the T = {bank['t']} task vectors "
            f"(assignments {bank['assignments']}; bank {bank['bank_bytes'] / 2**20:.1f} MiB vs "
            f"{bank['task_vector_bytes'] / 2**20:.1f} MiB of float32 task vectors).",
        ]
    return "\n".join(lines) + "\n"


def plots(folder: Path, names: list[str], runs: dict[str, list[dict[str, Any]]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made = []
    for p, rs in runs.items():
        if not p.startswith(("variational", "sample_specific")):
            continue
        coef = np.mean([np.array(r["coef_mean"]) for r in rs], axis=0)  # (test task, T, B)
        fig, axes = plt.subplots(
            len(names),
            1,
            figsize=(12, 1.2 + 1.3 * len(names) * max(1, coef.shape[1] / 3)),
            squeeze=False,
            layout="constrained",
        )
        lim = float(np.abs(coef).max()) or 1.0
        for i, ax in enumerate(axes[:, 0]):
            im = ax.imshow(coef[i], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"test task {names[i]}: mean α per (task vector, block)", fontsize=9)
            ax.set_yticks(range(coef.shape[1]))
            ax.set_yticklabels(rs[0].get("task_vectors", names)[: coef.shape[1]], fontsize=7)
        axes[-1, 0].set_xlabel("block (parameter tensor, in model order)", fontsize=8)
        fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, label="mean test-time α")
        path = folder / f"alpha_heatmap_{p}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    gated = {p: rs for p, rs in runs.items() if any(v < 1.0 for r in rs for v in r["kept"].values())}
    if gated:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / len(gated)
        for j, (p, rs) in enumerate(gated.items()):
            vals = np.array([[100 * (1 - r["kept"].get(t, 1.0)) for t in names] for r in rs])
            ax.bar(np.arange(len(names)) + j * w, vals.mean(0), w, yerr=vals.std(0) if len(rs) > 1 else None, label=p)
        ax.set_xticks(np.arange(len(names)) + w * (len(gated) - 1) / 2, names)
        ax.set_ylabel("gated-out coefficients (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / "gated_out.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite")
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument(
        "--init-coef",
        type=float,
        default=None,
        help="initial coefficient of every (task, block); default: task arithmetic's validated λ from "
        "--static, else the preset's 0.3",
    )
    ap.add_argument("--kl-weight", type=float, default=None, help="variational presets; default: the library's")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="composer option, dotted for nested ones (prior.pi=0.9, gate.kind=none), or train.KEY "
        "for a TrainConfig option (train.bias_lr=2e-2); repeatable",
    )
    ap.add_argument("--tag", default="", help="names the runs of a --set variant: <preset>+<tag>")
    ap.add_argument(
        "--tuned",
        nargs="?",
        const="tune",
        default=None,
        metavar="FOLDER",
        help="per preset, the lr, epochs, KL weight and --set options of its best variant under "
        "compose_<suite>_FOLDER (default 'tune'; 'cv3' for --folds 3)",
    )
    ap.add_argument(
        "--holdout",
        type=float,
        default=None,
        help="tuning: train on the rest of the validation data, score on this fraction of it "
        "(results under compose_<suite>_tune; test never used)",
    )
    ap.add_argument(
        "--folds",
        type=int,
        default=None,
        help="tuning by K-fold cross-validation of the validation splits: every variant is trained "
        "K times, each fold held out once (results under compose_<suite>_cvK)",
    )
    ap.add_argument("--mc", type=int, default=0, help="also score variational runs with this many posterior samples")
    ap.add_argument("--bank", type=int, default=None, help="use the M bases of a cluster bank as task vectors")
    ap.add_argument(
        "--static", type=Path, default=None, help="results.json of `taskvec bench run SUITE` (TA, TIES rows)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--summarize-only", action="store_true", help="no training: tables and plots of every saved run")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = f"compose_{args.suite}" + (f"_bank{args.bank}" if args.bank else "")
    args.hp = {}
    if args.tuned:
        tune_dir = args.out / f"{base}_{args.tuned}"
        if args.bank and not tune_dir.exists():
            tune_dir = args.out / f"compose_{args.suite}_{args.tuned}"  # the full task vectors' choice
        args.hp = {p: tuned(tune_dir, p) for p in args.presets}
        for p, h in args.hp.items():
            print(
                f"{p}: lr {h['lr']}, epochs {h['epochs']}, KL weight {h['kl_weight']}, set {h['set']} "
                f"(best held-out variant {h['from']}, {h['runs']} runs: {100 * h['heldout']:.2f} %)"
            )
    static_r = json.loads(args.static.read_text()) if args.static else None
    if args.init_coef is None and static_r is not None:
        args.init_coef = float(static_r["methods"]["task_arithmetic"]["lambda"])
        print(f"initial coefficients: task arithmetic's validated λ = {args.init_coef}")
    if args.folds:
        if args.holdout:
            raise SystemExit("--folds and --holdout: choose one (--folds K holds out 1/K per fold)")
        args.holdout = 1.0 / args.folds
    folder = args.out / (base + (f"_cv{args.folds}" if args.folds else "_tune" if args.holdout else ""))
    prep = prepare(args.suite)
    names = list(prep.tasks)
    ft = prep.finetuned_accuracy("val" if args.holdout else "test")
    tvs, tv_names, bank = task_vectors(prep, args.bank, folder)
    val, test = (None, None) if args.summarize_only else (suite_data(prep, "val"), suite_data(prep, "test"))
    folds: list[int | None] = list(range(args.folds)) if args.folds else [None]
    splits: dict[int | None, tuple[Any, Any]] = {}
    if val is not None:
        for f in folds:
            splits[f] = holdout_split(val, args.holdout, f or 0) if args.holdout else (val, test)
        if args.holdout:
            print(
                f"tuning: fit on {len(splits[folds[0]][0])} validation items, score on {len(splits[folds[0]][1])} "
                f"held-out validation items" + (f", {args.folds} folds" if args.folds else "")
            )
    runs: dict[str, list[dict[str, Any]]] = {}
    label = {p: p + (f"+{args.tag}" if args.tag else "") for p in args.presets}
    if args.summarize_only:  # every saved run, in preset order (PRESETS), then seed and fold order
        saved = [json.loads(f.read_text()) for f in (folder / "runs").glob("*.json")]
        order = list(PRESETS)
        plan = sorted(
            {(r["preset"], r["seed"], r.get("label", r["preset"]), r.get("fold")) for r in saved},
            key=lambda ps: (order.index(ps[0]), ps[2], ps[1], ps[3] or 0),
        )
    else:
        plan = [(p, seed, label[p], f) for p in args.presets for seed in args.seeds for f in folds]
    for p, seed, lab, f in plan:
        fold_tag = "" if f is None else f"-f{f}"
        path = folder / "runs" / f"{lab}-s{seed}{fold_tag}.json"
        if path.exists():
            r = json.loads(path.read_text())
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {args.suite}: {lab} seed {seed}{fold_tag}", flush=True)
            r = run_one(prep, tvs, tv_names, *splits[f], p, seed, args)
            r["task_vectors"] = tv_names
            r["label"] = lab
            r["set"] = args.hp.get(p, {}).get("set", []) + args.set
            if p in args.hp:
                r["tuned_from"] = args.hp[p]["from"]
            if args.holdout:
                r["holdout"] = args.holdout
            if f is not None:
                r["fold"] = f
            write_json(path, r)
        runs.setdefault(lab, []).append(r)
        print(
            f"  {lab} s{seed}{fold_tag}: mean {100 * statistics.fmean(r['test'].values()):.2f} "
            f"({r['train_seconds']:.0f} s train)",
            flush=True,
        )
    static = static_r if not (args.bank or args.holdout) else None
    md = summarize(args.suite, names, ft, runs, static, bank, args.holdout)
    write_text_atomic(folder / "results.md", md)
    write_json(
        folder / "results.json",
        {
            "suite": args.suite,
            "finetuned": ft,
            "bank": bank,
            "runs": {p: [{k: v for k, v in r.items() if k != "coef_mean"} for r in rs] for p, rs in runs.items()},
        },
    )
    for p in plots(folder, names, runs):
        print(f"wrote {p}")
    print(md)


if __name__ == "__main__":
    main()
