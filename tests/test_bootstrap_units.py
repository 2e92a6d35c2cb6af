"""Bootstrap building blocks without a full run: filters, phrases, image policy, span mapping."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mumu_training.bootstrap.filters import Detection, FilterConfig, filter_detections
from mumu_training.bootstrap.imageio import ImageSkip, open_image
from mumu_training.bootstrap.phrases import extract_phrases, is_person_phrase, trim_span
from mumu_training.bootstrap.records import encode_records, read_shard
from mumu_training.bootstrap.synthetic import BAD_KINDS, SKIPPED_KINDS, bad_image_bytes


@pytest.fixture(scope="session")
def tiny_detectors(tmp_path_factory):
    from mumu_training.bootstrap.tiny_detectors import write_tiny_detectors

    # one shared folder per session: write_tiny_detectors skips detectors already written
    return write_tiny_detectors(tmp_path_factory.getbasetemp() / "tiny_detectors")


def _det(box, phrase="dog", start=10, score=0.5):
    return Detection(phrase, start, start + len(phrase), tuple(float(v) for v in box), score)


def test_size_filters_follow_the_paper_and_their_boundaries():
    cfg = FilterConfig()  # 150x150 area, 75% of the image
    dets = [
        _det((0, 0, 150, 150)),            # exactly 22,500 px^2: kept
        _det((200, 0, 349, 150)),          # 149 x 150: too small
        _det((0, 200, 1000, 223)),         # 1000 x 23 = 23,000 px^2: kept by area (min side off)
        _det((0, 0, 1000, 750)),           # exactly 75% of 1000x1000: kept
        _det((0, 0, 1000, 751)),           # just over 75%: too large
        _det((-50, -50, 100, 100)),        # clipped to 100x100: too small
    ]
    kept, dropped = filter_detections(dets, 1000, 1000, cfg)
    assert sorted(d.box for d in kept) == sorted([(0.0, 0.0, 150.0, 150.0), (0.0, 200.0, 1000.0, 223.0),
                                                  (0.0, 0.0, 1000.0, 750.0)])
    assert dropped == {"too_small": 2, "too_large": 1}
    kept, dropped = filter_detections(dets, 1000, 1000, FilterConfig(min_box_side=150))
    assert (0.0, 200.0, 1000.0, 223.0) not in [d.box for d in kept] and dropped["too_small"] == 3


def test_nms_is_per_span_and_keeps_the_best_score():
    a = _det((0, 0, 300, 300), score=0.9)
    b = _det((10, 10, 310, 310), score=0.8)                 # same span, IoU ~0.88: suppressed
    c = _det((10, 10, 310, 310), phrase="cat", start=30, score=0.7)  # other span: kept
    d = _det((600, 600, 900, 900), score=0.6)               # same span, no overlap: kept
    kept, dropped = filter_detections([b, d, c, a], 1000, 1000, FilterConfig())
    assert [(k.phrase, k.score) for k in kept] == [("dog", 0.9), ("dog", 0.6), ("cat", 0.7)]
    assert dropped == {"nms": 1}


def test_phrase_chunker_spans():
    cap = "A woman, riding a bright red scooter in New York at night."
    ph = extract_phrases(cap)
    assert [p.text for p in ph] == ["woman", "bright red scooter", "New York"]
    assert all(cap[p.start:p.end] == p.text for p in ph)
    assert [p.text for p in extract_phrases("a man and his dog")] == ["man", "dog"]
    assert trim_span("a man and his dog.", 0, 5) == (2, 5)
    assert trim_span("a man and his dog.", 6, 13) is None  # only stopwords
    assert trim_span("a red scooter", 3, 7) == (2, 13)  # partial words widen to whole words
    assert is_person_phrase("young woman") and is_person_phrase("men") and not is_person_phrase("woman's dog")


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_image_policy(kind):
    data, _ = bad_image_bytes(kind)
    if kind in SKIPPED_KINDS:
        with pytest.raises(ImageSkip) as exc:
            open_image(data, min_side=64)
        assert exc.value.reason == BAD_KINDS[kind]
    else:
        loaded = open_image(data)
        assert loaded.converted == BAD_KINDS[kind] and loaded.image.mode == "RGB"
        assert loaded.image.size == (256, 200)
        lo, hi = loaded.image.convert("L").getextrema()
        assert hi - lo > 50  # content survived the conversion (16-bit is rescaled, not clipped white)


def test_decompression_limit_is_configurable():
    img = Image.new("RGB", (300, 300))
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert open_image(buf.getvalue()).image.size == (300, 300)
    with pytest.raises(ImageSkip, match="decompression_bomb"):
        # 90,000 px is between 1x and 2x the limit: PIL only warns there; we treat the warning as a bomb
        open_image(buf.getvalue(), max_pixels=50_000)
    assert Image.MAX_IMAGE_PIXELS != 50_000  # the global is restored


def test_shards_are_deterministic_bytes(tmp_path):
    recs = [{"id": "0", "caption": "é", "crops": [], "b": 1, "a": 2}]
    assert encode_records(recs) == encode_records(recs)
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(encode_records(recs))
    assert read_shard(p) == recs


def test_grounding_dino_maps_token_scores_to_caption_spans(tiny_detectors):
    """Feed hand-made logits through the real span logic: each box names the words it scored on."""
    from mumu_training.bootstrap.detectors import GroundingDinoDetector

    det = GroundingDinoDetector(tiny_detectors["grounding_dino"], box_threshold=0.3, text_threshold=0.25)
    caption = "A man and his dog, riding a red scooter."
    text_ids = det.tokenizer(caption.lower(), return_offsets_mapping=True)
    offsets = text_ids["offset_mapping"]

    def token_index(word, after=0):
        s = caption.lower().index(word, after)
        return [i for i, (a, b) in enumerate(offsets) if a >= s and b <= s + len(word) and b > a][0]

    n_tok = len(offsets)
    logits = torch.full((1, 4, det.max_text_len), -10.0)
    logits[0, 0, token_index("man")] = 5.0
    logits[0, 1, token_index("dog")] = 4.0
    logits[0, 1, token_index("his")] = 3.0         # a stopword next to it: trimmed away
    logits[0, 2, token_index("red")] = 3.0
    logits[0, 2, token_index("scooter")] = 4.0     # a multi-token run: "red scooter"
    logits[0, 3, token_index("a ", 20)] = 5.0        # only a stopword scores: no phrase, no box
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.2, 0.2], [0.75, 0.5, 0.5, 1.0], [0.5, 0.5, 0.1, 0.1]]])

    class Out:
        pass

    def fake_model(**inputs):
        assert inputs["input_ids"].shape[1] == n_tok
        o = Out()
        o.logits, o.pred_boxes = logits, boxes
        return o

    det.model = fake_model
    dets = det.detect(Image.new("RGB", (400, 200)), caption)
    got = {(d.phrase, d.start, d.end) for d in dets}
    assert got == {("man", 2, 5), ("dog", 14, 17), ("red scooter", 28, 39)}
    for d in dets:
        assert caption[d.start:d.end] == d.phrase
    man = next(d for d in dets if d.phrase == "man")
    assert man.box == (100.0, 50.0, 300.0, 150.0)  # cx,cy,w,h relative -> pixels


def test_tiny_detectors_are_a_function_of_the_seed_alone(tiny_detectors):
    """Same vocab on every run (no trainer tie-breaks) and every weight drawn from (seed, saved key):
    what keeps the tiny detectors, and the tests' box counts, equal across transformers versions."""
    from safetensors.torch import load_file

    from mumu_training.bootstrap.tiny_detectors import (INIT_STD, _param_generator, build_tiny_bert_tokenizer,
                                                        build_tiny_clip_tokenizer)

    for build in (build_tiny_bert_tokenizer, build_tiny_clip_tokenizer):
        assert build().get_vocab() == build().get_vocab()
    assert build_tiny_bert_tokenizer()("a man and his dog")["input_ids"] == [2, 43, 161, 142, 159, 151, 3]
    for det, key in (("grounding_dino", "model.backbone.conv_encoder.model.embeddings.patch_embeddings.projection.weight"),
                     ("grounding_dino", "model.text_backbone.embeddings.position_embeddings.weight"),
                     ("grounding_dino", "bbox_embed.0.layers.2.weight"),
                     ("owlv2", "owlv2.vision_model.embeddings.patch_embedding.weight")):
        saved = load_file(tiny_detectors[det] / "model.safetensors")[key]
        expected = torch.empty(saved.shape).normal_(0.0, INIT_STD, generator=_param_generator(0, key))
        assert torch.equal(saved, expected), (det, key)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "folder", "webdataset"])
