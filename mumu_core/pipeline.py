"""diffusers glue: SDXL from a local folder or single file, MUMU conditioning in, image out.

`StableDiffusionXLPipeline` runs with both text encoders set to None and is fed MUMU's context
as `prompt_embeds` and the bundle's pooled vector as `pooled_prompt_embeds`; the negative is the
encoding of the empty prompt. The pipeline needs positive and negative of one length, so the
shorter is zero-padded and a UNet pre-hook passes the matching `encoder_attention_mask`: padded
keys get no attention weight, so the result equals running each branch at its own length.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .compat import diffusers_dtype_kwarg
from .encoder import MumuConditioning
from .errors import ModelFolderError, MumuError

SDXL_BASE_CONFIG = Path(__file__).parent / "assets" / "sdxl_base_config"


def load_sdxl_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       config: str | Path | None = None):
    """An SDXL pipeline without text encoders from a diffusers folder or a single-file checkpoint.

    Single files need a diffusers config folder offline; full-size SDXL uses the bundled
    stable-diffusion-xl-base-1.0 configs, anything else needs `config=`.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    dtype_kw = diffusers_dtype_kwarg(dtype)
    no_text = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelFolderError(
                f"{path} is not a diffusers pipeline folder (no model_index.json). Pass the folder of an SDXL "
                f"pipeline or a single-file .safetensors checkpoint."
            )
        pipe = StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True, **dtype_kw, **no_text)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ModelFolderError(
                f"{path}: only .safetensors checkpoints are loaded (pickled .ckpt files can run code)."
            )
        config = Path(config) if config else SDXL_BASE_CONFIG
        if not (config / "model_index.json").exists():
            raise ModelFolderError(f"--sdxl-config {config} has no model_index.json; pass a diffusers SDXL config folder.")
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, **dtype_kw, **no_text
        )
    else:
        raise ModelFolderError(f"SDXL checkpoint {path} does not exist.")
    return pipe.to(device)


def load_unet_lora_into_pipeline(pipe, lora_path: str | Path, strength: float = 1.0) -> int:
    """Load a bundle's (or a standalone) UNet LoRA with diffusers' own loader; returns the layers placed."""
    from .unet_lora import load_unet_lora

    from diffusers.utils import logging as diffusers_logging

    state_dict, _info = load_unet_lora(lora_path, unet_config=dict(pipe.unet.config))
    verbosity = diffusers_logging.get_verbosity()
    # without text encoders diffusers logs "no LoRA keys for text_encoder" twice: expected here
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(dict(state_dict), adapter_name="mumu")
    finally:
        diffusers_logging.set_verbosity(verbosity)
    expected = sum(1 for k in state_dict if k.endswith(".lora_down.weight"))
    placed = sum(1 for m in pipe.unet.modules() if "mumu" in getattr(m, "lora_A", {}))
    if placed != expected:
        raise MumuError(
            f"{lora_path}: diffusers placed {placed} of the {expected} UNet LoRA layers; the LoRA does not fit "
            f"this SDXL UNet (a LoRA for another architecture?)."
        )
    pipe.set_adapters(["mumu"], adapter_weights=[strength])
    return placed


def pad_to(cond: MumuConditioning, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ctx, mask = cond.context, cond.mask
    extra = length - ctx.shape[1]
    if extra > 0:
        ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], extra, ctx.shape[2])], 1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
    return ctx, mask


@contextmanager
def cross_attention_mask(unet, positive_mask: torch.Tensor, negative_mask: torch.Tensor):
    """Pass the right key mask to every UNet call (CFG batches are [negative..., positive...])."""

    def hook(_module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        batch = states.shape[0]
        n = positive_mask.shape[0]
        reps = max(batch // (2 * n), 1)
        if batch == 2 * n * reps:
            mask = torch.cat([negative_mask.repeat(reps, 1), positive_mask.repeat(reps, 1)])
        else:
            mask = positive_mask.repeat(batch // n, 1)
        kwargs["encoder_attention_mask"] = mask.to(states.device)
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def generate(pipe, positive: MumuConditioning, negative: MumuConditioning, *, steps: int = 50, cfg: float = 6.0,
             seed: int = 0, width: int = 1024, height: int = 1024, scheduler: str = "ddim", progress: bool = True):
    """One image (PIL). The paper samples with 50-step DDIM at guidance 6 and no negative prompt."""
    return generate_batch(pipe, positive, negative, steps=steps, cfg=cfg, seeds=[seed], width=width, height=height,
                          scheduler=scheduler, progress=progress)[0]


def _set_scheduler(pipe, scheduler: str) -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'euler', got {scheduler!r}")


def _rows(cond: MumuConditioning | list[MumuConditioning]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(context [1,T,C], pooled [1,P], mask [1,T]) per prompt, as encoded (padding, if any, masked)."""
    conds = [cond] if isinstance(cond, MumuConditioning) else list(cond)
    return [(c.context[b : b + 1], c.pooled[b : b + 1], c.mask[b : b + 1]) for c in conds for b in range(c.context.shape[0])]


def generate_batch(pipe, positives: MumuConditioning | list[MumuConditioning], negative: MumuConditioning, *,
                   steps: int = 50, cfg: float = 6.0, seeds: list[int] | None = None, width: int = 1024,
                   height: int = 1024, scheduler: str = "ddim", progress: bool = True):
    """One image per prompt (PIL list), all sampled together; same maths as `generate` per image.

    positives: a batched MumuConditioning (B rows) or a list of them (rows are concatenated in order).
    negative: one row (shared by every prompt) or B rows. Every row is zero-padded to the longest and
    the cross-attention mask hides the padding, so each image equals its own `generate` call; image i
    starts from the noise of `seeds[i]` (default 0..B-1).
    """
    _set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=not progress)
    pos, neg = _rows(positives), _rows(negative)
    n = len(pos)
    if len(neg) == 1:
        neg = neg * n
    if len(neg) != n:
        raise ValueError(f"negative has {len(neg)} rows for {n} prompts; give one row or one per prompt.")
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed per prompt.")
    length = max(r[0].shape[1] for r in pos + neg)

    def stack(rows):
        padded = [pad_to(MumuConditioning(c, p, m), length) for c, p, m in rows]
        return torch.cat([c for c, _ in padded]), torch.cat([m for _, m in padded]), torch.cat([r[1] for r in rows])

    pos_ctx, pos_mask, pos_pooled = stack(pos)
    neg_ctx, neg_mask, neg_pooled = stack(neg)
    dtype = pipe.unet.dtype
    device = pipe.unet.device
    # one CPU generator per image: diffusers draws image i's noise from generators[i] alone, exactly as a
    # one-image call with that seed draws it
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with cross_attention_mask(pipe.unet, pos_mask, neg_mask):
        out = pipe(
            prompt_embeds=pos_ctx.to(device, dtype), pooled_prompt_embeds=pos_pooled.to(device, dtype),
            negative_prompt_embeds=neg_ctx.to(device, dtype), negative_pooled_prompt_embeds=neg_pooled.to(device, dtype),
            num_inference_steps=steps, guidance_scale=cfg, width=width, height=height, generator=generators,
        )
    return out.images
