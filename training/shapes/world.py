"""The shapes world: procedural scenes whose captions name objects but never their appearance.

A scene is 1-3 objects (distinct nouns from `NOUNS`) on a textured floor. Each object has a colour
(`COLOURS`) and a pattern (`PATTERNS`); the floor has one of `FLOORS`. The caption says only
`a ball and a box on the floor`, so an object's look can reach a generated image only through the
images in the prompt, and a model that gets colours right is reading its crops.

Training scenes carry the within-scene correlation a bootstrapped photo dataset has (one photo's
objects share its lighting and style): with probability `shared_pattern_prob` every object of a
scene has the same pattern. Crops from *different* scenes then make combinations the training
data rarely or never showed — the test of MUMU's composition claim.

Everything is a pure function of a seed: `sample_scene(rng)` draws a `Scene`, `render(scene)` draws
it, `record(scene, ...)` writes the annotation record the real pipeline reads (ground-truth phrase
boxes in place of a detector's), and `write_dataset` writes a caption folder + annotation shards
that `training/samples.py` consumes unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

NOUNS = ("ball", "box", "cone", "ring", "star")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 225, 40),
    "green": (50, 185, 60),
    "cyan": (60, 215, 230),
    "blue": (40, 80, 230),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("solid", "striped", "dotted")
# Dark floors so every object colour stands out; each is a colour *and* a texture.
FLOORS = {
    "slate": ((70, 70, 78), None),                 # plain
    "wood": ((95, 62, 38), (70, 44, 26)),          # checker
    "navy": ((30, 36, 80), (60, 70, 130)),         # grid lines
    "moss": ((36, 70, 40), (24, 48, 28)),          # diagonal stripes
}
FLOOR_NAMES = tuple(FLOORS)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean edges, stable patterns


@dataclass
class WorldConfig:
    """Knobs of the world. Defaults are the shipped model's."""

    size: int = 64                        # image side in px
    min_objects: int = 1
    max_objects: int = 3
    min_object_size: int = 20             # object bounding box side, px
    max_object_size: int = 28
    shared_pattern_prob: float = 0.8      # within-scene correlation (training scenes)
    floor_crop_size: int = 18             # an object-free square of floor, annotated as "floor"
    stripe_period: int = 8                # px at `size`; stripes/dots stay >= 2 latent px at VAE factor 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(NOUNS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(NOUNS)}; got "
                             f"{self.min_objects}, {self.max_objects}")
        if not 0.0 <= self.shared_pattern_prob <= 1.0:
            raise ValueError(f"shared_pattern_prob is a probability; got {self.shared_pattern_prob}")
        if self.max_object_size * 2 > self.size:
            raise ValueError(f"objects of {self.max_object_size} px do not fit {self.max_objects} to a "
                             f"{self.size} px scene; lower max_object_size")


@dataclass
class ShapeObject:
    noun: str
    colour: str
    pattern: str
    box: tuple[int, int, int, int]        # x0, y0, x1, y1 (x1/y1 exclusive), pixels


@dataclass
class Scene:
    objects: list[ShapeObject]
    floor: str
    floor_box: tuple[int, int, int, int] | None = None   # an object-free square of floor
    size: int = 64
    meta: dict = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return caption_for([o.noun for o in self.objects])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = [ShapeObject(o["noun"], o["colour"], o["pattern"], tuple(o["box"])) for o in d["objects"]]
        fb = tuple(d["floor_box"]) if d.get("floor_box") else None
        return cls(objs, d["floor"], fb, int(d.get("size", 64)), dict(d.get("meta", {})))


def caption_for(nouns: list[str], floor_word: str = "the floor") -> str:
    """`a ball`, `a ball and a box`, `a ball, a box and a star` + ` on the floor`."""
    items = [f"a {n}" for n in nouns]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{body} on {floor_word}"


def described_caption(scene: "Scene", rng: np.random.Generator, name_prob: float = 0.8) -> str:
    """The caption with appearance words, each named with probability `name_prob`:
    `a red striped ball and a dotted box on the navy floor`.

    Only stage 0 (the stand-in for SDXL's pretraining, whose captions describe colours and textures)
    reads these; the MUMU stage and every eval prompt use `Scene.caption`, which names none. Words
    left out at random teach the UNet that an unnamed attribute is free, so `a ball` still draws a
    ball of any colour (text-only prompts stay at chance).
    """
    return described_caption_spans(scene, rng, name_prob)[0]


def described_caption_spans(scene: "Scene", rng: np.random.Generator,
                            name_prob: float = 0.8) -> tuple[str, list[tuple[int, int]]]:
    """`described_caption` (same draws from `rng`) and, per object, the character span of its phrase
    (`red striped ball`: the appearance words named and the noun, without the article)."""
    def named(word: str) -> str:
        return f"{word} " if rng.random() < name_prob else ""

    phrases = [f"{named(o.colour)}{named(o.pattern)}{o.noun}" for o in scene.objects]
    items = [f"a {p}" for p in phrases]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    caption = f"{body} on the {named(scene.floor)}floor"
    spans, cursor = [], 0
    for item, phrase in zip(items, phrases):
        start = caption.index(item, cursor) + 2
        spans.append((start, start + len(phrase)))
        cursor = start + len(phrase)
    return caption, spans


