"""Fine-tuning on real data (real EfficientNet-Lite0 weights, scikit-learn digits) resumes from
the state file of an interrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskvec.bench.suite import load_suite

pytestmark = pytest.mark.suite


def test_rerun_after_interrupted_finetuning_resumes(tmp_path: Path) -> None:
    """A state file left by an interrupted run is picked up, and the result is the cached checkpoint."""
    from taskvec.bench.backbones import load_backbone
    from taskvec.bench.finetune import finetune
    from taskvec.bench.models import features, fit_head
    from taskvec.bench.suite import FinetuneSpec, load_task

    suite = load_suite("tiny")
    loaded = load_backbone(suite.backbone, suite.root)
    backbone = loaded.module
    pre = {k: v.clone() for k, v in backbone.state_dict().items()}
    train = load_task(suite, suite.tasks[2], loaded).train.take(torch.arange(256))  # 4 steps of 64
    head = fit_head(features(backbone, train), train.y, 10)
    spec = FinetuneSpec(epochs=1, batch_size=64, lr=1e-4)
    torch.manual_seed(0)
    full = finetune(backbone, head, train, spec, seed=0, state_path=tmp_path / "a.pt", progress=False, save_every=100)
    # interrupted after 2 of 4 steps: a state file at step 2 exists; rerunning finishes the same run
    backbone.load_state_dict(pre)

    class Stop(Exception):
        pass

    calls = {"n": 0}
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop
        return orig(self, *a, **k)

    torch.optim.AdamW.step = step  # type: ignore[method-assign]
    try:
        with pytest.raises(Stop):
            finetune(backbone, head, train, spec, seed=0, state_path=tmp_path / "b.pt", progress=False, save_every=2)
    finally:
        torch.optim.AdamW.step = orig  # type: ignore[method-assign]
    assert (tmp_path / "b.pt").exists()
    backbone.load_state_dict(pre)
    resumed = finetune(backbone, head, train, spec, seed=0, state_path=tmp_path / "b.pt", progress=False, save_every=2)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6)
