"""VLM memory with 8-bit weight storage (fp8_e4m3fn, int8) vs bf16, and how close the conditioning stays.

Builds a mid-size random Idefics2 (SigLIP-style vision tower, Mistral-style LLM, ~35 M params,
shaped so linear layers dominate as they do in Idefics2-8B) and a bundle for it, then in one run,
each variant in its own subprocess so peaks do not mix:
  bf16:  MumuEncoder.from_pretrained(dtype=bf16)
  fp8:   MumuEncoder.from_pretrained(dtype=bf16, weight_storage="fp8_e4m3fn")
  int8:  MumuEncoder.from_pretrained(dtype=bf16, weight_storage="int8")        (per-row scales)
and encodes the same 2-image prompt. Reports the encoder's weight bytes, its peak resident memory
while encoding (Linux VmHWM, reset after loading, minus the process before loading), and the
cosine similarity of each context with bf16's (plus bf16 vs fp32 for scale).

Last line: one JSON object, e.g. {"fp8_vs_bf16_weight_bytes": 0.52, "context_cosine_fp8_vs_bf16": 0.992,
"int8_vs_bf16_weight_bytes": 0.52, "context_cosine_int8_vs_bf16": 0.998, ...}.
Targets: weight bytes <= 0.55, cosine >= 0.995 (fp8's 3 mantissa bits stay below it; int8 meets it).

    python bench/vlm_memory.py      # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build(out: Path) -> tuple[Path, Path]:
    import torch
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor

    from mumu_core.adapter import AdapterConfig, MumuAdapter
    from mumu_core.bundle import make_config, save_bundle
    from mumu_core.compat import image_processor_class
    from mumu_core.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2688, num_hidden_layers=4,
                num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, model_type="mistral")
    config = Idefics2Config(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                           image_size=112, patch_size=14),
        perceiver_config=dict(resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                              num_key_value_heads=1, hidden_size=768, rms_norm_eps=1e-5),
        text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    vlm_dir = out / "idefics2-mid"
    Idefics2ForConditionalGeneration(config).save_pretrained(vlm_dir)
    Idefics2Processor(image_processor=image_processor_class("idefics2")(do_image_splitting=False),
                      tokenizer=tokenizer, image_seq_len=64).save_pretrained(vlm_dir)
    adapter_cfg = AdapterConfig(input_dim=768, width=192, depth=2, heads=4).to_dict()
    adapter = MumuAdapter(AdapterConfig.from_dict(adapter_cfg))
    bundle_cfg = make_config(vlm_family="idefics2", vlm_hidden_size=768, vlm_num_layers=4, adapter=adapter_cfg,
                             tokens_per_image=64, provenance={"kind": "bench/vlm_memory.py random weights"})
    bundle = save_bundle(out / "mid.safetensors", bundle_cfg, adapter.state_dict())
    return vlm_dir, bundle


def child(mode: str, vlm_dir: str, bundle: str, out: str) -> None:
    import gc

    import numpy as np
    import torch

    from mumu_core.encoder import MumuEncoder
    from mumu_core.weight_storage import weight_bytes
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    images = [PromptImage(rng.random((200, 160, 3)).astype("float32"), tokens_per_image="auto") for _ in range(2)]
    prompt = InterleavedPrompt.parse("a <image> man and his <image> dog in a park", images)
    gc.collect()
    base = _rss_kib("VmRSS")
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    storage = {"fp8": "fp8_e4m3fn", "int8": "int8"}.get(mode)
    encoder = MumuEncoder.from_pretrained(vlm_dir, bundle, dtype=dtype, weight_storage=storage)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    loaded = _rss_kib("VmRSS")
    cond = encoder.encode(prompt)
    peak = _rss_kib("VmHWM")
    torch.save({"context": cond.context.float(), "weight_bytes": weight_bytes(encoder),
                "vlm_weight_bytes": weight_bytes(encoder.vlm), "loaded_kib": loaded - base, "peak_kib": peak - base,
                "params": sum(p.numel() for p in encoder.parameters())}, out)


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory(prefix="mumu-vlm-memory-") as tmp:
        tmp = Path(tmp)
        vlm_dir, bundle = build(tmp)
        res = {}
        for mode in ("bf16", "fp8", "int8", "fp32"):
            out = tmp / f"{mode}.pt"
            subprocess.run([sys.executable, __file__, "--child", mode, str(vlm_dir), str(bundle), str(out)], check=True,
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            res[mode] = torch.load(out, weights_only=True)

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    for mode, r in res.items():
        print(f"{mode:>5}: encoder weights {r['weight_bytes'] / 2**20:7.1f} MiB (VLM {r['vlm_weight_bytes'] / 2**20:7.1f}), "
              f"resident after load {r['loaded_kib'] / 1024:7.1f} MiB, peak while encoding {r['peak_kib'] / 1024:7.1f} MiB")
    print(f"params: {res['bf16']['params'] / 1e6:.1f} M; context {list(res['bf16']['context'].shape)}")
    summary = {}
    for mode in ("fp8", "int8"):
        r, ref = res[mode], res["bf16"]
        summary.update({
            f"{mode}_vs_bf16_weight_bytes": round(r["weight_bytes"] / ref["weight_bytes"], 4),
            f"{mode}_vs_bf16_vlm_weight_bytes": round(r["vlm_weight_bytes"] / ref["vlm_weight_bytes"], 4),
            f"{mode}_vs_bf16_peak_memory": round(r["peak_kib"] / ref["peak_kib"], 4),
            f"context_cosine_{mode}_vs_bf16": round(cos(r["context"], ref["context"]), 5),
            f"context_cosine_{mode}_vs_fp32": round(cos(r["context"], res["fp32"]["context"]), 5),
        })
    summary["context_cosine_bf16_vs_fp32"] = round(cos(res["bf16"]["context"], res["fp32"]["context"]), 5)
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
