"""Untrained shapes-world models, built from the same classes as the real MUMU path at tiny width.

- VLM: `Idefics2ForConditionalGeneration` (the class Idefics2-8B is saved with), perceiver removed at
  load time like the real one; its byte-level BPE tokenizer is trained on the world's captions.
- SDXL: `UNet2DConditionModel` with SDXL's topology (3 levels, no attention in the first, text_time
  micro-conditioning, cross-attention 2048, pooled 1280) and an `AutoencoderKL` with a 4x
  downsampling (64 px images -> 16x16x4 latents), saved as a diffusers `StableDiffusionXLPipeline`
  folder with SDXL's betas as a v-prediction, zero-terminal-SNR schedule (`SCHEDULE`, below).

Everything goes through `save_pretrained`, so training, export and `mumu` load it with the code
that loads Idefics2-8B and community SDXL checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .world import COLOUR_NAMES, FLOOR_NAMES, NOUNS, PATTERNS, caption_for

TOKENS_PER_IMAGE = 16        # 4x4 patches of 14 px: 56 px crops
PATCH = 14

# SDXL's betas, but v-prediction with zero terminal SNR and trailing timesteps (the schedule of
# v-prediction SDXL finetunes). Why not SDXL's ε-prediction: which object gets which colour is decided
# in the noisiest sampling steps, and there an ε-prediction UNet must reproduce its input noise to
# within ~7 % to express the image at all. SDXL's large UNet can; this tiny one cannot (measured:
# at t=999 its implied image error was twice the latents' variance, and it did not improve with crops
# in the context, whatever the loss weighting), so an ε-prediction toy never learns to use the crops.
# At zero SNR a v-prediction UNet predicts the image itself from the conditioning alone.
SCHEDULE = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def world_corpus() -> list[str]:
    """Every caption shape the world writes (and attribute words, so probes of the text stay short)."""
    lines = [caption_for([a]) for a in NOUNS]
    lines += [caption_for([a, b]) for a in NOUNS for b in NOUNS if a != b]
    lines += [caption_for([a, b, c]) for a in NOUNS for b in NOUNS for c in NOUNS if len({a, b, c}) == 3][:40]
    lines += [" ".join(COLOUR_NAMES), " ".join(PATTERNS), " ".join(FLOOR_NAMES), "on a floor"]
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

    from mumu_core.compat import image_processor_class
    from mumu_core.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus=world_corpus())
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(Idefics2Config(**vlm_config(tokenizer)))
    model.save_pretrained(out)
    image_processor = image_processor_class("idefics2")(do_image_splitting=False)
    Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                      image_seq_len=TOKENS_PER_IMAGE).save_pretrained(out)
    return out


def unet_config() -> dict:
    """The tiny SDXL topology (mumu_core.tiny) at 16x16 latents, a little wider."""
    from mumu_core.tiny.configs import tiny_unet_config

    return {**tiny_unet_config(), "sample_size": 16, "block_out_channels": (32, 64, 96),
            "transformer_layers_per_block": (1, 1, 1), "norm_num_groups": 16}


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
        scaling_factor=1.0,   # set from the trained VAE's latent std (pretrain.train_vae)
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
