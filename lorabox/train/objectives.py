"""Training objectives as pure functions: what the denoiser sees, what it must predict, how each sample weighs.

Two families (FIELD_NOTES section 4):

* **flow matching** (SD3, FLUX.1, FLUX.2): x_s = (1 - s) x0 + s noise, target noise - x0. s = shift(u) with u drawn
  as diffusers' `compute_density_for_timestep_sampling` draws it (same random calls, so the same generator gives the
  same u), and the shift the base's own sampler uses: a fixed shift (SD3: 3.0) or, when its scheduler shifts by
  resolution (`use_dynamic_shifting`, FLUX), BFL's mu = m * seq_len + b and s' = e^mu / (e^mu + 1/s - 1).
  s is continuous (kohya's choice), not snapped to the scheduler's 1000 training timesteps.
* **DDPM** (SD1.5, SDXL): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t ~ U{0..999}; target noise (epsilon) or
  v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (`v_prediction`), abar from the base's scheduler config.
  Min-SNR-gamma, SNR = abar / (1 - abar): weight min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1)
  for v, the convention of the Min-SNR paper and kohya's `apply_snr_weight` (diffusers' scripts differ for v).

The loss is the per-sample mean of w * (pred - target)^2, then the batch mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ObjectiveMismatch

FLOW, EPSILON, V = "flow", "epsilon", "v_prediction"
OBJECTIVES = (FLOW, EPSILON, V)
SAMPLINGS = ("logit_normal", "mode", "uniform")
# BFL's resolution shift (flux/sampling.py `get_schedule`), also the defaults of diffusers' FLUX scheduler config
RESOLUTION_SHIFT = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


@dataclass(frozen=True)
class Objective:
    """Everything the loss needs to know about the base's training task."""

    kind: str  # FLOW, EPSILON or V
    sampling: str = "logit_normal"  # flow: how u is drawn
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None  # flow: a fixed shift; None with `resolution_shift` set = by resolution
    resolution_shift: dict | None = None  # flow: base/max seq len and shift of the resolution-dependent mu
    alphas_cumprod: torch.Tensor | None = None  # DDPM: abar_t for t = 0..T-1
    min_snr_gamma: float | None = None  # DDPM only

    def describe(self) -> str:
        if self.kind == FLOW:
            shift = "by resolution (BFL mu)" if self.resolution_shift else f"{self.shift or 1.0:g}"
            return f"flow matching, {self.sampling} timesteps, shift {shift}"
        snr = f", min-SNR gamma {self.min_snr_gamma:g}" if self.min_snr_gamma else ""
        return f"{self.kind} prediction, uniform t in 0..{len(self.alphas_cumprod) - 1}{snr}"


# --- which objective a base was trained with -------------------------------------------------------------

def base_objective(scheduler_class: str, scheduler_config: dict) -> str:
    """The objective a base was trained with, read from its scheduler: flow for flow-match schedulers, else the
    scheduler's `prediction_type` (epsilon when absent, as in diffusers)."""
    if "FlowMatch" in scheduler_class:
        return FLOW
    return scheduler_config.get("prediction_type") or EPSILON


def check_objective(requested: str | None, trained: str, *, base: str, scheduler_class: str) -> str:
    """The objective to train: the base's own. Asking for another is refused, with the reason."""
    if requested is None or requested == trained:
        return trained
    if requested not in OBJECTIVES:
        raise ObjectiveMismatch(f"unknown objective {requested!r}.", hint=f"Use one of {', '.join(OBJECTIVES)}.")
    why = {
        FLOW: "it predicts the velocity noise - x0 along straight paths; its sampler integrates that velocity",
        EPSILON: "it predicts the added noise, and its sampler divides by that convention",
        V: "it predicts v = sqrt(abar) noise - sqrt(1 - abar) x0, and its sampler expects v",
    }[trained]
    raise ObjectiveMismatch(
        f"{base}: the base was trained with the {trained} objective ({scheduler_class}: {why}); "
        f"a LoRA trained for {requested} would fight the base instead of adapting it.",
        hint=f"Drop --objective, or pass --objective {trained}.",
    )


# --- flow matching ---------------------------------------------------------------------------------------

def sample_u(n: int, sampling: str, *, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=None,
             device="cpu") -> torch.Tensor:
    """u in (0, 1), drawn with the same random calls as diffusers' `compute_density_for_timestep_sampling`."""
    if sampling == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(n,), device=device, generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(size=(n,), device=device, generator=generator)
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if sampling == "uniform":
        return u
    raise ObjectiveMismatch(f"unknown timestep sampling {sampling!r}.", hint=f"Use one of {', '.join(SAMPLINGS)}.")


