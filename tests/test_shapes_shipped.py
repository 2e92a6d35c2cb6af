"""The shipped shapes model, through the real `mumu` path (prompt -> VLM -> adapter -> UNet + LoRA -> VAE),
composes crops from different scenes well above chance; from text alone it stays at chance.

A regression anywhere on that path (tokenising, image placement, the adapter, the LoRA merge, the
scheduler) drops the cross-image score to chance and fails this test. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from mumu_training.shapes.evaluate import Settings, run_eval, shipped_model_dir
from mumu_training.shapes.metrics import CHANCE


@pytest.fixture(scope="module")
def shipped_result():
    model = shipped_model_dir()
    assert (model / "mumu_shapes.safetensors").is_file(), f"no shapes model shipped in {model}"
    return run_eval(model, ["b", "d"], n=32, settings=Settings(steps=10), progress=False)


def test_shipped_model_composes_cross_image_crops_above_chance(shipped_result):
    b = shipped_result["conditions"]["b"]
    assert b["colour"]["n"] >= 64
    assert b["colour"]["lo"] > CHANCE["colour"], f"cross-image colour {b['colour']} is not above chance"
    assert b["all_right"]["lo"] > b["chance"]["all_right"], b["all_right"]


def test_shipped_model_text_only_stays_near_chance(shipped_result):
    d = shipped_result["conditions"]["d"]
    # appearance can only come from the images: without them the colour is a guess
    assert d["colour"]["lo"] < 2 * CHANCE["colour"], d["colour"]
    assert d["presence"]["p"] > 0.5  # but the named objects are drawn
