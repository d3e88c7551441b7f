"""Amortized posterior over composition coefficients, Spike-and-Slab prior, and gated sampling.

For every sample x the network maps frozen pretrained features f0(x) to, per (task k, block b),
a slab mean mu, a log-variance log sigma^2 and an inclusion logit l (rho = sigmoid(l)):

    q(gamma, beta | x) = Bern(gamma; rho(x)) N(beta; mu(x), sigma^2(x)),   alpha = gamma * beta
    p(gamma, beta)     = Bern(gamma; pi)     N(beta; 0, sigma_p^2)
    KL(q || p)         = KL(Bern(rho) || Bern(pi)) + rho * KL(N(mu, sigma^2) || N(0, sigma_p^2))

Training samples beta = mu + sigma * eps and gamma from the relaxed Bernoulli (Concrete) with
temperature t; the gate g(x) (importance rho*|mu|, uncertainty sigma/|mu|) multiplies alpha, hard in
the forward pass with a sigmoid surrogate in the backward pass (straight-through). At test time
alpha*(x) = g(x) * 1[rho >= 1/2] * mu(x): one deterministic forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from taskvec.variational.config import GateConfig, PosteriorConfig, PriorConfig
from taskvec.variational.methods import ComposerConfig, register_composer

EPS = 1e-12


# --------------------------------------------------------------------------- closed forms


def kl_bernoulli(logit: torch.Tensor, pi: float) -> torch.Tensor:
    """KL(Bern(sigmoid(logit)) || Bern(pi)), elementwise, stable for large |logit|."""
    log_rho, log_1m_rho = F.logsigmoid(logit), F.logsigmoid(-logit)
    rho = torch.sigmoid(logit)
    return rho * (log_rho - math.log(pi)) + (1 - rho) * (log_1m_rho - math.log1p(-pi))


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, prior_sigma^2)), elementwise."""
    v = prior_sigma**2
    return 0.5 * ((logvar.exp() + mu * mu) / v - 1.0 - logvar + math.log(v))


def spike_slab_kl(mu: torch.Tensor, logvar: torch.Tensor, logit: torch.Tensor, prior: PriorConfig) -> torch.Tensor:
    """Per-coefficient KL of the posterior to the prior: spike_slab, gaussian (no spike) or none (0)."""
    if prior.kind == "none":
        return torch.zeros_like(mu)
    if prior.kind == "gaussian":
        return kl_normal(mu, logvar, prior.slab_sigma)
    return kl_bernoulli(logit, prior.pi) + torch.sigmoid(logit) * kl_normal(mu, logvar, prior.slab_sigma)


def relaxed_bernoulli(logit: torch.Tensor, u: torch.Tensor, temperature: float, hard: bool = False) -> torch.Tensor:
    """Concrete sample sigmoid((logit + log u - log(1-u)) / t) from uniform noise u; `hard` rounds it
    in the forward pass and keeps the relaxed gradient (straight-through)."""
    u = u.clamp(EPS, 1 - EPS)
    soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


# --------------------------------------------------------------------------- the gate


