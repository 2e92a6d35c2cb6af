"""Write the bundled sample scenes `mumu demo` composes (mumu_core/assets/shapes_scene_*.png + shapes_scenes.json).

    python -m mumu_training.shapes.samples_assets      # rewrites them (deterministic)

Four held-out scenes with chosen attributes, so the demo's cross-image rows mix nouns, colours
and patterns that never shared a scene; boxes are the ground truth from `world.sample_scene`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .world import WorldConfig, render, sample_scene

DEMO_SEED = 4_242
SPECS = (
    dict(nouns=["ball", "star"], colours=["red", "cyan"], patterns=["striped", "striped"], floor="wood"),
    dict(nouns=["box", "cone", "ring"], colours=["yellow", "purple", "green"], patterns=["dotted"] * 3, floor="navy"),
    dict(nouns=["ring", "ball"], colours=["blue", "orange"], patterns=["solid", "solid"], floor="moss"),
    dict(nouns=["cone", "box"], colours=["white", "green"], patterns=["striped", "dotted"], floor="slate"),
)


def write_sample_scenes(assets: Path | None = None) -> Path:
    assets = assets or Path(__file__).resolve().parents[2] / "mumu_core" / "assets"
    world = WorldConfig()
    listing = []
    for k, spec in enumerate(SPECS, 1):
        scene = sample_scene(np.random.default_rng(np.random.SeedSequence([DEMO_SEED, k])), world, **spec)
        while scene.floor_box is None:
            scene = sample_scene(np.random.default_rng(np.random.SeedSequence([DEMO_SEED, k, 1])), world, **spec)
        name = f"shapes_scene_{k}.png"
        render(scene, world.stripe_period).save(assets / name)
        listing.append({"image": name, "caption": scene.caption, "scene": scene.to_dict()})
    out = assets / "shapes_scenes.json"
    out.write_text(json.dumps({"what": "sample scenes of the shapes world for `mumu demo`", "seed": DEMO_SEED,
                               "scenes": listing}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    print(write_sample_scenes())
