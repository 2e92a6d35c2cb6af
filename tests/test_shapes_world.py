"""The shapes world (training/shapes/world.py): determinism, captions, records, datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mumu_training.shapes import world as W


def _scenes(seed, n):
    return list(W.iter_scenes(seed, n))


def test_scenes_and_renders_are_a_function_of_the_seed():
    a, b = _scenes(5, 6), _scenes(5, 6)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert all(np.array_equal(np.asarray(W.render(x)), np.asarray(W.render(y))) for x, y in zip(a, b))
    assert [s.to_dict() for s in _scenes(6, 6)] != [s.to_dict() for s in a]
    # scene i depends only on (seed, i)
    assert _scenes(5, 3)[2].to_dict() == a[2].to_dict()
    assert W.Scene.from_dict(json.loads(json.dumps(a[0].to_dict()))).to_dict() == a[0].to_dict()


def test_captions_never_name_appearance():
    words = set(W.COLOUR_NAMES) | set(W.PATTERNS) | set(W.FLOOR_NAMES)
    for s in _scenes(1, 200):
        tokens = set(s.caption.replace(",", " ").split())
        assert not tokens & words, s.caption
        assert [o.noun for o in s.objects] == [t for t in s.caption.replace(",", " ").split() if t in W.NOUNS]


def test_stage0_described_captions_name_each_objects_own_attributes():
    rng = np.random.default_rng(0)
    named = {"colour": 0, "floor": 0, "objects": 0}
    for s in _scenes(2, 300):
        c = W.described_caption(s, rng)
        assert c.replace(",", " ").split()[-1] == "floor" and W.described_caption(s, rng, 0.0) == s.caption
        # every named attribute sits in its own object's phrase, right before that object's noun
        phrases = c.split(" on the ")[0].replace(" and ", ", ").split(", ")
        assert [p.split()[-1] for p in phrases] == [o.noun for o in s.objects], c
        for p, o in zip(phrases, s.objects):
            words = p.split()[1:-1]
            assert set(words) <= {o.colour, o.pattern}, (c, o)
            named["colour"] += o.colour in words
            named["objects"] += 1
        named["floor"] += f" {s.floor} floor" in c
        assert W.described_caption(s, rng, 1.0) == W.described_caption(s, rng, 1.0)
        # the spans stage 0 grounds: each object's phrase without its article, the same caption
        state = rng.bit_generator.state
        caption, spans = W.described_caption_spans(s, rng)
        rng.bit_generator.state = state
        assert caption == W.described_caption(s, rng)
        assert [caption[a:b] for a, b in spans] == [p.split(" ", 1)[1] for p in caption.split(" on the ")[0]
                                                     .replace(" and ", ", ").split(", ")]
    # each word is named about 80 % of the time: unnamed attributes stay free
    assert 0.7 < named["colour"] / named["objects"] < 0.9 and 0.7 < named["floor"] / 300 < 0.9


def test_record_spans_and_boxes_are_valid():
    for i, s in enumerate(_scenes(2, 100)):
        rec = W.record(s, f"r{i}", f"images/{i}.png")
        assert rec["caption"] == s.caption and rec["width"] == rec["height"] == s.size
        assert len(rec["crops"]) == len(s.objects) + (s.floor_box is not None)
        for c in rec["crops"]:
            assert rec["caption"][c["start"]:c["end"]] == c["phrase"]
            x0, y0, x1, y1 = c["box"]
            assert 0 <= x0 < x1 <= s.size and 0 <= y0 < y1 <= s.size
        boxes = [o.box for o in s.objects]
        for j, a in enumerate(boxes):       # objects never overlap
            for b in boxes[j + 1:]:
                assert W._gap(a, b) >= 1
        if s.floor_box is not None:
            assert all(W._gap(s.floor_box, b) >= 0 for b in boxes)
        assert len({o.colour for o in s.objects}) == len(s.objects)


def test_within_scene_pattern_correlation_knob():
    shared = lambda cfg: np.mean([len({o.pattern for o in s.objects}) == 1
                                  for s in W.iter_scenes(3, 400, cfg) if len(s.objects) > 1])
    assert shared(W.WorldConfig(shared_pattern_prob=1.0)) == 1.0
    assert shared(W.WorldConfig(shared_pattern_prob=0.0)) < 0.5
    with pytest.raises(ValueError):
        W.WorldConfig(shared_pattern_prob=1.5)


def test_object_mask_matches_render():
    s = _scenes(4, 1)[0]
    m = np.asarray(W.object_mask(s, 0)) > 127
    x0, y0, x1, y1 = s.objects[0].box
    assert m.any() and not m[:y0].any() and not m[:, :x0].any() and not m[y1:].any() and not m[:, x1:].any()


def test_dataset_is_atomic_and_read_by_the_training_sampler(tmp_path):
    from mumu_training.annotation_dataset import AnnotationDataset
    from mumu_training.samples import SampleBuilderConfig

    out = tmp_path / "world"
    manifest = W.write_dataset(out, 12, seed=11, shard_size=5, progress=False)
    assert not (tmp_path / ".world.partial").exists()
    assert manifest["scenes"] == 12 and [s["records"] for s in manifest["shards"]] == [5, 5, 2]
    assert len(list((out / "images").glob("*.png"))) == 12
    assert W.write_dataset(out, 12, seed=11, progress=False) == manifest   # complete: left as it is
    cfg = SampleBuilderConfig(resolution=64, stage1_tokens=16, patch_size=14, buckets="square", edge_map_prob=0.0,
                              head_swap_prob=0.0, cond_dropout_prob=0.0, min_crops=2)
    ds = AnnotationDataset(out / "boot", cfg, seed=0)
    assert len(ds) == 12
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.target.size == (64, 64)
        assert 1 <= len(sample.prompt.images) <= 3
        assert sample.caption == (out / "images" / f"{i:06d}.txt").read_text().strip()
        for info in sample.conditioning:
            assert info.kind == "object" and sample.caption[info.start:info.end] == info.phrase
