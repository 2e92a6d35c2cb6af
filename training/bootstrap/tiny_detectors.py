"""Tiny, randomly initialised Grounding DINO and OWLv2 in Hugging Face layout, built offline.

`write_tiny_detectors(out_dir)` -> {"grounding_dino": path, "owlv2": path}; `mumu tiny` calls it.
Each folder holds config.json, model.safetensors, tokenizer files and processor_config.json, i.e.
what `save_pretrained` writes for the real checkpoints, so `mumu bootstrap --detector DIR` runs the
same loading code as for IDEA-Research/grounding-dino-* or google/owlv2-*.

Tokenizers are built offline from a small built-in corpus: a WordPiece vocab of its words wrapped
in BertTokenizerFast (Grounding DINO's text tower is BERT) and a CLIP-style byte-level BPE wrapped
in a CLIP tokenizer (OWLv2; `mumu_core.compat.clip_tokenizer`, which differs between transformers
4.x and 5.x). Both vocabularies are computed here, not by `tokenizers`' trainers, whose tie-breaks
follow hash-map order and so change from run to run.

Weights are a pure function of (config, seed), the same on every transformers version: the
library's own initialisation (its order of random draws and its per-module defaults changed
between 4.x and 5.x) is overwritten by `deterministic_init`, which draws each parameter from a
generator seeded by a hash of (seed, the key the parameter is saved under). Box heads end in a small random layer with
a positive bias on (w, h) (a head drawn like the other layers saturates the sigmoid into
degenerate boxes): boxes then scatter around the anchors at sizes where some pass the paper's
size filters and some do not, which keeps tests meaningful.
"""

from __future__ import annotations

import hashlib
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

from mumu_core.compat import checkpoint_parameter_names, clip_tokenizer, image_processor_class


GDINO_SIZE_BIAS = 0.75  # measured: ~12% of the tiny detector's boxes on the test images fall under 8,000 px²
OWL_SIZE_BIAS = 2.0


def _corpus_words(normalizer, pre_tokenizer) -> list[str]:
    """The corpus's pre-tokens in order of first appearance (each once)."""
    words: dict[str, None] = {}
    for line in _CORPUS:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words.setdefault(word)
    return list(words)


def learn_bpe_merges(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair, ties to the smallest pair, until none occurs twice.

    Written out because `tokenizers`' trainers break ties in hash-map order, which changes between
    runs: the vocab (and so the token ids the models see) must be a function of the corpus alone.
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def build_tiny_bert_tokenizer():
    """WordPiece over the corpus's whole words, with every single character (and its ## form) as fallback.

    Built directly rather than trained: deterministic, so the same ids on every run and version.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = _corpus_words(normalizer, pre_tokenizer)
    chars = sorted(set("".join(words)) | set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = specials + chars + [f"##{c}" for c in chars] + sorted(set(words) - set(chars))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=256)


def build_tiny_clip_tokenizer(vocab_size: int = 400):
    """CLIP-style byte-level BPE learnt on the corpus (`learn_bpe_merges`): the 256 byte symbols, the
    word-final forms ("x</w>") of printable ASCII and of the corpus's symbols, then one token per
    merge, up to vocab_size."""
    import string

    from tokenizers import pre_tokenizers

    probe = clip_tokenizer()  # empty vocab; lends CLIP's normalizer and pre-tokenizer
    counts: dict[tuple[str, ...], int] = {}
    for line in _CORPUS:
        text = probe._tokenizer.normalizer.normalize_str(line)
        for word, _ in probe._tokenizer.pre_tokenizer.pre_tokenize_str(text):
            symbols = (*word[:-1], word[-1] + "</w>")
            counts[symbols] = counts.get(symbols, 0) + 1
    # OWLv2 masks a query whose first id is 0, so <|startoftext|> must not get id 0 (CLIP's is 49406).
    tokens = ["<|endoftext|>", "<|startoftext|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    finals = {w[-1] for w in counts} | {f"{c}</w>" for c in string.ascii_lowercase + string.digits + string.punctuation}
    tokens += sorted(finals - set(tokens))
    merges = learn_bpe_merges(counts, vocab_size - len(tokens))
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    return clip_tokenizer({t: i for i, t in enumerate(tokens)}, merges, model_max_length=16)


INIT_STD = 0.02


def _param_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()  # not hash(): str hashing is salted
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def deterministic_init(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Re-draw every parameter from (seed, its checkpoint key) alone, whatever the library did at construction.

    Norm layers get weight 1 and bias 0, other biases 0, everything else normal(0, std) drawn on
    the CPU in float32 from its own generator (so neither the order of parameters nor the global
    RNG matters); embedding padding rows are zeroed. The name hashed is the key the parameter is
    saved under (`mumu_core.compat.checkpoint_parameter_names`: transformers 5 renames some
    modules in memory); tied parameters (one tensor under several names) are drawn once.
    """
    saved = checkpoint_parameter_names(model)
    owners = {}  # in-memory parameter name -> module holding it
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    with torch.no_grad():
        for name, p in model.named_parameters():  # deduplicated: a tied tensor once
            module, key = owners[name], saved[name]
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in type(module).__name__.lower() and leaf == "weight":
                value = torch.ones(p.shape)
            elif leaf == "bias":
                value = torch.zeros(p.shape)
            else:
                value = torch.empty(p.shape).normal_(0.0, std, generator=_param_generator(seed, key))
                pad = getattr(module, "padding_idx", None)
                if isinstance(module, torch.nn.Embedding) and pad is not None:
                    value[pad] = 0.0
            p.copy_(value.to(p.dtype))


def _tame_box_head(heads, size_bias: float) -> None:
    """A positive bias on (w, h) of each box head's last layer (its weight is small already): varied,
    medium-sized boxes."""
    for module in heads:
        last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
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
    model = GroundingDinoForObjectDetection(config).eval()
    deterministic_init(model, seed)
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
    model = Owlv2ForObjectDetection(config).eval()
    deterministic_init(model, seed)
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