def word_spans(caption: str, words: list[str]) -> list[tuple[int, int]]:
    """Character span of each word's first whole-word occurrence, in order."""
    spans, cursor = [], 0
    for w in words:
        i = caption.index(f" {w}", cursor) + 1
        spans.append((i, i + len(w)))
        cursor = i + len(w)
    return spans


# ---------------------------------------------------------------- sampling

def _place(rng: np.random.Generator, sizes: list[int], size: int, tries: int = 200):
    """Non-overlapping square boxes (1 px apart) for the given sides, or None."""
    boxes: list[tuple[int, int, int, int]] = []
    for s in sizes:
        for _ in range(tries):
            x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            b = (x0, y0, x0 + s, y0 + s)
            if all(_gap(b, o) >= 1 for o in boxes):
                boxes.append(b)
                break
        else:
            return None
    return boxes


def _gap(a, b) -> int:
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _floor_box(rng: np.random.Generator, boxes, size: int, side: int):
    for _ in range(100):
        x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        b = (x0, y0, x0 + side, y0 + side)
        if all(_gap(b, o) >= 0 for o in boxes):
            return b
    return None


def sample_scene(rng: np.random.Generator, cfg: WorldConfig | None = None, *, nouns: list[str] | None = None,
                 colours: list[str] | None = None, patterns: list[str] | None = None,
                 floor: str | None = None) -> Scene:
    """One random scene; any attribute list given is used as is (for building evaluation scenes)."""
    cfg = cfg or WorldConfig()
    while True:
        n = len(nouns) if nouns else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        ns = list(nouns) if nouns else [NOUNS[i] for i in rng.permutation(len(NOUNS))[:n]]
        cs = list(colours) if colours else [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))[:n]]
        if patterns:
            ps = list(patterns)
        elif rng.random() < cfg.shared_pattern_prob:
            ps = [PATTERNS[int(rng.integers(len(PATTERNS)))]] * n
        else:
            ps = [PATTERNS[int(i)] for i in rng.integers(0, len(PATTERNS), n)]
        fl = floor or FLOOR_NAMES[int(rng.integers(len(FLOOR_NAMES)))]
        sizes = [int(rng.integers(cfg.min_object_size, cfg.max_object_size + 1)) for _ in range(n)]
        boxes = _place(rng, sizes, cfg.size)
        if boxes is None:
            continue
        objs = [ShapeObject(*a, box=b) for a, b in zip(zip(ns, cs, ps), boxes)]
        return Scene(objs, fl, _floor_box(rng, boxes, cfg.size, cfg.floor_crop_size), cfg.size)


# ---------------------------------------------------------------- rendering

