"""Spike-and-Slab KL, Concrete sampling, the gate rule and the posterior network."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from taskvec.variational import (
    GateConfig,
    PosteriorConfig,
    PriorConfig,
    VariationalCoefficients,
)
from taskvec.variational.data import sample_noise
from taskvec.variational.posterior import (
    DeterministicCoefficients,
    gate,
    kl_bernoulli,
    kl_normal,
    relaxed_bernoulli,
    spike_slab_kl,
)

D64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(n: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g, dtype=D64)
    logvar = torch.randn(n, generator=g, dtype=D64) - 2
    logit = 3 * torch.randn(n, generator=g, dtype=D64)
    return mu, logvar, logit


def test_kl_matches_torch_distributions_float64() -> None:
    mu, logvar, logit = _params()
    prior = PriorConfig(pi=0.3, slab_sigma=0.7)
    rho = torch.sigmoid(logit)
    kb = kl_divergence(Bernoulli(probs=rho), Bernoulli(probs=torch.full_like(rho, 0.3)))
    kn = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.full_like(mu, 0.7)))
    torch.testing.assert_close(kl_bernoulli(logit, 0.3), kb, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(kl_normal(mu, logvar, 0.7), kn, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(spike_slab_kl(mu, logvar, logit, prior), kb + rho * kn, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(spike_slab_kl(mu, logvar, logit, PriorConfig(kind="gaussian", slab_sigma=0.7)), kn)
    assert torch.count_nonzero(spike_slab_kl(mu, logvar, logit, PriorConfig(kind="none"))) == 0


def test_kl_gradient_gradcheck_and_closed_form() -> None:
    mu, logvar, logit = (t.clone().requires_grad_() for t in _params(8))
    prior = PriorConfig(pi=0.2, slab_sigma=1.5)
    assert torch.autograd.gradcheck(lambda a, b, c: spike_slab_kl(a, b, c, prior), (mu, logvar, logit))
    gm, gv, gl = torch.autograd.grad(spike_slab_kl(mu, logvar, logit, prior).sum(), (mu, logvar, logit))
    rho, v = torch.sigmoid(logit), 1.5**2
    kn = 0.5 * ((logvar.exp() + mu**2) / v - 1 - logvar + math.log(v))
    torch.testing.assert_close(gm, rho * mu / v)
    torch.testing.assert_close(gv, rho * 0.5 * (logvar.exp() / v - 1))
    dkb = rho * (1 - rho) * (torch.log(rho / 0.2) - torch.log((1 - rho) / 0.8))
    torch.testing.assert_close(gl, dkb + rho * (1 - rho) * kn)


def test_kl_is_finite_for_saturated_logits() -> None:
    logit = torch.tensor([-200.0, 200.0], dtype=D64)
    k = kl_bernoulli(logit, 0.5)
    assert torch.isfinite(k).all()
    torch.testing.assert_close(k, torch.full_like(k, math.log(2)))


def test_relaxed_bernoulli_limits() -> None:
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(10_000, generator=g, dtype=D64)
    u = torch.rand(10_000, generator=g, dtype=D64)
    hard = (u < torch.sigmoid(logit)).to(D64)  # exact Bernoulli(rho) draw from the same u
    # Concrete with the logistic noise log u - log(1-u) is the sign of (logit + noise) as t -> 0,
    # which is Bernoulli(rho) with u -> 1-u
    soft = relaxed_bernoulli(logit, 1 - u, temperature=1e-4)
    torch.testing.assert_close(soft.round(), hard)
    st = relaxed_bernoulli(logit.requires_grad_(), 1 - u, 0.5, hard=True)
    torch.testing.assert_close(st.detach(), st.detach().round(), atol=1e-12, rtol=0)
    (g1,) = torch.autograd.grad(st.sum(), logit)
    assert (g1 > 0).all()  # straight-through: the relaxed gradient


def test_gate_rule() -> None:
    cfg = GateConfig(min_rho=0.5, min_importance=0.1, max_uncertainty=1.0)
    mu = torch.tensor([0.5, 0.5, 0.05, 0.5, -0.5], dtype=D64)
    sigma = torch.tensor([0.1, 0.1, 0.01, 0.9, 0.1], dtype=D64)
    rho = torch.tensor([0.9, 0.3, 0.9, 0.9, 0.9], dtype=D64)
    logvar, logit = 2 * sigma.log(), torch.logit(rho)
    # 0: kept; 1: rho < min_rho; 2: rho*|mu| < 0.1; 3: kept (cv 1.8 > 1 fails) -> dropped; 4: kept (|mu|)
    hard, soft = gate(mu, logvar, logit, cfg, spike=True)
    assert hard.tolist() == [1, 0, 0, 0, 1]
    assert ((soft > 0.5) == (hard > 0)).all()
    imp = gate(mu, logvar, logit, cfg.model_copy(update={"kind": "importance"}), spike=True)[0]
    assert imp.tolist() == [1, 0, 0, 1, 1]
    unc = gate(mu, logvar, logit, cfg.model_copy(update={"kind": "uncertainty"}), spike=True)[0]
    assert unc.tolist() == [1, 1, 1, 0, 1]
    assert gate(mu, logvar, logit, cfg.model_copy(update={"kind": "none"}), spike=True)[0].tolist() == [1] * 5


def _posterior(**kw: object) -> VariationalCoefficients:
    torch.manual_seed(0)
    return VariationalCoefficients(
        6, 3, 4, PosteriorConfig(hidden=8), PriorConfig(), GateConfig(**kw), init_coef=0.3
    ).double()


def test_initial_coefficients_are_task_arithmetic() -> None:
    q = _posterior()
    f0 = torch.randn(5, 6, dtype=D64)
    torch.testing.assert_close(q.coefficients(f0), torch.full((5, 3, 4), 0.3, dtype=D64))
    det = DeterministicCoefficients(6, 3, 4, PosteriorConfig(hidden=8), init_coef=0.3).double()
    torch.testing.assert_close(det.coefficients(f0), torch.full((5, 3, 4), 0.3, dtype=D64))


def test_training_draws_and_test_time_selection() -> None:
    q = _posterior()
    with torch.no_grad():  # make samples differ: random output layer
        q.net.out.weight.normal_(0, 1.0)
    f0 = torch.randn(5, 6, dtype=D64)
    noise = sample_noise(torch.arange(5), 0, 0, 2, 2, (3, 4), D64)
    alpha, kl = q(f0, noise)
    assert alpha.shape == (2, 5, 3, 4) and kl.shape == (5,)
    post = q.posterior(f0)
    hard, _ = q.gates(post)
    assert torch.all(alpha[:, hard == 0] == 0)  # gated-out coefficients are never sampled
    # test time: gate * 1[rho >= 1/2] * mu, deterministic
    expect = hard * (post.rho >= 0.5) * post.mu
    torch.testing.assert_close(q.coefficients(f0), expect)
    s = q.sample(f0, noise)
    assert torch.all(s[:, hard == 0] == 0)
    # gradients reach every output of the network (mu, variance, inclusion) through the sample and KL
    (alpha.sum() + kl.sum()).backward()
    assert q.net.out.weight.grad is not None and torch.count_nonzero(q.net.out.weight.grad) > 0


def test_noise_depends_only_on_index() -> None:
    a = sample_noise(torch.tensor([3, 7, 9]), 2, 5, 2, 2, (3, 4))
    b = sample_noise(torch.tensor([9, 3]), 2, 5, 2, 2, (3, 4))
    torch.testing.assert_close(a[:, :, 2], b[:, :, 0])
    torch.testing.assert_close(a[:, :, 0], b[:, :, 1])
    assert not torch.equal(a, sample_noise(torch.tensor([3, 7, 9]), 3, 5, 2, 2, (3, 4)))
    u = a[:, 1]
    assert (u > 0).all() and (u < 1).all()


@pytest.mark.parametrize("kind", ["gaussian", "none"])
def test_prior_ablations(kind: str) -> None:
    torch.manual_seed(0)
    q = VariationalCoefficients(6, 2, 3, PosteriorConfig(hidden=8), PriorConfig(kind=kind), GateConfig()).double()
    f0 = torch.randn(4, 6, dtype=D64)
    _, kl = q(f0, sample_noise(torch.arange(4), 0, 0, 1, 2, (2, 3), D64))
    if kind == "none":
        assert torch.count_nonzero(kl) == 0
    else:
        assert (kl > 0).all()
        torch.testing.assert_close(q.posterior(f0).rho, torch.ones(4, 2, 3, dtype=D64))
