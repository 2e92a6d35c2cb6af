"""Checkpoints: atomic, small (trainable weights only), exactly resumable, with a retention limit.

A checkpoint folder `OUTPUT/checkpoints/checkpoint-0001000/` holds
  trainable.safetensors   every trainable parameter by name (LoRAs + adapter; frozen weights are
                          the base models' and are never copied: 30 MB-1 GB, not 25 GB)
  optimizer.bin, scheduler.bin, random_states_<rank>.pkl
                          accelerate's save_state (AdamW moments, LR schedule, RNG per process);
                          accelerate reads them back with torch.load(weights_only=True)
  train_state.json        step, data position (global micro-batch index), layout, loss history
  mumu_train.json         what export.py needs besides the weights (VLM family, adapter shape,
                          LoRA ranks/targets, UNet config, provenance)
It is written under `.checkpoint-N.partial/` and renamed only when every process has finished,
so a crash never leaves a half checkpoint that `--resume latest` could pick up.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from mumu_core.atomic import atomic_write, fsync_dir

from .config import TrainConfigError

TRAINABLE = "trainable.safetensors"
TRAIN_STATE = "train_state.json"
EXPORT_META = "mumu_train.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(arg: str | None, output_dir: str | Path) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none yet); a path -> that folder."""
    if not arg:
        return None
    if arg == "latest":
        dirs = checkpoint_dirs(Path(output_dir) / "checkpoints")
        return dirs[-1] if dirs else None
    path = Path(arg)
    if not (path / TRAIN_STATE).is_file():
        raise TrainConfigError(f"--resume {arg}: not a checkpoint folder (no {TRAIN_STATE}). Pass 'latest' or a "
                               f"checkpoints/checkpoint-N folder written by training/train.py.")
    return path


def _save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def gather_trainable(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Trainable tensors by unwrapped name on the main process (collective under FSDP)."""
    from accelerate.utils import DistributedType

    names = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
    if accelerator.distributed_type == DistributedType.FSDP:
        full = accelerator.get_state_dict(model)  # every rank must call it
        return {k: v for k, v in full.items() if k in names} if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    return {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}


def register_hooks(accelerator) -> None:
    """accelerate's own model file would hold the frozen 8B VLM too: replace it by trainable.safetensors."""

    def save_hook(models, weights, output_dir):
        weights.clear()  # trainable.safetensors is written by save_checkpoint itself

    def load_hook(models, input_dir):
        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_trainable(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load trainable.safetensors; every trainable parameter must be there with its shape."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / TRAINABLE
    if not path.is_file():
        raise TrainConfigError(f"{ckpt_dir} has no {TRAINABLE}; it is not a complete training checkpoint.")
    sd = load_file(str(path))
    params = {n.removeprefix("module."): p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(sd))
    extra = sorted(set(sd) - set(params))
    bad = [n for n in set(params) & set(sd) if tuple(params[n].shape) != tuple(sd[n].shape)]
    if missing or extra or bad:
        raise TrainConfigError(
            f"{path} does not fit the configured model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}), {len(bad)} with other shapes (e.g. {bad[:2]}). "
            f"Resume with the config (adapter shape, LoRA ranks/targets) the checkpoint was trained with.")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(sd[n].to(device=p.device, dtype=p.dtype))


def save_checkpoint(accelerator, model, output_dir: str | Path, step: int, train_state: dict, export_meta: dict,
                    total_limit: int) -> Path | None:
    """Collective: every process calls it. Returns the final folder (main process) or None."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".checkpoint-{step:07d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a run killed mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    trainable = gather_trainable(accelerator, model)
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        _save_file(trainable, tmp / TRAINABLE, {"step": str(step)})
        atomic_write(tmp / TRAIN_STATE, lambda p: Path(p).write_text(json.dumps(train_state, indent=1)))
        atomic_write(tmp / EXPORT_META, lambda p: Path(p).write_text(json.dumps(export_meta, indent=1)))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    if final.exists():  # the same step saved again (e.g. a resumed run ending where it began)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    for old in checkpoint_dirs(root)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_train_state(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / TRAIN_STATE).read_text())


def read_export_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / EXPORT_META
    if not path.is_file():
        raise TrainConfigError(f"{ckpt_dir} has no {EXPORT_META}; pass a checkpoints/checkpoint-N folder written by "
                               f"training/train.py.")
    return json.loads(path.read_text())