def _floor_image(name: str, size: int) -> Image.Image:
    base, alt = FLOORS[name]
    a = np.empty((size, size, 3), dtype=np.uint8)
    a[:] = base
    yy, xx = np.mgrid[0:size, 0:size]
    cell = max(2, size // 8)
    if name == "wood":
        a[((xx // cell + yy // cell) % 2) == 1] = alt
    elif name == "navy":
        a[(xx % cell == 0) | (yy % cell == 0)] = alt
    elif name == "moss":
        a[((xx + yy) // max(1, cell // 2)) % 2 == 1] = alt
    return Image.fromarray(a, "RGB")


def _shape_mask(noun: str, box, scale: int) -> Image.Image:
    """The object's silhouette (L, 255 inside) at `scale` times the scene resolution."""
    x0, y0, x1, y1 = [v * scale for v in box]
    w = x1 - x0
    m = Image.new("L", (w, w), 0)
    d = ImageDraw.Draw(m)
    if noun == "ball":
        d.ellipse((0, 0, w - 1, w - 1), fill=255)
    elif noun == "box":
        inset = w // 12
        d.rectangle((inset, inset, w - 1 - inset, w - 1 - inset), fill=255)
    elif noun == "cone":
        d.polygon([(w / 2, 0), (w - 1, w - 1), (0, w - 1)], fill=255)
    elif noun == "ring":
        d.ellipse((0, 0, w - 1, w - 1), fill=255)
        k = w * 0.27
        d.ellipse((k, k, w - 1 - k, w - 1 - k), fill=0)
    elif noun == "star":
        c, ro, ri = (w - 1) / 2, (w - 1) / 2, (w - 1) / 2 * 0.45
        pts = []
        for i in range(10):
            r = ro if i % 2 == 0 else ri
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((c + r * math.cos(a), c + r * math.sin(a) + w * 0.04))
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown noun {noun!r}; the world has {NOUNS}")
    return m


def _fill(colour: str, pattern: str, w: int, period: int) -> Image.Image:
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    dark = rgb * 0.25
    a = np.empty((w, w, 3), dtype=np.float32)
    a[:] = rgb
    yy, xx = np.mgrid[0:w, 0:w]
    if pattern == "striped":
        a[(yy // (period // 2)) % 2 == 1] = dark
    elif pattern == "dotted":
        c = period / 2
        r = period * 0.28
        a[((xx % period - c + 0.5) ** 2 + (yy % period - c + 0.5) ** 2) <= r * r] = dark
    elif pattern != "solid":
        raise ValueError(f"unknown pattern {pattern!r}; the world has {PATTERNS}")
    return Image.fromarray(a.astype(np.uint8), "RGB")


def render(scene: Scene, stripe_period: int = 8) -> Image.Image:
    """The scene as an RGB image of scene.size px."""
    s = SUPERSAMPLE
    big = _floor_image(scene.floor, scene.size).resize((scene.size * s, scene.size * s), Image.NEAREST)
    for o in scene.objects:
        mask = _shape_mask(o.noun, o.box, s)
        # the pattern is anchored to the object, so a crop carries it whatever its position
        tex = _fill(o.colour, o.pattern, mask.width, stripe_period * s)
        big.paste(tex, (o.box[0] * s, o.box[1] * s), mask)
    return big.resize((scene.size, scene.size), Image.BOX)


def object_mask(scene: Scene, index: int) -> Image.Image:
    """Scene-sized L mask of one object (255 = object), e.g. for masked-crop prompts."""
    o = scene.objects[index]
    s = SUPERSAMPLE
    big = Image.new("L", (scene.size * s, scene.size * s), 0)
    big.paste(_shape_mask(o.noun, o.box, s), (o.box[0] * s, o.box[1] * s))
    return big.resize((scene.size, scene.size), Image.BOX)


# ---------------------------------------------------------------- records and datasets

def record(scene: Scene, record_id: str, path: str) -> dict:
    """The bootstrap annotation record of a scene: ground-truth phrase boxes, one per noun and floor."""
    caption = scene.caption
    words = [o.noun for o in scene.objects]
    crops = []
    for o, (s, e) in zip(scene.objects, word_spans(caption, words)):
        crops.append({"phrase": o.noun, "start": s, "end": e, "box": [float(v) for v in o.box], "score": 1.0,
                      "person": False, "head_box": None, "head_score": None})
    if scene.floor_box is not None:
        s = caption.rindex("floor")
        crops.append({"phrase": "floor", "start": s, "end": s + 5, "box": [float(v) for v in scene.floor_box],
                      "score": 1.0, "person": False, "head_box": None, "head_score": None})
    return {"id": record_id, "source": {"path": path}, "caption": caption, "width": scene.size,
            "height": scene.size, "mode": "RGB", "crops": crops, "scene": scene.to_dict()}


def iter_scenes(seed: int, n: int, cfg: WorldConfig | None = None) -> Iterator[Scene]:
    """n scenes from one seed; scene i depends only on (seed, i)."""
    for i in range(n):
        yield sample_scene(np.random.default_rng(np.random.SeedSequence([seed, i])), cfg)


def write_dataset(out: str | Path, n: int, seed: int, cfg: WorldConfig | None = None, shard_size: int = 2500,
                  progress: bool = True) -> dict:
    """Caption folder (`images/*.png` + `*.txt`) + annotation folder (`boot/`) for n scenes.

    Same layout as `mumu bootstrap --out`: `boot/manifest.json` + `boot/shards/*.jsonl.gz`, so
    `AnnotationDataset(out/boot)` reads it. Written into a temporary sibling folder and renamed
    when complete; an existing complete folder is left as it is.
    """
    import shutil

    from tqdm.auto import tqdm

    from mumu_core.atomic import fsync_dir

    from ..bootstrap.records import atomic_write_bytes, atomic_write_json, encode_records, shard_name

    cfg = cfg or WorldConfig()
    out = Path(out)
    if (out / "boot" / "manifest.json").is_file():
        return json.loads((out / "boot" / "manifest.json").read_text())
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "boot" / "shards").mkdir(parents=True)
    shards, batch = [], []
    for i, scene in enumerate(tqdm(iter_scenes(seed, n, cfg), total=n, desc="world", disable=not progress)):
        name = f"images/{i:06d}"
        render(scene, cfg.stripe_period).save(tmp / f"{name}.png")
        (tmp / f"{name}.txt").write_text(scene.caption + "\n")
        batch.append(record(scene, f"{seed}/{i:06d}", f"{name}.png"))
        if len(batch) == shard_size or i == n - 1:
            atomic_write_bytes(tmp / "boot" / "shards" / shard_name(len(shards)), encode_records(batch))
            shards.append({"name": shard_name(len(shards)), "records": len(batch)})
            batch = []
    manifest = {"format": "mumu-bootstrap-annotations", "source": "shapes-world", "seed": seed, "scenes": n,
                "world": asdict(cfg), "image_root": str(out.resolve()), "shards": shards}
    atomic_write_json(tmp / "boot" / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    fsync_dir(out.parent)
    return manifest
