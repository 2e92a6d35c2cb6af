"""Tiny, randomly initialised Grounding DINO and OWLv2 in Hugging Face layout, built offline.

`write_tiny_detectors(out_dir)` -> {"grounding_dino": path, "owlv2": path}; `mumu tiny` calls it.
Each folder holds config.json, model.safetensors, tokenizer files and processor_config.json, i.e.
what `save_pretrained` writes for the real checkpoints, so `mumu bootstrap --detector DIR` runs the
same loading code as for IDEA-Research/grounding-dino-* or google/owlv2-*.

Tokenizers are trained offline with `tokenizers` on a small built-in corpus: a WordPiece vocab
wrapped in BertTokenizerFast (Grounding DINO's text tower is BERT) and a CLIP-style byte-level BPE
wrapped in a CLIP tokenizer (OWLv2; `mumu_core.compat.clip_tokenizer`, which differs between
transformers 4.x and 5.x). Weights come from fixed seeds. Random box heads saturate the sigmoid
and emit degenerate (zero-width) boxes, so their last layer is re-drawn small with a positive
size bias: boxes then scatter around the anchors at sizes where some pass the paper's size filters
and some do not, which keeps tests meaningful.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_CORPUS = """a man and his dog in an animated style
a woman riding a red scooter in new york at night
a portrait of a person with glasses and a hat
a cat sitting on a chair next to a window
a photo of a car on a street in the city
two people hiking in the wilderness during the day
a head . a face . a person . a girl and a boy
""".splitlines()

from mumu_core.compat import clip_tokenizer, image_processor_class


GDINO_SIZE_BIAS = 1.0
OWL_SIZE_BIAS = 2.0


def build_tiny_bert_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([l for l in _CORPUS if l] * 4,
                            trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=256)


def build_tiny_clip_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    probe = clip_tokenizer()  # empty vocab; lends CLIP's normalizer and pre-tokenizer for training
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = probe._tokenizer.normalizer
    tok.pre_tokenizer = probe._tokenizer.pre_tokenizer
    # OWLv2 masks a query whose first id is 0, so <|startoftext|> must not get id 0 (CLIP's is 49406).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|startoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([l for l in _CORPUS if l] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return clip_tokenizer(model["vocab"], merges, model_max_length=16)


def _tame_box_head(heads, size_bias: float, std: float = 0.02) -> None:
    """Small random last layer + a positive bias on (w, h): varied, medium-sized boxes."""
    done = set()  # heads may share (tie) weights: set each tensor once
    for module in heads:
        last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
        if last.weight.data_ptr() in done:
            continue
        done.add(last.weight.data_ptr())
        with torch.no_grad():
            last.weight.normal_(0.0, std)
            last.bias.copy_(torch.tensor([0.0, 0.0, size_bias, size_bias]))


def write_tiny_grounding_dino(out: Path, seed: int = 0) -> Path:
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)

    tokenizer = build_tiny_bert_tokenizer()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=128, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=256),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=30, num_feature_levels=4,
        encoder_n_points=2, decoder_n_points=2, max_text_len=64,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    _tame_box_head([*model.bbox_embed, model.model.encoder_output_bbox_embed], GDINO_SIZE_BIAS)
    # 128 px short side: the smallest size the tiny Swin + deformable attention handle.
    processor = GroundingDinoProcessor(image_processor_class("grounding_dino")(size={"shortest_edge": 128, "longest_edge": 192}),
                                       tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_owlv2(out: Path, seed: int = 0) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    tokenizer = build_tiny_clip_tokenizer()
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    _tame_box_head([model.box_head], OWL_SIZE_BIAS)
    processor = Owlv2Processor(image_processor_class("owlv2")(size={"height": 64, "width": 64}), tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_detectors(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write both tiny detectors under out_dir (each folder built in a temp name, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in (("grounding_dino", write_tiny_grounding_dino), ("owlv2", write_tiny_owlv2)):
        final = out / name
        if not (final / "config.json").is_file():
            tmp = out / f".{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp, seed)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        paths[name] = final
    return paths
