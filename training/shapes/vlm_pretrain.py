"""Stage 0 for the VLM: a short captioning pretraining on the world, the toy's Idefics2 pretraining.

MUMU's VLM (Idefics2-8B) arrives pretrained: a crop's colour, pattern and object are salient,
linearly readable directions of its hidden states. A randomly initialised tiny Idefics2 carries them
too, but scrambled through random layers, and the diffusion loss alone is far too weak a signal to
unscramble them (measured: two full MUMU runs on a random VLM left every eval condition at chance).
So before anything else the toy VLM learns to describe world crops, next-token prediction as in
Idefics2's own pretraining:

    <image> red striped ball        (an object's box cropped from a rendered scene)
    <image> grid floor              (an object-free square of floor)

The vision tower and the modality projection train, through the same perceiver-free path MUMU uses
(`MumuEncoder.vlm_hidden_states`), with a throwaway linear head over the vocabulary; the LLM and its
embeddings stay frozen (as in LLaVA's projector pretraining), so a caption without images encodes
exactly as before and the text-to-image stage 0 does not depend on this step. The folder is then
saved back with `save_pretrained`, so every later stage loads it like Idefics2-8B.
The held-out accuracy of the greedy colour / pattern / noun words is written to `vlm_summary.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class VlmPretrainConfig:
    steps: int = 500
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0
    held_out: int = 256


def descriptions(scene, world_cfg, rng) -> tuple[object, str]:
    """One (crop, description) pair of a scene: one of its objects, or its floor (1 time in 4)."""
    from .world import render

    image = render(scene, world_cfg.stripe_period)
    if scene.floor_box is not None and rng.random() < 0.25:
        return image.crop(scene.floor_box), f"{scene.floor} floor"
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return image.crop(obj.box), f"{obj.colour} {obj.pattern} {obj.noun}"


def _batch(rng, n: int, world_cfg, tokens_per_image: int):
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    from .world import sample_scene

    prompts, texts = [], []
    for _ in range(n):
        crop, text = descriptions(sample_scene(rng, world_cfg), world_cfg, rng)
        prompts.append(InterleavedPrompt.parse(f"<image> {text}", [PromptImage(crop, tokens_per_image=tokens_per_image)]))
        texts.append(text)
    return prompts, texts


def caption_loss(encoder, head, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the words after each image -> (loss, logits, targets mask)."""
    inputs = encoder.prepare(prompts)
    hidden, mask = encoder.vlm_hidden_states(inputs)
    ids = inputs.tokens.input_ids.to(hidden.device)
    supervised = torch.zeros_like(mask)
    for b, spans in enumerate(inputs.tokens.image_spans):
        end = spans[-1][2]  # the first token after the last image's tokens
        supervised[b, end:] = mask[b, end:]
    logits = head(hidden[:, :-1])
    target_mask = supervised[:, 1:]
    loss = F.cross_entropy(logits[target_mask], ids[:, 1:][target_mask])
    return loss, logits, target_mask


@torch.no_grad()
def word_accuracy(encoder, head, prompts, texts) -> dict[str, float]:
    """Greedy next-token accuracy per description word (colour, pattern, noun; floor), teacher-forced:
    a word counts as right when every one of its tokens is the argmax."""
    _, logits, _ = caption_loss(encoder, head, prompts)
    tokens = encoder.prepare(prompts).tokens
    tokenizer = encoder.vlm.tokenizer
    hits: dict[str, list[bool]] = {}
    for b, text in enumerate(texts):
        ids = tokens.input_ids[b][tokens.attention_mask[b]]
        words = text.split()
        slots = ("floor", "floor") if words[-1] == "floor" else ("colour", "pattern", "noun")
        pos = len(ids) - len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
        for slot, word in zip(slots, words):
            n = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
            pred = logits[b, pos - 1 : pos - 1 + n].argmax(-1)  # logits[j] predicts token j + 1
            if slot != "floor" or word != "floor":
                hits.setdefault(slot, []).append(bool(torch.equal(pred, ids[pos : pos + n])))
            pos += n
    return {k: sum(v) / len(v) for k, v in hits.items()}


def pretrain_vlm(folder: Path, world_cfg, cfg: VlmPretrainConfig, tokens_per_image: int,
                 progress: bool = True) -> dict:
    """Pretrain the VLM saved in `folder` in place (the caller writes `folder` atomically)."""
    import numpy as np
    from tqdm.auto import tqdm
    from transformers import Idefics2ForConditionalGeneration

    from mumu_core.encoder import MumuEncoder
    from mumu_core.vlm import load_vlm

    torch.manual_seed(cfg.seed)
    vlm = load_vlm(folder)
    image_path = [vlm.model.vision_model, vlm.model.connector]  # the LLM stays frozen
    for module in image_path:
        module.requires_grad_(True).train()
    encoder = MumuEncoder(vlm, adapter=None, config={"tokens_per_image": tokens_per_image})
    head = torch.nn.Linear(vlm.hidden_size, len(vlm.tokenizer), bias=False)
    params = [p for m in image_path for p in m.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    from ..lr_schedule import lr_factor

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 20, cfg.steps, "cosine", 0.1))
    bar = tqdm(range(cfg.steps), desc="stage 0: VLM captioning", disable=not progress, dynamic_ncols=True)
    for step in bar:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 11, step]))
        prompts, _ = _batch(rng, cfg.batch, world_cfg, tokens_per_image)
        loss, _, _ = caption_loss(encoder, head, prompts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vlm.model.eval()
    vlm.model.requires_grad_(False)
    held_out = _batch(np.random.default_rng(np.random.SeedSequence([cfg.seed, 12])), cfg.held_out, world_cfg,
                      tokens_per_image)
    accuracy = word_accuracy(encoder, head, *held_out)

    full = Idefics2ForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
    missing, unexpected = full.model.load_state_dict(vlm.model.state_dict(), strict=False)
    if unexpected or any("perceiver" not in k for k in missing):  # only the removed perceiver may differ
        raise RuntimeError(f"VLM pretraining: weights do not match the folder ({missing[:3]}, {unexpected[:3]})")
    full.save_pretrained(folder)
    summary = {"steps": cfg.steps, "batch": cfg.batch, "final_loss": round(loss.item(), 4),
               "held_out_word_accuracy": {k: round(v, 4) for k, v in accuracy.items()}}
    (folder / "vlm_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