def quantile_u(q: torch.Tensor, obj: Objective) -> torch.Tensor:
    """The u at quantiles q of the sampling distribution (fixed timesteps for a comparable held-out loss)."""
    if obj.sampling == "logit_normal":
        return torch.sigmoid(obj.logit_mean + obj.logit_std * math.sqrt(2) * torch.erfinv(2 * q - 1))
    return q  # uniform (and "mode": the held-out loss only needs fixed, spread-out timesteps)


def static_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = shift * s / (1 + (shift - 1) * s) (FlowMatchEulerDiscreteScheduler without dynamic shifting)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_mu(seq_len: int, *, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                  max_shift=1.15) -> float:
    """BFL's mu: linear in the number of image tokens (256 -> 0.5, 4096 -> 1.15)."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return seq_len * m + (base_shift - m * base_image_seq_len)


def exponential_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """s' = e^mu / (e^mu + (1/s - 1)): the resolution shift, equal to static_shift with shift = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flow_sigmas(u: torch.Tensor, obj: Objective, seq_len: int) -> torch.Tensor:
    """The noise level s for draws u, shifted as the base's sampler shifts (seq_len = image tokens)."""
    if obj.resolution_shift:
        return exponential_shift(u, resolution_mu(seq_len, **obj.resolution_shift))
    if obj.shift and obj.shift != 1.0:
        return static_shift(u, obj.shift)
    return u


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


# --- DDPM (epsilon / v) ----------------------------------------------------------------------------------

def alphas_cumprod(config: dict) -> torch.Tensor:
    """abar_t from a DDPM-family scheduler config (beta_start, beta_end, beta_schedule, num_train_timesteps)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":  # the latent-diffusion schedule (SD1.5, SDXL)
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2
    else:
        raise ObjectiveMismatch(f"beta_schedule {schedule!r} is not supported for training.",
                                hint="Bases with linear or scaled_linear schedules (SD1.5, SDXL) are.")
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_noisy(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    a = _bcast(abar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    a = _bcast(abar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(abar: torch.Tensor) -> torch.Tensor:
    return abar / (1 - abar)


def min_snr_weight(abar: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023; kohya)."""
    s = snr(abar)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if kind == V else clipped / s


# --- one training example --------------------------------------------------------------------------------

@dataclass
class Draw:
    noisy: torch.Tensor
    target: torch.Tensor
    timestep: torch.Tensor  # flow: s in [0, 1]; DDPM: integer t
    weight: torch.Tensor  # per sample


def draw(obj: Objective, x0: torch.Tensor, noise: torch.Tensor, *, timestep: torch.Tensor | None = None,
         seq_len: int = 0, generator=None) -> Draw:
    """Noise x0 at a random timestep (or the given one: s for flow, integer t for DDPM) and give the target."""
    n = x0.shape[0]
    ones = torch.ones(n, device=x0.device)
    # timesteps are drawn where the generator lives (the trainer's is a CPU one, so a run draws the same timesteps
    # on every device), then moved to the batch
    where = generator.device if generator is not None else x0.device
    if obj.kind == FLOW:
        sigma = timestep
        if sigma is None:
            u = sample_u(n, obj.sampling, logit_mean=obj.logit_mean, logit_std=obj.logit_std,
                         mode_scale=obj.mode_scale, generator=generator, device=where)
            sigma = flow_sigmas(u, obj, seq_len)
        sigma = sigma.to(x0.device, torch.float32)
        return Draw(flow_noisy(x0, noise, sigma), flow_target(x0, noise), sigma, ones)
    abar_all = obj.alphas_cumprod.to(x0.device)
    t = timestep
    if t is None:
        t = torch.randint(0, len(abar_all), (n,), device=where, generator=generator)
    t = t.to(x0.device)
    abar = abar_all[t].to(x0.dtype)
    target = noise if obj.kind == EPSILON else v_target(x0, noise, abar)
    weight = min_snr_weight(abar, obj.min_snr_gamma, obj.kind) if obj.min_snr_gamma else ones
    return Draw(ddpm_noisy(x0, noise, abar), target, t, weight)


def loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of w * (pred - target)^2 (in float32), then the batch mean."""
    per = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return (per if weight is None else per * weight.float()).mean()


def fixed_timesteps(obj: Objective, quantiles, seq_len: int) -> torch.Tensor:
    """Timesteps at fixed quantiles of the training distribution: s for flow, integer t for DDPM."""
    q = torch.as_tensor(quantiles, dtype=torch.float64)
    if obj.kind == FLOW:
        return flow_sigmas(quantile_u(q, obj), obj, seq_len).float()
    return (q * len(obj.alphas_cumprod)).long().clamp(0, len(obj.alphas_cumprod) - 1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.ndim - 1)))
