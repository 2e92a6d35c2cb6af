"""Benchmark: streamed LoRA merge vs plain file copy vs naive load-everything merge, on a full-size SDXL file.

Writes (streaming, never in RAM) a synthetic SDXL single-file checkpoint with the real names and
shapes (UNet 1680 tensors from the SDXL config, CLIP-L, OpenCLIP-bigG, VAE; random fp16 data,
~6.9 GB) and a rank-8 LoRA on every attention projection, then measures in the same run, each in
its own subprocess (peak RSS = the child's VmHWM from /proc/self/status):
  copy          shutil.copyfile + fsync (the I/O floor)
  merge         mumu_core.merge.merge_checkpoint (what `mumu merge` runs)
  merge_hash    the same with `--hash-checkpoint` (sha256 of the finetune computed while streaming)
  naive         safetensors load_file -> W + delta for each LoRA'd weight -> save_file
copy and the merges alternate and each keeps its best of --repeat runs (shared machines are noisy).
Prints a table, then as the last line one JSON object. Cleans up its files.

  python bench/merge_throughput.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024 ** 3

CHILD_PRELUDE = """
import json, os, sys, time
def peak_rss_gib():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024 / 1024 ** 3
"""

CHILD = {
    "copy": """
import shutil
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
shutil.copyfile(src, dst)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gib": peak_rss_gib()}))
""",
    "merge": """
import torch
from mumu_core.merge import merge_checkpoint
src, dst, lora = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
r = merge_checkpoint(src, dst, lora=lora, strength=1.0, hash_checkpoint=len(sys.argv) > 4)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gib": peak_rss_gib(),
                  "delta_retained": r.delta_retained, "delta_relative_error": r.delta_relative_error,
                  "tensors_changed": r.tensors_changed}))
""",
    "naive": """
import torch
from safetensors.torch import load_file, save_file
src, dst, lora = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
sd = load_file(src)
lo = load_file(lora)
for stem in {k.split('.')[0] for k in lo}:
    cand = NAMES[stem]  # kohya stem -> checkpoint key (stems lose the dots)
    up, down = lo[stem + '.lora_up.weight'].float(), lo[stem + '.lora_down.weight'].float()
    scale = lo[stem + '.alpha'].item() / down.shape[0]
    w = sd[cand]
    sd[cand] = (w.float() + scale * (up @ down)).to(w.dtype)
