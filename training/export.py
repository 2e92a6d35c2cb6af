"""Export a training checkpoint as a MUMU bundle (+ a standalone UNet LoRA for stock loaders).

    python training/export.py --checkpoint runs/stage1/checkpoints/checkpoint-0150000 \
        --out models/mumu/mumu_stage1.safetensors [--lora-out models/loras/mumu_unet.safetensors]

The bundle is one safetensors file:
  adapter.*    the adapter's weights (checkpoint names minus `encoder.adapter.`)
  vlm_lora.*   PEFT keys, exactly what `peft.get_peft_model_state_dict` writes for the VLM
               (`base_model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight`)
  unet_lora.*  kohya keys with the real alpha (`lora_unet_<ldm path>.lora_down.weight`, `.alpha`)
  metadata `mumu_config` (VLM family/sizes, tokens per image, adapter shape, LoRA specs, provenance).
The standalone LoRA holds the same kohya tensors; ComfyUI's LoraLoaderModelOnly and diffusers'
`load_lora_weights` both load it without unmatched keys. No model is loaded: export only renames
tensors, so it runs in seconds on a laptop even for an 8B-VLM checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run by path, training/ is first on sys.path and its module names (config, data, model) could
# shadow other packages'; everything here is imported as mumu_training (the installed package).
_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from mumu_core.errors import MumuError  # noqa: E402
from mumu_training.checkpoints import TRAINABLE, read_export_meta, read_train_state  # noqa: E402
from mumu_training.model import ADAPTER_PREFIX, UNET_PREFIX, VLM_PREFIX  # noqa: E402


def _peft_key(name: str) -> str:
    # PEFT's in-model names carry the adapter name ("lora_A.default.weight"); its saved state
    # dicts (get_peft_model_state_dict) drop it, and loaders expect that form.
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def split_trainable(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Checkpoint tensors -> (adapter, VLM LoRA in PEFT keys, UNet LoRA in PEFT/diffusers keys)."""
    adapter, vlm, unet, other = {}, {}, {}, []
    for name, t in sd.items():
        if name.startswith(ADAPTER_PREFIX):
            adapter[name[len(ADAPTER_PREFIX):]] = t
        elif name.startswith(VLM_PREFIX) and "lora_" in name:
            vlm[_peft_key(name[len(VLM_PREFIX):])] = t
        elif name.startswith(UNET_PREFIX) and "lora_" in name:
            unet[_peft_key(name[len(UNET_PREFIX):])] = t
        else:
            other.append(name)
    if other:
        raise MumuError(f"checkpoint tensors that belong to no bundle part: {other[:5]}; was it written by another "
                        f"version of training/train.py?")
    if not adapter:
        raise MumuError("the checkpoint holds no adapter weights; it is not a MUMU training checkpoint.")
    return adapter, vlm, unet


def bundle_parts(trainable: dict[str, torch.Tensor], meta: dict, provenance: dict | None = None,
                 dtype: torch.dtype | None = None):
    """-> (config, adapter_sd, vlm_lora_sd, unet_lora_kohya_sd) ready for mumu_core.bundle.save_bundle."""
    from mumu_core.bundle import make_config
    from mumu_core.unet_lora import peft_unet_lora_to_kohya

    adapter, vlm, unet_peft = split_trainable(trainable)
    cast = (lambda d: {k: v.to(dtype) for k, v in d.items()}) if dtype is not None else (lambda d: d)
    unet_kohya = peft_unet_lora_to_kohya(unet_peft, meta["unet_config"], alpha=meta["unet_lora"]["alpha"], dtype=dtype)
    config = make_config(
        vlm_family=meta["vlm_family"], vlm_hidden_size=meta["vlm_hidden_size"], vlm_num_layers=meta["vlm_num_layers"],
        adapter=meta["adapter"], tokens_per_image=meta["tokens_per_image"], hidden_layer=meta["hidden_layer"],
        vlm_lora=meta["vlm_lora"], unet_lora=meta["unet_lora"],
        provenance={**meta.get("provenance", {}), **(provenance or {})},
    )
    return config, cast(adapter), cast(vlm), unet_kohya


def export_checkpoint(checkpoint: str | Path, out: str | Path, lora_out: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> dict:
    """Write the bundle (and the standalone LoRA); returns a summary dict."""
    from safetensors.torch import load_file

    from mumu_core.bundle import save_bundle
    from mumu_core.unet_lora import save_unet_lora

    checkpoint = Path(checkpoint)
    meta = read_export_meta(checkpoint)
    state = read_train_state(checkpoint)
    path = checkpoint / TRAINABLE
    if not path.is_file():
        raise MumuError(f"{checkpoint} has no {TRAINABLE}; it is not a complete training checkpoint.")
    trainable = load_file(str(path))
    config, adapter, vlm, unet = bundle_parts(
        trainable, meta, {"step": state.get("step"), "checkpoint": checkpoint.name}, dtype)
    save_bundle(out, config, adapter, vlm, unet)
    summary = {"bundle": str(out), "step": state.get("step"), "adapter_tensors": len(adapter),
               "vlm_lora_tensors": len(vlm), "unet_lora_tensors": len(unet)}
    if lora_out:
        save_unet_lora(lora_out, unet, dtype=dtype or torch.float16,
                       metadata={"mumu_source": Path(out).name, "mumu_step": str(state.get("step"))},
                       unet_config=meta["unet_config"])
        summary["lora"] = str(lora_out)
    return summary


def main(argv=None) -> int:
    import json

    p = argparse.ArgumentParser(description="Export a MUMU training checkpoint as a bundle (+ standalone UNet LoRA).")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/checkpoint-N folder written by training/train.py")
    p.add_argument("--out", required=True, help="bundle path (.safetensors), e.g. ComfyUI/models/mumu/my.safetensors")
    p.add_argument("--lora-out", default=None, help="also write the UNet LoRA alone (kohya keys, for any SDXL finetune)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="tensor dtype of the bundle (the standalone LoRA defaults to float16)")
    args = p.parse_args(argv)
    try:
        summary = export_checkpoint(args.checkpoint, args.out, args.lora_out,
                                    None if args.dtype == "float32" else getattr(torch, args.dtype))
    except MumuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