def gate(
    mu: torch.Tensor, logvar: torch.Tensor, logit: torch.Tensor, cfg: GateConfig, spike: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard gate in {0,1}, soft surrogate in (0,1)) per coefficient.

    importance:  rho >= min_rho  and  rho*|mu| >= min_importance   (rho = 1 without a spike)
    uncertainty: sigma/|mu| <= max_uncertainty                     (coefficient of variation)
    The surrogate is a product of sigmoids of the log-margins divided by `temperature`; the hard
    gate is the product of the indicator functions (= surrogate rounded per factor)."""
    ones = torch.ones_like(mu)
    if cfg.kind == "none":
        return ones, ones
    t = cfg.temperature
    abs_mu = mu.abs().clamp_min(EPS)
    factors = []
    if cfg.kind in ("both", "importance"):
        log_imp = torch.log(abs_mu)
        if spike:
            log_imp = log_imp + F.logsigmoid(logit)
            factors.append((logit - math.log(cfg.min_rho / (1 - cfg.min_rho))) / t)
        factors.append((log_imp - math.log(cfg.min_importance)) / t)
    if cfg.kind in ("both", "uncertainty"):
        log_cv = 0.5 * logvar - torch.log(abs_mu)
        factors.append((math.log(cfg.max_uncertainty) - log_cv) / t)
    hard, soft = ones, ones
    for m in factors:
        hard = hard * (m >= 0).to(mu.dtype)
        soft = soft * torch.sigmoid(m)
    return hard, soft


# --------------------------------------------------------------------------- networks


@dataclass
class Posterior:
    """Posterior parameters per sample: each (N, T, B). rho = sigmoid(logit)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    logit: torch.Tensor

    @property
    def sigma(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    @property
    def rho(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


class CoefficientNet(nn.Module):
    """f0(x) (N, D) -> `outputs` maps of shape (N, T, B): LayerNorm (no affine), Linear, GELU, Dropout, Linear.

    The last layer starts at zero weight with biases `init_bias`, so every sample starts from the
    same coefficients (task arithmetic with `init_coef`); features shape the output after step 1.
    The output biases are the input-independent part of the coefficients (a shared, block-level
    solution) and its weights the input dependence: training can give them different step sizes
    (TrainConfig.bias_lr) and decays only the weights."""

    def __init__(
        self,
        feature_dim: int,
        num_tasks: int,
        num_blocks: int,
        hidden: int,
        init_bias: list[float],
        feature_norm: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.shape = (num_tasks, num_blocks)
        k = len(init_bias)
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False) if feature_norm else nn.Identity()
        self.hidden = nn.Linear(feature_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, k * num_tasks * num_blocks)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor(init_bias).repeat_interleave(num_tasks * num_blocks))

    def forward(self, f0: torch.Tensor) -> list[torch.Tensor]:
        h = self.drop(F.gelu(self.hidden(self.norm(f0))))
        out = self.out(h).reshape(f0.shape[0], -1, *self.shape)
        return list(out.unbind(1))


class VariationalCoefficients(nn.Module):
    """Sample-specific Spike-and-Slab posterior with gated sampling (the paper's model and ablations).

    forward(f0, noise) -> (alpha (S, N, T, B), KL per sample (N,)) draws S samples for the ELBO from
    `noise` (S, 2, N, T, B): standard normals (slab) and uniforms (Concrete). `coefficients(f0)` is
    the deterministic test-time selection g * 1[rho>=1/2] * mu; `sample(f0, noise)` draws exact
    (hard) samples for the Monte-Carlo-averaged prediction."""

    noise_channels = 2

    def __init__(
        self,
        feature_dim: int,
        num_tasks: int,
        num_blocks: int,
        posterior: PosteriorConfig,
        prior: PriorConfig,
        gate_cfg: GateConfig,
        init_coef: float = 0.3,
        concrete_temperature: float = 0.5,
        hard_concrete: bool = False,
    ):
        super().__init__()
        self.prior, self.gate_cfg, self.posterior_cfg = prior, gate_cfg, posterior
        self.temperature, self.hard_concrete = concrete_temperature, hard_concrete
        rho = posterior.init_rho
        self.net = CoefficientNet(
            feature_dim,
            num_tasks,
            num_blocks,
            posterior.hidden,
            [init_coef, 2 * math.log(posterior.init_sigma), math.log(rho / (1 - rho))],
            posterior.feature_norm,
            posterior.dropout,
        )

    @property
    def spike(self) -> bool:
        return self.prior.kind != "gaussian"

    def posterior(self, f0: torch.Tensor) -> Posterior:
        mu, logvar, logit = self.net(f0)
        logvar = logvar.clamp(-30.0, 10.0)
        if not self.spike:  # no spike: gamma = 1 (rho -> 1)
            logit = torch.full_like(logit, 30.0)
        return Posterior(mu, logvar, logit)

    def gates(self, q: Posterior) -> tuple[torch.Tensor, torch.Tensor]:
        return gate(q.mu, q.logvar, q.logit, self.gate_cfg, self.spike)

    def forward(self, f0: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.posterior(f0)
        hard, soft = self.gates(q)
        g = hard + soft - soft.detach() if self.gate_cfg.straight_through else soft
        beta = q.mu + q.sigma * noise[:, 0]
        gamma = relaxed_bernoulli(q.logit, noise[:, 1], self.temperature, self.hard_concrete) if self.spike else 1.0
        alpha = g * gamma * beta
        kl = spike_slab_kl(q.mu, q.logvar, q.logit, self.prior).flatten(1).sum(1)
        return alpha, kl

    @torch.no_grad()
    def coefficients(self, f0: torch.Tensor) -> torch.Tensor:
        q = self.posterior(f0)
        keep = self.gates(q)[0]
        if self.spike:
            keep = keep * (q.logit >= 0).to(keep.dtype)
        return keep * q.mu

    @torch.no_grad()
    def sample(self, f0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        q = self.posterior(f0)
        beta = q.mu + q.sigma * noise[:, 0]
        gamma = (noise[:, 1] < q.rho).to(beta.dtype) if self.spike else 1.0
        return self.gates(q)[0] * gamma * beta


class DeterministicCoefficients(nn.Module):
    """Ablation: a sample-specific network alpha(x) = mu(x), no prior, no gate, no sampling."""

    noise_channels = 0

    def __init__(
        self, feature_dim: int, num_tasks: int, num_blocks: int, posterior: PosteriorConfig, init_coef: float = 0.3
    ):
        super().__init__()
        self.net = CoefficientNet(
            feature_dim, num_tasks, num_blocks, posterior.hidden, [init_coef], posterior.feature_norm, posterior.dropout
        )

    def forward(self, f0: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.net(f0)[0]
        return mu.unsqueeze(0), torch.zeros(f0.shape[0], dtype=mu.dtype, device=mu.device)

    @torch.no_grad()
    def coefficients(self, f0: torch.Tensor) -> torch.Tensor:
        return self.net(f0)[0]


class VariationalConfig(ComposerConfig):
    """The variational composer: sample-specific alpha(x) with a spike-and-slab prior and a gate."""

    method: Literal["variational"] = "variational"
    objective: Literal["supervised"] = "supervised"
    prior: PriorConfig = Field(default_factory=PriorConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    posterior: PosteriorConfig = Field(default_factory=PosteriorConfig)
    concrete_temperature: float = Field(default=0.5, gt=0.0)
    hard_concrete: bool = False
    kl_weight: float = Field(
        default=1e-4,
        ge=0.0,
        description="lambda_KL; the KL is summed over the T*B coefficients, so a larger value gates out more of them",
    )

    def kl_scale(self) -> float:
        return self.kl_weight


def build_variational(cfg: VariationalConfig, d: int, t: int, b: int) -> VariationalCoefficients:
    return VariationalCoefficients(
        d, t, b, cfg.posterior, cfg.prior, cfg.gate, cfg.init_coef, cfg.concrete_temperature, cfg.hard_concrete
    )


register_composer(
    "variational",
    VariationalConfig,
    build_variational,
    doc="sample-specific alpha(x) with a spike-and-slab prior and a gate",
    presets={
        "variational": {},
        "variational_no_prior": {"prior": {"kind": "none"}},
        "variational_no_spike": {"prior": {"kind": "gaussian"}},
        "variational_no_gate": {"gate": {"kind": "none"}},
        "variational_gate_importance": {"gate": {"kind": "importance"}},
        "variational_gate_uncertainty": {"gate": {"kind": "uncertainty"}},
    },
)


class SampleSpecificConfig(ComposerConfig):
    """Deterministic sample-specific alpha(x) = mu(x): the variational network without prior or gate."""

    method: Literal["sample_specific"] = "sample_specific"
    posterior: PosteriorConfig = Field(default_factory=PosteriorConfig)


def build_sample_specific(cfg: SampleSpecificConfig, d: int, t: int, b: int) -> DeterministicCoefficients:
    return DeterministicCoefficients(d, t, b, cfg.posterior, cfg.init_coef)


register_composer(
    "sample_specific",
    SampleSpecificConfig,
    build_sample_specific,
    doc="deterministic alpha(x) = mu(x): no prior, no gate",
    presets={"sample_specific": {}},
)
