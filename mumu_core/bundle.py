"""The MUMU bundle: one `.safetensors` file with everything MUMU adds to the base models.

Tensors:
  adapter.<name>      the adapter's full weights
  vlm_lora.<peft key> the VLM LoRA, keys as `peft.get_peft_model_state_dict` writes them
                      (`base_model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight`)
  unet_lora.<kohya>   the SDXL UNet LoRA in kohya/ComfyUI keys (`lora_unet_<ldm path>.lora_down.weight`,
                      `.lora_up.weight`, `.alpha`), so it can also be exported alone for stock loaders
Metadata `mumu_config`: JSON with the format version, the VLM family and sizes it was trained on,
tokens per image, the adapter config, LoRA ranks/targets and training provenance.

Loading never unpickles anything: a file that is not safetensors is refused before it is parsed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .errors import BundleError, MumuError

FORMAT_VERSION = 1
METADATA_KEY = "mumu_config"
PREFIXES = ("adapter.", "vlm_lora.", "unet_lora.")


@dataclass
class Bundle:
    config: dict
    adapter: dict[str, torch.Tensor]
    vlm_lora: dict[str, torch.Tensor] = field(default_factory=dict)
    unet_lora: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None


def make_config(*, vlm_family: str, vlm_hidden_size: int, vlm_num_layers: int, adapter: dict,
                tokens_per_image: int = 324, hidden_layer: int = -1, vlm_lora: dict | None = None,
                unet_lora: dict | None = None, provenance: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "vlm": {"family": vlm_family, "hidden_size": vlm_hidden_size, "num_layers": vlm_num_layers,
                "hidden_layer": hidden_layer},
        "tokens_per_image": tokens_per_image,
        "adapter": adapter,
        "vlm_lora": vlm_lora or {},
        "unet_lora": unet_lora or {},
        "provenance": provenance or {},
    }


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a whole safetensors file (pickles are never parsed)."""
    from .safetensors_io import read_header

    try:
        read_header(path, what="bundle file")
    except MumuError as exc:
        raise BundleError(
            f"{exc} MUMU bundles are single .safetensors files; re-export it with `python training/export.py` "
            f"or download the .safetensors again."
        ) from None


def read_bundle_config(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types per version
        raise BundleError(f"{path} is not a readable safetensors file: {exc}") from None
    if METADATA_KEY not in meta:
        raise BundleError(
            f"{path} is a safetensors file but not a MUMU bundle (no '{METADATA_KEY}' metadata). "
            f"If it is a plain UNet LoRA, load it with the Apply UNet LoRA node or `mumu merge --lora`."
        )
    try:
        config = json.loads(meta[METADATA_KEY])
    except ValueError as exc:
        raise BundleError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON ({exc}).") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format version {version!r}; this ComfyUI-MUMU reads version {FORMAT_VERSION}. "
            f"Update ComfyUI-MUMU or re-export the bundle."
        )
    return config


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    from safetensors import safe_open

    path = Path(path)
    config = read_bundle_config(path)
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PREFIXES}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                prefix = next((p for p in PREFIXES if key.startswith(p)), None)
                if prefix is None:
                    raise BundleError(f"{path}: unexpected tensor '{key}' (bundle tensors start with {PREFIXES}).")
                parts[prefix][key[len(prefix):]] = f.get_tensor(key)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"{path} could not be read, the file is damaged: {exc}") from None
    if not parts["adapter."]:
        raise BundleError(f"{path} has no adapter.* tensors; it is not a usable MUMU bundle.")
    return Bundle(config, parts["adapter."], parts["vlm_lora."], parts["unet_lora."], path)


def save_bundle(path: str | os.PathLike, config: dict, adapter: dict[str, torch.Tensor],
                vlm_lora: dict[str, torch.Tensor] | None = None,
                unet_lora: dict[str, torch.Tensor] | None = None) -> Path:
    """Write atomically: a temp file in the destination folder, renamed when complete."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sd in (("adapter.", adapter), ("vlm_lora.", vlm_lora or {}), ("unet_lora.", unet_lora or {})):
        for k, v in sd.items():
            tensors[prefix + k] = v.detach().to("cpu").contiguous()
    metadata = {METADATA_KEY: json.dumps(config, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def check_against_vlm(bundle: Bundle, vlm_hidden_size: int, vlm_family: str, vlm_modules: dict[str, Any],
                      adapter_shapes: dict[str, tuple]) -> None:
    """Every shape in the bundle must fit the VLM it is paired with; name the first misfits."""
    cfg_vlm = bundle.config.get("vlm", {})
    where = bundle.path or "bundle"
    if cfg_vlm.get("family") not in (None, vlm_family):
        raise BundleError(
            f"{where} was trained on a '{cfg_vlm.get('family')}' VLM but is paired with a '{vlm_family}' "
            f"folder. Pick the VLM folder the bundle was trained with."
        )
    if cfg_vlm.get("hidden_size") not in (None, vlm_hidden_size):
        raise BundleError(
            f"{where} expects a VLM with hidden size {cfg_vlm.get('hidden_size')}, but the VLM folder has "
            f"hidden size {vlm_hidden_size}. Pick the VLM folder the bundle was trained with."
        )
    problems = []
    for name, shape in adapter_shapes.items():
        got = bundle.adapter.get(name)
        if got is None:
            problems.append(f"adapter.{name} is missing (expected shape {list(shape)})")
        elif tuple(got.shape) != tuple(shape):
            problems.append(f"adapter.{name} has shape {list(got.shape)}, the adapter config needs {list(shape)}")
    for name in bundle.adapter:
        if name not in adapter_shapes:
            problems.append(f"adapter.{name} is not a parameter of the configured adapter")
    for key, tensor in bundle.vlm_lora.items():
        problem = _check_lora_tensor(key, tensor, vlm_modules)
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BundleError(f"{where} does not fit this VLM: " + "; ".join(problems[:5]) + more)


def _check_lora_tensor(key: str, tensor: torch.Tensor, modules: dict[str, Any]) -> str | None:
    for marker in (".lora_A.", ".lora_B."):
        if marker in key:
            module_path = key.split(marker)[0]
            break
    else:
        return None
    module_path = module_path.removeprefix("base_model.model.")
    module = modules.get(module_path)
    if module is None:
        return f"vlm_lora.{key} targets module '{module_path}', which this VLM does not have"
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if in_f is None:
        return None
    if ".lora_A." in key and tensor.shape[1] != in_f:
        return f"vlm_lora.{key} has shape {list(tensor.shape)}, but the VLM's {module_path} takes {in_f} inputs"
    if ".lora_B." in key and tensor.shape[0] != out_f:
        return f"vlm_lora.{key} has shape {list(tensor.shape)}, but the VLM's {module_path} has {out_f} outputs"
    return None
