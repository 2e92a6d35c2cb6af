"""The one home for differences between library versions (transformers, diffusers).

Version drift in transformers is what breaks VLM node packs most, so every shim for a renamed
keyword, a moved class or a changed default lives here and nowhere else: when a new release
breaks loading, this is the one file to fix. Imports of the libraries stay inside the functions
so importing `mumu_core` stays cheap.
"""

from __future__ import annotations

import importlib

import torch


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return major, minor


def transformers_dtype_kwarg(dtype: torch.dtype) -> dict:
    """The `from_pretrained` keyword for a dtype: `dtype` from transformers 4.56, `torch_dtype` before."""
    return {"dtype": dtype} if transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def diffusers_dtype_kwarg(dtype: torch.dtype) -> dict:
    """The diffusers `from_pretrained` / `from_single_file` keyword for a dtype.

    Newer diffusers renamed `torch_dtype` to `dtype` (and warn on the old name); the rename came
    with `deprecation_utils._resolve_dtype`, which is what is probed.
    """
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


# transformers model_type -> class-name prefix of its image processor
_IMAGE_PROCESSOR_PREFIX = {
    "idefics2": "Idefics2",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
    "grounding_dino": "GroundingDino",
    "owlv2": "Owlv2",
}


def image_processor_class(model_type: str):
    """The PIL/numpy-backed image processor class for a model type, so torchvision is never needed.

    transformers 5 names it `*ImageProcessorPil` (exported at the top level, or only from
    `models.<type>.image_processing_pil_<type>`); in 4.x the plain `*ImageProcessor` is the PIL one.
    """
    import transformers

    prefix = _IMAGE_PROCESSOR_PREFIX[model_type]
    cls = getattr(transformers, f"{prefix}ImageProcessorPil", None)
    if cls is None:
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.image_processing_pil_{model_type}")
            cls = getattr(module, f"{prefix}ImageProcessorPil", None)
        except ImportError:
            cls = None
    return cls or getattr(transformers, f"{prefix}ImageProcessor")


def clip_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None, **kwargs):
    """A CLIP BPE tokenizer (fast, `tokenizers`-backed) built from an in-memory vocab and merges.

    transformers 5's `CLIPTokenizer` takes `vocab=`/`merges=` objects (or nothing: an empty vocab);
    4.x's wants `vocab_file`/`merges_file` paths, so there they are written to a temp folder and
    read by `CLIPTokenizerFast` (which keeps everything in memory afterwards). With no vocab, the
    result holds only CLIP's special tokens: enough to lend CLIP's normalizer and pre-tokenizer.
    """
    import json
    import tempfile
    from pathlib import Path

    if transformers_version() >= (5, 0):
        from transformers import CLIPTokenizer

        if vocab is None:
            return CLIPTokenizer(**kwargs)
        return CLIPTokenizer(vocab=vocab, merges=list(merges or []), **kwargs)
    from transformers import CLIPTokenizerFast

    if vocab is None:
        vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        # first line is a header the slow tokenizer skips
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in (merges or [])), encoding="utf-8")
        return CLIPTokenizerFast(vocab_file=str(vocab_file), merges_file=str(merges_file), **kwargs)


def checkpoint_parameter_names(model) -> dict[str, str]:
    """{in-memory parameter name: the key `save_pretrained` writes it under}, for every parameter.

    transformers 5 renames some modules in memory (Swin's `attention.self.query` became
    `swin....attention.q_proj`, for one) and maps the names back when saving, so only the saved
    key is the same on 4.x and 5.x. Found by experiment, not from either version's tables: each
    distinct parameter is filled with its own index, the model is saved to a temp folder and the
    file read back; the originals are restored afterwards. Tied parameters share one tensor and
    so one key (the smallest if several were written). A parameter that was not saved, or saved
    reshaped or split, keeps its in-memory name.
    """
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    unique: list[torch.nn.Parameter] = []
    index: dict[int, int] = {}
    for p in model.parameters():  # deduplicated: tied parameters appear once
        index.setdefault(id(p), len(unique))
        if len(unique) < len(index):
            unique.append(p)
    if len(unique) >= 2**24:
        raise ValueError("too many parameters to tag exactly in float32")
    saved_as: dict[int, str] = {}
    originals = [p.detach().clone() for p in unique]
    try:
        with torch.no_grad():
            for i, p in enumerate(unique):
                p.fill_(i)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            for f in sorted(Path(tmp).glob("*.safetensors")):
                for key, t in load_file(f).items():
                    if not t.is_floating_point() or t.numel() == 0:
                        continue
                    i = int(t.flatten()[0].item())
                    if 0 <= i < len(unique) and t.shape == unique[i].shape and bool((t == i).all()):
                        saved_as[i] = min(saved_as.get(i, key), key)
    finally:
        with torch.no_grad():
            for p, o in zip(unique, originals):
                p.copy_(o)
    return {name: saved_as.get(index[id(p)], name) for name, p in model.named_parameters(remove_duplicate=False)}


# transformers classes newer than our lowest supported transformers -> the release that added them
_FIRST_RELEASE = {"SmolVLMModel": (4, 50), "SmolVLMForConditionalGeneration": (4, 50)}


def transformers_class(name: str):
    """`transformers.<name>`, or a clear `ModelFolderError` naming the release that added it.

    Our range starts below some model families (SmolVLM arrived in transformers 4.50), so an
    older install must say so instead of ending in an AttributeError.
    """
    import transformers

    from .errors import ModelFolderError

    cls = getattr(transformers, name, None)
    if cls is None:
        first = _FIRST_RELEASE.get(name)
        need = f"; it needs transformers >= {first[0]}.{first[1]}" if first else ""
        raise ModelFolderError(
            f"the installed transformers {transformers.__version__} has no {name}{need}. "
            f"Upgrade with: pip install -U \"transformers<6\"")
    return cls


def diffusers_version() -> tuple[int, int]:
    """(major, minor) of the installed diffusers.

    Known difference: before 0.39, diffusers' `load_lora_weights` cannot read kohya-format UNet
    LoRA modules outside the 19 blocks (conv_in = input_blocks_0_0, time_embed, out, label_emb):
    it raises ValueError while remapping block ids. MUMU's own loaders read them on every version.
    """
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return major, minor


# transformers 5 saves fast tokenizers as "TokenizersBackend", a class transformers 4 does not have;
# "PreTrainedTokenizerFast" names the same tokenizer.json-backed tokenizer in both.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def make_tokenizer_config_portable(folder) -> bool:
    """Rewrite a saved folder's tokenizer_class so every supported transformers loads it; -> changed."""
    import json
    from pathlib import Path

    from .atomic import atomic_write

    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") != "TokenizersBackend":
        return False
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return True
