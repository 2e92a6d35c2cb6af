"""The toy VLM's captioning pretraining (training/shapes/vlm_pretrain.py): it learns to name a crop's
colour, moves only the image path, and leaves a folder that loads like any Idefics2 folder."""

from __future__ import annotations

import numpy as np
import torch

from mumu_core.encoder import MumuEncoder
from mumu_core.prompt import InterleavedPrompt
from mumu_core.vlm import load_vlm
from mumu_training.shapes.components import TOKENS_PER_IMAGE, write_vlm
from mumu_training.shapes.vlm_pretrain import VlmPretrainConfig, _batch, descriptions, pretrain_vlm
from mumu_training.shapes.world import COLOUR_NAMES, FLOOR_NAMES, NOUNS, PATTERNS, WorldConfig, sample_scene


def _hidden(folder, prompts):
    encoder = MumuEncoder(load_vlm(folder), adapter=None, config={"tokens_per_image": TOKENS_PER_IMAGE})
    with torch.no_grad():
        return encoder.vlm_hidden_states(encoder.prepare(prompts))[0]


def test_descriptions_name_what_the_crop_shows():
    world = WorldConfig()
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = sample_scene(rng, world)
        crop, text = descriptions(scene, world, rng)
        words = text.split()
        if words[-1] == "floor":
            assert words[0] == scene.floor and words[0] in FLOOR_NAMES and crop.size[0] == crop.size[1]
        else:
            match = [o for o in scene.objects if (o.colour, o.pattern, o.noun) == tuple(words)]
            assert match and words[0] in COLOUR_NAMES and words[1] in PATTERNS and words[2] in NOUNS
            x0, y0, x1, y1 = match[0].box
            assert crop.size == (x1 - x0, y1 - y0)


def test_pretraining_learns_colours_and_leaves_the_text_path_alone(tmp_path):
    folder = write_vlm(tmp_path / "vlm")
    world = WorldConfig()
    text = [InterleavedPrompt.parse("a ball and a box on the floor", [])]
    images, _ = _batch(np.random.default_rng(3), 4, world, TOKENS_PER_IMAGE)
    text_before, image_before = _hidden(folder, text), _hidden(folder, images)

    summary = pretrain_vlm(folder, world, VlmPretrainConfig(steps=150, held_out=64), TOKENS_PER_IMAGE, progress=False)

    accuracy = summary["held_out_word_accuracy"]
    assert set(accuracy) == {"colour", "pattern", "noun", "floor"}
    assert accuracy["colour"] > 0.5, accuracy  # chance is 1/8
    assert (folder / "vlm_summary.json").is_file()
    # the LLM is frozen: a caption without images encodes exactly as before; crops do not
    assert torch.equal(_hidden(folder, text), text_before)
    assert not torch.allclose(_hidden(folder, images), image_before)
