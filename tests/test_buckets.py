"""Aspect-ratio buckets: no letterboxed targets, time ids = the crop taken, bucket-pure batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mumu_core.errors import MumuError
from mumu_training.buckets import Bucket, apply_crop, make_buckets, nearest_bucket, plan_crop
from mumu_training.data import BatchPlan, GroupedLoader, padding_fraction
from mumu_training.samples import SampleBuilder, SampleBuilderConfig, sample_rng


def test_sdxl_buckets_around_1024():
    names = {b.name for b in make_buckets(1024)}
    # SDXL's familiar training sizes (width x height)
    assert {"1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344"} <= names
    for b in make_buckets(1024):
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert b.width * b.height <= 1024 * 1024
        assert 0.5 <= b.aspect <= 2.0


def test_buckets_scale_with_resolution():
    small = make_buckets(256)
    assert Bucket(256, 256) in small and len(small) > 3
    assert all(b.width % 32 == 0 and b.height % 32 == 0 and b.width * b.height <= 256 * 256 for b in small)
    assert make_buckets(64) == [Bucket(64, 64)]  # sides stay multiples of 32 (VAE /8, UNet /4)
    with pytest.raises(MumuError, match="multiple of 8"):
        make_buckets(512, step=20)


def test_nearest_bucket_by_aspect():
    buckets = make_buckets(1024)
    assert nearest_bucket(1000, 1000, buckets) == Bucket(1024, 1024)
    assert nearest_bucket(1600, 1100, buckets).name == "1216x832"   # 1.45 -> 1.46
    wide = nearest_bucket(3000, 1000, buckets)
    assert wide.aspect == max(b.aspect for b in buckets)


def _textured(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(60, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(400, 200), (200, 400), (300, 300), (1000, 230), (517, 389)])
def test_no_target_has_padding_and_time_ids_match_the_crop(size):
    w, h = size
    image = _textured(w, h)
    cfg = SampleBuilderConfig(resolution=256, patch_size=2, cond_dropout_prob=0.0, edge_map_prob=0.0)
    s = SampleBuilder(cfg).build({"id": "x", "caption": "a thing", "crops": []}, image, sample_rng(0, 0, 0))
    bucket = cfg.bucket_for(w, h)
    assert s.target.size == (bucket.width, bucket.height) and s.bucket == bucket.name
    arr = np.asarray(s.target)
    assert arr.min() > 20  # source pixels are >= 60: a black letterbox bar would show as 0
    oh, ow, top, left, th, tw = s.time_ids()
    assert (oh, ow) == (h, w) and (th, tw) == (bucket.height, bucket.width)
    # the crop actually taken: resize to cover, cut at (top, left)
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    assert (top, left) == ((rh - th) // 2, (rw - tw) // 2)  # center crop
    again = image.resize((rw, rh), Image.BICUBIC).crop((left, top, left + tw, top + th))
    assert np.array_equal(np.asarray(again), arr)


def test_random_target_crop_is_recorded():
    image = _textured(400, 200)
    cfg = SampleBuilderConfig(resolution=256, patch_size=2, cond_dropout_prob=0.0, edge_map_prob=0.0,
                              target_crop="random")
    b = SampleBuilder(cfg)
    seen = set()
    for i in range(12):
        s = b.build({"id": "x", "caption": "a", "crops": []}, image, sample_rng(0, 0, i))
        _, _, top, left, th, tw = s.time_ids()
        crop = plan_crop(400, 200, cfg.bucket_for(400, 200))
        rh, rw = crop.resized
        expected = image.resize((rw, rh), Image.BICUBIC).crop((left, top, left + tw, top + th))
        assert np.array_equal(np.asarray(expected), np.asarray(s.target))
        seen.add((top, left))
    assert len(seen) > 3


def test_apply_crop_covers_exactly():
    image = _textured(517, 389)
    for bucket in make_buckets(256):
        crop = plan_crop(517, 389, bucket)
        out = apply_crop(image, crop)
        assert out.size == (bucket.width, bucket.height)
        assert crop.resized[0] >= bucket.height and crop.resized[1] >= bucket.width


class _S:
    def __init__(self, i, bucket, length):
        self.i, self.bucket, self.length = i, bucket, length
        self.prompt = length


class _FakeDataset:
    def __init__(self, buckets, lengths):
        self.buckets, self.lengths = buckets, lengths
        self.epoch = 0

    def __len__(self):
        return len(self.buckets)

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        return _S(i, self.buckets[i], self.lengths[i])


@pytest.mark.parametrize("n", [403, 4003])  # small: micro-batch runs; large: megabatch runs
def test_batches_stay_within_a_bucket_and_length_grouping_still_works(n):
    rng = np.random.default_rng(0)
    names = ["1024x1024", "1216x832", "832x1216", "1344x768"]
    buckets = [names[int(k)] for k in rng.choice(4, n, p=[0.5, 0.3, 0.15, 0.05])]
    lengths = [int(x) for x in 30 + 324 * rng.integers(0, 5, n) + rng.integers(0, 20, n)]  # 0-4 images
    ds = _FakeDataset(buckets, lengths)
    seen, grouped_pad, plain_pad = set(), [], []
    for rank in range(2):
        loader = GroupedLoader(ds, lambda p: p, batch_size=4, group_size=8, world_size=2, rank=rank, seed=3,
                               buckets=buckets)
        it = loader.iterate(0)
        per_epoch = loader.plan.megabatches_per_epoch * 8
        assert loader.plan.run == (4 if n < 1000 else 32)
        for _ in range(per_epoch * 2):
            mb = next(it)
            assert len({s.bucket for s in mb.samples}) == 1, [s.bucket for s in mb.samples]
            assert len(mb.samples) == 4
            seen.update(s.i for s in mb.samples if mb.epoch == 0)
            grouped_pad.append(padding_fraction(mb.lengths))
            plain_pad.append(padding_fraction(mb.ungrouped_lengths))
    assert len(seen) > 0.9 * n  # an epoch still covers (nearly) every record
    assert np.mean(grouped_pad) < 0.7 * np.mean(plain_pad)
    if n > 1000:  # whole megabatches per bucket: grouping as good as without buckets
        ref = GroupedLoader(ds, lambda p: p, batch_size=4, group_size=8, world_size=2, rank=0, seed=3).iterate(0)
        no_buckets = [padding_fraction(next(ref).lengths) for _ in range(len(grouped_pad))]
        assert np.mean(grouped_pad) <= np.mean(no_buckets) + 0.03, (np.mean(grouped_pad), np.mean(no_buckets))


def test_bucket_plan_is_deterministic_and_single_bucket_is_the_plain_order():
    buckets = ["a"] * 30 + ["b"] * 11
    p1 = BatchPlan(41, 2, 3, 1, 0, seed=5, buckets=buckets)
    p2 = BatchPlan(41, 2, 3, 1, 0, seed=5, buckets=buckets)
    for m in range(10):
        assert np.array_equal(p1.megabatch_indices(m)[1], p2.megabatch_indices(m)[1])
    one = BatchPlan(41, 2, 3, 1, 0, seed=5, buckets=["a"] * 41)
    plain = BatchPlan(41, 2, 3, 1, 0, seed=5)
    for m in range(10):
        assert np.array_equal(one.megabatch_indices(m)[1], plain.megabatch_indices(m)[1])
