"""`mumu demo`: a shapes-world model composes crops of the bundled sample scenes.

    mumu demo --out demo_out                    # the shipped model (mumu_core/assets/shapes_model);
                                                # without one installed: the --random-weights run
    mumu demo --model runs/shapes/model         # any shapes model folder
    mumu demo --random-weights --out demo_out   # the old smoke run on tiny random components

Default: crops of the four bundled sample scenes (mumu_core/assets/shapes_scene_*.png, their
ground-truth boxes in shapes_scenes.json) go into one prompt per condition — same-image crops,
cross-image composition, unseen pattern mixes, swapped words, text only, a floor from another
scene, a weight-0 image, masked crops — through the real path (MumuEncoder -> SDXL + UNet LoRA).
Writes OUT/demo.png (a contact sheet: input crops -> output, one row per condition), OUT/demo.json
and the scores measured on a small held-out set (`mumu eval` with --n 32 on conditions a, b, d).
A toy-world model (64 px shapes), not SDXL: it shows the mechanism, measured.

--random-weights: the whole inference path on tiny random components (noise, by design):
writes demo.png + demo.json exactly as before the shapes model shipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MumuError
from ._common import atomic_write

DEMO_PROMPT = "a <image> man and his <image> dog in an <image> animated style"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
SCENES_JSON = ASSETS / "shapes_scenes.json"

# (condition, prompt words, [(scene, object index, weight, masked)], floor crop scene or None)
DEMO_ROWS = (
    ("a same-image crops", ["box", "cone", "ring"], [(2, 0, 1, 0), (2, 1, 1, 0), (2, 2, 1, 0)], None),
    ("b cross-image", ["ball", "box"], [(1, 0, 1, 0), (2, 0, 1, 0)], None),
    ("b cross-image, 3 scenes", ["star", "ring", "cone"], [(1, 1, 1, 0), (3, 0, 1, 0), (4, 0, 1, 0)], None),
    ("b' unseen pattern mix", ["ball", "cone"], [(3, 1, 1, 0), (2, 1, 1, 0)], None),
    ("c swapped words", ["box", "ball"], [(1, 0, 1, 0), (4, 1, 1, 0)], None),
    ("d text only", ["ball", "box"], [], None),
    ("e floor from scene 2", ["ring", "ball"], [(3, 0, 1, 0), (3, 1, 1, 0)], 2),
    ("f weight 0 on the box", ["ball", "box"], [(1, 0, 1, 0), (2, 0, 0, 0)], None),
    ("f masked crops", ["star", "cone"], [(1, 1, 1, 1), (2, 1, 1, 1)], None),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--model", type=Path, default=None,
                        help="shapes model folder (default: the shipped mumu_core/assets/shapes_model)")
    parser.add_argument("--n", type=int, default=32, help="held-out prompts per scored condition (default 32; 0 skips)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 15; --random-weights: 4)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    g = parser.add_argument_group("--random-weights (the old smoke run on tiny random components)")
    g.add_argument("--random-weights", action="store_true",
                   help="run the inference path on tiny random components instead (noise, by design)")
    g.add_argument("--tiny", type=Path, default=None, help="tiny components folder (default OUT/tiny; written if absent; implies --random-weights)")
    g.add_argument("--tokens-per-image", type=int, default=36, help="patch tokens per image (default 36)")
    g.add_argument("--size", type=int, default=128, help="output width and height in px")


def run(args: argparse.Namespace) -> int:
    if args.random_weights or args.tiny is not None:   # --tiny only makes sense for the random-weights run
        return run_random_weights(args)
    if args.model is None and not (ASSETS / "shapes_model").is_dir():
        # no trained shapes model ships yet (see README "The shapes world"): the smoke run still
        # exercises every part of the inference path
        print("mumu demo: no trained shapes model is installed (mumu_core/assets/shapes_model); running the "
              "random-weights demo instead. Train one with `python -m mumu_training.shapes reproduce --out "
              "runs/shapes` and run `mumu demo --model runs/shapes/model`.", file=sys.stderr)
        return run_random_weights(args)
    return run_shapes(args)


# ---------------------------------------------------------------- the shapes model

def load_sample_scenes() -> list[tuple[object, dict]]:
    """The bundled sample scenes: [(PIL render, scene dict)], scene k = index k - 1."""
    from PIL import Image

    if not SCENES_JSON.is_file():
        raise MumuError(f"the sample scenes ({SCENES_JSON}) are missing from this installation.")
    scenes = json.loads(SCENES_JSON.read_text())["scenes"]
    out = []
    for s in scenes:
        with Image.open(ASSETS / s["image"]) as im:
            out.append((im.convert("RGB"), s["scene"]))
    return out


def demo_items(seed: int = 0):
    """The contact-sheet prompts as EvalItems (crops cut by the scenes' ground-truth boxes)."""
    from mumu_training.shapes.conditions import EvalItem, Target, _prompt
    from mumu_training.shapes.world import Scene, caption_for, object_mask

    scenes = load_sample_scenes()
    items = []
    for r, (label, words, picks, floor_from) in enumerate(DEMO_ROWS):
        it = EvalItem(label.split()[0], r, "", seed=seed + r)
        for k, j, w, masked in picks:
            image, sd = scenes[k - 1]
            scene = Scene.from_dict(sd)
            o = scene.objects[j]
            it.images.append(image.crop(o.box))
            it.masks.append(object_mask(scene, j).crop(o.box) if masked else None)
            it.weights.append(float(w))
            it.sources.append(f"scene {k}")
            it.targets.append(Target(o.noun, o.colour, o.pattern, "scored" if w else "chance",
                                     word_noun=words[len(it.images) - 1]))
        if not picks:
            it.prompt = caption_for(words)
        elif floor_from:
            image, sd = scenes[floor_from - 1]
            scene = Scene.from_dict(sd)
            it.images.append(image.crop(scene.floor_box))
            it.masks.append(None)
            it.weights.append(1.0)
            it.sources.append(f"scene {floor_from}")
            it.floor = scene.floor
            it.prompt = _prompt(words, "a <image> floor")
        else:
            it.prompt = _prompt(words)
        items.append((label, it))
    return items


def run_shapes(args: argparse.Namespace) -> int:
    try:
        from mumu_training.shapes import evaluate
    except ModuleNotFoundError as exc:
        raise MumuError(f"mumu demo needs the training package (mumu_training; {exc}). Install the project with "
                        f"`pip install -e .`, or run `mumu demo --random-weights`.") from None
    import time

    model = args.model or evaluate.shipped_model_dir()
    try:
        evaluate.model_paths(model)
    except MumuError as exc:
        raise MumuError(f"{exc} (`mumu demo --random-weights` runs without it.)") from None
    steps = args.steps or 15
    settings = evaluate.Settings(steps=steps, cfg=args.cfg)
    t0 = time.perf_counter()
    print(f"shapes model: {model} (a toy world of 64 px shapes, not SDXL)")
    shapes = evaluate.ShapesModel(model)
    rows = demo_items(args.seed)
    items = [it for _, it in rows]
    print(f"composing {len(items)} prompts from the bundled sample scenes ({steps} DDIM steps, CFG {args.cfg:g})")
    outputs = shapes.generate(items, settings)
    readings = shapes.read(outputs)
    args.out.mkdir(parents=True, exist_ok=True)
    sheet, listing = [], []
    for (label, it), im, r in zip(rows, outputs, readings):
        read = {t.noun: r["nouns"][t.noun] for t in it.targets}
        marks = " ".join(f"{t.noun}:{'ok' if evaluate._right(t, r, 'colour') else 'x'}" for t in it.targets if t.role == "scored")
        sheet.append((f"{label}\n{it.prompt}\n{marks}", evaluate._shown_inputs(it), im))
        listing.append({"condition": label, "prompt": it.prompt, "sources": it.sources, "weights": it.weights,
                        "asked": [t.__dict__ for t in it.targets], "probe_read": read, "floor_read": r["floor"],
                        "floor_asked": it.floor})
    evaluate.contact_sheet(sheet, args.out / "demo.png")
    summary = {"model": str(model), "what": "MUMU trained on the procedural shapes world (a toy world, not SDXL)",
               "sampling": {"steps": steps, "cfg": args.cfg, "scheduler": "ddim", "size": 64, "seed": args.seed},
               "rows": listing, "probe": shapes.probe_info["metrics"]}
    if args.n > 0:
        result = evaluate.run_eval(model, ["a", "b", "d"], args.n, settings, out=None, progress=not args.no_progress,
                                   shapes=shapes)
        print(result.pop("table"))
        summary["scores"] = result
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(args.out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"wrote {args.out / 'demo.png'} (input crops -> output, one row per condition) and {args.out / 'demo.json'}")
    return 0


# ---------------------------------------------------------------- --random-weights (unchanged behaviour)

def run_random_weights(args: argparse.Namespace) -> int:
    from ..tiny import write_tiny_components
    from .generate import run_generation

    tiny_dir = args.tiny or args.out / "tiny"
    print(f"tiny components: {tiny_dir}")
    paths = write_tiny_components(tiny_dir, detectors=False)
    images = paths["images"]
    gen_args = argparse.Namespace(
        sdxl=paths["sdxl"], sdxl_config=None, vlm=paths["vlm"], bundle=paths["bundle"], dtype="fp32", device="cpu",
        prompt=DEMO_PROMPT, image=[images / "man.png", images / "dog.png", images / "style.png"], mask=[], weight=[],
        tokens_per_image=args.tokens_per_image, negative="", steps=args.steps or 4, cfg=6.0, seed=args.seed,
        width=args.size, height=args.size, scheduler="ddim", lora_strength=1.0, no_unet_lora=False,
        out=args.out / "demo.png",
    )
    summary = run_generation(gen_args)
    summary["tiny_components"] = {k: str(v) for k, v in paths.items()}
    atomic_write(args.out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"wrote {args.out / 'demo.png'} and {args.out / 'demo.json'}")
    for entry in summary["layout"]:
        print(f"  image {entry['image']}: {entry['tokens']} tokens at {entry['start']}..{entry['end']} ({entry['side']} px)")
    print(f"  context {summary['context_shape']}, pooled {summary['pooled_shape']}, timings {summary['timings']}")
    return 0
