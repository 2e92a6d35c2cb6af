"""Exact name mapping between the three spellings of an SDXL-family UNet.

- diffusers `UNet2DConditionModel` parameters: `down_blocks.1.attentions.0.proj_in.weight`
- original single-file (ldm/sgm) keys, under `model.diffusion_model.` in a checkpoint:
  `input_blocks.4.1.proj_in.weight`
- kohya / ComfyUI LoRA stems: `lora_unet_input_blocks_4_1_proj_in` (ldm module path, "." -> "_")

The mapping is *derived from the UNet config* (block types, layers_per_block, mid block type,
embedding types) with the same index arithmetic as diffusers' `convert_ldm_unet_checkpoint`, so it
holds for the real SDXL config and for the tiny SDXL-topology config alike. Tests check it against
diffusers' own converter and against the real SDXL shapes on the meta device.

Inside a transformer block (attn1/attn2/ff/norms/proj_in/proj_out) both spellings are identical,
and shapes are identical everywhere (SDXL's linear proj_in/proj_out are 2-D in both layouts).
"""

from __future__ import annotations

import functools
import json
import re

from ..errors import MumuError
from .shapes import as_config_dict, derived_unet_shapes, layers_per_block, meta_device_shapes

LDM_UNET_PREFIX = "model.diffusion_model."
COMFY_UNET_PREFIX = "diffusion_model."
KOHYA_UNET_PREFIX = "lora_unet_"

# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json (data, not code: the mapping and the
# meta-device shape table are derived from it).
SDXL_BASE_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# diffusers ResnetBlock2D <-> ldm ResBlock sub-module names
_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)

# ComfyUI's ModelMergeSDXL blocks: input_blocks 0-8, middle_block, output_blocks 0-8
NUM_BLOCKS = 19
BLOCK_NAMES = tuple([f"input{i}" for i in range(9)] + ["middle"] + [f"output{i}" for i in range(9)])


def _config_key(config) -> str:
    return json.dumps(as_config_dict(config), sort_keys=True, default=str)


@functools.lru_cache(maxsize=16)
def _module_pairs_cached(key: str) -> tuple[tuple[str, str, bool], ...]:
    cfg = json.loads(key)
    pairs: list[tuple[str, str, bool]] = [  # (diffusers module, ldm module, is_resnet)
        ("time_embedding.linear_1", "time_embed.0", False),
        ("time_embedding.linear_2", "time_embed.2", False),
        ("conv_in", "input_blocks.0.0", False),
        ("conv_norm_out", "out.0", False),
        ("conv_out", "out.2", False),
    ]
    embed = "add_embedding" if cfg.get("addition_embed_type") == "text_time" else (
        "class_embedding" if cfg.get("class_embed_type") in ("timestep", "projection") else None)
    if embed:
        pairs += [(f"{embed}.linear_1", "label_emb.0.0", False), (f"{embed}.linear_2", "label_emb.0.2", False)]
    lpb = layers_per_block(cfg)
    down, up = cfg["down_block_types"], cfg["up_block_types"]

    idx = 1
    for i, block_type in enumerate(down):
        for j in range(lpb):
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", True))
            if "CrossAttn" in block_type:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", False))
            idx += 1
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", False))
            idx += 1

    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid == "UNetMidBlock2DCrossAttn":
        pairs += [("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
                  ("mid_block.resnets.1", "middle_block.2", True)]
    elif mid is not None:
        raise MumuError(f"UNet mid_block_type {mid!r} has no known original layout "
                        f"(SDXL uses UNetMidBlock2DCrossAttn).")

    idx = 0
    for i, block_type in enumerate(up):
        has_attn = "CrossAttn" in block_type
        for j in range(lpb + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", True))
            if has_attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", False))
            if j == lpb and i < len(up) - 1:
                # the upsampler follows the attention in the same ldm TimestepEmbedSequential
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if has_attn else 1}.conv",
                              False))
            idx += 1
    return tuple(pairs)


