"""Sample builder: placement before the grounded words, crop provenance, counts and probabilities."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from mumu_core.prompt import InterleavedPrompt
from mumu_training.bootstrap.records import atomic_write_json, encode_records, shard_name
from mumu_training.samples import (AnnotationDataset, SampleBuilder, SampleBuilderConfig, collate_samples,
                                   edge_map, sample_rng)

CAPTION = "a man and his dog ride a red scooter"
COLORS = {"man": (255, 0, 0), "dog": (0, 255, 0), "scooter": (0, 0, 255), "head": (255, 255, 0)}


def _span(word):
    start = CAPTION.index(word)
    return start, start + len(word)


def _record():
    crops = []
    boxes = {"man": [10, 10, 110, 190], "dog": [150, 100, 250, 190], "scooter": [270, 20, 390, 190]}
    for word, box in boxes.items():
        s, e = _span(word)
        crops.append({"phrase": word, "start": s, "end": e, "box": box, "score": 0.5, "person": word == "man",
                      "head_box": [40, 10, 80, 50] if word == "man" else None, "head_score": 0.4 if word == "man" else None})
    # a second, overlapping box for "red scooter": must never give two images to one word
    s, e = _span("red scooter")
    crops.append({"phrase": "red scooter", "start": s, "end": e, "box": [260, 10, 395, 195], "score": 0.3,
                  "person": False, "head_box": None, "head_score": None})
    return {"id": "000000/000000", "source": {"path": "img.png"}, "caption": CAPTION, "width": 400, "height": 200,
            "crops": crops}


def _image():
    arr = np.full((200, 400, 3), 40, np.uint8)
    for word, (x0, y0, x1, y1) in {"man": (10, 10, 110, 190), "dog": (150, 100, 250, 190),
                                   "scooter": (260, 10, 395, 195)}.items():
        arr[y0:y1, x0:x1] = COLORS[word]
    arr[10:50, 40:80] = COLORS["head"]
    return Image.fromarray(arr)


def _small(**kw):
    return SampleBuilderConfig(**{"resolution": 64, "patch_size": 2, **kw})


def test_each_crop_sits_immediately_before_its_word_and_shows_its_box():
    builder = SampleBuilder(_small(augment_prob=0.0, cond_dropout_prob=0.0, edge_map_prob=0.0))
    rec, img = _record(), _image()
    seen_counts = set()
    for i in range(60):
        s = builder.build(rec, img, sample_rng(0, 0, i))
        objs = [c for c in s.conditioning if c.kind in ("object", "head")]
        seen_counts.add(len(objs))
        assert 1 <= len(objs) <= 3
        segs = s.prompt.segments
        for n, info in enumerate(objs):
            pos = segs.index(n)
            after = segs[pos + 1]
            assert isinstance(after, str) and after.startswith(" " + info.phrase), (s.text, info)
            # the caption text before the placeholder ends exactly where the grounded word starts
            before = s.text[: s.text.index(after, len("".join(x if isinstance(x, str) else "<image>" for x in segs[:pos])))]
            assert before.endswith("<image>")
            assert before[: -len("<image>")].replace("<image> ", "") == CAPTION[: info.start]
            centre = np.asarray(s.prompt.images[n].image)[18, 18]
            word = "head" if info.kind == "head" else info.phrase.split()[-1]
            assert tuple(centre) == COLORS[word], (info, centre)
        # no two images for overlapping spans ("scooter" inside "red scooter")
        spans = sorted((c.start, c.end) for c in objs)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert s.text.replace("<image> ", "") == CAPTION
        assert s.target.size == (64, 64)
    assert seen_counts == {1, 2, 3}


def test_known_caption_exact_text():
    cfg = _small(augment_prob=0.0, cond_dropout_prob=0.0, edge_map_prob=0.0, min_crops=3, head_swap_prob=0.0)
    rec = _record()
    rec["crops"] = rec["crops"][:3]
    s = SampleBuilder(cfg).build(rec, _image(), sample_rng(1, 0, 0))
    assert s.text == "a <image> man and his <image> dog ride a red <image> scooter"
    assert [c.phrase for c in s.conditioning] == ["man", "dog", "scooter"]
    assert all(im.tokens_per_image == 324 for im in s.prompt.images)


def test_probabilities_follow_the_config():
    cfg = _small()
    builder = SampleBuilder(cfg)
    rec, img = _record(), _image()
    n, dropped, edges, swaps, persons, aug, cond_images = 1500, 0, 0, 0, 0, 0, 0
    crop_counts = {1: 0, 2: 0, 3: 0}
    for i in range(n):
        s = builder.build(rec, img, sample_rng(7, 0, i))
        if s.dropped:
            dropped += 1
            assert s.prompt.is_empty and s.text == ""
            continue
        assert len(s.prompt.images) <= cfg.max_images
        assert sum(c.kind != "edge" for c in s.conditioning) <= cfg.max_crops
        edges += any(c.kind == "edge" for c in s.conditioning)
        crop_counts[sum(c.kind != "edge" for c in s.conditioning)] += 1
        for c in s.conditioning:
            if c.phrase == "man":
                persons += 1
                swaps += c.kind == "head"
            if c.kind != "edge":
                cond_images += 1
                aug += bool(c.augmentations)
    kept = n - dropped
    assert all(abs(v / kept - 1 / 3) < 0.05 for v in crop_counts.values()), crop_counts  # k ~ U{1..3}
    assert abs(dropped / n - 0.1) < 0.025
    assert abs(edges / kept - 0.3) < 0.04
    assert abs(swaps / persons - 0.7) < 0.06
    assert abs(aug / cond_images - 0.2) < 0.035


def test_crop_count_limits():
    rec, img = _record(), _image()
    two = SampleBuilder(_small(max_crops=2, cond_dropout_prob=0.0))
    counts = {sum(c.kind != "edge" for c in two.build(rec, img, sample_rng(0, 0, i)).conditioning) for i in range(100)}
    assert counts == {1, 2}
    one_image = SampleBuilder(_small(max_images=1, edge_map_prob=1.0, cond_dropout_prob=0.0))
    for i in range(30):  # a prompt already at max_images gets no edge map
        assert len(one_image.build(rec, img, sample_rng(0, 0, i)).prompt.images) == 1
    always_edge = SampleBuilder(_small(edge_map_prob=1.0, cond_dropout_prob=0.0))
    s = always_edge.build(rec, img, sample_rng(0, 0, 0))
    assert s.conditioning[-1].kind == "edge" and s.text.endswith("<image>") and len(s.prompt.images) <= 4


def test_reproducible_and_epoch_changes_sample():
    builder = SampleBuilder(_small())
    rec, img = _record(), _image()
    a = builder.build(rec, img, sample_rng(3, 0, 5))
    b = builder.build(rec, img, sample_rng(3, 0, 5))
    assert a.text == b.text and [c.augmentations for c in a.conditioning] == [c.augmentations for c in b.conditioning]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a.prompt.images, b.prompt.images))
    texts = {builder.build(rec, img, sample_rng(3, e, 5)).text for e in range(12)}
    assert len(texts) > 1


def test_stage2_single_high_res_person_crop():
    cfg = _small(stage=2, cond_dropout_prob=0.0, augment_prob=0.0)
    builder = SampleBuilder(cfg)
    kinds = []
    for i in range(200):
        s = builder.build(_record(), _image(), sample_rng(0, 0, i))
        assert len(s.prompt.images) == 1 and s.prompt.images[0].tokens_per_image == 1296
        assert s.conditioning[0].phrase == "man"
        assert s.prompt.images[0].image.size == (72, 72)  # 36 x 36 patches at patch_size 2
        kinds.append(s.conditioning[0].kind)
    assert abs(kinds.count("head") / len(kinds) - 0.7) < 0.1


def test_invalid_crops_are_ignored():
    rec = _record()
    rec["crops"][0] = dict(rec["crops"][0], head_box=[40, 10, 40.2, 50])          # sub-pixel head: dropped
    rec["crops"][1] = dict(rec["crops"][1], box=[500, 10, 600, 50])               # outside the image
    rec["crops"][2] = dict(rec["crops"][2], phrase="bike")                        # span text mismatch
    b = SampleBuilder(_small(cond_dropout_prob=0.0, head_swap_prob=1.0, min_crops=3))
    for i in range(20):
        s = b.build(rec, _image(), sample_rng(0, 0, i))
        assert {c.phrase for c in s.conditioning if c.kind != "edge"} <= {"man", "red scooter"}
        assert all(c.kind != "head" for c in s.conditioning)


def test_caption_with_placeholder_text_and_no_crops():
    rec = {"id": "x", "caption": "a <image> sign saying <img>", "crops": []}
    s = SampleBuilder(_small(cond_dropout_prob=0.0, edge_map_prob=0.0)).build(rec, _image(), sample_rng(0, 0, 0))
    assert s.prompt.images == [] and "<image>" not in s.text
    assert isinstance(InterleavedPrompt.parse(s.text, []), InterleavedPrompt)


def test_edge_map_marks_boundaries():
    e = np.asarray(edge_map(_image()))[..., 0]
    assert e.shape == (200, 400) and set(np.unique(e)) <= {0, 255}
    assert e[100, 10] == 255 or e[100, 9] == 255 or e[100, 11] == 255  # left edge of the man box
    assert e[100, 60] == 0  # inside a flat region


def test_dataset_reads_shards_and_skips_missing_images(tmp_path):
    _image().save(tmp_path / "img.png")
    rec = _record()
    missing = dict(rec, id="000000/000001", source={"path": "gone.png"})
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / shard_name(0)).write_bytes(encode_records([rec, missing, dict(rec, id="000000/000002", crops=[])]))
    atomic_write_json(tmp_path / "manifest.json", {"image_root": str(tmp_path),
                                                   "shards": [{"name": shard_name(0), "records": 3}]})
    ds = AnnotationDataset(tmp_path, _small(), seed=0)
    assert len(ds) == 3
    assert ds.sample_weights(person_weight=3.0) == [3.0, 3.0, 1.0]  # the last record has no person crop
    s = ds[1]  # missing image -> next record
    assert s.record_id == "000000/000002" and ds.skipped_at_load == 1
    t = ds[0].target_tensor()
    assert tuple(t.shape) == (3, 64, 64) and float(t.min()) >= -1 and float(t.max()) <= 1
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_samples)))
    assert len(batch) == 2 and batch[0].record_id == "000000/000000"


def test_config_rejects_bad_probability():
    from mumu_core.errors import MumuError

    with pytest.raises(MumuError, match="edge_map_prob"):
        SampleBuilderConfig(edge_map_prob=1.5)
