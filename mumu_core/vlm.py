"""The vision-language backbone with the perceiver removed.

MUMU keeps Idefics2's SigLIP vision tower, its modality-projection MLP and its Mistral LLM, but
drops the perceiver resampler, which pools every image to 64 tokens and loses detail (paper §3,
Fig. 5). Each image then contributes all of its patch tokens: (S / patch)^2 for an S x S image.

We drive the three sub-modules ourselves instead of calling the HF model's forward: that lets
every image have its own token budget (the stock merger needs one size per batch), gives exact
per-image token spans for image weights and layouts, and keeps us off the parts of the HF API
that change between transformers 4.x and 5.x (processors, image processors, merger signatures).
The HF model (`Idefics2Model`, `Idefics3Model`, `SmolVLMModel`) is still built and loaded by
transformers from a local folder in Hugging Face layout, so real checkpoints load unchanged.

Idefics3 / SmolVLM have no perceiver but pixel-shuffle the patch grid by `scale_factor`, so an
S x S image gives (S / (patch * scale))^2 tokens; they are the small, CPU-friendly backbones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .compat import transformers_class, transformers_dtype_kwarg
from .errors import ModelFolderError, PromptError
from .prompt import InterleavedPrompt, PromptImage, check_context_length, square_grid_neighbours


@dataclass(frozen=True)
class VlmFamily:
    name: str
    model_class: str  # transformers base-model class
    # token strings wrapped around each image's patch tokens (as the stock processors do)
    image_prefix: tuple[str, ...]
    image_suffix: tuple[str, ...]
    lora_targets: str  # regex (re.fullmatch on module names) for the VLM LoRA


_LLM_LINEAR = r"text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"

FAMILIES: dict[str, VlmFamily] = {
    "idefics2": VlmFamily(
        "idefics2",
        "Idefics2Model",
        ("<fake_token_around_image>",),
        ("<fake_token_around_image>",),
        rf"^(.*\.)?({_LLM_LINEAR}|connector\.modality_projection\.(gate_proj|up_proj|down_proj))$",
    ),
    "idefics3": VlmFamily(
        "idefics3",
        "Idefics3Model",
        ("<fake_token_around_image>", "<global-img>"),
        ("<fake_token_around_image>",),
        rf"^(.*\.)?({_LLM_LINEAR}|connector\.modality_projection\.proj)$",
    ),
    "smolvlm": VlmFamily(
        "smolvlm",
        "SmolVLMModel",
        ("<fake_token_around_image>", "<global-img>"),
        ("<fake_token_around_image>",),
        rf"^(.*\.)?({_LLM_LINEAR}|connector\.modality_projection\.proj)$",
    ),
}

IMAGE_TOKEN = "<image>"


class PerceiverRemoved(nn.Module):
    """Stands where Idefics2's perceiver resampler was: every patch token passes through."""

    def forward(self, context: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any):
        return context


def remove_perceiver(model: nn.Module) -> nn.Module:
    """Replace the perceiver (Idefics2 only; Idefics3/SmolVLM have none). Idempotent."""
    connector = getattr(model, "connector", None)
    if connector is not None and hasattr(connector, "perceiver_resampler"):
        if not isinstance(connector.perceiver_resampler, PerceiverRemoved):
            connector.perceiver_resampler = PerceiverRemoved()
    return model


def read_model_type(folder: Path) -> str:
    cfg_path = folder / "config.json"
    try:
        return json.loads(cfg_path.read_text())["model_type"]
    except FileNotFoundError:
        raise ModelFolderError(
            f"{folder} is not a model folder in Hugging Face layout: config.json is missing. "
            f"Point to the folder that holds config.json, *.safetensors and the tokenizer files "
            f"(e.g. models/mumu/idefics2-8b)."
        ) from None
    except (ValueError, KeyError) as exc:
        raise ModelFolderError(f"{cfg_path} is not a valid model config ({exc}).") from None


