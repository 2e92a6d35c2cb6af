"""Can the stage-0 UNet draw what a caption names? The MUMU stage's starting point, measured.

MUMU teaches a pretrained text-to-image UNet to take an object's appearance from a crop instead of
from words; if the UNet cannot yet draw `a red striped ball and a blue dotted box` with each colour
on its own object, the MUMU stage has no binding to reuse. This check generates held-out scenes from
captions that name every attribute (`world.described_caption`) through the stage-0 UNet and the
stage-0 adapter (an adapter-only bundle, no LoRA: the real `mumu` path), reads them with the
attribute probe, and reports, for 2-3 objects and for a single object, the named colour per object
(Wilson 95 % interval), pattern, objects found and floor.

    python -m mumu_training.shapes.text_check --run runs/shapes            # after `reproduce`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TEXT_CHECK_SEED = 31_337   # scenes and sampling seeds disjoint from training (seed 0) and eval


def stage0_bundle(run: Path, out: Path) -> Path:
    """The stage-0 adapter as an ordinary MUMU bundle (no LoRAs), so `mumu`'s loaders read it."""
    from safetensors import safe_open

    from mumu_core.bundle import make_config, save_bundle

    from .components import TOKENS_PER_IMAGE

    with safe_open(str(run / "stage0" / "adapter.safetensors"), "pt") as f:
        adapter_cfg = json.loads(f.metadata()["adapter"])
        adapter = {k: f.get_tensor(k) for k in f.keys()}
    text = json.loads((run / "components" / "vlm" / "config.json").read_text())["text_config"]
    cfg = make_config(vlm_family="idefics2", vlm_hidden_size=text["hidden_size"],
                      vlm_num_layers=text["num_hidden_layers"], adapter=adapter_cfg,
                      tokens_per_image=TOKENS_PER_IMAGE, provenance={"kind": "shapes stage 0 (text-to-image)"})
    return save_bundle(out, cfg, adapter)


def described_items(n: int, objects: tuple[int, int], seed: int = TEXT_CHECK_SEED) -> list:
    from .conditions import EvalItem, Target
    from .world import WorldConfig, described_caption, sample_scene

    rng = np.random.default_rng(np.random.SeedSequence([seed, objects[0], objects[1]]))
    world = WorldConfig(min_objects=objects[0], max_objects=objects[1])
    items = []
    for i in range(n):
        scene = sample_scene(rng, world)
        items.append(EvalItem("b", i, described_caption(scene, rng, name_prob=1.0),
                              targets=[Target(o.noun, o.colour, o.pattern) for o in scene.objects],
                              floor=scene.floor, seed=seed + 1000 * objects[0] + i))
    return items


def text_check(run: str | Path, probe: str | Path, n: int = 96, steps: int = 10, cfg: float = 3.0) -> dict:
    """Figures for 2-3 named objects and for 1; writes RUN/stage0/text_check.json (+ a contact sheet)."""
    from mumu_core.atomic import atomic_write

    from .evaluate import BUNDLE_NAME, Settings, ShapesModel, contact_sheet, score_condition

    run = Path(run)
    bundle = stage0_bundle(run, run / "stage0" / BUNDLE_NAME)
    shapes = ShapesModel(None, paths={"vlm": run / "components" / "vlm", "sdxl": run / "stage0" / "sdxl",
                                      "bundle": bundle, "probe": Path(probe)})
    result, sheet = {"n": n, "steps": steps, "cfg": cfg}, []
    for name, objects in (("objects_2_3", (2, 3)), ("object_1", (1, 1))):
        items = described_items(n, objects)
        images = shapes.generate(items, Settings(steps=steps, cfg=cfg))
        fig = score_condition("b", items, shapes.read(images))["figures"]
        result[name] = {k: fig[k] for k in ("colour", "all_right", "pattern", "presence", "floor")}
        sheet += [(it.prompt, [], im) for it, im in list(zip(items, images))[:6]]
    result["contact_sheet"] = str(contact_sheet(sheet, run / "stage0" / "text_check.png"))
    atomic_write(run / "stage0" / "text_check.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mumu_training.shapes.text_check", description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/shapes", help="a reproduce output folder (needs components/, stage0/)")
    p.add_argument("--probe", default=None, help="attribute probe (default RUN/model/probe.safetensors)")
    p.add_argument("--n", type=int, default=96, help="prompts per setting")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=3.0)
    args = p.parse_args(argv)
    probe = args.probe or str(Path(args.run) / "model" / "probe.safetensors")
    res = text_check(args.run, probe, args.n, args.steps, args.cfg)
    for name in ("objects_2_3", "object_1"):
        r = res[name]
        print(f"{name:<12} colour/object {r['colour']['p']:6.1%} [{r['colour']['lo']:.1%}, {r['colour']['hi']:.1%}]  "
              f"found {r['presence']['p']:6.1%}  floor {r['floor']['p']:6.1%}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