def module_pairs(config) -> tuple[tuple[str, str, bool], ...]:
    """(diffusers module path, ldm module path, is_resnet) for every top-level module of the UNet."""
    return _module_pairs_cached(_config_key(config))


@functools.lru_cache(maxsize=16)
def _lookup(key: str):
    pairs = _module_pairs_cached(key)
    return ({d: (o, r) for d, o, r in pairs}, {o: (d, r) for d, o, r in pairs})


def _split_match(name: str, table: dict) -> tuple[str, str, tuple] | None:
    # the longest registered module path that prefixes `name` at a "." boundary
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return head, ".".join(parts[cut:]), table[head]
    return None


def diffusers_to_ldm(name: str, config) -> str:
    """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight`."""
    d2l, _ = _lookup(_config_key(config))
    hit = _split_match(name, d2l)
    if hit is None:
        raise KeyError(f"{name!r} is not a parameter path of this UNet config")
    _, rest, (ldm, is_resnet) = hit
    if is_resnet:
        for d, o in _RESNET_RENAMES:
            if rest == d or rest.startswith(d + "."):
                rest = o + rest[len(d):]
                break
    return f"{ldm}.{rest}"


def ldm_to_diffusers(name: str, config) -> str:
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight`."""
    _, l2d = _lookup(_config_key(config))
    hit = _split_match(name, l2d)
    if hit is None:
        raise KeyError(f"{name!r} is not an original-layout (ldm) key of this UNet config")
    _, rest, (diff, is_resnet) = hit
    if is_resnet:
        for d, o in _RESNET_RENAMES:
            if rest == o or rest.startswith(o + "."):
                rest = d + rest[len(o):]
                break
    return f"{diff}.{rest}"


@functools.lru_cache(maxsize=8)
def _diffusers_shapes_cached(key: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    cfg = json.loads(key)
    derived = derived_unet_shapes(cfg)
    return tuple(derived if derived is not None else meta_device_shapes(cfg).items())


def diffusers_unet_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every diffusers UNet parameter name -> shape (derived in Python; meta-device diffusers otherwise)."""
    return dict(_diffusers_shapes_cached(_config_key(config)))


@functools.lru_cache(maxsize=8)
def _ldm_shapes_cached(key: str) -> dict[str, tuple[int, ...]]:
    cfg = json.loads(key)
    return {diffusers_to_ldm(n, cfg): s for n, s in _diffusers_shapes_cached(key)}


def unet_key_map(config) -> dict[str, str]:
    """diffusers parameter name -> ldm key (without `model.diffusion_model.`), for every parameter."""
    return {name: diffusers_to_ldm(name, config) for name in diffusers_unet_shapes(config)}


def ldm_unet_shapes(config) -> dict[str, tuple[int, ...]]:
    """ldm key (no prefix) -> shape, for every UNet parameter of `config`."""
    return dict(_ldm_shapes_cached(_config_key(config)))


# --------------------------------------------------------------------------- LoRA stems
def kohya_stem(ldm_module: str) -> str:
    """`input_blocks.4.1.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    return KOHYA_UNET_PREFIX + ldm_module.replace(".", "_")


@functools.lru_cache(maxsize=8)
def _lora_weight_keys_cached(key: str) -> dict[str, str]:
    return {k[: -len(".weight")]: k for k, s in _ldm_shapes_cached(key).items()
            if k.endswith(".weight") and len(s) in (2, 4)}


def lora_weight_keys(config) -> dict[str, str]:
    """ldm module path -> ldm weight key for every Linear/Conv in the UNet (LoRA-able modules).

    Norm weights are 1-D and cannot carry a LoRA; everything 2-D (Linear) or 4-D (Conv2d) can.
    """
    return dict(_lora_weight_keys_cached(_config_key(config)))


