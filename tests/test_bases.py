"""Task vector bases against exact float64 references: streamed Gram, eigengap, clustering of
planted clusters, exact reconstruction errors, PCA/learned bases, the bank on disk (round trip,
memory accounting, arithmetic, continual add), the CLI, and clear errors on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from taskvec import TaskVector, compose
from taskvec.bases import (
    Bank,
    affinity,
    build_bank,
    cosine_from_gram,
    eigengap,
    fit_bases,
    gram,
    reconstruct_tasks,
    spectral_assign,
)
from taskvec.cli import app
from taskvec.errors import CheckpointError, ConfigError, UnknownMethodError
from taskvec.io.safetensors_file import read_header

SHAPES = {"embed.weight": (20, 9), "layers.0.w": (11, 7), "layers.0.b": (13,)}
K, PER = 3, 4  # planted clusters, tasks per cluster
runner = CliRunner()


def planted(k: int = K, per: int = PER, noise: float = 0.15, seed: int = 0) -> tuple[list[TaskVector], list[int]]:
    """Task vectors = cluster centre + small noise, float64."""
    g = torch.Generator().manual_seed(seed)
    centres = [{n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()} for _ in range(k)]
    tvs, labels = [], []
    for c in range(k):
        for j in range(per):
            t = {n: centres[c][n] + noise * torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
            tvs.append(TaskVector.from_tensors(t, name=f"c{c}t{j}"))
            labels.append(c)
    return tvs, labels


def flat(tv: TaskVector) -> torch.Tensor:
    return torch.cat([tv[k].reshape(-1).to(torch.float64) for k in SHAPES])


def explicit_error(tv: TaskVector, rec: TaskVector) -> float:
    v = flat(tv)
    return float((v - flat(rec)).norm() / v.norm())


@pytest.fixture(scope="module")
def data() -> tuple[list[TaskVector], list[int], torch.Tensor]:
    tvs, labels = planted()
    return tvs, labels, gram(tvs)


# ------------------------------------------------------------------ analysis
def test_streamed_gram_equals_dense(data) -> None:
    tvs, _, g = data
    v = torch.stack([flat(tv) for tv in tvs], 1)
    torch.testing.assert_close(gram(tvs, chunk_elems=7), v.T @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, v.T @ v, rtol=1e-12, atol=1e-12)
    n = v.norm(dim=0)
    torch.testing.assert_close(cosine_from_gram(g), (v.T @ v) / n[:, None] / n[None, :], rtol=1e-12, atol=1e-12)


def test_affinity_choices() -> None:
    cos = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.0], [0.2, 0.0, 1.0]], dtype=torch.float64)
    assert affinity(cos, "clip").tolist() == [[1.0, 0.0, 0.2], [0.0, 1.0, 0.0], [0.2, 0.0, 1.0]]
    torch.testing.assert_close(affinity(cos, "shift"), (cos + 1) / 2)
    with pytest.raises(ConfigError, match="affinity"):
        affinity(cos, "rbf")


def test_eigengap_and_spectral_clustering_recover_planted_clusters(data) -> None:
    _, labels, g = data
    aff = affinity(cosine_from_gram(g))
    m, ev = eigengap(aff)
    assert m == K
    assert float(ev[K - 1]) < 0.2 and float(ev[K]) > 0.9  # K small eigenvalues, then the gap
    assign = spectral_assign(aff, m)
    assert adjusted_rand_score(labels, assign) == 1.0
    # a different planting: 4 clusters of 3
    tvs4, labels4 = planted(k=4, per=3, seed=5)
    fit = fit_bases(tvs4, method="cluster")
    assert fit.m == 4 and fit.info["m_from"] == "eigengap"
    assert adjusted_rand_score(labels4, fit.assignments) == 1.0


# ------------------------------------------------------------------ fits and exact errors
@pytest.mark.parametrize("method", ["cluster", "learned", "pca"])
def test_error_from_gram_equals_explicit_float64_reconstruction(data, method: str) -> None:
    tvs, _, g = data
    fit = fit_bases(tvs, method=method, m=K, gram_matrix=g, steps=60)
    errs = fit.relative_errors()
    for i in (0, 5, 11):
        assert float(errs[i]) == pytest.approx(explicit_error(tvs[i], fit.reconstruct(tvs, i)), rel=1e-9)
    assert float(errs.max()) < 0.2  # the noise level of the planted clusters


def test_full_rank_pca_and_learned_are_exact(data) -> None:
    tvs, _, g = data
    t = len(tvs)
    for method in ("pca", "learned", "cluster"):
        fit = fit_bases(tvs, method=method, m=t, gram_matrix=g, steps=50)
        assert float(fit.relative_errors().max()) < 1e-6, method
        assert explicit_error(tvs[3], fit.reconstruct(tvs, 3)) < 1e-10, method


def test_pca_is_eckart_young_and_learned_bases_are_convex(data) -> None:
    tvs, _, g = data
    evals = torch.linalg.eigvalsh(g).flip(0)
    for m in (1, 2, 5):
        pca = fit_bases(tvs, method="pca", m=m, gram_matrix=g)
        residual = float((pca.relative_errors() ** 2 * g.diagonal()).sum())
        assert residual == pytest.approx(float(evals[m:].sum()), rel=1e-8)
        learned = fit_bases(tvs, method="learned", m=m, gram_matrix=g, steps=60)
        lres = float((learned.relative_errors() ** 2 * g.diagonal()).sum())
        assert lres >= residual * (1 - 1e-9)  # PCA is optimal among rank-m bases
        assert learned.info["final_loss"] <= learned.info["initial_loss"]
        w = learned.mixing
        assert bool((w >= 0).all()) and torch.allclose(w.sum(0), torch.ones(m, dtype=torch.float64))


def test_learned_loss_trace_expansion(data) -> None:
    """||V - V W D||_F^2 = tr G - 2 tr(G W D) + tr(D^T W^T G W D), as docs/bases.md derives."""
    tvs, _, g = data
    fit = fit_bases(tvs, method="learned", m=2, gram_matrix=g, steps=100)
    v = torch.stack([flat(tv) for tv in tvs], 1)
    w, d = fit.mixing, fit.decoder
    explicit = float(((v - v @ w @ d) ** 2).sum())
    traced = float(g.trace() - 2 * (g @ w @ d).trace() + (d.T @ w.T @ g @ w @ d).trace())
    assert traced == pytest.approx(explicit, rel=1e-9)
    assert explicit / float(g.trace()) == pytest.approx(fit.info["final_loss"], rel=1e-6)
    assert float((fit.relative_errors() ** 2 * g.diagonal()).sum()) == pytest.approx(explicit, rel=1e-9)


def test_reconstruct_tasks_api(data) -> None:
    tvs, _, g = data
    recs = reconstruct_tasks(tvs, 2, "pca", gram_matrix=g)
    fit = fit_bases(tvs, method="pca", m=2, gram_matrix=g)
    assert len(recs) == len(tvs)
    for i in (0, 7):
        assert explicit_error(tvs[i], recs[i]) == pytest.approx(float(fit.relative_errors()[i]), rel=1e-9)


@pytest.mark.parametrize("merge,params", [("mean", {}), ("task_arithmetic", {}), ("ties", {"density": 0.5})])
def test_cluster_bases_are_the_chosen_merge(tmp_path: Path, data, merge: str, params: dict) -> None:
    tvs, _, g = data
    bank = build_bank(
        tvs, method="cluster", m=K, out=tmp_path / "bank", gram_matrix=g, merge=merge, merge_params=params
    )
    for k in range(bank.m):
        members = [tvs[i] for i, a in enumerate(bank.manifest.assignments) if a == k]
        if merge == "mean":
            ref = {n: sum(tv[n] for tv in members) / len(members) for n in SHAPES}
        elif merge == "task_arithmetic":
            ref = {n: sum(tv[n] for tv in members) for n in SHAPES}
        else:
            merged = compose(members, "ties", **params)
            ref = {n: merged[n] for n in SHAPES}
        basis = bank.basis(k)
        for n in SHAPES:
            torch.testing.assert_close(basis[n], ref[n], rtol=1e-12, atol=1e-12)
    for name in bank.names:  # measured statistics give the exact error of the stored bases
        i = bank.index(name)
        assert bank.relative_errors()[name] == pytest.approx(explicit_error(tvs[i], bank.reconstruct(name)), rel=1e-9)
    if merge == "mean":  # linear merge: statistics also follow from G
        a = torch.tensor(bank.manifest.assignments)
        w = torch.stack([(a == k).double() / (a == k).sum() for k in range(bank.m)], 1)
        torch.testing.assert_close(bank.basis_gram.diagonal(), (w.T @ g @ w).diagonal(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the bank
def save_all(tvs: list[TaskVector], folder: Path, dtype: torch.dtype) -> list[TaskVector]:
    folder.mkdir(parents=True, exist_ok=True)
    return [TaskVector.load(tv.save(folder / f"{tv.name}.safetensors", dtype=dtype)) for tv in tvs]


@pytest.mark.parametrize("method", ["cluster", "learned", "pca"])
def test_bank_round_trip_float64(tmp_path: Path, data, method: str) -> None:
    tvs, _, g = data
    names = [tv.name for tv in tvs]
    build_bank(tvs, names, method, 2, out=tmp_path / "bank", steps=100)
    again = Bank.load(tmp_path / "bank")
    assert (again.t, again.m, again.method, again.names, again.dtype) == (len(tvs), 2, method, names, torch.float64)
    torch.testing.assert_close(again.gram, g, rtol=1e-12, atol=0)
    assert sorted(os.listdir(tmp_path / "bank")) == ["basis-000.safetensors", "basis-001.safetensors", "manifest.json"]
    assert set(load_file(tmp_path / "bank" / "basis-001.safetensors")) == set(SHAPES)
    fit = fit_bases(tvs, names, method, 2, gram_matrix=g, steps=100)
    for name in ("c0t0", "c2t3"):
        i = names.index(name)
        rec = again.reconstruct(name)
        assert again.relative_errors()[name] == pytest.approx(explicit_error(tvs[i], rec), rel=1e-9)
        assert explicit_error(fit.reconstruct(tvs, i), rec) < 1e-12  # the same bases, from disk
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bank_memory_accounting_is_exact_fp16(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    stored = save_all(tvs, tmp_path / "tvs", torch.float16)
    bank = build_bank(stored, method="cluster", out=tmp_path / "bank")
    assert bank.dtype == torch.float16 and bank.m == K
    mem = bank.memory()
    numel = sum(int(np.prod(s)) for s in SHAPES.values())
    on_disk = 0
    for tv in stored:
        path = Path(tv.source.name)
        _, _, data_start = read_header(path)
        on_disk += path.stat().st_size - data_start
    assert mem.task_vectors == on_disk == len(tvs) * numel * 2
    assert mem.bases_data == K * numel * 2
    assert mem.bank == sum(p.stat().st_size for p in (tmp_path / "bank").rglob("*") if p.is_file())
    assert mem.bases_files == sum(p.stat().st_size for p in (tmp_path / "bank").glob("basis-*"))
    r = runner.invoke(app, ["bases", "info", str(tmp_path / "bank")])
    assert r.exit_code == 0, r.output
    assert f"{mem.task_vectors:,}" in r.output and f"{mem.bank:,}" in r.output and "memory" in r.output


def test_arithmetic_through_reconstructions(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    bank = build_bank(tvs, method="learned", m=3, out=tmp_path / "bank", steps=100)
    combo = bank.combine(add=["c0t1", "c1t2"], negate=["c2t0"])
    ref = {n: bank.reconstruct("c0t1")[n] + bank.reconstruct("c1t2")[n] - bank.reconstruct("c2t0")[n] for n in SHAPES}
    for n in SHAPES:
        torch.testing.assert_close(combo[n], ref[n], rtol=1e-12, atol=1e-12)
    base = {n: torch.randn(s, dtype=torch.float64) for n, s in SHAPES.items()}
    applied = combo.apply_to(base, 0.4)
    for n in SHAPES:
        torch.testing.assert_close(applied[n], base[n] + 0.4 * ref[n], rtol=1e-12, atol=1e-12)
    neg = bank.negation("c1t1")
    torch.testing.assert_close(neg["layers.0.w"], -bank.reconstruct("c1t1")["layers.0.w"], rtol=0, atol=1e-15)
    torch.testing.assert_close(
        bank.addition(["c1t1"])["layers.0.b"], bank.reconstruct("c1t1")["layers.0.b"], rtol=0, atol=1e-15
    )
    with pytest.raises(ConfigError, match="'nope' is not in the bank"):
        bank.combine(add=["nope"])
    with pytest.raises(ConfigError, match="both added and negated"):
        bank.combine(add=["c0t1"], negate=["c0t1"])


# ------------------------------------------------------------------ continual
def test_continual_add_cluster_re_merges_the_most_similar_basis(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    stored = save_all(tvs, tmp_path / "tvs", torch.float64)
    new = stored.pop(5)  # c1t1 arrives later
    bank = build_bank(stored, method="cluster", m=K, out=tmp_path / "bank")
    k1 = bank.manifest.assignments[bank.index("c1t0")]
    old_file = bank.manifest.bases[k1].file
    k = bank.add(new, "c1t1")
    assert k == k1 and bank.t == len(tvs) and bank.m == K
    assert not (tmp_path / "bank" / old_file).exists() and (tmp_path / "bank" / bank.manifest.bases[k].file).exists()
    members = [tvs[i] for i in (4, 5, 6, 7)]
    for n in SHAPES:  # re-merged: the mean of the old members and the new task
        torch.testing.assert_close(bank.basis(k)[n], sum(tv[n] for tv in members) / 4, rtol=1e-12, atol=1e-12)
    again = Bank.load(tmp_path / "bank")
    for name in ("c1t1", "c1t0", "c0t0"):
        i = [tv.name for tv in tvs].index(name)
        assert again.relative_errors()[name] == pytest.approx(explicit_error(tvs[i], again.reconstruct(name)), rel=1e-9)
    # Gram entries with the re-merged cluster's members are now known, others are not
    i_new, i_sib, i_far = again.index("c1t1"), again.index("c1t0"), again.index("c0t0")
    assert float(again.gram[i_new, i_sib]) == pytest.approx(float(flat(tvs[5]) @ flat(tvs[4])), rel=1e-12)
    assert torch.isnan(again.gram[i_new, i_far])
    # a task unlike every basis opens a new basis when asked to
    odd = TaskVector.from_tensors({n: torch.randn(s, dtype=torch.float64) for n, s in SHAPES.items()}, name="odd")
    assert again.add(odd, "odd", new_basis_below=0.5) == K and again.m == K + 1
    assert again.relative_errors()["odd"] < 1e-6  # exact up to the cancellation in G_ii - 2 d c + d^2 h


def test_continual_add_needs_members_or_their_files(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    bank = build_bank(tvs[:-1], method="cluster", m=K, out=tmp_path / "bank")  # in-memory: no source files
    with pytest.raises(ConfigError, match=r"member 'c2t0'.*members="):
        bank.add(tvs[-1], "c2t3")
    k = bank.add(tvs[-1], "c2t3", members={tv.name: tv for tv in tvs})
    assert bank.manifest.bases[k].members == ["c2t0", "c2t1", "c2t2", "c2t3"]
    with pytest.raises(ConfigError, match="appears twice"):
        bank.add(tvs[-1], "c2t3")


def test_continual_add_linear_bases(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    bank = build_bank(tvs[1:], method="pca", m=4, out=tmp_path / "bank")
    files = sorted(os.listdir(tmp_path / "bank"))
    assert bank.add(tvs[0], "c0t0") is None
    assert sorted(os.listdir(tmp_path / "bank")) == files  # the bases stay
    assert bank.relative_errors()["c0t0"] == pytest.approx(explicit_error(tvs[0], bank.reconstruct("c0t0")), rel=1e-9)
    assert bank.relative_errors()["c0t0"] < 0.2
    with pytest.raises(ConfigError, match="new_basis_below"):
        bank.add(tvs[0], "again", new_basis_below=0.5)


# ------------------------------------------------------------------ bad input
def test_bad_options_name_the_option(tmp_path: Path, data) -> None:
    tvs, _, g = data
    with pytest.raises(ConfigError, match=r"m=13 exceeds the number of task vectors T=12"):
        build_bank(tvs, method="pca", m=13, out=tmp_path / "b")
    with pytest.raises(ConfigError, match="m: must be at least 1, got 0"):
        fit_bases(tvs, method="cluster", m=0, gram_matrix=g)
    with pytest.raises(UnknownMethodError, match="method: unknown bases method 'kmeans'"):
        build_bank(tvs, method="kmeans", out=tmp_path / "b")
    with pytest.raises(UnknownMethodError, match="unknown merge method 'avg'"):
        fit_bases(tvs, method="cluster", gram_matrix=g, merge="avg")
    with pytest.raises(ConfigError, match="density"):
        fit_bases(tvs, method="cluster", gram_matrix=g, merge="ties", merge_params={"density": 2.0})
    with pytest.raises(ConfigError, match="names: 'x' appears twice"):
        fit_bases(tvs[:2], ["x", "x"], gram_matrix=g[:2, :2])
    with pytest.raises(ConfigError, match="temperature"):
        fit_bases(tvs, method="learned", gram_matrix=g, temperature=0.0)
    with pytest.raises(ConfigError, match="rank"):
        fit_bases([tvs[0], tvs[0] * 2.0, tvs[1]], ["a", "b", "c"], method="pca", m=3)
    with pytest.raises(ConfigError, match="zero"):
        fit_bases([tvs[0], tvs[0] * 0.0], ["a", "z"], method="pca", m=1)
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_corrupt_or_incomplete_bank_names_the_file(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    build_bank(tvs, method="pca", m=2, out=tmp_path / "bank")
    with pytest.raises(ConfigError, match="already exists"):
        build_bank(tvs, method="pca", m=2, out=tmp_path / "bank")
    manifest = tmp_path / "bank" / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"manifest.json: corrupt manifest, not valid JSON"):
        Bank.load(tmp_path / "bank")
    d = json.loads(good)
    d["decoder"] = d["decoder"][:1]
    manifest.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"manifest.json: corrupt manifest: .*decoder must be 2 x 12"):
        Bank.load(tmp_path / "bank")
    d = json.loads(good)
    d["method"] = "magic"
    manifest.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"corrupt manifest: method"):
        Bank.load(tmp_path / "bank")
    manifest.write_text(good)
    (tmp_path / "bank" / "basis-001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"basis 1 file 'basis-001.safetensors' is missing"):
        Bank.load(tmp_path / "bank")
    with pytest.raises(CheckpointError, match="not a bases bank"):
        Bank.load(tmp_path)


def test_failed_build_leaves_nothing_behind(tmp_path: Path, data) -> None:
    tvs, _, g = data

    class Failing:
        def __init__(self, src):
            self.source, self.name = src, "failing"

        def keys(self):
            return self.source.keys()

        def spec(self, key):
            return self.source.spec(key)

        def read_flat(self, key, start=0, stop=None):
            if key == "layers.0.b":
                raise OSError("disk went away")
            return self.source.read_flat(key, start, stop)

    bad = [TaskVector(Failing(tv.source), name=tv.name) for tv in tvs]
    with pytest.raises(OSError, match="disk went away"):
        build_bank(bad, method="pca", m=2, out=tmp_path / "bank", gram_matrix=g)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ CLI
def test_cli_build_info_compose(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    stored = save_all(tvs[:6], tmp_path / "tvs", torch.float32)
    files = [tv.source.name for tv in stored]
    bank = tmp_path / "bank"
    r = runner.invoke(app, ["bases", "build", *files, "-o", str(bank), "--method", "pca", "--m", "2"])
    assert r.exit_code == 0, r.output
    assert "wrote bank of 2 pca bases for 6 task vectors" in r.output
    r = runner.invoke(app, ["bases", "info", str(bank)])
    assert r.exit_code == 0 and "c0t1" in r.output and "bank total" in r.output
    base = {n: torch.randn(s) for n, s in SHAPES.items()}
    from safetensors.torch import save_file

    save_file(base, tmp_path / "base.safetensors")
    r = runner.invoke(
        app,
        [
            "bases",
            "compose",
            str(bank),
            "--add",
            "c0t0,c1t1",
            "--negate",
            "c0t2",
            "--base",
            str(tmp_path / "base.safetensors"),
            "-o",
            str(tmp_path / "out.safetensors"),
            "--coef",
            "0.5",
        ],
    )
    assert r.exit_code == 0, r.output
    b = Bank.load(bank)
    ref = b.combine(add=["c0t0", "c1t1"], negate=["c0t2"])
    out = load_file(tmp_path / "out.safetensors")
    for n in SHAPES:
        torch.testing.assert_close(out[n], (base[n].double() + 0.5 * ref[n]).float(), rtol=0, atol=1e-6)
    extra = save_all(tvs[6:7], tmp_path / "more", torch.float32)[0]
    r = runner.invoke(app, ["bases", "add", str(bank), extra.source.name])
    assert r.exit_code == 0 and "added c1t2 to least-squares coefficients" in r.output, r.output
    r = runner.invoke(app, ["bases", "compose", str(bank), "--negate", "c0t2", "-o", str(tmp_path / "neg.safetensors")])
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(
        load_file(tmp_path / "neg.safetensors")["layers.0.w"], -b.reconstruct("c0t2")["layers.0.w"].float()
    )
    # a YAML config, with ties merge
    cfg = tmp_path / "bases.yaml"
    tasks = "\n".join(f"  - {{name: t{i}, task_vector: tvs/{Path(f).name}}}" for i, f in enumerate(files))
    cfg.write_text(f"method: cluster\nmerge: ties\nmerge_params: {{density: 0.5}}\ndtype: float16\ntasks:\n{tasks}\n")
    r = runner.invoke(app, ["bases", "build", str(cfg), "-o", str(tmp_path / "bank2")])
    assert r.exit_code == 0, r.output
    b2 = Bank.load(tmp_path / "bank2")
    assert b2.manifest.merge == "ties" and b2.dtype == torch.float16 and b2.names == [f"t{i}" for i in range(6)]
    assert b2.manifest.sources[0] == str(Path(files[0]).resolve())


def test_cli_errors_name_the_option_or_file(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    files = [tv.source.name for tv in save_all(tvs[:3], tmp_path / "tvs", torch.float32)]
    r = runner.invoke(app, ["bases", "build", *files, "-o", str(tmp_path / "b"), "--m", "0"])
    assert r.exit_code == 2 and "--m" in r.output
    r = runner.invoke(app, ["bases", "build", *files, "-o", str(tmp_path / "b"), "--m", "4"])
    assert r.exit_code == 2 and "m=4 exceeds the number of task vectors T=3" in r.output
    r = runner.invoke(app, ["bases", "build", *files, "-o", str(tmp_path / "b"), "--method", "svd"])
    assert r.exit_code == 2 and "--method" in r.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method: cluster\nm: 2\ntask: []\n")
    r = runner.invoke(app, ["bases", "build", str(cfg), "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "bad.yaml" in r.output and "task" in r.output
    r = runner.invoke(app, ["bases", "build", str(cfg), "-o", str(tmp_path / "b"), "--m", "2"])
    assert r.exit_code == 2 and "--m" in r.output and "config file" in r.output
    r = runner.invoke(app, ["bases", "info", str(tmp_path)])
    assert r.exit_code == 2 and "not a bases bank" in " ".join(r.output.split())


def test_unknown_option_is_refused_before_any_reading(tmp_path: Path, data) -> None:
    tvs, _, _ = data
    with pytest.raises(ConfigError, match="unknown option.*temprature"):
        build_bank(tvs, method="learned", out=tmp_path / "b", temprature=2.0)
