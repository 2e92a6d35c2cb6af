"""Parameter names and shapes of an SDXL-family UNet2DConditionModel, derived from its config.

Pure Python, so the merge engine and the ComfyUI nodes need neither diffusers nor a model build to
know what an SDXL UNet looks like. `meta_device_shapes` is the reference (diffusers' own model on
the meta device); tests check both agree for the SDXL, inpainting and tiny configs.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import MumuError

_SUPPORTED_BLOCKS = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}


def as_config_dict(config) -> dict:
    """A plain dict from a dict, a diffusers FrozenDict or a model with `.config`."""
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}


def layers_per_block(cfg: dict) -> int:
    lpb = cfg["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise MumuError(f"UNet config has per-block layers_per_block={lpb}; the original (ldm) layout "
                            f"numbers input/output blocks uniformly, so only one value is supported.")
        lpb = lpb[0]
    return int(lpb)


def derived_unet_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]] | None:
    """Parameter names/shapes of UNet2DConditionModel for SDXL-family configs, in pure Python.

    Follows diffusers' constructor arithmetic (ResnetBlock2D, Transformer2DModel with
    BasicTransformerBlock + GEGLU, skip-connection widths of the up path) so the merge engine and
    the ComfyUI nodes need neither diffusers nor a model build. Tests compare it with a meta-device
    diffusers model for the SDXL and tiny configs. None for configs outside this family.
    """
    if not set(cfg["down_block_types"]) | set(cfg["up_block_types"]) <= _SUPPORTED_BLOCKS or \
            cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn" or \
            cfg.get("class_embed_type") or cfg.get("encoder_hid_dim") or cfg.get("time_cond_proj_dim") or \
            cfg.get("time_embedding_type", "positional") != "positional" or cfg.get("time_embedding_dim") or \
            cfg.get("addition_embed_type") not in (None, "text_time"):
        return None
    chans = list(cfg["block_out_channels"])
    n = len(chans)
    lpb = layers_per_block(cfg)
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    ctx = cfg["cross_attention_dim"]
    linear = bool(cfg.get("use_linear_projection", False))
    k_in, k_out = cfg.get("conv_in_kernel", 3), cfg.get("conv_out_kernel", 3)
    temb = chans[0] * 4
    out: list[tuple[str, tuple[int, ...]]] = []

    def lin(name, o, i, bias=True):
        out.append((f"{name}.weight", (o, i)))
        if bias:
            out.append((f"{name}.bias", (o,)))

    def conv(name, o, i, k):
        out.append((f"{name}.weight", (o, i, k, k)))
        out.append((f"{name}.bias", (o,)))

    def norm(name, c):
        out.extend([(f"{name}.weight", (c,)), (f"{name}.bias", (c,))])

    def resnet(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        lin(f"{name}.time_emb_proj", o, temb)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.conv_shortcut", o, i, 1)

    def transformer(name, c, layers):
        norm(f"{name}.norm", c)
        (lin if linear else lambda nm, o, i: conv(nm, o, i, 1))(f"{name}.proj_in", c, c)
        for b in range(layers):
            t = f"{name}.transformer_blocks.{b}"
            norm(f"{t}.norm1", c)
            for a, kv in (("attn1", c), ("attn2", ctx)):
                lin(f"{t}.{a}.to_q", c, c, bias=False)
                lin(f"{t}.{a}.to_k", c, kv, bias=False)
                lin(f"{t}.{a}.to_v", c, kv, bias=False)
                lin(f"{t}.{a}.to_out.0", c, c)
                if a == "attn1":
                    norm(f"{t}.norm2", c)
            norm(f"{t}.norm3", c)
            lin(f"{t}.ff.net.0.proj", c * 8, c)  # GEGLU: two 4x halves
            lin(f"{t}.ff.net.2", c, c * 4)
        (lin if linear else lambda nm, o, i: conv(nm, o, i, 1))(f"{name}.proj_out", c, c)

    conv("conv_in", chans[0], cfg["in_channels"], k_in)
    lin("time_embedding.linear_1", temb, chans[0])
    lin("time_embedding.linear_2", temb, temb)
    if cfg.get("addition_embed_type") == "text_time":
        lin("add_embedding.linear_1", temb, cfg["projection_class_embeddings_input_dim"])
        lin("add_embedding.linear_2", temb, temb)
    prev = chans[0]
    for i, bt in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            if "CrossAttn" in bt:
                transformer(f"down_blocks.{i}.attentions.{j}", chans[i], tl[i])
            resnet(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else chans[i], chans[i])
        prev = chans[i]
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", chans[i], chans[i], 3)
    transformer("mid_block.attentions.0", chans[-1], tl[-1])
    resnet("mid_block.resnets.0", chans[-1], chans[-1])
    resnet("mid_block.resnets.1", chans[-1], chans[-1])
    rev, rev_tl = chans[::-1], tl[::-1]
    for i, bt in enumerate(cfg["up_block_types"]):
        prev_out, out_ch, in_ch = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
        for j in range(lpb + 1):
            if "CrossAttn" in bt:
                transformer(f"up_blocks.{i}.attentions.{j}", out_ch, rev_tl[i])
            skip = in_ch if j == lpb else out_ch
            resnet(f"up_blocks.{i}.resnets.{j}", (prev_out if j == 0 else out_ch) + skip, out_ch)
        if i < n - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out_ch, out_ch, 3)
    norm("conv_norm_out", chans[0])
    conv("conv_out", cfg["out_channels"], chans[0], k_out)
    return out


def meta_device_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names/shapes from diffusers' own UNet2DConditionModel built on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(as_config_dict(config))
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}