@functools.lru_cache(maxsize=8)
def _stem_table_cached(key: str) -> dict[str, str]:
    cfg = json.loads(key)
    table = {}
    for ldm_module in _lora_weight_keys_cached(key):
        table[kohya_stem(ldm_module)] = ldm_module
        # kohya stems spelled with diffusers paths (`lora_unet_down_blocks_1_...`) are also in use
        table[kohya_stem(ldm_to_diffusers(ldm_module + ".weight", cfg)[: -len(".weight")])] = ldm_module
    return table


class LoraNameResolver:
    """Resolves LoRA module spellings against one config; builds its tables once (fast per key)."""

    def __init__(self, config):
        self.config = config
        key = _config_key(config)
        self._stems = _stem_table_cached(key)
        self._weights = _lora_weight_keys_cached(key)
        self._d2l, _ = _lookup(key)

    def stem(self, stem: str) -> str | None:
        return self._stems.get(stem)

    def ldm_module(self, ldm_module: str) -> str | None:
        return ldm_module if ldm_module in self._weights else None

    def diffusers_module(self, module: str) -> str | None:
        hit = _split_match(module + ".weight", self._d2l)
        if hit is None:
            return None
        try:
            ldm = diffusers_to_ldm(module + ".weight", self.config)[: -len(".weight")]
        except KeyError:
            return None
        return self.ldm_module(ldm)


def stem_to_ldm_module(stem: str, config) -> str | None:
    """kohya stem (ldm or diffusers spelling) -> ldm module path, or None if it names no Linear/Conv."""
    return _stem_table_cached(_config_key(config)).get(stem)


# --------------------------------------------------------------------------- blocks
_BLOCK_RE = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_index(ldm_key: str) -> int | None:
    """0-8 input_blocks, 9 middle_block, 10-18 output_blocks; None for time/label embeddings and `out.`."""
    m = _BLOCK_RE.match(ldm_key)
    if not m:
        return None
    kind, n = m.group(1), int(m.group(2))
    if kind == "input_blocks":
        return n if n < 9 else None
    if kind == "middle_block":
        return 9
    return 10 + n if n < 9 else None


def parse_block_weights(spec) -> list[float] | None:
    """19 per-block strengths from `"input=1,middle=0.5,output=1,output4=0"` or 19 numbers.

    Group names (input/middle/output) set every block of the group; indexed names (input0..input8,
    output0..output8) override them. Unnamed blocks default to 1.0.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        values = [float(v) for v in spec]
        if len(values) != NUM_BLOCKS:
            raise MumuError(f"block weights: got {len(values)} values, expected {NUM_BLOCKS} "
                            f"(input 0-8, middle, output 0-8).")
        return values
    parts = [p.strip() for p in spec.replace(";", ",").split(",") if p.strip()]
    if all("=" not in p for p in parts):
        try:
            return parse_block_weights([float(p) for p in parts])
        except ValueError:
            raise MumuError(f"block weights {spec!r}: expected numbers or name=value pairs.") from None
    weights = [1.0] * NUM_BLOCKS
    groups = {"input": range(0, 9), "middle": range(9, 10), "output": range(10, 19)}
    singles: list[tuple[int, float]] = []
    for part in parts:
        if "=" not in part:
            raise MumuError(f"block weights {spec!r}: {part!r} is not name=value; mix of plain numbers and "
                            f"names is not allowed.")
        name, _, value = (s.strip().lower() for s in part.partition("="))
        try:
            v = float(value)
        except ValueError:
            raise MumuError(f"block weights: {part!r} has a value that is not a number.") from None
        m = re.fullmatch(r"(input|output)_?(\d)", name)
        if name in groups:
            for i in groups[name]:
                weights[i] = v
        elif m:
            singles.append(((0 if m.group(1) == "input" else 10) + int(m.group(2)), v))
        else:
            raise MumuError(f"block weights: unknown block {name!r}; use input, middle, output, input0-input8 "
                            f"or output0-output8.")
    for i, v in singles:
        weights[i] = v
    return weights


def block_weight(ldm_key: str, weights: list[float] | None) -> float:
    if weights is None:
        return 1.0
    i = block_index(ldm_key)
    return 1.0 if i is None else float(weights[i])
