"""`mumu bootstrap` end to end on tiny detectors (HF layout, saved/loaded), every input format,
every bad-image kind; the annotations feed the sample builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mumu_core.cli import main as mumu
from mumu_training.bootstrap.imageio import load_source_image
from mumu_training.bootstrap.records import read_shard, shard_paths
from mumu_training.bootstrap.synthetic import make_examples, write_dataset

N_GOOD = 8
FORMATS = ("folder", "webdataset", "jsonl", "parquet")


@pytest.fixture(scope="session")
def tiny_detectors(tmp_path_factory):
    from mumu_training.bootstrap.tiny_detectors import write_tiny_detectors

    return write_tiny_detectors(tmp_path_factory.getbasetemp() / "tiny_detectors")


@pytest.fixture(scope="session")
def examples():
    return make_examples(N_GOOD)  # 8 good + 7 bad kinds


@pytest.fixture(scope="session")
def datasets(tmp_path_factory, examples):
    root = tmp_path_factory.mktemp("boot_data")
    return {fmt: write_dataset(root, fmt, examples, per_unit=4) for fmt in FORMATS}


def _run(inp, fmt, det, out, *extra) -> int:
    # Tiny models gain nothing from threads, and OpenMP spin-waiting on a shared, loaded machine
    # made a 0.5 s run take 50 s; restore the count for the other test modules.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _mumu_bootstrap(inp, fmt, det, out, *extra)
    finally:
        torch.set_num_threads(before)


def _mumu_bootstrap(inp, fmt, det, out, *extra) -> int:
    return mumu(["bootstrap", "--input", str(inp), "--format", fmt, "--detector", str(det), "--out", str(out),
                 "--shard-size", "4", "--box-threshold", "0.3", "--min-box-area", "8000", "--max-boxes-per-image", "8",
                 "--no-progress", *extra])


def _records(out: Path) -> list[dict]:
    return [r for p in shard_paths(out) for r in read_shard(p)]


@pytest.fixture(scope="session")
def outputs(tmp_path_factory, tiny_detectors, datasets):
    """Run every (detector, format) once; tests below inspect the results."""
    root = tmp_path_factory.mktemp("boot_out")
    outs = {}
    for det in ("grounding_dino", "owlv2"):
        for fmt in FORMATS:
            out = root / f"{det}_{fmt}"
            assert _run(datasets[fmt], fmt, tiny_detectors[det], out) == 0
            outs[det, fmt] = out
    return outs


@pytest.mark.parametrize("det", ["grounding_dino", "owlv2"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_skips_and_conversions(outputs, det, fmt):
    out = outputs[det, fmt]
    stats = json.loads((out / "stats.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert stats["skipped_by_reason"] == {"corrupt": 1, "decompression_bomb": 1, "too_small": 1, "truncated": 1}
    assert stats["converted_by_mode"] == {"16bit": 1, "cmyk": 1, "palette": 1}
    assert stats["counts"]["images_seen"] == N_GOOD + 7 and stats["counts"]["images_kept"] == N_GOOD + 3
    assert manifest["detector"]["type"] == det and manifest["thresholds"]["box"] == 0.3
    assert manifest["format_version"] == 1 and manifest["input"]["format"] == fmt
    assert sum(s["records"] for s in manifest["shards"]) == N_GOOD + 3
    assert len(manifest["shards"]) == 4  # 15 inputs / 4 per shard (webdataset: 4 per tar)
    hist = {int(k): v for k, v in stats["crops_per_image"].items()}
    assert sum(hist.values()) == N_GOOD + 3 and sum(k * v for k, v in hist.items()) == stats["counts"]["crops"]
    assert stats["counts"]["crops"] > 0, "thresholds are set so the tiny detector keeps some boxes"
    assert stats["boxes"].get("dropped_too_small", 0) > 0 or stats["boxes"].get("dropped_too_large", 0) > 0
    assert stats["top_phrases"] and all(isinstance(p, str) and n > 0 for p, n in stats["top_phrases"])


@pytest.mark.parametrize("det", ["grounding_dino", "owlv2"])
def test_records_are_valid_and_equal_across_formats(outputs, det):
    per_fmt = {}
    for fmt in FORMATS:
        out = outputs[det, fmt]
        root = Path(json.loads((out / "manifest.json").read_text())["image_root"])
        recs = _records(out)
        for r in recs:
            W, H = r["width"], r["height"]
            assert load_source_image(r["source"], root).size == (W, H)  # source reference resolves
            for c in r["crops"]:
                assert r["caption"][c["start"]:c["end"]] == c["phrase"]
                x0, y0, x1, y1 = c["box"]
                assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
                assert (x1 - x0) * (y1 - y0) >= 8000 - 1 and (x1 - x0) * (y1 - y0) <= 0.75 * W * H + 1
                if c["head_box"] is not None:
                    hx0, hy0, hx1, hy1 = c["head_box"]
                    assert c["person"] and x0 - 1 <= hx0 < hx1 <= x1 + 1 and y0 - 1 <= hy0 < hy1 <= y1 + 1
        per_fmt[fmt] = [(r["caption"], r["width"], r["height"], r["mode"], r["crops"]) for r in recs]
    # the same images give the same annotations whatever the container
    assert per_fmt["folder"] == per_fmt["webdataset"] == per_fmt["jsonl"] == per_fmt["parquet"]
    if det == "grounding_dino":
        assert any(c["person"] and c["head_box"] for r in _records(outputs[det, "folder"]) for c in r["crops"])


def test_webdataset_sources_point_at_tar_members(outputs, datasets, examples):
    out = outputs["grounding_dino", "webdataset"]
    rec = _records(out)[0]
    assert set(rec["source"]) == {"tar", "member", "offset", "size"}
    import tarfile

    with tarfile.open(Path(datasets["webdataset"]) / rec["source"]["tar"]) as tf:
        data = tf.extractfile(rec["source"]["member"]).read()
    assert data == examples[0][1]


def test_annotations_feed_the_sample_builder(outputs):
    from mumu_training.annotation_dataset import AnnotationDataset
    from mumu_training.samples import SampleBuilderConfig

    for fmt in ("folder", "webdataset"):
        ds = AnnotationDataset(outputs["grounding_dino", fmt],
                               SampleBuilderConfig(resolution=64, patch_size=2, cond_dropout_prob=0.0), seed=0)
        assert len(ds) == N_GOOD + 3
        n_images = 0
        for i in range(len(ds)):
            s = ds[i]
            assert s.target.size == (64, 64)
            n_images += len(s.prompt.images)
            for k, info in enumerate(c for c in s.conditioning if c.kind != "edge"):
                pos = s.prompt.segments.index(k)
                assert s.prompt.segments[pos + 1].startswith(" " + info.phrase)
        assert n_images > 0


def test_user_errors_are_clear(tmp_path, datasets, tiny_detectors, capsys):
    assert _run(datasets["folder"], "folder", tmp_path / "nope", tmp_path / "o1") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run(datasets["folder"], "folder", tiny_detectors["owlv2"], tmp_path / "o2", "--detector-type",
                "grounding_dino") == 2
    assert "holds a owlv2 model" in capsys.readouterr().err
    assert _run(datasets["folder"], "jsonl", tiny_detectors["owlv2"], tmp_path / "o3") == 2
    assert "jsonl" in capsys.readouterr().err.lower()


def test_rerun_with_other_settings_is_refused(tmp_path, datasets, tiny_detectors, capsys):
    out = tmp_path / "o"
    assert _run(datasets["jsonl"], "jsonl", tiny_detectors["owlv2"], out) == 0
    before = {p.name: p.read_bytes() for p in shard_paths(out)}
    assert _run(datasets["jsonl"], "jsonl", tiny_detectors["owlv2"], out) == 0  # same settings: all skipped
    assert {p.name: p.read_bytes() for p in shard_paths(out)} == before
    log = [json.loads(l) for l in (out / "run_log.jsonl").read_text().splitlines()]
    assert log[-1]["units_done"] == 0 and log[-1]["units_already_complete"] == 4
    assert _run(datasets["jsonl"], "jsonl", tiny_detectors["owlv2"], out, "--min-box-area", "100") == 2
    assert "different settings" in capsys.readouterr().err


def test_batched_detection(outputs, datasets, tiny_detectors, tmp_path):
    """--batch-size: OWLv2 (fixed square input, per-query scores) gives the batch-1 records exactly;
    Grounding DINO pads batched images, so only validity and record coverage are the same."""
    for det in ("owlv2", "grounding_dino"):
        out = tmp_path / det
        assert _run(datasets["jsonl"], "jsonl", tiny_detectors[det], out, "--batch-size", "3") == 0
        batched, single = _records(out), _records(outputs[det, "jsonl"])
        assert [r["id"] for r in batched] == [r["id"] for r in single]
        if det == "owlv2":
            assert batched == single
        for r in batched:
            assert all(r["caption"][c["start"]:c["end"]] == c["phrase"] for c in r["crops"])
        assert json.loads((out / "manifest.json").read_text())["batch_size"] == 3


def test_preview_contact_sheet(outputs, tmp_path):
    from mumu_training.bootstrap.preview import main as preview

    png = tmp_path / "p.png"
    assert preview([str(outputs["grounding_dino", "webdataset"]), "--out", str(png), "--n", "4", "--side", "128"]) == 0
    from PIL import Image

    sheet = Image.open(png)
    assert sheet.size == (256, 2 * (128 + 28))  # 4 tiles in a 2 x 2 grid
    assert len(np.unique(np.asarray(sheet.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # images + boxes drawn
    assert preview([str(tmp_path), "--out", str(png)]) == 2
