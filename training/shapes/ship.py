"""Install a trained shapes model into the package, where `mumu demo` and `mumu eval` find it by default.

    python -m mumu_training.shapes ship --model runs/shapes/model     # -> mumu_core/assets/shapes_model
    mumu eval --out runs/shapes/eval_shipped                          # re-measures the installed copy

A run's model folder keeps the MUMU stage's UNet LoRA in its bundle, as the recipe exports it (a LoRA
that any SDXL of the same layout can take). The package's budget is 25 MiB and the toy SDXL's UNet
alone is 17 MB, so the installed copy has that LoRA fused into the UNet at strength 1 (diffusers'
`fuse_lora`) and a bundle without its `unet_lora.*` part: ~5 MB less, the same network up to fp16
rounding. Every weight stays fp16 safetensors; the copy is written to a temporary folder and renamed
over the old one only when it is complete and within budget.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BUDGET_BYTES = 25 * 2**20


def shipped_dir() -> Path:
    from .evaluate import shipped_model_dir

    return shipped_model_dir()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ship(model: Path, dest: Path | None = None) -> dict:
    """Copy `model` (a shapes model folder) to `dest` with its UNet LoRA fused; -> what was written."""
    from mumu_core.bundle import load_bundle, save_bundle
    from mumu_core.compat import make_tokenizer_config_portable
    from mumu_core.errors import MumuError
    from mumu_core.pipeline import load_sdxl_pipeline, load_unet_lora_into_pipeline

    from .evaluate import BUNDLE_NAME, PROBE_NAME, model_paths
    from .pretrain import _save_atomic_dir
    from .reproduce import store_fp16

    paths = model_paths(model)
    dest = Path(dest) if dest is not None else shipped_dir()
    bundle = load_bundle(paths["bundle"])

    def build(tmp: Path) -> None:
        shutil.copytree(paths["vlm"], tmp / "vlm")
        make_tokenizer_config_portable(tmp / "vlm")  # folders written by transformers 5 before that fix
        shutil.copy2(paths["probe"], tmp / PROBE_NAME)
        pipe = load_sdxl_pipeline(paths["sdxl"])
        config = json.loads(json.dumps(bundle.config))
        if bundle.unet_lora:
            load_unet_lora_into_pipeline(pipe, paths["bundle"])
            pipe.fuse_lora(lora_scale=1.0)
            pipe.unload_lora_weights()
            config["provenance"]["shipped"] = {"unet_lora": "fused into sdxl/unet at strength 1",
                                               "unet_lora_config": config["unet_lora"]}
            config["unet_lora"] = {}
        pipe.save_pretrained(tmp / "sdxl")
        save_bundle(tmp / BUNDLE_NAME, config, bundle.adapter, bundle.vlm_lora)
        for f in sorted(tmp.rglob("*.safetensors")):
            store_fp16(f)
        card_path = Path(model) / "model_card.json"
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        card["shipped_from"] = str(model)  # as given, e.g. runs/shapes/model
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2))
        size = folder_bytes(tmp)
        if size > BUDGET_BYTES:
            raise MumuError(f"the shapes model would take {size / 2**20:.1f} MiB in the package; the budget is "
                            f"{BUDGET_BYTES / 2**20:.0f} MiB. Nothing was installed.")

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save_atomic_dir(dest, build)
    finally:  # a failed build leaves neither a half-written model nor its temporary folder
        shutil.rmtree(dest.with_name(f".{dest.name}.partial"), ignore_errors=True)
    return {"dest": str(dest), "bytes": folder_bytes(dest), "unet_lora_fused": bool(bundle.unet_lora)}