save_file(sd, dst)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gib": peak_rss_gib()}))
""",
}


def _clip_l_shapes() -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768, vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    # transformers 5 drops the `text_model.` level from CLIPTextModel's keys; SDXL files keep it
    return {f"conditioner.embedders.0.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}":
            tuple(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}


def _open_clip_bigg_shapes() -> dict[str, tuple[int, ...]]:
    # OpenCLIP ViT-bigG/14 text tower in open_clip's own layout (what SDXL single files carry)
    p, w, mlp = "conditioner.embedders.1.model.", 1280, 5120
    shapes = {f"{p}token_embedding.weight": (49408, w), f"{p}positional_embedding": (77, w),
              f"{p}ln_final.weight": (w,), f"{p}ln_final.bias": (w,), f"{p}text_projection": (w, w),
              f"{p}logit_scale": ()}
    for i in range(32):
        r = f"{p}transformer.resblocks.{i}."
        shapes.update({f"{r}ln_1.weight": (w,), f"{r}ln_1.bias": (w,), f"{r}attn.in_proj_weight": (3 * w, w),
                       f"{r}attn.in_proj_bias": (3 * w,), f"{r}attn.out_proj.weight": (w, w),
                       f"{r}attn.out_proj.bias": (w,), f"{r}ln_2.weight": (w,), f"{r}ln_2.bias": (w,),
                       f"{r}mlp.c_fc.weight": (mlp, w), f"{r}mlp.c_fc.bias": (mlp,),
                       f"{r}mlp.c_proj.weight": (w, mlp), f"{r}mlp.c_proj.bias": (w,)})
    return shapes


def _vae_shapes() -> dict[str, tuple[int, ...]]:
    import torch
    from diffusers import AutoencoderKL

    from mumu_core.sdxl.single_file import LDM_VAE_PREFIX, vae_diffusers_to_ldm

    cfg = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    ldm = vae_diffusers_to_ldm(vae.state_dict(), cfg)
    return {LDM_VAE_PREFIX + k: tuple(v.shape) for k, v in ldm.items()}


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    from mumu_core.sdxl import keys as K

    shapes = {K.LDM_UNET_PREFIX + k: s for k, s in K.ldm_unet_shapes(K.SDXL_BASE_UNET_CONFIG).items()}
    shapes.update(_clip_l_shapes())
    shapes.update(_open_clip_bigg_shapes())
    shapes.update(_vae_shapes())
    return shapes


def write_synthetic_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Stream random fp16 data with the given names/shapes to `path`; returns the file size."""
    import torch

    from mumu_core.safetensors_io import build_header_bytes

    entries = [(k, "F16", s) for k, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 * 1024 * 1024, generator=g) * 0.02).half().numpy().tobytes()  # 128 MB of noise
    pos = 0
    with open(path, "wb") as f:
        f.write(build_header_bytes(entries, {"modelspec.architecture": "stable-diffusion-xl-v1-base",
                                             "modelspec.title": "synthetic SDXL (random weights)"}))
        for _, _, shape in entries:
            n = 2
            for d in shape:
                n *= d
            while n:
                take = min(n, len(pool) - pos)
                f.write(memoryview(pool)[pos:pos + take])
                pos = (pos + take) % (len(pool) - 2)  # stays 2-byte aligned; drifts so tensors differ
                n -= take
        f.flush()
        os.fsync(f.fileno())
    _drop_cache(path)
    return path.stat().st_size


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]], rank: int = 8) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    from mumu_core.sdxl import keys as K

    g = torch.Generator().manual_seed(1)
    sd, names = {}, {}
    for key, shape in shapes.items():
        if key.startswith(K.LDM_UNET_PREFIX) and key.endswith(
                tuple(f"{a}.{p}.weight" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))):
            stem = K.kohya_stem(key[len(K.LDM_UNET_PREFIX):-len(".weight")])
            sd[f"{stem}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
            sd[f"{stem}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
            sd[f"{stem}.alpha"] = torch.tensor(float(rank))
            names[stem] = key
    save_file(sd, str(path))
    return names


def _drop_cache(path: Path) -> None:
    # start every measurement with the input out of the page cache (this file only; harmless)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_child(kind: str, args: list[str], names: dict[str, str]) -> dict:
    code = CHILD_PRELUDE + (f"NAMES = {json.dumps(names)}\n" if kind == "naive" else "") + CHILD[kind]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="folder for the temporary files (needs ~21 GB free)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and LoRA")
    ap.add_argument("--repeat", type=int, default=2, help="runs of copy/merge each, best kept (default 2)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mumu_merge_bench_", dir=args.workdir))
    try:
        free = shutil.disk_usage(work).free
        if free < 24e9:
            raise SystemExit(f"need ~24 GB free in {work}, have {free / 1e9:.1f} GB (use --workdir)")
        ckpt, lora, out = work / "sdxl_synthetic.safetensors", work / "lora_r8.safetensors", work / "out.safetensors"
        t = time.perf_counter()
        shapes = sdxl_shapes()
        size = write_synthetic_checkpoint(ckpt, shapes)
        names = write_lora(lora, shapes)
        print(f"synthetic SDXL: {len(shapes)} tensors, {size / 1e9:.2f} GB, written in {time.perf_counter() - t:.1f} s;"
              f" rank-8 LoRA on {len(names)} attention projections", flush=True)
        results: dict[str, dict] = {}
        # shared, noisy machines: alternate the fast runs and keep each one's best of `--repeat`
        order = [k for _ in range(args.repeat) for k in ("copy", "merge", "merge_hash")] + ["naive"]
        for kind in order:
            _drop_cache(ckpt)
            extra = ["--hash-checkpoint"] if kind == "merge_hash" else []
            r = run_child(kind.split("_")[0], [str(ckpt), str(out), str(lora), *extra], names)
            print(f"{kind:13s} {r['seconds']:7.1f} s  {size / r['seconds'] / 1e9:5.2f} GB/s  "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
            if kind not in results or r["seconds"] < results[kind]["seconds"]:
                results[kind] = dict(r, peak_rss_gib=max(r["peak_rss_gib"], results.get(kind, r)["peak_rss_gib"]))
            out.unlink(missing_ok=True)
        summary = {
            "checkpoint_gb": round(size / 1e9, 3),
            "copy_s": round(results["copy"]["seconds"], 2),
            "merge_s": round(results["merge"]["seconds"], 2),
            "naive_s": round(results["naive"]["seconds"], 2),
            "merge_hash_s": round(results["merge_hash"]["seconds"], 2),
            "merge_vs_copy": round(results["copy"]["seconds"] / results["merge"]["seconds"], 3),
            "merge_hash_vs_copy": round(results["copy"]["seconds"] / results["merge_hash"]["seconds"], 3),
            "naive_vs_copy": round(results["copy"]["seconds"] / results["naive"]["seconds"], 3),
            "copy_peak_rss_gib": round(results["copy"]["peak_rss_gib"], 3),
            "merge_peak_rss_gib": round(results["merge"]["peak_rss_gib"], 3),
            "naive_peak_rss_gib": round(results["naive"]["peak_rss_gib"], 3),
            "lora_modules": len(names),
            "merge_tensors_changed": results["merge"]["tensors_changed"],
            "merge_delta_retained_fp16": results["merge"]["delta_retained"],
            "merge_delta_relative_error_fp16": results["merge"]["delta_relative_error"],
        }
        print(json.dumps(summary))
        return 0
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
