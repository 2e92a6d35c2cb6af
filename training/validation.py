"""Validation images: fixed multimodal prompts rendered with the weights being trained.

Runs on the main process only, with the unwrapped training modules (LoRAs active, not merged),
through the same diffusers glue users run (mumu_core.pipeline.generate), so a sample here is
what the exported bundle will produce. Images go to OUTPUT/samples/step-N/ and TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mumu_core.atomic import atomic_write


def load_prompts(prompts: list, tokens_per_image: int):
    from PIL import Image

    from mumu_core.prompt import InterleavedPrompt, PromptImage

    out = []
    for p in prompts:
        images = [PromptImage(Image.open(path).convert("RGB"), tokens_per_image=tokens_per_image)
                  for path in p.get("images", []) or []]
        out.append((p["text"], InterleavedPrompt.parse(p["text"], images)))
    return out


@torch.no_grad()
def render(model, vae, scheduler_config: dict, prompts, *, steps: int, cfg: float, seed: int, width: int,
           height: int, autocast) -> list:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from mumu_core.pipeline import generate

    was_training = model.training
    model.eval()  # adapter/UNet checkpointing and dropout are training-only
    try:
        pipe = StableDiffusionXLPipeline(vae=vae, unet=model.unet, scheduler=EulerDiscreteScheduler.from_config(
            scheduler_config), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
        images = []
        with autocast():
            negative = model.encoder.encode_unconditional()
            for _text, prompt in prompts:
                positive = model.encoder.encode(prompt)
                images.append(generate(pipe, positive, negative, steps=steps, cfg=cfg, seed=seed, width=width,
                                       height=height, progress=False))
        return images
    finally:
        model.train(was_training)


def save_and_log(images, texts, out_dir: Path, step: int, writer=None) -> list[Path]:
    folder = Path(out_dir) / "samples" / f"step-{step:07d}"
    paths = []
    for i, (img, text) in enumerate(zip(images, texts)):
        path = folder / f"{i:02d}.png"
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
        paths.append(path)
        if writer is not None:
            writer.add_image(f"validation/{i:02d}", np.asarray(img), step, dataformats="HWC")
            writer.add_text(f"validation/{i:02d}/prompt", text, step)
    return paths
