"""The diffusion training objective: noise a latent batch at random timesteps, and the (min-SNR) MSE loss.

SDXL's DDPM schedule: a timestep t ~ U{0, T-1} per sample, x_t = add_noise(x_0, ε, t), and the UNet
predicts ε (or v = get_velocity(x_0, ε, t) for v-prediction schedulers). The loss is the MSE to
that target, optionally min-SNR weighted (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction,
min(SNR, γ) / (SNR + 1) for v-prediction. All random draws come from the caller's generator, in a
fixed order (noise, offset noise, timesteps), so a resumed run draws what the straight run drew.
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


def add_training_noise(latents: torch.Tensor, noise_scheduler, generator: torch.Generator,
                       noise_offset: float = 0.0) -> NoisedBatch:
    """Draw ε (plus `noise_offset` x per-channel noise), uniform timesteps, and noise `latents` to x_t."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return NoisedBatch(noisy, timesteps, target)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and the target; min-SNR-γ weighted per sample when γ is set."""
    if min_snr_gamma is None:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=min_snr_gamma) / snr  # ε-prediction: min(SNR, γ) / SNR
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weight).mean()
