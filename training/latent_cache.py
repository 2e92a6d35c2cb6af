"""Cached VAE latents of training targets (what kohya's / OneTrainer's `cache_latents` do).

At 1024² the VAE encode is a large share of a training step, and a target's latent never
changes: same image, same bucket, same crop, same VAE -> same latent distribution. The cache
stores the VAE's latent *distribution* (mean and log-variance, `latent_dist.parameters`) of every
target once, as one small safetensors file per target; training then draws
``mean + std * noise`` from it with the step's generator, exactly what ``vae.encode(x)
.latent_dist.sample(generator)`` would draw, so a cached run trains on the same numbers.

Keys: sha256 of the target's pixels (the image content after the bucket resize and crop) together
with the bucket, the crop offset and the original size. Files live under
``DIR/<vae fingerprint>/<key[:2]>/<key>.safetensors``; the fingerprint hashes the VAE's config,
every weight and the encode dtype. Change the image, the bucket list, the crop or the VAE and the
key no longer matches: the entry is recomputed (old entries are simply no longer read; delete the
folder to reclaim space). Entries persist across epochs, runs and resumes; a truncated or
unreadable file counts as a miss and is rewritten.

Filled on the fly (the first epoch encodes and writes, later epochs only read) or ahead of time,
optionally sharded across processes (each process takes every N-th record)::

    python -m mumu_training.latent_cache --config training/configs/stage1.yaml
    accelerate launch --num_processes 8 -m mumu_training.latent_cache --config training/configs/stage1.yaml

Not compatible with target augmentation: a random target crop (``data.sample.target_crop:
random``) makes a different target every epoch, so nothing would ever be reused while the cache
grew without bound; the config is refused. (Conditioning-image augmentation is unaffected: it
never touches the target.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mumu_core.errors import MumuError

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LatentCacheConfig:
    enabled: bool = False
    dir: str | None = None             # default: <data.annotations>/latent_cache (shared by runs on that data)
    dtype: str = "float16"             # storage dtype of mean/log-variance (float32 for bit-exact resumes of uncached runs)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise MumuError(f"data.latent_cache.dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}.")
        if not isinstance(self.enabled, bool):
            raise MumuError(f"data.latent_cache.enabled must be true or false; got {self.enabled!r}.")


def refuse_target_augmentation(builder_cfg) -> None:
    if getattr(builder_cfg, "target_crop", "center") != "center":
        raise MumuError(
            "data.latent_cache.enabled with data.sample.target_crop: random — a cached latent is one fixed "
            "(image, bucket, crop); a random target crop makes a new target every epoch, so the cache would never "
            "be reused and would grow without bound. Use target_crop: center with the cache, or turn the cache off.")


def content_key(target, bucket: str, crop_top_left: Sequence[int], original_size: Sequence[int]) -> str:
    """sha256 over the target pixels (PIL RGB) + bucket + crop + original size."""
    arr = np.ascontiguousarray(np.asarray(target.convert("RGB"), dtype=np.uint8))
    h = hashlib.sha256()
    h.update(f"mumu-latent-v{CACHE_VERSION}|{bucket}|{tuple(int(x) for x in crop_top_left)}|"
             f"{tuple(int(x) for x in original_size)}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def sample_key(sample) -> str:
    return content_key(sample.target, sample.bucket or f"{sample.target.width}x{sample.target.height}",
                       sample.crop_top_left, sample.original_size)


def vae_fingerprint(vae, encode_dtype: torch.dtype | None = None) -> str:
    """Config + every weight + encode dtype: a different or finetuned VAE gets its own cache folder."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(encode_dtype or next(vae.parameters()).dtype).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_latents(params: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw from cached `latent_dist.parameters` exactly as diffusers' DiagonalGaussianDistribution
    .sample(generator) does (same clamp, same noise draw), unscaled."""
    mean, logvar = torch.chunk(params, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    gen_device = generator.device if generator is not None else params.device
    noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=params.dtype).to(params.device)
    return mean + std * noise


class LatentCache:
    """One folder per VAE fingerprint; `params(samples, encode)` returns [B, 2C, h, w] on the way."""

    def __init__(self, root: str | Path, vae, *, dtype: str = "float16") -> None:
        self.fingerprint = vae_fingerprint(vae)
        self.dir = Path(root) / self.fingerprint[:16]
        self.store_dtype = _DTYPES[dtype]
        self.hits = self.misses = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "cache.json"
        if not info.is_file():
            from mumu_core.atomic import atomic_write

            meta = {"version": CACHE_VERSION, "vae_fingerprint": self.fingerprint, "dtype": dtype,
                    "vae_config": {k: v for k, v in dict(vae.config).items() if not str(k).startswith("_")}}
            atomic_write(info, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, default=str)))

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return f.get_tensor("params")
        except Exception as exc:  # truncated / foreign file: recompute it
            log.warning("latent cache entry %s unreadable (%s); recomputing", p, exc)
            return None

    def put(self, key: str, params: torch.Tensor, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        from mumu_core.atomic import atomic_write

        tensor = params.detach().to("cpu", self.store_dtype).contiguous()
        metadata = {"key": key, "version": str(CACHE_VERSION), **{k: str(v) for k, v in (meta or {}).items()}}
        atomic_write(self.path(key), lambda tmp: save_file({"params": tensor}, tmp, metadata=metadata))

    def params(self, samples: Sequence, encode: Callable[[torch.Tensor], torch.Tensor],
               keys: Sequence[str] | None = None) -> torch.Tensor:
        """Latent-distribution parameters for the samples' targets: cached ones read, the rest
        encoded in one batch (`encode(pixels [n,3,H,W] in [-1,1]) -> parameters`) and written."""
        keys = list(keys) if keys is not None else [sample_key(s) for s in samples]
        found = [self.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            pixels = torch.stack([samples[i].target_tensor() for i in missing])
            with torch.no_grad():
                fresh = encode(pixels).detach()
            for j, i in enumerate(missing):
                s = samples[i]
                self.put(keys[i], fresh[j], {"bucket": s.bucket, "crop_top_left": list(s.crop_top_left),
                                             "original_size": list(s.original_size), "record_id": s.record_id})
                found[i] = fresh[j].to("cpu", self.store_dtype)
        return torch.stack([t.float() for t in found])

    def take_counts(self) -> tuple[int, int]:
        out = (self.hits, self.misses)
        self.hits = self.misses = 0
        return out


def resolve_config(data_cfg) -> LatentCacheConfig:
    """DataConfig.latent_cache (a mapping) -> LatentCacheConfig with the default folder filled in."""
    raw = dict(getattr(data_cfg, "latent_cache", None) or {})
    try:
        cfg = LatentCacheConfig(**raw)
    except TypeError:
        valid = ["enabled", "dir", "dtype"]
        raise MumuError(f"data.latent_cache: unknown key(s) {sorted(set(raw) - set(valid))}; valid keys: {valid}.") from None
    if cfg.dir is None:
        cfg.dir = str(Path(data_cfg.annotations) / "latent_cache")
    return cfg


# ---------------------------------------------------------------- ahead-of-time fill (sharded)

def fill(cfg, *, rank: int = 0, world: int = 1, batch_size: int = 8, device="cpu", progress: bool = True) -> dict:
    """Encode every record's target this process owns (record i with i % world == rank)."""
    from mumu_core.pipeline import load_sdxl_pipeline

    from .bootstrap.imageio import ImageSkip, load_source_image
    from .buckets import apply_crop
    from .config import sample_builder_config
    from .annotation_dataset import AnnotationDataset

    builder_cfg = sample_builder_config(cfg)
    refuse_target_augmentation(builder_cfg)
    lc = resolve_config(cfg.data)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32}.get(cfg.run.mixed_precision, torch.float32)
    vae = load_sdxl_pipeline(cfg.model.sdxl, dtype=dtype, device=device, config=cfg.model.sdxl_config).vae
    vae.requires_grad_(False)
    cache = LatentCache(lc.dir, vae, dtype=lc.dtype)
    ds = AnnotationDataset(cfg.data.annotations, builder_cfg, seed=cfg.run.seed, image_root=cfg.data.image_root)
    mine = range(rank, len(ds), world)

    class _Target:  # the fields `sample_key` / `LatentCache.params` read
        def __init__(self, rec, image):
            crop = ds.builder.target_crop(image.width, image.height, ds.record_bucket(rec))
            self.target, self.bucket, self.crop_top_left = apply_crop(image, crop), crop.bucket.name, crop.crop_top_left
            self.original_size, self.record_id = crop.original_size, str(rec.get("id", ""))

        def target_tensor(self):
            arr = np.asarray(self.target, dtype=np.float32) / 127.5 - 1.0
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def encode(px):
        return vae.encode(px.to(device=device, dtype=vae.dtype)).latent_dist.parameters

    pending: dict[str, list] = {}  # per bucket: one encode batch holds one size
    skipped = 0
    from tqdm.auto import tqdm

    for i in tqdm(mine, desc=f"latents [{rank}/{world}]", disable=not progress):
        rec = ds.record(i)
        try:
            image = load_source_image(rec["source"], ds.image_root)
        except ImageSkip:
            skipped += 1
            continue
        t = _Target(rec, image)
        batch = pending.setdefault(t.bucket, [])
        batch.append(t)
        if len(batch) >= batch_size:
            cache.params(batch, encode)
            pending[t.bucket] = []
    for batch in pending.values():
        if batch:
            cache.params(batch, encode)
    return {"records": len(mine), "encoded": cache.misses, "already_cached": cache.hits, "skipped": skipped,
            "dir": str(cache.dir)}


def main(argv=None) -> int:
    import argparse
    import sys

    from .config import load_config

    p = argparse.ArgumentParser(description="Fill the latent cache of a training config ahead of time.")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    try:
        import yaml

        overrides = {k.strip(): yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
        overrides.setdefault("data.latent_cache.enabled", True)
        cfg = load_config(args.config, overrides)
        if cfg.tiny is not None:
            from .tiny_data import ensure_tiny_assets

            ensure_tiny_assets(cfg)
        rank, world, device = 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
        try:
            from accelerate import PartialState

            state = PartialState()
            rank, world, device = state.process_index, state.num_processes, state.device
        except Exception:  # accelerate missing or not launched: one process
            pass
        print(json.dumps(fill(cfg, rank=rank, world=world, batch_size=args.batch_size, device=device)))
        return 0
    except MumuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