def _check_folder(folder: Path) -> VlmFamily:
    if not folder.is_dir():
        raise ModelFolderError(f"VLM folder {folder} does not exist or is not a folder.")
    model_type = read_model_type(folder)
    if model_type not in FAMILIES:
        raise ModelFolderError(
            f"{folder} holds a '{model_type}' model; MUMU's encoder needs a vision-language model of "
            f"family {', '.join(sorted(FAMILIES))} (e.g. HuggingFaceM4/idefics2-8b)."
        )
    missing = []
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights (only safetensors are loaded, never pickled .bin files)")
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    if missing:
        raise ModelFolderError(f"VLM folder {folder} is missing: {'; '.join(missing)}.")
    return FAMILIES[model_type]


def _read_image_normalisation(folder: Path) -> tuple[list[float], list[float], float]:
    """image_mean, image_std, rescale_factor from the folder's (pre)processor config."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg:
                return list(cfg["image_mean"]), list(cfg["image_std"]), float(cfg.get("rescale_factor", 1 / 255))
    return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 1 / 255


@dataclass
class TokenizedBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] bool
    # per prompt, per placeholder: (image index into prompt.images, start, end) of its patch tokens
    image_spans: list[list[tuple[int, int, int]]]


class VlmBackbone(nn.Module):
    """A perceiver-free VLM: images + text -> LLM hidden states with exact per-image token spans."""

    def __init__(self, model: nn.Module, tokenizer: Any, family: VlmFamily, image_mean, image_std,
                 rescale_factor: float = 1 / 255, hidden_layer: int = -1):
        super().__init__()
        self.model = remove_perceiver(model)
        self.tokenizer = tokenizer
        self.family = family
        self.hidden_layer = hidden_layer
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.rescale_factor = rescale_factor
        cfg = model.config
        self.patch_size = int(cfg.vision_config.patch_size)
        self.scale_factor = int(getattr(cfg, "scale_factor", 1) or 1)
        self.max_side = int(cfg.vision_config.image_size)
        self.hidden_size = int(cfg.text_config.hidden_size)
        self.num_layers = int(cfg.text_config.num_hidden_layers)
        self.max_context_tokens = int(getattr(cfg.text_config, "max_position_embeddings", 0) or 0)
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        if getattr(cfg, "image_token_id", None) not in (None, self.image_token_id):
            raise ModelFolderError(
                f"the tokenizer's {IMAGE_TOKEN} id ({self.image_token_id}) differs from the model config's "
                f"image_token_id ({cfg.image_token_id}); the folder mixes files of two models."
            )
        for tok in family.image_prefix + family.image_suffix:
            self._token_id(tok)

    # -- geometry ------------------------------------------------------------------------
    @property
    def grid_unit(self) -> int:
        """Pixels per side that one token row covers (patch size x pixel-shuffle factor)."""
        return self.patch_size * self.scale_factor

    @property
    def max_tokens_per_image(self) -> int:
        return (self.max_side // self.grid_unit) ** 2

    def side_for_tokens(self, tokens: int) -> int:
        """S such that an S x S image gives `tokens` patch tokens; errors name the valid range."""
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            lo, hi = square_grid_neighbours(tokens)
            raise PromptError(f"tokens_per_image={tokens} is not a square grid; nearest valid: {lo} or {hi}.")
        if tokens > self.max_tokens_per_image:
            m = self.max_tokens_per_image
            raise PromptError(
                f"tokens_per_image={tokens} needs {grid * self.grid_unit} px images, but this VLM's vision "
                f"tower takes at most {self.max_side} px: use at most {m} ({math.isqrt(m)}x{math.isqrt(m)})."
            )
        return grid * self.grid_unit

    def tokens_for_side(self, side: int) -> int:
        return (side // self.grid_unit) ** 2

    # -- text ----------------------------------------------------------------------------
    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ModelFolderError(
                f"the VLM tokenizer has no '{token}' token; the folder is not a complete "
                f"{self.family.name} checkpoint (tokenizer files missing or from another model)."
            )
        return tid

    def expand_image(self, image: PromptImage) -> str:
        return "".join(self.family.image_prefix) + IMAGE_TOKEN * image.tokens_per_image + "".join(self.family.image_suffix)

    def tokenize(self, prompts: Sequence[InterleavedPrompt]) -> TokenizedBatch:
        rows, spans = [], []
        for prompt in prompts:
            text = prompt.expand(self.expand_image)
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if not ids:  # a tokenizer without BOS gives nothing for the empty prompt
                ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id]
            check_context_length(len(ids), self.max_context_tokens, prompt)  # before any compute
            rows.append(ids)
            spans.append(self._image_spans(ids, prompt))
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = True
        return TokenizedBatch(input_ids, attention_mask, spans)

    def _image_spans(self, ids: list[int], prompt: InterleavedPrompt) -> list[tuple[int, int, int]]:
        is_image = np.asarray(ids) == self.image_token_id
        edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
        runs = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
        order = prompt.image_order
        expected = [prompt.images[i].tokens_per_image for i in order]
        if [e - s for s, e in runs] != expected:
            raise PromptError(
                f"the prompt text itself contains '{IMAGE_TOKEN}'-like tokens; image token runs found "
                f"{[e - s for s, e in runs]}, expected {expected}. Use <image> only as a placeholder."
            )
        return [(img, s, e) for img, (s, e) in zip(order, runs)]

    # -- images --------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (already S x S) -> normalised [N,3,S,S] float32."""
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
        # the normalisation buffers live on the model device (cuda when training on a GPU)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.image_mean.device) * self.rescale_factor
        return (x - self.image_mean) / self.image_std

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] (one S) -> projected patch tokens [N, tokens, hidden]."""
        n, _, h, w = pixel_values.shape
        param = next(self.model.vision_model.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        grid = (h // self.patch_size, w // self.patch_size)
        patch_mask = torch.ones((n, *grid), dtype=torch.bool, device=param.device)
        hidden = self.model.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
        if self.family.name == "idefics2":
            return self.model.connector(hidden, attention_mask=patch_mask.view(n, -1))
        return self.model.connector(hidden)

    # -- language model ------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def language_hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of layer `hidden_layer` (-1 = the LLM's final, normalised output)."""
        if self.hidden_layer == -1:
            out = self.model.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), use_cache=False)
            return out.last_hidden_state
        out = self.model.text_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), use_cache=False, output_hidden_states=True
        )
        return out.hidden_states[self.hidden_layer]


