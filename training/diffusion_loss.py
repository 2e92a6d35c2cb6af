"""The diffusion training objective: noise a latent batch at random timesteps, and the (min-SNR) MSE loss.

SDXL's DDPM schedule: a timestep t ~ U{0, T-1} per sample (or from a biased distribution, below), x_t = add_noise(x_0, ε, t), and the UNet
predicts ε (or v = get_velocity(x_0, ε, t) for v-prediction schedulers). The loss is the MSE to
that target, optionally min-SNR weighted (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction,
min(SNR, γ) / (SNR + 1) for v-prediction. All random draws come from the caller's generator, in a
fixed order (noise, offset noise, timesteps), so a resumed run draws what the straight run drew.

Timestep bias (`loss.timestep_bias_*`, the same knobs and meaning as diffusers' SDXL training
script): "later" draws the noisiest `portion` of timesteps `multiplier` times as often, "earlier"
the cleanest, "range" the timesteps in [begin, end). Why it matters for MUMU: which object gets
which appearance is decided in the first, noisiest sampling steps, and there an ε-prediction
loss weighs an error in the image by SNR (≈0.005-0.03 above t=900 on SDXL's schedule), so uniform
draws give the conditioning almost no gradient; biasing the draws towards those steps does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # x_t, fp32 (cast it to the UNet's dtype at the call)
    timesteps: torch.Tensor  # [B] long
    target: torch.Tensor  # ε or v, fp32


TIMESTEP_BIAS_STRATEGIES = ("none", "later", "earlier", "range")


def timestep_weights(num_timesteps: int, strategy: str = "none", portion: float = 0.25, multiplier: float = 1.0,
                     begin: int = 0, end: int | None = None) -> torch.Tensor | None:
    """Sampling weights over [0, num_timesteps) (normalised), or None for uniform draws."""
    if strategy == "none" or multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    count = max(1, int(portion * num_timesteps))
    if strategy == "later":
        weights[-count:] *= multiplier
    elif strategy == "earlier":
        weights[:count] *= multiplier
    elif strategy == "range":
        weights[begin:num_timesteps if end is None else end] *= multiplier
    else:
        raise ValueError(f"timestep bias strategy must be one of {TIMESTEP_BIAS_STRATEGIES}; got {strategy!r}")
    return weights / weights.sum()


def timestep_weights_for(loss_cfg, num_timesteps: int) -> torch.Tensor | None:
    """`timestep_weights` from a config's `loss` section."""
    return timestep_weights(num_timesteps, loss_cfg.timestep_bias_strategy, loss_cfg.timestep_bias_portion,
                            loss_cfg.timestep_bias_multiplier, loss_cfg.timestep_bias_begin,
                            loss_cfg.timestep_bias_end)


def add_training_noise(latents: torch.Tensor, noise_scheduler, generator: torch.Generator,
                       noise_offset: float = 0.0, timestep_weights: torch.Tensor | None = None) -> NoisedBatch:
    """Draw ε (plus `noise_offset` x per-channel noise), timesteps (uniform, or from `timestep_weights`),
    and noise `latents` to x_t."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    if timestep_weights is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device).long()
    else:  # the generator lives on the latents' device, so draw there
        timesteps = torch.multinomial(timestep_weights.to(latents.device), latents.shape[0], replacement=True,
                                      generator=generator).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return NoisedBatch(noisy, timesteps, target)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   min_snr_gamma: float | None = None, v_pred_like: float = 0.0) -> torch.Tensor:
    """MSE between the UNet's prediction and the target, per sample weighted by

    - min-SNR-γ when `min_snr_gamma` is set, and
    - `1 + v_pred_like / ᾱ_t` for ε-prediction when `v_pred_like` > 0 (kohya's `--v_pred_like_loss`):
      at 1 this adds a v-prediction loss (an ε error costs 1/ᾱ_t as much in v), whose weight on the
      image error stays ≥ 1 at the noisiest steps, where a plain ε loss weighs it by SNR ≈ 0.005.
    """
    if min_snr_gamma is None and not v_pred_like:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.ones_like(snr)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    if min_snr_gamma is not None:
        # ε-prediction: min(SNR, γ) / SNR; v-prediction: min(SNR, γ) / (SNR + 1)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_prediction else snr)
    if v_pred_like and not v_prediction:
        weight = weight * (1 + v_pred_like * (snr + 1) / snr)  # (SNR + 1) / SNR = 1 / ᾱ_t
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weight).mean()
