"""Sample builder: placement before the grounded words, crop provenance, counts and probabilities."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from mumu_core.prompt import InterleavedPrompt
from mumu_training.bootstrap.records import atomic_write_json, encode_records, shard_name
from mumu_training.annotation_dataset import AnnotationDataset
from mumu_training.samples import SampleBuilder, SampleBuilderConfig, collate_samples, edge_map, sample_rng

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


def test_max_crops_zero_gives_caption_only_prompts():
    """Text-to-image pretraining (the shapes world's stage 0) builds stage-1 samples with no crops."""
    rec, img = _record(), _image()
    text_only = SampleBuilder(_small(max_crops=0, min_crops=0, edge_map_prob=0.0, cond_dropout_prob=0.0))
    for i in range(20):
        s = text_only.build(rec, img, sample_rng(0, 0, i))
        assert s.prompt.images == [] and s.conditioning == [] and s.text == CAPTION


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


# ---------------------------------------------------------------- the 150 px rule

def _person_record(box, head_box, w=2000, h=1500):
    caption = "a man"
    return {"id": "p", "source": {"path": "x.png"}, "caption": caption, "width": w, "height": h,
            "crops": [{"phrase": "man", "start": 2, "end": 5, "box": box, "score": 0.5, "person": True,
                       "head_box": head_box, "head_score": 0.5}]}


def test_min_crop_side_both_sides_by_default_area_behind_an_option():
    from mumu_training.samples import _valid_crops

    sliver = _person_record([10, 10, 1010, 33], None)          # 1000 x 23: area 23,000 > 150^2
    sides = SampleBuilderConfig(resolution=1024)
    assert sides.min_side_px == 150 and sides.min_crop_rule == "sides"
    counts = {}
    assert _valid_crops(sliver, sides.min_side_px, sides.min_crop_rule, counts) == [] and counts == {"crops": 1}
    area = SampleBuilderConfig(resolution=1024, min_crop_rule="area")
    assert len(_valid_crops(sliver, area.min_side_px, area.min_crop_rule)) == 1
    ok = _person_record([10, 10, 160, 160], None)               # exactly 150 x 150 is kept
    assert len(_valid_crops(ok, 150, "sides")) == 1
    assert SampleBuilderConfig(resolution=512).min_side_px == 75  # scaled for small runs
    assert SampleBuilderConfig(resolution=512, min_crop_side=150).min_side_px == 150
    with pytest.raises(Exception, match="min_crop_rule"):
        SampleBuilderConfig(min_crop_rule="diagonal")


@pytest.mark.parametrize("stage", [1, 2])
def test_small_heads_fall_back_to_the_person_crop(stage):
    img = Image.fromarray(np.full((1500, 2000, 3), 90, np.uint8))
    cfg = SampleBuilderConfig(stage=stage, resolution=1024, patch_size=2, head_swap_prob=1.0, cond_dropout_prob=0.0,
                              edge_map_prob=0.0, augment_prob=0.0)
    b = SampleBuilder(cfg)
    small_head = _person_record([100, 100, 700, 1400], [300, 120, 400, 220])   # 100 px head < 150
    s = b.build(small_head, img, sample_rng(0, 0, 0))
    assert [c.kind for c in s.conditioning] == ["object"] and s.conditioning[0].box == [100, 100, 700, 1400]
    assert s.filtered == {"heads": 1}
    big_head = _person_record([100, 100, 700, 1400], [300, 120, 480, 320])     # 180 x 200 head
    s = b.build(big_head, img, sample_rng(0, 0, 0))
    assert [c.kind for c in s.conditioning] == ["head"] and s.filtered == {}


# ---------------------------------------------------------------- control maps in prompts

def test_control_map_kinds_follow_the_split_and_are_recorded():
    cfg = _small(cond_dropout_prob=0.0, edge_map_prob=1.0, control_maps={"canny": 1.0, "sketch": 3.0})
    b = SampleBuilder(cfg)
    kinds = []
    for i in range(160):
        s = b.build(_record(), _image(), sample_rng(0, 0, i))
        maps = [c for c in s.conditioning if c.kind == "edge"]
        assert len(maps) == 1 and s.conditioning[-1] is maps[0]     # always the prompt's last image
        assert s.text.endswith("<image>") and s.control_kinds() == [maps[0].control]
        kinds.append(maps[0].control)
    assert set(kinds) == {"canny", "sketch"}
    assert abs(kinds.count("sketch") / len(kinds) - 0.75) < 0.1


def test_depth_needs_a_model_folder():
    from mumu_core.errors import MumuError

    with pytest.raises(MumuError, match="depth_model"):
        SampleBuilderConfig(control_maps={"canny": 1.0, "depth": 1.0})
    with pytest.raises(MumuError, match="unknown kind"):
        SampleBuilderConfig(control_maps={"hed": 1.0})


def test_sample_stats_count_kinds_and_buckets():
    from mumu_training.sample_stats import SampleStats

    stats = SampleStats()
    b = SampleBuilder(_small(edge_map_prob=0.5))
    samples = [b.build(_record(), _image(), sample_rng(1, 0, i)) for i in range(200)]
    stats.update(samples[:100])
    m = stats.metrics()
    assert m["data/bucket/64x64"] == 1.0
    assert 0.02 < m["data/dropped_frac"] < 0.25
    assert m["data/kind/object_per_sample"] > 0.5
    assert abs(m["data/control/canny"] + m["data/control/sketch"] - m["data/kind/edge_per_sample"]) < 1e-9
    stats.update(samples[100:])
    summary = stats.summary()
    assert summary["samples"] == 200 and summary["bucket"] == {"64x64": 200}
    assert sum(summary["control"].values()) == summary["kind"]["edge"]
    assert stats.metrics()["data/bucket/64x64"] == 1.0  # the interval restarted


def test_dataset_bucket_ids_and_replacement_keeps_the_bucket(tmp_path):
    _image().save(tmp_path / "img.png")                                       # 400 x 200
    Image.fromarray(np.full((300, 150, 3), 80, np.uint8)).save(tmp_path / "tall.png")
    rec = _record()
    tall = dict(rec, id="t", source={"path": "tall.png"}, width=150, height=300, crops=[])
    gone = dict(rec, id="g", source={"path": "gone.png"})                     # 400 x 200, missing file
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / shard_name(0)).write_bytes(encode_records([rec, gone, tall]))
    atomic_write_json(tmp_path / "manifest.json", {"image_root": str(tmp_path),
                                                   "shards": [{"name": shard_name(0), "records": 3}]})
    ds = AnnotationDataset(tmp_path, SampleBuilderConfig(resolution=256, patch_size=2), seed=0)
    ids = ds.bucket_ids()
    assert ids[0] == ids[1] != ids[2] and ids[2] == ds.config.bucket_for(150, 300).name
    s = ds[1]  # the missing image is replaced by the tall one, cut to the missing record's bucket
    assert s.record_id == "t" and s.bucket == ids[1] and s.target.size == tuple(map(int, ids[1].split("x")))
