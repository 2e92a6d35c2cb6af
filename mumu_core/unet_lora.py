"""SDXL UNet LoRA formats: PEFT (training) <-> kohya (bundle, ComfyUI, diffusers), per-module deltas, files.

The canonical in-memory form is a kohya state dict with original (ldm) module names:
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.lora_down.weight`  [rank, in]
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.lora_up.weight`    [out, rank]
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.alpha`             scalar
with delta = alpha / rank * up @ down. This is what the bundle stores under `unet_lora.`, what stock
ComfyUI LoraLoaderModelOnly loads and what diffusers' `load_lora_weights` accepts. Unlike diffusers'
`convert_state_dict_to_kohya`, the real `lora_alpha` is kept, so alpha != rank stays correct.
Conv LoRAs (down [r, in, kh, kw], up [out, r, 1, 1]) are supported everywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import MumuError
from .sdxl import keys as K

BUNDLE_PREFIX = "unet_lora."
BUNDLE_METADATA_KEY = "mumu_config"
# (suffix, role): every LoRA spelling ComfyUI's weight_adapter/lora.py accepts for plain LoRA
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te.", "te1.",
                          "te2.", "base_model.model.text_model.")
_PEFT_PREFIXES = ("base_model.model.", "unet.")


@dataclass
class LoraModule:
    """One LoRA'd Linear/Conv: delta = alpha / rank * up @ down (reshaped to the weight)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def out_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    def delta(self, multiplier: float = 1.0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """fp32 `multiplier * alpha/rank * up @ down` in the weight's shape."""
        up = self.up.reshape(self.up.shape[0], -1).float()
        down = self.down.reshape(self.rank, -1).float()
        d = (up @ down) * (multiplier * self.scale)
        return d.reshape(shape if shape is not None else self.out_shape())


def _default_config(unet_config):
    # The ldm<->diffusers module arithmetic depends only on the block topology, which the tiny
    # config shares with SDXL; SDXL's is the superset of module names, so it is the safe default.
    return K.SDXL_BASE_UNET_CONFIG if unet_config is None else unet_config


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _resolve_module(module: str, names: K.LoraNameResolver) -> tuple[str | None, str]:
    """(ldm module path or None if unknown, format name) for one LoRA module spelling."""
    if module.startswith(K.KOHYA_UNET_PREFIX):
        return names.stem(module), "kohya"
    if module.startswith("lycoris_"):
        return names.stem(K.KOHYA_UNET_PREFIX + module[len("lycoris_"):]), "kohya"
    if module.startswith(K.COMFY_UNET_PREFIX):
        return names.ldm_module(module[len(K.COMFY_UNET_PREFIX):]), "comfy"
    for prefix in _PEFT_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
    return names.diffusers_module(module), "peft"


def normalize_unet_lora(state_dict: Mapping[str, torch.Tensor], unet_config=None) -> tuple[dict, dict]:
    """Any supported UNet LoRA spelling -> (kohya state dict, info {format, ignored, ranks, alphas}).

    Text-encoder LoRA keys are ignored (MUMU has no CLIP) and reported; anything else that does not
    name a UNet Linear/Conv is an error listing the keys, so nothing is silently dropped.
    """
    names = K.LoraNameResolver(_default_config(unet_config))
    parts: dict[str, dict] = {}
    formats, ignored, unmatched = set(), [], []
    for key, tensor in state_dict.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            ignored.append(key)
            continue
        split = _split_suffix(key)
        if split is None:
            if key.endswith((".dora_scale", ".lora_magnitude_vector.weight", ".diff", ".diff_b", ".lora_mid.weight")):
                raise MumuError(f"LoRA key {key!r}: DoRA, LoCon mid and full-diff LoRAs are not supported by the "
                                f"MUMU merge; export a plain LoRA (lora_down/lora_up/alpha).")
            unmatched.append(key)
            continue
        module, role = split
        ldm, fmt = _resolve_module(module, names)
        if ldm is None:
            unmatched.append(key)
            continue
        formats.add(fmt)
        parts.setdefault(ldm, {})[role] = tensor
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else "")
        raise MumuError(f"{len(unmatched)} LoRA keys match no SDXL UNet Linear/Conv layer: {shown}. Expected "
                        f"kohya `lora_unet_<ldm path>.lora_down.weight`, ComfyUI "
                        f"`diffusion_model.<ldm path>.lora_down.weight` or PEFT `<diffusers path>.lora_A.weight`; "
                        f"is this an SDXL UNet LoRA?")
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for ldm, p in parts.items():
        if "down" not in p or "up" not in p:
            raise MumuError(f"LoRA module {ldm!r} has {sorted(p)} but needs both down (A) and up (B) weights; the "
                            f"file is incomplete.")
        down, up = p["down"], p["up"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise MumuError(f"LoRA module {ldm!r}: up {list(up.shape)} and down {list(down.shape)} ranks differ.")
        alpha = float(p["alpha"].item()) if "alpha" in p else float(rank)
        stem = K.kohya_stem(ldm)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        ranks.add(int(rank))
        alphas.add(alpha)
    if not out:
        raise MumuError("the LoRA has no UNet LoRA weights" + (" (only text-encoder keys)." if ignored else "."))
    return out, {"format": "+".join(sorted(formats)), "ignored": ignored, "ranks": sorted(ranks),
                 "alphas": sorted(alphas), "num_modules": len(parts)}


def peft_unet_lora_to_kohya(peft_state_dict: Mapping[str, torch.Tensor], unet_config=None,
                            alpha: float | Mapping[str, float] | None = None,
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT LoRA state dict of a diffusers UNet (`get_peft_model_state_dict(unet)`) -> kohya keys.

    `alpha` is the LoraConfig's `lora_alpha` (a number, or {diffusers module path: alpha} for an
    alpha_pattern); None means alpha = rank. Written as a `.alpha` scalar so scale = alpha / rank.
    """
    sd = dict(peft_state_dict)
    if alpha is not None:
        for key in list(sd):
            split = _split_suffix(key)
            if split is None or split[1] != "down":
                continue
            module = split[0]
            a = alpha
            if isinstance(alpha, Mapping):
                bare = module
                for prefix in _PEFT_PREFIXES:
                    bare = bare[len(prefix):] if bare.startswith(prefix) else bare
                a = alpha.get(bare, alpha.get(module))
                if a is None:
                    continue
            sd[module + ".alpha"] = torch.tensor(float(a), dtype=torch.float32)
    out, _ = normalize_unet_lora(sd, unet_config)
    if dtype is not None:
        out = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in out.items()}
    return out


