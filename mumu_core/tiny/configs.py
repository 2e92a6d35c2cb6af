"""Configs of the tiny offline components (pure data, no torch import).

Tiny models keep the *topology* of the real ones (SDXL: 3 down blocks, 2 layers per block, no
attention in the first block, text_time micro-conditioning, cross-attention 2048, pooled 1280)
with tiny widths, so every key map, loader and shape check that works on them works on the real
models.
"""

from __future__ import annotations

SDXL_CONTEXT_DIM = 2048
SDXL_POOLED_DIM = 1280
SDXL_ADDITION_TIME_EMBED_DIM = 256


def tiny_unet_config() -> dict:
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=SDXL_CONTEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_ADDITION_TIME_EMBED_DIM,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,
    )
