"""Architecture detection on full-size key/shape tables (no weights): what `mumu merge` accepts or refuses."""

from __future__ import annotations

import pytest

from mumu_core.sdxl import keys as K
from mumu_core.errors import MumuError
from mumu_core.sdxl.detect import detect_sdxl_unet

SD15 = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
            attention_head_dim=8, use_linear_projection=False)
SD2 = dict(SD15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
REFINER = dict(block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280, layers_per_block=2,
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               in_channels=4, out_channels=4, attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4,
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2560)


def _single_file_shapes(cfg):
    shapes = {K.LDM_UNET_PREFIX + k: s for k, s in K.ldm_unet_shapes(cfg).items()}
    shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    return shapes


def test_full_size_sdxl_and_inpainting_are_accepted():
    layout = detect_sdxl_unet(_single_file_shapes(K.SDXL_BASE_UNET_CONFIG))
    assert layout.kind == "single-file" and layout.variant == "SDXL" and len(layout.to_ldm) == 1680
    inpaint = detect_sdxl_unet(_single_file_shapes(dict(K.SDXL_BASE_UNET_CONFIG, in_channels=9)))
    assert inpaint.variant.startswith("SDXL inpainting")


def test_diffusers_named_sdxl_unet_is_accepted():
    shapes = K.diffusers_unet_shapes(K.SDXL_BASE_UNET_CONFIG)
    layout = detect_sdxl_unet(shapes)
    assert layout.kind == "diffusers-unet"
    assert layout.to_ldm["down_blocks.1.attentions.0.proj_in.weight"] == "input_blocks.4.1.proj_in.weight"


@pytest.mark.parametrize("cfg,found", [(SD15, "SD 1.x"), (SD2, "SD 2.x"), (REFINER, "SDXL refiner")],
                         ids=["sd15", "sd2", "refiner"])
def test_other_unets_are_refused_naming_what_was_found(cfg, found):
    with pytest.raises(MumuError, match=found):
        detect_sdxl_unet(_single_file_shapes(cfg))


def test_damaged_sdxl_names_the_mismatch():
    shapes = _single_file_shapes(K.SDXL_BASE_UNET_CONFIG)
    del shapes[K.LDM_UNET_PREFIX + "output_blocks.5.2.conv.weight"]
    shapes[K.LDM_UNET_PREFIX + "middle_block.1.proj_in.weight"] = (1280, 1281)
    with pytest.raises(MumuError, match=r"output_blocks\.5\.2\.conv\.weight.*middle_block\.1\.proj_in\.weight"):
        detect_sdxl_unet(shapes)