def load_vlm(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             hidden_layer: int = -1) -> VlmBackbone:
    """Load a local Idefics2 / Idefics3 / SmolVLM folder (HF layout) and remove the perceiver."""
    import transformers
    from transformers import AutoTokenizer

    folder = Path(folder)
    family = _check_folder(folder)
    model_cls = transformers_class(family.model_class)  # a clear error where transformers lacks it
    verbosity = transformers.logging.get_verbosity()
    # the checkpoint's lm_head is expected to be unused: keep its load report out of the log
    transformers.logging.set_verbosity_error()
    try:
        model = model_cls.from_pretrained(folder, use_safetensors=True, **transformers_dtype_kwarg(dtype))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as exc:
        raise ModelFolderError(f"could not load the VLM from {folder}: {exc}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = remove_perceiver(model)  # from_pretrained rebuilt it
    model.to(device).eval().requires_grad_(False)
    mean, std, rescale = _read_image_normalisation(folder)
    if not -model.config.text_config.num_hidden_layers - 1 <= hidden_layer < model.config.text_config.num_hidden_layers + 1:
        raise ModelFolderError(
            f"hidden_layer={hidden_layer} is out of range for an LLM with "
            f"{model.config.text_config.num_hidden_layers} layers."
        )
    return VlmBackbone(model, tokenizer, family, mean, std, rescale, hidden_layer).to(device)


def load_processor(folder: str | Path, tokens_per_image: int):
    """The stock HF processor of the folder with image_seq_len set for the perceiver-free model.

    For users who want the plain transformers path (one token budget for all images); MUMU's own
    encoder does not need it.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    processor.image_seq_len = tokens_per_image
    return processor


def apply_vlm_lora(model: nn.Module, family: VlmFamily, rank: int = 8, alpha: float = 8.0,
                   targets: str | None = None, dropout: float = 0.0):
    """Wrap the HF base model in a PEFT LoRA on the LLM linears + modality projection (paper Table 1).

    The regex keeps the vision tower (which also has q_proj/k_proj/...) out of the LoRA.
    Keys of `peft.get_peft_model_state_dict(result)` are the bundle's `vlm_lora.*` keys.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or family.lora_targets)
    return get_peft_model(model, config)
