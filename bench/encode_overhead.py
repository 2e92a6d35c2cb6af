"""encode() wall time vs a bare forward of the same VLM + adapter on already-prepared tensors.

    python bench/encode_overhead.py [--repeats 7]

Builds a mid-size random Idefics2 (so compute, not Python, dominates as with the real 8B model),
saves it in HF layout with a bundle, loads it through MumuEncoder.from_pretrained and times, in
alternation: `encoder.encode(prompt)` (image padding/resizing, tokenization, vision, LLM, adapter,
weights, layout) and `encoder(prepared_inputs)` under no_grad. Target ratio <= 1.10.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def build(tmp: Path) -> tuple[Path, Path]:
    from peft import get_peft_model_state_dict
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor

    from mumu_core.adapter import AdapterConfig, MumuAdapter
    from mumu_core.bundle import make_config, save_bundle
    from mumu_core.compat import image_processor_class
    from mumu_core.tiny import build_tiny_tokenizer
    from mumu_core.vlm import apply_vlm_lora, load_vlm

    tok = build_tiny_tokenizer()
    cfg = Idefics2Config(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=980, patch_size=14),
        perceiver_config=dict(resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                              num_key_value_heads=1),
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    torch.manual_seed(0)
    vlm_dir = tmp / "vlm"
    Idefics2ForConditionalGeneration(cfg).save_pretrained(vlm_dir)
    Idefics2Processor(image_processor=image_processor_class("idefics2")(), tokenizer=tok).save_pretrained(vlm_dir)
    vlm = load_vlm(vlm_dir)
    adapter_cfg = AdapterConfig(input_dim=512, width=512, depth=6, heads=8)
    lora = get_peft_model_state_dict(apply_vlm_lora(vlm.model, vlm.family, rank=8, alpha=8))
    bundle = save_bundle(tmp / "bundle.safetensors",
                         make_config(vlm_family="idefics2", vlm_hidden_size=512, vlm_num_layers=6,
                                     adapter=adapter_cfg.to_dict(), vlm_lora={"rank": 8, "alpha": 8}),
                         MumuAdapter(adapter_cfg).state_dict(), lora, {})
    return vlm_dir, bundle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from mumu_core.encoder import MumuEncoder
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    with tempfile.TemporaryDirectory() as d:
        vlm_dir, bundle = build(Path(d))
        enc = MumuEncoder.from_pretrained(vlm_dir, bundle)
        images = [Image.new("RGB", (640, 480), (200, 40, 40)), Image.new("RGB", (512, 768), (40, 200, 40)),
                  Image.new("RGB", (800, 600), (40, 40, 200))]
        prompt = InterleavedPrompt.parse("a <image> man and his <image> dog in an <image> animated style",
                                         [PromptImage(im, tokens_per_image=324) for im in images])
        prepared = enc.prepare([prompt])
        enc.encode(prompt)  # warm-up
        encode_t, forward_t = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            enc.encode(prompt)
            encode_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                enc(prepared)
            forward_t.append(time.perf_counter() - t)
        e, f = statistics.median(encode_t), statistics.median(forward_t)
        print(f"encode() median {e * 1000:.1f} ms, bare forward median {f * 1000:.1f} ms over {args.repeats} runs")
        print(json.dumps({"encode_vs_forward": round(e / f, 3), "encode_ms": round(e * 1000, 1),
                          "forward_ms": round(f * 1000, 1), "tokens": int(prepared.tokens.input_ids.shape[1])}))


if __name__ == "__main__":
    main()
