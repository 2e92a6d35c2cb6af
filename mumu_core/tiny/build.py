"""Tiny offline components, written in the same layouts as the real ones.

`mumu tiny --out DIR` writes:
  vlm/             tiny Idefics2 (HF layout: config.json, model.safetensors, tokenizer, processor)
  vlm_idefics3/    tiny Idefics3 (the smaller, pixel-shuffle family)
  mumu_tiny.safetensors   a bundle (adapter + VLM LoRA + UNet LoRA) that fits vlm/ and sdxl/
  sdxl/            tiny SDXL-topology pipeline in diffusers layout (UNet + VAE + scheduler)
  sdxl_tiny.safetensors   the same SDXL as an original-layout single-file checkpoint
  detectors/grounding_dino, detectors/owlv2   tiny detectors for `mumu bootstrap`
  images/          the sample images the demo uses

Everything is random-initialised from fixed seeds and goes through `save_pretrained` /
safetensors, so tests and the demo exercise the same loading code as real weights.
The tokenizer is a byte-level BPE trained on a small built-in corpus with `tokenizers`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..atomic import atomic_write
from .configs import tiny_unet_config, tiny_vae_config

ASSETS = Path(__file__).parent.parent / "assets"
SAMPLE_IMAGES = ("man.png", "dog.png", "style.png", "scooter.png", "city.png")

_CORPUS = """a man and his dog in an animated style
a woman riding a scooter in new york at night
a portrait of a person with glasses and a hat
a monster wearing armor and playing guitar
a cat sitting on a red chair next to a window
a photo of a car on a street in the city
a painting of a house by a lake with mountains
an astronaut riding a horse on the moon
the quick brown fox jumps over the lazy dog
two people hiking in the wilderness during the day
abstract geometric modernist cubist bold color blocks art deco
""".split("\n")

_IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]


def build_tiny_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with BOS handling like Llama/Mistral's, trained offline on `corpus`
    (default: a small built-in one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([line for line in (corpus or _CORPUS) if line] * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": _IDEFICS_SPECIALS})
    return fast


def _tiny_text_config(vocab_size: int, pad_id: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=pad_id, rms_norm_eps=1e-5)


def write_tiny_idefics2(out: Path, seed: int = 0) -> Path:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor

    from ..compat import image_processor_class

    tokenizer = build_tiny_tokenizer()
    text = dict(_tiny_text_config(len(tokenizer), tokenizer.pad_token_id), model_type="mistral")
    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=980, patch_size=14),
        perceiver_config=dict(resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                              num_key_value_heads=1, hidden_size=text["hidden_size"], rms_norm_eps=text["rms_norm_eps"]),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)  # the class real checkpoints are saved with
    model.save_pretrained(out)
    image_processor = image_processor_class("idefics2")(do_image_splitting=False)
    Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64).save_pretrained(out)
    return out


def write_tiny_idefics3(out: Path, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    from ..compat import image_processor_class

    tokenizer = build_tiny_tokenizer()
    text = dict(_tiny_text_config(len(tokenizer), tokenizer.pad_token_id), model_type="llama")
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=512, patch_size=8),
        text_config=text,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(out)
    image_processor = image_processor_class("idefics3")(do_image_splitting=False)
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16).save_pretrained(out)
    return out


def tiny_adapter_config(input_dim: int) -> dict:
    from ..adapter import AdapterConfig

    return AdapterConfig(input_dim=input_dim, width=64, depth=2, heads=4).to_dict()


def _randomise_lora_b(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """PEFT starts lora_B at zero (a no-op LoRA); a tiny bundle should change something."""
    for name, p in module.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def build_tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config())


def tiny_unet_lora(unet, rank: int = 4, alpha: float = 4.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random rank-`rank` PEFT LoRA on the UNet's attention, converted to kohya keys."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from ..unet_lora import peft_unet_lora_to_kohya

    unet = copy.deepcopy(unet)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    inject_adapter_in_model(config, unet)
    _randomise_lora_b(unet, torch.Generator().manual_seed(seed + 1))
    peft_sd = get_peft_model_state_dict(unet)
    return peft_unet_lora_to_kohya(peft_sd, dict(unet.config), alpha=alpha)


def write_tiny_bundle(path: Path, vlm_dir: Path, unet, seed: int = 0, tokens_per_image: int = 324) -> Path:
    from peft import get_peft_model_state_dict

    from ..adapter import AdapterConfig, MumuAdapter
    from ..bundle import make_config, save_bundle
    from ..vlm import apply_vlm_lora, load_vlm

    vlm = load_vlm(vlm_dir)
    adapter_cfg = tiny_adapter_config(vlm.hidden_size)
    torch.manual_seed(seed)
    adapter = MumuAdapter(AdapterConfig.from_dict(adapter_cfg))
    peft_model = apply_vlm_lora(vlm.model, vlm.family, rank=4, alpha=4.0)
    _randomise_lora_b(peft_model, torch.Generator().manual_seed(seed + 2))
    vlm_lora = get_peft_model_state_dict(peft_model)
    unet_lora = tiny_unet_lora(unet, seed=seed)
    config = make_config(
        vlm_family=vlm.family.name, vlm_hidden_size=vlm.hidden_size, vlm_num_layers=vlm.num_layers,
        adapter=adapter_cfg, tokens_per_image=tokens_per_image,
        vlm_lora={"rank": 4, "alpha": 4.0, "targets": vlm.family.lora_targets},
        unet_lora={"rank": 4, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        provenance={"kind": "tiny random weights for tests and the demo", "seed": seed},
    )
    return save_bundle(path, config, adapter.state_dict(), vlm_lora, unet_lora)


def write_tiny_sdxl(out: Path, unet, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ..pipeline import SDXL_BASE_CONFIG

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config())
    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler")  # SDXL's own
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler,
        text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
    )
    pipe.save_pretrained(out)
    return out


def write_tiny_components(out_dir: str | Path, seed: int = 0, detectors: bool = True) -> dict[str, Path]:
    """Write every tiny component under `out_dir` (skips parts already complete) and return paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "vlm": out / "vlm",
        "vlm_idefics3": out / "vlm_idefics3",
        "bundle": out / "mumu_tiny.safetensors",
        "sdxl": out / "sdxl",
        "sdxl_single_file": out / "sdxl_tiny.safetensors",
        "images": out / "images",
    }
    _atomic_dir(paths["vlm"], lambda d: write_tiny_idefics2(d, seed))
    _atomic_dir(paths["vlm_idefics3"], lambda d: write_tiny_idefics3(d, seed))
    unet = build_tiny_unet(seed)
    _atomic_dir(paths["sdxl"], lambda d: write_tiny_sdxl(d, unet, seed))
    if not paths["bundle"].exists():
        write_tiny_bundle(paths["bundle"], paths["vlm"], unet, seed)
    if not paths["sdxl_single_file"].exists():
        from ..sdxl.single_file import diffusers_folder_to_single_file

        diffusers_folder_to_single_file(paths["sdxl"], paths["sdxl_single_file"])
    _atomic_dir(paths["images"], _copy_sample_images)
    if detectors:
        from mumu_training.bootstrap.tiny_detectors import write_tiny_detectors

        det = out / "detectors"
        if not (det / "grounding_dino" / "config.json").exists() or not (det / "owlv2" / "config.json").exists():
            paths.update({k: Path(v) for k, v in write_tiny_detectors(det).items()})
        else:
            paths.update({"grounding_dino": det / "grounding_dino", "owlv2": det / "owlv2"})
    listing = json.dumps({k: str(v) for k, v in paths.items()}, indent=2)
    atomic_write(out / "tiny_components.json", lambda tmp: Path(tmp).write_text(listing))
    return paths


def _copy_sample_images(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_IMAGES:
        shutil.copy2(ASSETS / name, dest / name)
    return dest


def _atomic_dir(final: Path, build) -> None:
    """Build into a temp sibling folder and rename, so an interrupted run leaves no half folder."""
    if final.exists():
        return
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
