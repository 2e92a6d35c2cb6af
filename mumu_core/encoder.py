"""MumuEncoder: interleaved prompt -> SDXL conditioning (context, pooled, mask).

    prompt ──prepare──► token ids + square image tensors ──VLM (no perceiver)──► hidden states
           ──adapter──► context [B,T,2048], pooled [B,1280] ──image weights──► MumuConditioning

The unconditional embedding is the encoding of the empty prompt (training drops conditioning to
the empty prompt, so CFG's negative is that, not zeros). An image's weight scales the context
rows of its own patch tokens after the adapter: other images' tokens and the text are untouched
(like IPAdapter's weight; >1 strengthens it). Weight 0 leaves the image out of the prompt altogether,
placeholder and all, since the words after it would otherwise have read it inside the VLM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .adapter import AdapterConfig, MumuAdapter
from .bundle import Bundle, check_against_vlm, load_bundle
from .errors import BundleError
from .images import prepare_image
from .prompt import DEFAULT_TOKENS_PER_IMAGE, InterleavedPrompt, PromptImage
from .vlm import TokenizedBatch, VlmBackbone, load_vlm


@dataclass
class MumuConditioning:
    context: torch.Tensor  # [B,T,2048]
    pooled: torch.Tensor  # [B,1280]
    mask: torch.Tensor  # [B,T] bool, True = real token
    # per prompt: one dict per placeholder {image (1-based, as given), start, end, tokens, side, weight}
    layouts: list[list[dict]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class EncoderInputs:
    """Everything the forward pass needs, already on tensors (the output of `prepare`)."""

    tokens: TokenizedBatch
    # square images grouped by side: side -> [N,3,S,S] normalised
    pixel_values: dict[int, torch.Tensor]
    # per prompt, per image index of prompt.images: (side, row in pixel_values[side])
    image_rows: list[list[tuple[int, int]]]
    # per prompt, per placeholder: weight of that image
    weights: list[list[float]]
    # the prompts encoded (weight-0 images left out) and, per prompt, the caller's 0-based index of
    # each image they keep
    prompts: list[InterleavedPrompt] = field(default_factory=list)
    image_numbers: list[list[int]] = field(default_factory=list)


class MumuEncoder(nn.Module):
    def __init__(self, vlm: VlmBackbone, adapter: MumuAdapter, config: dict | None = None):
        super().__init__()
        self.vlm = vlm
        self.adapter = adapter
        self.config = config or {}

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, vlm_dir: str | Path, bundle_path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", weight_storage: str | None = None) -> "MumuEncoder":
        """Load a VLM folder (HF layout) and a MUMU bundle; the bundle's VLM LoRA is merged in.

        weight_storage: "fp8_e4m3fn" or "int8" stores the VLM's linear weights in 8 bits (computed in
        `dtype`), about half the memory (`mumu_core.weight_storage`); quantised on the CPU, after the
        LoRA merge, then moved. None keeps them in `dtype`."""
        bundle = load_bundle(bundle_path)
        hidden_layer = int(bundle.config.get("vlm", {}).get("hidden_layer", -1))
        load_device = "cpu" if weight_storage else device
        vlm = load_vlm(vlm_dir, dtype=dtype, device=load_device, hidden_layer=hidden_layer)
        encoder = cls.from_bundle(vlm, bundle, dtype=dtype, device=load_device)
        if weight_storage:
            from .weight_storage import store_linear_weights

            store_linear_weights(encoder.vlm.model, weight_storage)
            encoder.to(device)
        return encoder

    @classmethod
    def from_bundle(cls, vlm: VlmBackbone, bundle: Bundle, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> "MumuEncoder":
        try:
            adapter_cfg = AdapterConfig.from_dict(bundle.config["adapter"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{bundle.path}: the adapter config in the bundle is invalid ({exc}).") from None
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in MumuAdapter(adapter_cfg).state_dict().items()}
        modules = dict(vlm.model.named_modules())
        check_against_vlm(bundle, vlm.hidden_size, vlm.family.name, modules, shapes)
        adapter = MumuAdapter(adapter_cfg)
        adapter.load_state_dict(bundle.adapter)
        if bundle.vlm_lora:
            merge_vlm_lora(vlm, bundle)
        encoder = cls(vlm, adapter, bundle.config)
        return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def default_tokens_per_image(self) -> int:
        """The bundle's training budget: what "auto" means for an image's tokens_per_image."""
        return int(self.config.get("tokens_per_image", DEFAULT_TOKENS_PER_IMAGE))

    # -- preparation ---------------------------------------------------------------------
    def prepare(self, prompts: Sequence[InterleavedPrompt]) -> EncoderInputs:
        """Leave out weight-0 images, pad/resize the others to their squares, tokenize, group by size."""
        # images whose token budget is "auto" (None) get the budget the bundle was trained with
        kept = [p.with_default_tokens(self.default_tokens_per_image).without_silenced_images() for p in prompts]
        prompts = [p for p, _ in kept]
        groups: dict[int, list] = {}
        image_rows: list[list[tuple[int, int]]] = []
        for prompt in prompts:
            rows = []
            for image in prompt.images:
                side = self.vlm.side_for_tokens(image.tokens_per_image)
                group = groups.setdefault(side, [])
                rows.append((side, len(group)))
                group.append(prepare_image(image.image, side, image.mask))
            image_rows.append(rows)
        pixel_values = {side: self.vlm.pixel_values(images) for side, images in groups.items()}
        weights = [[p.images[i].weight for i in p.image_order] for p in prompts]
        return EncoderInputs(self.vlm.tokenize(prompts), pixel_values, image_rows, weights,
                             prompts, [numbers for _, numbers in kept])

    # -- forward -------------------------------------------------------------------------
    def image_features(self, inputs: EncoderInputs, on_image: Callable[[int, int], None] | None = None):
        """side -> [N,tokens,hidden]. With `on_image`, one image at a time so progress is per image."""
        total = sum(len(v) for v in inputs.pixel_values.values())
        feats, done = {}, 0
        for side, pixels in inputs.pixel_values.items():
            if on_image is None:
                feats[side] = self.vlm.image_features(pixels)
                continue
            rows = []
            for i in range(len(pixels)):
                rows.append(self.vlm.image_features(pixels[i : i + 1]))
                done += 1
                on_image(done, total)
            feats[side] = torch.cat(rows)
        return feats

    def forward(self, inputs: EncoderInputs, on_image: Callable[[int, int], None] | None = None):
        """-> context [B,T,2048], pooled [B,1280], mask [B,T] (differentiable; used for training)."""
        hidden, mask = self.vlm_hidden_states(inputs, on_image)
        context, pooled = self.adapter(hidden, mask)
        scale = _weight_scale(inputs.tokens, inputs.weights, context)
        if scale is not None:
            context = context * scale
        return context, pooled, mask

    def vlm_hidden_states(self, inputs: EncoderInputs, on_image: Callable[[int, int], None] | None = None):
        """-> the VLM's hidden states [B,T,hidden] with every image's tokens in place, and mask [B,T]."""
        device = self.vlm.image_mean.device
        tokens = inputs.tokens
        input_ids = tokens.input_ids.to(device)
        mask = tokens.attention_mask.to(device)
        embeds = self.vlm.embed(input_ids)
        if inputs.pixel_values:
            feats = self.image_features(inputs, on_image)
            embeds = embeds.clone()
            for b, spans in enumerate(tokens.image_spans):
                for image_index, start, end in spans:
                    side, row = inputs.image_rows[b][image_index]
                    embeds[b, start:end] = feats[side][row].to(embeds.dtype)
        return self.vlm.language_hidden_states(embeds, mask), mask

    @torch.no_grad()
    def encode(self, prompts: InterleavedPrompt | Sequence[InterleavedPrompt],
               on_image: Callable[[int, int], None] | None = None) -> MumuConditioning:
        """Encode one prompt or a batch (any image counts); padded rows have mask False."""
        single = isinstance(prompts, InterleavedPrompt)
        batch = [prompts] if single else list(prompts)
        t0 = time.perf_counter()
        inputs = self.prepare(batch)
        t1 = time.perf_counter()
        context, pooled, mask = self.forward(inputs, on_image)
        t2 = time.perf_counter()
        layouts = [  # weight-0 images were left out, so they have no tokens and no entry
            [
                {"image": inputs.image_numbers[b][img] + 1, "start": s, "end": e, "tokens": e - s,
                 "side": inputs.image_rows[b][img][0], "weight": p.images[img].weight}
                for img, s, e in inputs.tokens.image_spans[b]
            ]
            for b, p in enumerate(inputs.prompts)
        ]
        return MumuConditioning(
            context.float(), pooled.float(), mask, layouts,
            {"prepare_s": t1 - t0, "forward_s": t2 - t1},
        )

    def encode_unconditional(self, batch_size: int = 1) -> MumuConditioning:
        """The empty prompt's encoding: CFG's negative (what conditioning dropout trained)."""
        return self.encode([InterleavedPrompt.parse("")] * batch_size)

    def encode_text(self, text: str, images: Sequence[PromptImage] | None = None, **kw) -> MumuConditioning:
        return self.encode(InterleavedPrompt.parse(text, list(images or [])), **kw)


def _weight_scale(tokens: TokenizedBatch, weights: list[list[float]], like: torch.Tensor) -> torch.Tensor | None:
    if all(w == 1.0 for ws in weights for w in ws):
        return None
    scale = torch.ones(like.shape[:2] + (1,), dtype=like.dtype, device=like.device)
    for b, spans in enumerate(tokens.image_spans):
        for (_, start, end), w in zip(spans, weights[b]):
            scale[b, start:end] = w
    return scale


def merge_vlm_lora(vlm: VlmBackbone, bundle: Bundle) -> None:
    """Apply the bundle's PEFT LoRA to the VLM and merge it into the weights (no runtime cost)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    lora_cfg = bundle.config.get("vlm_lora", {})
    rank = int(lora_cfg.get("rank", 8))
    config = LoraConfig(
        r=rank,
        lora_alpha=float(lora_cfg.get("alpha", rank)),
        target_modules=lora_cfg.get("targets") or vlm.family.lora_targets,
    )
    peft_model = get_peft_model(vlm.model, config)
    result = set_peft_model_state_dict(peft_model, bundle.vlm_lora)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise BundleError(f"{bundle.path}: VLM LoRA tensors that match no module: {unexpected[:5]}")
    vlm.model = peft_model.merge_and_unload()
