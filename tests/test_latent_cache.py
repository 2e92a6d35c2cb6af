"""Latent cache: same draws as the VAE path, keyed by content + bucket + crop (+ VAE), invalidation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mumu_core.errors import MumuError
from mumu_training.latent_cache import LatentCache, content_key, refuse_target_augmentation, sample_latents, sample_key
from mumu_training.samples import SampleBuilder, SampleBuilderConfig, sample_rng


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    from mumu_core.tiny.configs import tiny_vae_config

    torch.manual_seed(0)
    return AutoencoderKL(**tiny_vae_config()).eval()


def _samples(seed=0, n=3, size=(96, 64)):
    rng = np.random.default_rng(seed)
    b = SampleBuilder(SampleBuilderConfig(resolution=64, patch_size=2, cond_dropout_prob=0.0, edge_map_prob=0.0))
    return [b.build({"id": str(i), "caption": "a", "crops": []},
                    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), sample_rng(0, 0, i))
            for i in range(n)]


def _encode(vae):
    return lambda px: vae.encode(px).latent_dist.parameters


def test_cached_draw_equals_the_vae_draw(vae):
    px = torch.stack([s.target_tensor() for s in _samples()])
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
        want = dist.sample(generator=torch.Generator().manual_seed(7))
        got = sample_latents(dist.parameters, torch.Generator().manual_seed(7))
    assert torch.equal(want, got)


def test_hits_after_the_first_pass_and_same_numbers(vae, tmp_path):
    samples = _samples()
    cache = LatentCache(tmp_path, vae, dtype="float32")
    first = cache.params(samples, _encode(vae))
    assert cache.take_counts() == (0, 3)
    files = sorted(cache.dir.rglob("*.safetensors"))
    assert len(files) == 3 and (cache.dir / "cache.json").is_file()
    calls = []
    again = LatentCache(tmp_path, vae, dtype="float32")  # a resumed run: a new process, same folder
    second = again.params(samples, lambda px: calls.append(px) or _encode(vae)(px))
    assert again.take_counts() == (3, 0) and not calls
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.allclose(first, _encode(vae)(torch.stack([s.target_tensor() for s in samples])), atol=1e-5)


def test_keys_change_with_content_bucket_crop_and_vae(vae, tmp_path):
    s = _samples(n=1)[0]
    k = sample_key(s)
    assert k == sample_key(_samples(n=1)[0])                       # deterministic
    assert k != sample_key(_samples(seed=1, n=1)[0])               # other pixels
    assert k != content_key(s.target, "96x64", s.crop_top_left, s.original_size)
    assert k != content_key(s.target, s.bucket, (0, 1), s.original_size)
    assert k != content_key(s.target, s.bucket, s.crop_top_left, (65, 96))
    from diffusers import AutoencoderKL

    from mumu_core.tiny.configs import tiny_vae_config

    torch.manual_seed(1)
    other = AutoencoderKL(**tiny_vae_config()).eval()             # same config, other weights
    assert LatentCache(tmp_path, other).dir != LatentCache(tmp_path, vae).dir


def test_unreadable_entry_is_recomputed(vae, tmp_path):
    samples = _samples(n=2)
    cache = LatentCache(tmp_path, vae, dtype="float16")
    cache.params(samples, _encode(vae))
    path = cache.path(sample_key(samples[0]))
    path.write_bytes(path.read_bytes()[:40])                       # truncated by a crash
    cache.take_counts()
    out = cache.params(samples, _encode(vae))
    assert cache.take_counts() == (1, 1) and out.dtype == torch.float32 and out.shape[1] == 8
    assert cache.get(sample_key(samples[0])) is not None


def test_refused_with_target_augmentation():
    refuse_target_augmentation(SampleBuilderConfig())
    with pytest.raises(MumuError, match="target_crop"):
        refuse_target_augmentation(SampleBuilderConfig(target_crop="random"))


def test_config_refuses_cache_with_random_crops_and_checks_validation_bucket():
    from mumu_training.config import TrainConfigError, config_from_dict

    base = {"model": {"vlm": "v", "sdxl": "s"}, "data": {"annotations": "a", "sample": {"resolution": 256}}}
    cfg = config_from_dict(base, {"data.latent_cache.enabled": True})
    assert cfg.data.latent_cache == {"enabled": True}
    with pytest.raises(TrainConfigError, match="target_crop"):
        config_from_dict(base, {"data.latent_cache.enabled": True, "data.sample.target_crop": "random"})
    with pytest.raises(TrainConfigError, match="unknown key"):
        config_from_dict(base, {"data.latent_cache.size": 3})
    config_from_dict(base, {"validation.width": 320, "validation.height": 192})
    with pytest.raises(TrainConfigError, match="not a training bucket"):
        config_from_dict(base, {"validation.width": 300, "validation.height": 200})
    with pytest.raises(TrainConfigError, match="together"):
        config_from_dict(base, {"validation.width": 320})


@pytest.mark.slow
def test_training_reads_the_cache_after_the_first_epoch_and_logs_sample_stats(tmp_path):
    """tiny.yaml with 4 images: an epoch is 2 steps, so step 3 trains on cached latents only."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out, cache = tmp_path / "run", tmp_path / "latents"
    cmd = [sys.executable, str(repo / "training" / "train.py"), "--config", str(repo / "training/configs/tiny.yaml"),
           "--output-dir", str(out), "--max-steps", "3", "--set", f"tiny.root={tmp_path / 'assets'}",
           "--set", "tiny.num_images=4", "--set", "run.progress=false", "--set", "run.validate_every=0",
           "--set", "run.checkpoint_every=0", "--set", "run.export_at_end=false", "--set", "data.num_workers=0",
           "--set", "data.latent_cache.enabled=true", "--set", f"data.latent_cache.dir={cache}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["latent_cache/hit_rate"] for m in metrics] == [0.0, 0.0, 1.0]
    assert all(m["data/bucket/64x64"] == 1.0 for m in metrics)
    data = json.loads((out / "data_stats.json").read_text())
    assert data["bucket_histogram"] == {"64x64": data["records"]} and data["sketch"] == "xdog"
    assert len(list(cache.rglob("*.safetensors"))) == data["records"]  # one entry per target, written once
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["samples"] == 6 and stats["bucket"] == {"64x64": 6}
