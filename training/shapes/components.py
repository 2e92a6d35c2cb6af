"""Untrained shapes-world models, built from the same classes as the real MUMU path at tiny width.

- VLM: `Idefics2ForConditionalGeneration` (the class Idefics2-8B is saved with), perceiver removed at
  load time like the real one; its byte-level BPE tokenizer is trained on the world's captions.
- SDXL: `UNet2DConditionModel` with SDXL's topology (3 levels, text_time micro-conditioning,
  cross-attention 2048, pooled 1280) and an `AutoencoderKL` with a 4x downsampling (64 px images ->
  16x16x4 latents), saved as a diffusers `StableDiffusionXLPipeline` folder with SDXL base's noise
  schedule (`SCHEDULE`, below). One departure: the first level has cross-attention too. SDXL's has
  none because at 1024 px its 128x128 level sees objects dozens of pixels wide and the deeper levels
  can place them; the toy's objects are 5-7 latent pixels wide at 16x16 and 2-3 at 8x8, so the
  level where an object's crop can meet its pixels is the first one.

Everything goes through `save_pretrained`, so training, export and `mumu` load it with the code
that loads Idefics2-8B and community SDXL checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .world import COLOUR_NAMES, FLOOR_NAMES, NOUNS, PATTERNS, caption_for, described_caption, sample_scene

TOKENS_PER_IMAGE = 16        # 4x4 patches of 14 px: 56 px crops
PATCH = 14

# SDXL base's own noise schedule: ε-prediction, SDXL's betas, leading timesteps. (Run 3 and 4 used
# v-prediction at zero terminal SNR, the schedule of v-prediction SDXL finetunes; the crops then did
# reach the noisiest step, but its v-loss spent the tiny UNet's capacity on the noisiest steps and it
# drew small shapeless blobs: 41 % of objects found by the probe, against 53 % with ε after the same
# stage 0. Both knobs stay in `SCHEDULE` for whoever wants to try again.)
SCHEDULE = dict(prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading")


def world_corpus() -> list[str]:
    """Every caption shape the world writes (and attribute words, so probes of the text stay short)."""
    lines = [caption_for([a]) for a in NOUNS]
    lines += [caption_for([a, b]) for a in NOUNS for b in NOUNS if a != b]
    lines += [caption_for([a, b, c]) for a in NOUNS for b in NOUNS for c in NOUNS if len({a, b, c}) == 3][:40]
    lines += [" ".join(COLOUR_NAMES), " ".join(PATTERNS), " ".join(FLOOR_NAMES), "on a floor"]
    rng = np.random.default_rng(0)   # stage 0's described captions (world.described_caption)
    lines += [described_caption(sample_scene(rng), rng) for _ in range(200)]
    return lines


def vlm_config(tokenizer) -> dict:
    return dict(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=PATCH),
        perceiver_config=dict(resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                              num_key_value_heads=1, hidden_size=128, rms_norm_eps=1e-5),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, model_type="mistral"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )


def write_vlm(out: Path, seed: int = 0) -> Path:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor

    from mumu_core.compat import image_processor_class, make_tokenizer_config_portable
    from mumu_core.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus=world_corpus())
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(Idefics2Config(**vlm_config(tokenizer)))
    model.save_pretrained(out)
    image_processor = image_processor_class("idefics2")(do_image_splitting=False)
    Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                      image_seq_len=TOKENS_PER_IMAGE).save_pretrained(out)
    make_tokenizer_config_portable(out)  # the shipped model must load under transformers 4 and 5
    return out


def unet_config() -> dict:
    """The tiny SDXL topology (mumu_core.tiny) at 16x16 latents, a little wider, cross-attention at every level."""
    from mumu_core.tiny.configs import tiny_unet_config

    return {**tiny_unet_config(), "sample_size": 16, "block_out_channels": (32, 64, 96),
            "transformer_layers_per_block": (1, 1, 1), "norm_num_groups": 16,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3, "up_block_types": ("CrossAttnUpBlock2D",) * 3}


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,   # set from the trained VAE's latent std (pretrain.train_vae, PretrainConfig.latent_std)
    )


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config())


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config())


def save_sdxl(out: Path, unet, vae) -> Path:
    """A diffusers StableDiffusionXLPipeline folder without text encoders (MUMU replaces them)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from mumu_core.pipeline import SDXL_BASE_CONFIG

    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler", **SCHEDULE)
    pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, text_encoder=None,
                                     text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    pipe.save_pretrained(out)
    return out


def training_noise_scheduler():
    """The DDPM noise process stage 0 trains with: the same betas and schedule `save_sdxl` writes."""
    from diffusers import DDPMScheduler

    from mumu_core.pipeline import SDXL_BASE_CONFIG

    return DDPMScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler", **SCHEDULE)