def kohya_to_peft(kohya_state_dict: Mapping[str, torch.Tensor], unet_config=None,
                  prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya (or any supported spelling) -> (PEFT state dict with diffusers names, {module: alpha}).

    PEFT keeps alpha in LoraConfig, not in the weights: build it with `r`, `lora_alpha` or an
    `alpha_pattern` from the returned alphas.
    """
    cfg = _default_config(unet_config)
    modules = lora_modules(kohya_state_dict, unet_config)
    peft_sd, alphas = {}, {}
    for ldm_key, m in modules.items():
        module = K.ldm_to_diffusers(ldm_key, cfg)[: -len(".weight")]
        peft_sd[f"{prefix}{module}.lora_A.weight"] = m.down
        peft_sd[f"{prefix}{module}.lora_B.weight"] = m.up
        alphas[module] = m.alpha
    return peft_sd, alphas


def lora_modules(lora_state_dict: Mapping[str, torch.Tensor], unet_config=None) -> dict[str, LoraModule]:
    """ldm weight key (`input_blocks.4.1.proj_in.weight`) -> LoraModule, from any supported spelling."""
    kohya, _ = normalize_unet_lora(lora_state_dict, unet_config)
    names = K.LoraNameResolver(_default_config(unet_config))
    out = {}
    for key in kohya:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            ldm = names.stem(stem)
            out[ldm + ".weight"] = LoraModule(kohya[key], kohya[stem + ".lora_up.weight"],
                                              float(kohya[stem + ".alpha"].item()))
    return out


def lora_deltas(lora_state_dict: Mapping[str, torch.Tensor], strength: float = 1.0,
                block_weights: list[float] | None = None, unet_config=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (ldm weight key, fp32 delta = strength * block weight * alpha/rank * up@down) per module."""
    for ldm_key, m in lora_modules(lora_state_dict, unet_config).items():
        yield ldm_key, m.delta(strength * K.block_weight(ldm_key, block_weights))


def load_unet_lora(path: str | os.PathLike, unet_config=None, compute_hash: bool = True) -> tuple[dict, dict]:
    """A MUMU bundle's `unet_lora.*` or a standalone LoRA file -> (kohya state dict, info).

    info: path, name, format (mumu-bundle/kohya/comfy/peft), ranks, alphas, num_modules, ignored
    (text-encoder keys), sha256, mumu_config (bundles), metadata.
    """
    from safetensors import safe_open

    from .safetensors_io import read_header

    path = Path(path)
    header = read_header(path, what="LoRA")  # refuses pickles, truncation, corrupt headers
    meta = header.metadata
    is_bundle = any(k.startswith(BUNDLE_PREFIX) for k in header.tensors)
    try:
        with safe_open(str(path), framework="pt") as f:
            if is_bundle:
                sd = {k[len(BUNDLE_PREFIX):]: f.get_tensor(k) for k in header.tensors if k.startswith(BUNDLE_PREFIX)}
            else:
                sd = {k: f.get_tensor(k) for k in header.tensors}
    except Exception as exc:
        raise MumuError(f"LoRA {path} could not be read, the file is damaged: {exc}") from None
    if is_bundle is False and any(k.startswith(("adapter.", "vlm_lora.")) for k in header.tensors):
        raise MumuError(f"{path} is a MUMU bundle without a UNet LoRA (no unet_lora.* tensors); there is nothing "
                        f"to merge into the UNet.")
    kohya, info = normalize_unet_lora(sd, unet_config)
    info.update(path=str(path), name=path.name, metadata=meta)
    if is_bundle:
        info["format"] = "mumu-bundle"
        try:
            info["mumu_config"] = json.loads(meta.get(BUNDLE_METADATA_KEY, "{}"))
        except ValueError:
            info["mumu_config"] = {}
    if compute_hash:
        from .safetensors_io import sha256_file

        info["sha256"] = sha256_file(path)
    return kohya, info


def save_unet_lora(path: str | os.PathLike, kohya_state_dict: Mapping[str, torch.Tensor],
                   dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None,
                   unet_config=None) -> Path:
    """Write a standalone kohya LoRA (stock ComfyUI / diffusers loadable), atomically.

    `unet_config`: the UNet the LoRA was trained on (default SDXL base's layout)."""
    from safetensors.torch import save_file

    kohya, _ = normalize_unet_lora(kohya_state_dict, unet_config)
    sd = {k: (v.float() if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in kohya.items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"ss_network_module": "networks.lora",
                                                                      **(metadata or {})}))
