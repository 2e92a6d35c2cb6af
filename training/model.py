"""The trainable MUMU model (paper Table 1) and everything frozen around it.

    MumuTrainModel = encoder (VLM with PEFT LoRA on LLM + modality projection, frozen vision tower,
                     fully trained adapter) + SDXL UNet (PEFT LoRA on attention projections)
    frozen beside it: VAE (latents on the fly), DDPM noise schedule from SDXL's scheduler config

One nn.Module holds every trainable parameter so accelerate wraps a single DDP/FSDP unit and one
optimizer with per-module parameter groups (learning rates from Table 1). Frozen weights are kept
in the mixed-precision dtype (bf16) and the trainable ones in fp32, as diffusers' LoRA scripts do:
autocast computes in bf16 while the optimizer updates fp32 masters.

Trainable parameter names (`trainable_state_dict`) are the checkpoint format; `export.py` maps
them to bundle keys (adapter.*, PEFT vlm_lora.*, kohya unet_lora.*).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mumu_core.adapter import AdapterConfig, MumuAdapter
from mumu_core.encoder import EncoderInputs, MumuEncoder
from mumu_core.errors import BundleError

from .config import TrainConfig, TrainConfigError

ADAPTER_PREFIX = "encoder.adapter."
VLM_PREFIX = "encoder.vlm.model."
UNET_PREFIX = "unet."
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class MumuTrainModel(nn.Module):
    def __init__(self, encoder: MumuEncoder, unet: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.unet = unet

    def image_only_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and ".connector." in n]

    def forward(self, inputs: EncoderInputs, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        context, pooled, mask = self.encoder(inputs)
        if not inputs.pixel_values:
            # DDP expects a gradient for every trainable parameter on every step; a micro-batch
            # without images never reaches the modality-projection LoRA. A zero-weighted term
            # keeps it in the graph, cheaper than find_unused_parameters' per-step graph walk.
            context = context + 0.0 * sum(p.sum() for p in self.image_only_parameters())
        dtype = noisy_latents.dtype
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=context.to(dtype), encoder_attention_mask=mask,
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
        ).sample


@dataclass
class Components:
    model: MumuTrainModel
    vae: nn.Module
    noise_scheduler: object          # diffusers DDPMScheduler (SDXL's betas)
    sdxl_scheduler_config: dict      # for validation pipelines
    export_meta: dict                # what export.py needs besides the weights


def _enable_llm_checkpointing(text_model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # reentrant checkpointing drops LoRA grads when inputs need none
    if hasattr(text_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        text_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_components(cfg: TrainConfig, device: torch.device | str, weight_dtype: torch.dtype) -> Components:
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from mumu_core.pipeline import load_sdxl_pipeline
    from mumu_core.vlm import apply_vlm_lora, load_vlm

    m = cfg.model
    vlm = load_vlm(m.vlm, dtype=weight_dtype, device=device, hidden_layer=m.hidden_layer)
    if m.vlm_family is not None and vlm.family.name != m.vlm_family:
        raise TrainConfigError(f"model.vlm holds a '{vlm.family.name}' VLM but model.vlm_family is '{m.vlm_family}'.")
    pipe = load_sdxl_pipeline(m.sdxl, dtype=weight_dtype, device=device, config=m.sdxl_config)
    unet, vae = pipe.unet, pipe.vae
    if getattr(unet.config, "addition_embed_type", None) != "text_time" or unet.config.cross_attention_dim != 2048:
        raise TrainConfigError(f"model.sdxl = {m.sdxl} is not an SDXL UNet (needs addition_embed_type 'text_time' "
                               f"and cross_attention_dim 2048); MUMU replaces SDXL's text encoders.")
    sched_config = dict(pipe.scheduler.config)
    # SDXL ships an Euler config; the training noise process is DDPM with the same betas
    noise_scheduler = DDPMScheduler.from_config(sched_config)
    del pipe

    init_bundle = _read_init_bundle(m.init_from)
    adapter_dict = dict(m.adapter)
    if init_bundle is not None:  # stage 2 keeps the stage-1 adapter shape
        adapter_dict = {k: v for k, v in init_bundle.config["adapter"].items() if k != "input_dim"}
    try:
        adapter_cfg = AdapterConfig(input_dim=vlm.hidden_size, **adapter_dict)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"model.adapter: {exc}") from None
    if m.adapter_init and init_bundle is None:  # e.g. the shapes world's stage-0 adapter
        adapter_cfg = _adapter_init_config(m.adapter_init, vlm.hidden_size)
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    adapter = MumuAdapter(adapter_cfg).to(device)
    if m.adapter_init and init_bundle is None:
        from safetensors.torch import load_file

        adapter.load_state_dict(load_file(m.adapter_init))   # CPU first: safetensors refuses "cpu:0" (multi-process CPU runs)

    vl = m.vlm_lora
    vlm_targets = vl.targets or vlm.family.lora_targets
    vlm.model = apply_vlm_lora(vlm.model, vlm.family, rank=vl.rank, alpha=float(vl.alpha), targets=vlm_targets,
                               dropout=vl.dropout)
    ul = m.unet_lora
    unet_targets = list(ul.targets or DEFAULT_UNET_TARGETS)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=ul.rank, lora_alpha=float(ul.alpha), lora_dropout=ul.dropout,
                                init_lora_weights="gaussian", target_modules=unet_targets))
    encoder = MumuEncoder(vlm, adapter)
    model = MumuTrainModel(encoder, unet)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 masters for everything the optimizer updates
    if m.gradient_checkpointing:
        _enable_llm_checkpointing(vlm.model.text_model)
        unet.enable_gradient_checkpointing()
        adapter.gradient_checkpointing = True
    if init_bundle is not None:
        load_bundle_weights(model, init_bundle, dict(unet.config))
    elif m.init_from:
        from .checkpoints import load_trainable

        load_trainable(model, m.init_from)
    vae.to(device=device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)  # fp16 VAE overflows

    export_meta = {
        "vlm_family": vlm.family.name, "vlm_hidden_size": vlm.hidden_size, "vlm_num_layers": vlm.num_layers,
        "hidden_layer": m.hidden_layer, "adapter": adapter_cfg.to_dict(),
        "vlm_lora": {"rank": vl.rank, "alpha": float(vl.alpha), "targets": vlm_targets},
        "unet_lora": {"rank": ul.rank, "alpha": float(ul.alpha), "targets": unet_targets},
        "unet_config": _jsonable(dict(unet.config)),
        "tokens_per_image": None,  # filled by train.py from the sample builder
        "vlm_path": str(Path(m.vlm).resolve()), "sdxl_path": str(Path(m.sdxl).resolve()),
    }
    return Components(model, vae, noise_scheduler, sched_config, export_meta)


def _adapter_init_config(path: str, vlm_hidden: int) -> AdapterConfig:
    import json

    from mumu_core.safetensors_io import read_header

    meta = read_header(path, "model.adapter_init").metadata
    if "adapter" not in meta:
        raise TrainConfigError(f"model.adapter_init = {path} holds no adapter config in its metadata; pass a file "
                               f"written by training/shapes/pretrain.py save_adapter.")
    cfg = AdapterConfig.from_dict(json.loads(meta["adapter"]))
    if cfg.input_dim != vlm_hidden:
        raise TrainConfigError(f"model.adapter_init = {path} was trained on a VLM with hidden size {cfg.input_dim}, "
                               f"but model.vlm has {vlm_hidden}.")
    return cfg


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups with the paper's per-module learning rates (Table 1)."""
    groups = {"vlm_lora": [], "adapter": [], "unet_lora": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        if name.startswith(ADAPTER_PREFIX):
            groups["adapter"].append(p)
        elif name.startswith(VLM_PREFIX):
            groups["vlm_lora"].append(p)
        elif name.startswith(UNET_PREFIX):
            groups["unet_lora"].append(p)
        else:
            raise RuntimeError(f"trainable parameter {name} belongs to no optimizer group")
    o = cfg.optim
    lrs = {"vlm_lora": o.lr_vlm_lora, "adapter": o.lr_adapter, "unet_lora": o.lr_unet_lora}
    return [{"params": ps, "lr": lrs[k], "name": k, "weight_decay": o.weight_decay} for k, ps in groups.items() if ps]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def frozen_named_parameters(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if not p.requires_grad]


def _read_init_bundle(path: str | None):
    if not path or Path(path).is_dir():
        return None
    from mumu_core.bundle import load_bundle

    return load_bundle(path)


def load_bundle_weights(model: MumuTrainModel, bundle, unet_config: dict) -> None:
    """Initialise from a bundle (stage 2 from stage 1): adapter, VLM LoRA, UNet LoRA, checked."""
    from peft import set_peft_model_state_dict

    from mumu_core.unet_lora import kohya_to_peft

    model.encoder.adapter.load_state_dict(bundle.adapter)
    peft_vlm = model.encoder.vlm.model
    _set_lora(peft_vlm, bundle.vlm_lora, "vlm_lora", bundle.path, set_peft_model_state_dict)
    if bundle.unet_lora:
        peft_sd, alphas = kohya_to_peft(bundle.unet_lora, unet_config)
        ranks = {int(v.shape[0]) for k, v in peft_sd.items() if ".lora_A." in k}
        want = model.unet.peft_config["default"]
        if ranks != {want.r} or any(abs(a - want.lora_alpha) > 1e-6 for a in alphas.values()):
            raise BundleError(f"{bundle.path}: its UNet LoRA has rank(s) {sorted(ranks)} / alpha(s) "
                              f"{sorted(set(alphas.values()))}, the config asks for rank {want.r} / alpha "
                              f"{want.lora_alpha}. Set model.unet_lora to match the stage-1 run.")
        _set_lora(model.unet, peft_sd, "unet_lora", bundle.path, set_peft_model_state_dict)


def _set_lora(module, sd, what, where, setter) -> None:
    own = {k.replace(".default.", "."): v for k, v in module.state_dict().items() if "lora_" in k}
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or extra or bad:
        raise BundleError(f"{where}: its {what} does not fit the configured LoRA: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, shape mismatch {bad[:3]}. Use the same LoRA rank and targets "
                          f"as the run that wrote it.")
    setter(module, sd)
