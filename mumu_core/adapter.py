"""The adapter ("transformer connector"): VLM hidden states -> SDXL cross-attention context.

Paper §3 / Fig. 2: a 16-layer non-causal (bidirectional) transformer on top of the Idefics2
hidden states, fully trained, cited to ELLA. Everything else about it is unstated; our choices:

- input: LayerNorm then Linear(vlm_hidden -> width). LLM hidden states have a few very large
  channels; normalising first keeps the projection well conditioned.
- blocks: pre-norm transformer layers (LayerNorm, multi-head self-attention over *all* tokens,
  LayerNorm, GELU MLP), no positional encoding: the causal LLM underneath already encodes order.
  Padding keys are masked, so padding never changes a real token's output.
- context: LayerNorm then Linear(width -> 2048) (SDXL's cross_attention_dim).
- pooled (SDXL's 1280-d `text_embeds`, not mentioned in the paper): a masked mean over the
  prompt's real tokens of the final normalised states, then Linear(width -> 1280). SDXL's own
  pooled vector is CLIP-bigG's EOS projection; a mean is robust to where the content sits in
  an interleaved prompt and needs no special token. It is trained with the rest of the adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class AdapterConfig:
    input_dim: int  # the VLM's hidden size (4096 for Idefics2-8B)
    width: int = 1024
    depth: int = 16
    heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int = 2048  # SDXL cross_attention_dim
    pooled_dim: int = 1280  # SDXL text_embeds (add_embedding) width
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"adapter width {self.width} must be divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class AdapterBlock(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # key_mask [B,1,1,T]: True = attend. Every row has >= 1 real key, so no NaNs.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MumuAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.input_norm = nn.LayerNorm(config.input_dim, eps=config.norm_eps)
        self.input_proj = nn.Linear(config.input_dim, config.width)
        self.blocks = nn.ModuleList(AdapterBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.context_proj = nn.Linear(config.width, config.context_dim)
        self.pooled_proj = nn.Linear(config.width, config.pooled_dim)
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B,T,input_dim], mask [B,T] bool (True = real token) -> context [B,T,2048], pooled [B,1280]."""
        dtype = self.input_proj.weight.dtype
        mask = mask.to(device=hidden.device, dtype=torch.bool)
        x = self.input_proj(self.input_norm(hidden.to(dtype)))
        key_mask = mask[:, None, None, :]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
        x = self.final_norm(x)
        weights = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.context_proj(x), self.pooled_proj(pooled)
