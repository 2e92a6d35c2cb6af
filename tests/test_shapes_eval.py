"""`mumu eval` and its parts: metrics, evaluation conditions, the attribute probe, batched generation."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from mumu_training.shapes import conditions as C
from mumu_training.shapes import metrics as M
from mumu_training.shapes.world import PATTERNS, Scene, render

from conftest import run_mumu

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


# ---------------------------------------------------------------- metrics

def test_wilson_interval_values():
    lo, hi = M.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert M.wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert M.wilson(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    lo, hi = M.wilson(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert all(math.isnan(v) for v in M.wilson(0, 0))
    with pytest.raises(ValueError):
        M.wilson(3, 2)


def test_chance_levels_and_table():
    assert M.CHANCE["colour"] == 1 / 8 and M.CHANCE["pattern"] == 1 / 3
    assert M.both_right_chance(2) == pytest.approx(1 / 64)
    assert M.both_right_chance([2, 3]) == pytest.approx((1 / 64 + 1 / 512) / 2)
    p = M.Proportion(200, 256)
    assert p.to_dict()["p"] == pytest.approx(0.7812, abs=1e-4) and p.to_dict()["lo"] < 0.7812 < p.to_dict()["hi"]
    table = M.format_table([{"name": "b cross-image", "colour": p, "all_right": M.Proportion(150, 256),
                             "pattern": p, "presence": p, "floor": None, "chance_all": 1 / 64, "n": 256}])
    assert "b cross-image" in table and "78.1 [" in table and "12.5/1.6" in table


# ---------------------------------------------------------------- conditions

def _crop_of(scene: Scene, index: int):
    return render(scene).crop(scene.objects[index].box)


def test_conditions_are_deterministic_and_well_formed():
    assert C.expand_conditions("a,b',f,g") == ["a", "b2", "f0", "fm", "g1", "b", "g6"]
    with pytest.raises(ValueError):
        C.expand_conditions("z")
    for name in C.DEFAULT_CONDITIONS:
        a, b = C.build_item(name, 3), C.build_item(name, 3)
        assert a.describe() == b.describe() and a.prompt.count("<image>") == len(a.images) == len(a.weights)
    # g1/g6 are condition b's prompts at another CFG
    b, g1 = C.build_item("b", 4), C.build_item("g1", 4)
    assert b.prompt == g1.prompt and g1.cfg == 1.0 and b.cfg is None


def test_cross_image_crops_come_from_different_scenes():
    for i in range(30):
        it = C.build_item("b", i)
        assert 2 <= len(it.images) <= 3
        dicts = [s.to_dict() for s in it.source_scenes]
        assert all(dicts[j] != dicts[k] for j in range(len(dicts)) for k in range(j + 1, len(dicts)))
        assert len({t.noun for t in it.targets}) == len(it.targets)
        assert len({t.colour for t in it.targets}) == len(it.targets)
        for im, scene, t in zip(it.images, it.source_scenes, it.targets):
            assert np.array_equal(np.asarray(im), np.asarray(_crop_of(scene, 0)))
            assert (scene.objects[0].noun, scene.objects[0].colour) == (t.noun, t.colour)
            assert f"<image> {t.noun}" in it.prompt
    same = C.build_item("a", 0)
    assert all(s is same.source_scenes[0] for s in same.source_scenes)


def test_unseen_combinations_swaps_text_only_floor_weight_and_masks():
    for i in range(20):
        it = C.build_item("b2", i)
        assert len({t.pattern for t in it.targets}) == len(it.targets) and {t.pattern for t in it.targets} <= set(PATTERNS)
        d = C.build_item("d", i)
        assert not d.images and "<image>" not in d.prompt and all(t.role == "chance" for t in d.targets)
        c = C.build_item("c", i)
        assert [t.word_noun for t in c.targets] == [c.targets[1].noun, c.targets[0].noun]
        assert c.prompt.index(f"<image> {c.targets[1].noun}") < c.prompt.index(f"<image> {c.targets[0].noun}")
        e = C.build_item("e", i)
        assert e.prompt.endswith("on a <image> floor") and e.floor != e.source_scenes[0].floor
        assert e.floor == e.source_scenes[-1].floor
        f = C.build_item("f0", i)
        assert sorted(f.weights) == [0.0, 1.0]
        assert [t.role for t in f.targets] == ["chance" if w == 0 else "scored" for w in f.weights]
        m = C.build_item("fm", i)
        assert all(mk is not None and mk.size == im.size for mk, im in zip(m.masks, m.images))


def test_scoring_counts_each_object_against_its_own_crop():
    from mumu_training.shapes.evaluate import score_condition
    from mumu_training.shapes.world import COLOUR_NAMES, NOUNS

    def reading(item, right=True):
        nouns = {n: {"present": False, "colour": "red", "pattern": "solid"} for n in NOUNS}
        for t in item.targets:
            colour = t.colour if right else next(c for c in COLOUR_NAMES if c != t.colour)
            nouns[t.noun] = {"present": True, "colour": colour, "pattern": t.pattern}
        return {"floor": item.floor or "slate", "nouns": nouns}

    items = [C.build_item("b", i) for i in range(8)]
    perfect = score_condition("b", items, [reading(it) for it in items])["figures"]
    assert perfect["colour"]["p"] == 1.0 and perfect["all_right"]["p"] == 1.0
    wrong = score_condition("b", items, [reading(it, right=i % 2 == 0) for i, it in enumerate(items)])["figures"]
    assert wrong["all_right"]["p"] == 0.5
    # swapped colours between the two objects: each object is compared with its own crop -> all wrong
    it = C.build_item("b", 0)
    r = reading(it)
    t0, t1 = it.targets[:2]
    r["nouns"][t0.noun]["colour"], r["nouns"][t1.noun]["colour"] = t1.colour, t0.colour
    assert score_condition("b", [it], [r])["figures"]["all_right"]["p"] == 0.0
    f0 = [C.build_item("f0", i) for i in range(6)]
    fig = score_condition("f0", f0, [reading(x) for x in f0])["figures"]
    assert fig["colour"]["n"] == 6 and fig["weight0_colour"]["n"] == 6
    c = [C.build_item("c", i) for i in range(4)]
    fig = score_condition("c", c, [reading(x) for x in c])["figures"]
    assert fig["follows_crop"]["p"] == 1.0 and fig["follows_word"]["p"] == 0.0
    d = [C.build_item("d", i) for i in range(4)]
    assert score_condition("d", d, [reading(x) for x in d])["figures"]["scored_as"] == "chance"


# ---------------------------------------------------------------- probe

def test_probe_learns_and_round_trips(tmp_path):
    from mumu_training.shapes.probe import PROBE_SEED, ProbeConfig, load_probe, probe_dataset, train_probe

    cfg = ProbeConfig(scenes=768, held_out=96, epochs=5, batch=32, width=32)
    model, metrics = train_probe(tmp_path / "probe.safetensors", cfg=cfg, progress=False)
    held = metrics["held_out"]
    # after 120 steps on 768 scenes the floor and pattern heads are far above chance (1/4, 1/3); the
    # per-noun colour and presence heads need the full run's data (6000 scenes: colour 92.6 % held out)
    assert held["floor"] > 0.8 and held["pattern"] > 0.45, held
    loaded, info = load_probe(tmp_path / "probe.safetensors")
    assert info["metrics"]["held_out"] == held and info["config"]["scenes"] == 768
    x, _ = probe_dataset(4, PROBE_SEED, offset=123)
    with torch.no_grad():
        a, b = model.eval()(x), loaded(x)
    assert all(torch.allclose(a[k], b[k]) for k in a)
    assert loaded.read(x)[0]["nouns"].keys() == {"ball", "box", "cone", "ring", "star"}


# ---------------------------------------------------------------- batched generation

def test_generate_batch_equals_one_image_calls(tiny, tiny_encoder):
    from mumu_core.pipeline import generate, generate_batch, load_sdxl_pipeline
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    items = [C.build_item("b", 0), C.build_item("d", 0), C.build_item("a", 1)]
    prompts = [InterleavedPrompt.parse(it.prompt, [PromptImage(im, tokens_per_image=16) for im in it.images])
               for it in items]
    pipe = load_sdxl_pipeline(tiny["sdxl"])
    neg = tiny_encoder.encode_unconditional(1)
    batch = generate_batch(pipe, tiny_encoder.encode(prompts), neg, steps=2, cfg=3.0, seeds=[5, 6, 7], width=64,
                           height=64, progress=False)
    for p, s, im in zip(prompts, (5, 6, 7), batch):
        one = generate(pipe, tiny_encoder.encode(p), neg, steps=2, cfg=3.0, seed=s, width=64, height=64, progress=False)
        diff = np.abs(np.asarray(one, dtype=np.int16) - np.asarray(im, dtype=np.int16)).max()
        assert diff <= 2, diff   # same maths; float summation order may differ by a rounding step
    with pytest.raises(ValueError):
        generate_batch(pipe, tiny_encoder.encode(prompts), neg, steps=1, seeds=[1], width=64, height=64)


# ---------------------------------------------------------------- mumu eval end to end

@pytest.fixture(scope="module")
def standin_model(tmp_path_factory, tiny):
    """A shapes-model folder from the tiny components (random weights) with a probe trained a few seconds."""
    from mumu_core.tiny.build import build_tiny_unet, write_tiny_bundle
    from mumu_training.shapes.probe import ProbeConfig, train_probe

    d = tmp_path_factory.mktemp("shapes_model")
    os.symlink(tiny["vlm"], d / "vlm")
    os.symlink(tiny["sdxl"], d / "sdxl")
    write_tiny_bundle(d / "mumu_shapes.safetensors", tiny["vlm"], build_tiny_unet(0), tokens_per_image=16)
    train_probe(d / "probe.safetensors", vae_dir=d / "sdxl" / "vae",
                cfg=ProbeConfig(width=16, scenes=64, held_out=16, epochs=1, batch=16), progress=False)
    return d


@pytest.fixture(scope="module")
def tiny_clip_dino(tmp_path_factory):
    """Tiny random CLIP and DINOv2 folders, built from configs and saved like downloaded ones."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    from mumu_core.tiny import build_tiny_tokenizer
    from mumu_training.shapes.components import world_corpus

    root = tmp_path_factory.mktemp("sim")
    tok = build_tiny_tokenizer(vocab_size=300, corpus=world_corpus())
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32,
                             patch_size=8)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def test_mumu_eval_end_to_end_on_a_standin(standin_model, tiny_clip_dino, tmp_path):
    clip, dino = tiny_clip_dino
    out = tmp_path / "eval"
    res = run_mumu("eval", "--model", standin_model, "--n", "3", "--steps", "2", "--conditions", "a,b,c,d,f",
                   "--batch", "8", "--out", out, "--clip", clip, "--dino", dino, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "expected time" in res.stderr
    head = next(i for i, ln in enumerate(lines) if ln.startswith("condition"))
    for name in ("a same-image", "b cross-image", "c swapped", "c  ...follows the word", "d text only",
                 "f0 weight 0", "f0 ...weight-0 object", "fm masked"):
        assert any(ln.startswith(name) for ln in lines[head:]), name
    assert "CLIP-I" in res.stdout
    result = json.loads(lines[-1])
    assert set(result["conditions"]) == {"a", "b", "c", "d", "f0", "fm"}
    b = result["conditions"]["b"]
    assert b["n_prompts"] == 3 and 0.0 <= b["colour"]["lo"] <= b["colour"]["p"] <= b["colour"]["hi"] <= 1.0
    assert b["chance"]["colour"] == 0.125 and {"clip_i", "clip_t", "dino"} <= set(b["similarity"])
    assert "colour_inside_chance_interval" in result["conditions"]["d"]
    assert "follows_word" in result["conditions"]["c"]
    assert result["settings"]["steps"] == 2 and result["settings"]["cfg"] == 3.0
    assert {"held_out", "held_out_vae"} <= set(result["probe"])   # the probe also read VAE round trips
    saved = json.loads((out / "eval.json").read_text())
    assert saved["conditions"] == result["conditions"]
    assert (out / "contact_sheet.png").stat().st_size > 0


def test_mumu_eval_missing_model_is_a_clear_error(tmp_path):
    res = run_mumu("eval", "--model", tmp_path / "nothing", "--n", "1")
    assert res.returncode == 2 and "does not exist" in res.stderr and "reproduce" in res.stderr
    (tmp_path / "m").mkdir()
    res = run_mumu("eval", "--model", tmp_path / "m", "--n", "1")
    assert res.returncode == 2 and "probe.safetensors" in res.stderr


def test_mumu_demo_composes_the_sample_scenes(standin_model, tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    res = run_mumu("demo", "--model", standin_model, "--n", "2", "--steps", "2", "--out", out, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    labels = [r["condition"] for r in summary["rows"]]
    assert labels[0].startswith("a ") and any(lb.startswith("b cross-image") for lb in labels) and len(labels) == 9
    cross = summary["rows"][1]
    assert cross["sources"] == ["scene 1", "scene 2"] and cross["prompt"] == "a <image> ball and a <image> box on the floor"
    assert set(summary["scores"]["conditions"]) == {"a", "b", "d"}
    assert Image.open(out / "demo.png").size[1] > 9 * 96


def test_bundled_sample_scenes_are_reproducible(tmp_path):
    from mumu_training.shapes.samples_assets import write_sample_scenes

    from mumu_core.commands.demo import SCENES_JSON

    fresh = write_sample_scenes(tmp_path)
    assert json.loads(fresh.read_text()) == json.loads(SCENES_JSON.read_text())
    for s in json.loads(fresh.read_text())["scenes"]:
        assert np.array_equal(np.asarray(Image_open(tmp_path / s["image"])), np.asarray(Image_open(SCENES_JSON.parent / s["image"])))


def Image_open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
