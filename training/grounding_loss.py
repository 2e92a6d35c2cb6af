"""Grounding loss: a crop's tokens should be attended to from inside its own box.

Not in the MUMU paper. Bootstrapped data carries, for every crop, the box it was cut from in the
target image; the diffusion loss alone uses that only indirectly (the crop's appearance must end up
there). With several crops in one prompt the UNet's cross-attention can read every crop from every
pixel, and objects then blend their colours ("a yellow ring and a red star" drawn as two
orange-and-red things). TokenCompose (Wang et al., CVPR 2024) adds a token-level grounding loss to
text-to-image finetuning for exactly this multi-object failure; this is its token loss with the
crop's image tokens as the token set and the crop's box as the mask (stage 0 of the shapes world uses
it on text, each object's phrase `red striped ball` and its box: `phrase_targets`):

    A_k(p) = Σ_{t ∈ tokens of crop k} softmax attention of pixel p to token t     (mean over heads)
    L_k    = (1 − Σ_p box_k(p) A_k(p) / Σ_p A_k(p))²

averaged over crops and over every cross-attention layer of the UNet, `box_k(p)` being the share of
latent cell p inside the box (soft, so a 4x4 map still sees a small box). The total loss is
`diffusion + loss.grounding_weight × grounding`; weight 0 (the default) installs nothing.

    recorder = CrossAttentionRecorder(unet)          # wraps every attn2 processor
    with recorder.recording() as maps:               # the forward pass fills maps
        pred = model(...)
        loss = loss + w * grounding_loss(maps, grounding_targets(samples, inputs.tokens.image_spans))
        loss.backward()                              # inside too: see CrossAttentionRecorder
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


class _RecordingProcessor:
    """Runs the layer's own processor, then its attention probabilities for the record.

    The query and key are the ones the processor itself computed, caught on their way out of
    `attn.to_q` / `attn.to_k` (forward hooks, held only during the call): diffusers' processor, and so
    whatever kernel it uses, stays untouched, and the projections (the key reads the 2,048-wide context)
    do not run twice, forward and backward. A processor that projects some other way (fused q/k/v)
    has them recomputed. The probabilities come from `Attention.get_attention_scores`, diffusers' own.
    """

    def __init__(self, inner, recorder: "CrossAttentionRecorder"):
        self.inner, self.recorder = inner, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if not self.recorder.active:  # validation images, sampling: nothing kept
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        seen: dict = {}
        hooks = [attn.to_q.register_forward_hook(lambda _m, _i, out: seen.setdefault("q", out)),
                 attn.to_k.register_forward_hook(lambda _m, _i, out: seen.setdefault("k", out))]
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b, hw, tokens = hidden_states.shape[0], hidden_states.shape[1], context.shape[1]
        query = seen["q"] if "q" in seen else attn.to_q(hidden_states)
        key = seen["k"] if "k" in seen else attn.to_k(context)
        mask = attn.prepare_attention_mask(attention_mask, tokens, b)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), mask)
        self.recorder.maps.append(probs.view(b, attn.heads, hw, tokens).mean(1))   # [B*heads, HW, T] -> [B, HW, T]
        return out


class CrossAttentionRecorder:
    """Wraps the UNet's cross-attention (attn2) processors; inside `recording()` each forward pass
    appends one [B, HW, T] map per layer to `maps`, outside it nothing is kept.

    Run the backward inside `recording()` too: gradient checkpointing re-runs the forward during the
    backward and requires the same tensors to be saved both times (the maps it appends then are
    never read; the next `recording()` clears them)."""

    def __init__(self, unet):
        self.maps: list[torch.Tensor] = []
        self.active = False
        processors = unet.attn_processors
        wrapped = {name: (_RecordingProcessor(proc, self) if ".attn2." in name else proc)
                   for name, proc in processors.items()}
        if not any(isinstance(p, _RecordingProcessor) for p in wrapped.values()):
            raise ValueError("the UNet has no cross-attention (attn2) layers to ground")
        unet.set_attn_processor(wrapped)

    @contextmanager
    def recording(self):
        self.maps.clear()
        self.active = True
        try:
            yield self.maps
        finally:
            self.active = False


@dataclass
class GroundingTarget:
    sample: int                                # row of the batch
    tokens: tuple[int, int]                    # [start, end) of the crop's image tokens
    box: tuple[float, float, float, float]     # the crop's box in target pixels (x0, y0, x1, y1)
    size: tuple[int, int]                      # the target's (height, width) in pixels


def grounding_targets(samples, image_spans) -> list[GroundingTarget]:
    """One target per crop that has a box in the target image (edge maps and dropped samples have none)."""
    out = []
    for b, (sample, spans) in enumerate(zip(samples, image_spans)):
        size = sample.target_size or (sample.target.height, sample.target.width)
        for image_index, start, end in spans:
            info = sample.conditioning[image_index] if image_index < len(sample.conditioning) else None
            if info is not None and info.target_box is not None:
                out.append(GroundingTarget(b, (start, end), tuple(info.target_box), tuple(size)))
    return out


def phrase_targets(tokenizer, input_ids: torch.Tensor, texts: list[str], phrases: list[list],
                   size: tuple[int, int]) -> list[GroundingTarget]:
    """Text phrases as grounding targets: per prompt, [((char_start, char_end), box), ...] -> the
    tokens covering each phrase (contiguous) and its box. `input_ids` are the ids the encoder ran
    ([B, T], right-padded); the text is re-tokenized for its character offsets and must give the same ids."""
    out = []
    for b, (text, items) in enumerate(zip(texts, phrases)):
        if not items:
            continue
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if input_ids[b, :len(ids)].tolist() != ids:
            raise ValueError(f"prompt {b} tokenizes differently from the encoder's input ids; the phrase "
                             f"offsets would point at the wrong tokens: {text!r}")
        for (start, end), box in items:
            hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
            if not hit:
                raise ValueError(f"no token covers characters {start}-{end} ({text[start:end]!r}) of {text!r}")
            out.append(GroundingTarget(b, (hit[0], hit[-1] + 1), tuple(float(v) for v in box), tuple(size)))
    return out


def box_coverage(box, size: tuple[int, int], grid: tuple[int, int], device=None) -> torch.Tensor:
    """[h*w]: the share of each cell of an h x w grid over a (height, width) image that lies inside `box`."""
    (height, width), (h, w) = size, grid
    x0, y0, x1, y1 = box

    def overlap(lo, hi, cells, extent):
        edges = torch.linspace(0, extent, cells + 1, device=device)
        return ((torch.minimum(edges[1:], torch.tensor(hi, device=device))
                 - torch.maximum(edges[:-1], torch.tensor(lo, device=device))).clamp_min(0) / (extent / cells))

    return (overlap(y0, y1, h, height)[:, None] * overlap(x0, x1, w, width)[None, :]).reshape(-1)


def _layout(hw: int, size: tuple[int, int]) -> tuple[int, int]:
    height, width = size
    h = round((hw * height / width) ** 0.5)
    if h == 0 or h * (hw // h) != hw:
        raise ValueError(f"cannot lay out a {hw}-cell attention map over a {height}x{width} target")
    return h, hw // h


def grounding_loss(maps: list[torch.Tensor], targets: list[GroundingTarget]) -> torch.Tensor:
    """TokenCompose's token loss, mean over every recorded layer and crop; 0 (with a graph) when no crop."""
    if not maps:
        raise ValueError("no cross-attention maps were recorded: is the CrossAttentionRecorder installed?")
    if not targets:
        return maps[0].sum() * 0.0
    device, tokens = maps[0].device, maps[0].shape[-1]
    rows = torch.tensor([t.sample for t in targets], device=device)
    select = torch.zeros(len(targets), tokens, device=device, dtype=maps[0].dtype)   # crop k's token set
    for k, t in enumerate(targets):
        select[k, t.tokens[0]:t.tokens[1]] = 1.0
    coverage: dict[int, torch.Tensor] = {}                                          # per map size: [K, HW]
    losses = []
    for attn in maps:                                                               # [B, HW, T]
        hw = attn.shape[1]
        if hw not in coverage:
            coverage[hw] = torch.stack([box_coverage(t.box, t.size, _layout(hw, t.size), device) for t in targets])
        a = torch.einsum("kpt,kt->kp", attn[rows], select)                          # [K, HW]
        inside = (a * coverage[hw].to(a.dtype)).sum(-1) / a.sum(-1).clamp_min(1e-8)
        losses.append((1.0 - inside) ** 2)
    return torch.cat(losses).mean()