def test_units_cover_every_input_once_in_order(tmp_path, fmt):
    """Unit boundaries that do not line up with Parquet row groups (4) or tars still cover each row once."""
    from mumu_training.bootstrap.sources import image_root_for, iter_unit, plan_units
    from mumu_training.bootstrap.synthetic import make_examples, write_dataset

    examples = make_examples(6, bad=False)
    inp = write_dataset(tmp_path, fmt, examples, per_unit=4)
    units = plan_units(inp, fmt, shard_size=3)
    root = image_root_for(inp, fmt)
    items = [it for u in units for it in iter_unit(u, root)]
    assert [it.caption.strip() for it in items] == [e[3] for e in examples]
    assert len(units) == 2  # 6 rows / 3 per unit; webdataset: one unit per tar (4 + 2 examples)
    assert all(it.problem is None for it in items)


def test_input_problems_become_skip_reasons(tmp_path):
    from mumu_training.bootstrap.sources import iter_unit, plan_units

    (tmp_path / "a.png").write_bytes(b"x")           # no a.txt beside it
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("a dog")
    items = [it for u in plan_units(tmp_path, "folder", 10) for it in iter_unit(u, tmp_path)]
    assert [it.problem for it in items] == ["missing_caption", None]
    index = tmp_path / "i.jsonl"
    index.write_text('{"image": "b.png", "caption": "a dog"}\nnot json\n{"caption": "no image"}\n')
    items = [it for u in plan_units(index, "jsonl", 10) for it in iter_unit(u, tmp_path)]
    assert [it.problem for it in items] == [None, "bad_index_row", "missing_image"]


def test_exif_orientation_is_applied():
    import io

    img = Image.new("RGB", (300, 200), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the upright image is 200 x 300
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).image.size == (200, 300)
