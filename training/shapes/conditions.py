"""Evaluation prompt sets for `mumu eval`, built from held-out scenes of the shapes world.

Every item is a pure function of (condition, index): its scenes come from
`SeedSequence([EVAL_SEED, condition code, index])`, a namespace disjoint from the training scenes'
(`[TRAIN_SEED, i]`) and the probe's (`[PROBE_SEED, i]`). Crops are cut by the ground-truth box of
`world.render(scene)`, exactly as the training data's phrase boxes cut them.

Conditions:
  a    same-image crops (the training distribution)
  b    cross-image composition: 2-3 objects, each cropped from a different scene (the headline)
  b2   (b') unseen combinations: cross-image crops whose patterns all differ
  c    swapped words: the ball crop before "box" and the box crop before "ball" (diagnostic)
  d    text only: no images; the colours asked for are a held-out scene's, unknowable -> chance
  e    `on a <image> floor`: objects from one scene, the floor crop from another scene's floor
  f0   weight 0 on one of two cross-image crops: that object must fall to chance
  fm   masked cross-image crops (the object's silhouette, background blacked out)
  g1/g6  condition b's prompts at CFG 1 and 6 (b itself runs at the default CFG 3)

Targets say what the probe must read in the output: `noun` is the object whose colour/pattern is
compared with its own crop's; role "scored" counts toward accuracy, role "chance" is expected to
sit at chance (text-only, weight-0 images).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .world import COLOUR_NAMES, FLOOR_NAMES, NOUNS, PATTERNS, Scene, WorldConfig, caption_for, object_mask, render, sample_scene

EVAL_SEED = 9_001            # evaluation scenes: SeedSequence([EVAL_SEED, code, i])

CONDITIONS = {
    # name: (code, cfg override, description)
    "a": (1, None, "same-image crops"),
    "b": (2, None, "cross-image composition"),
    "b2": (3, None, "unseen combinations (patterns differ)"),
    "c": (4, None, "swapped words (crop follows)"),
    "d": (5, None, "text only (must be chance)"),
    "e": (6, None, "floor from another scene"),
    "f0": (7, None, "weight 0 on one image"),
    "fm": (8, None, "masked crops"),
    "g1": (2, 1.0, "cross-image at CFG 1"),
    "g6": (2, 6.0, "cross-image at CFG 6"),
}
ALIASES = {"b'": ["b2"], "f": ["f0", "fm"], "g": ["g1", "b", "g6"], "all": list(CONDITIONS)}
DEFAULT_CONDITIONS = ("a", "b", "b2", "c", "d", "e", "f0", "fm", "g1", "g6")


@dataclass
class Target:
    noun: str                      # the object the probe reads in the output
    colour: str
    pattern: str
    role: str = "scored"           # "scored" | "chance"
    word_noun: str | None = None   # condition c: the word the crop stands before


@dataclass
class EvalItem:
    condition: str
    index: int
    prompt: str
    images: list = field(default_factory=list)       # PIL crops, in placeholder order
    masks: list = field(default_factory=list)        # PIL L masks or None, per image
    weights: list = field(default_factory=list)      # per image
    targets: list = field(default_factory=list)
    floor: str | None = None                         # the floor the output must show (condition e)
    cfg: float | None = None                         # override of the run's CFG
    seed: int = 0                                    # sampling seed of this prompt's image
    sources: list = field(default_factory=list)      # source-scene id per image (which scene it was cut from)
    source_scenes: list = field(default_factory=list)  # the Scene each image was cut from (provenance, tests)

    def describe(self) -> dict:
        return {"condition": self.condition, "index": self.index, "prompt": self.prompt, "weights": self.weights,
                "masked": [m is not None for m in self.masks], "floor": self.floor, "cfg": self.cfg, "seed": self.seed,
                "sources": self.sources, "targets": [t.__dict__ for t in self.targets]}


def expand_conditions(spec: str | list[str] | None) -> list[str]:
    """'a,b,f' -> ['a', 'b', 'f0', 'fm'] (aliases: b' = b2, f = f0+fm, g = g1+b+g6, all)."""
    if spec is None:
        return list(DEFAULT_CONDITIONS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        for n in ALIASES.get(name, [name]):
            if n not in CONDITIONS:
                raise ValueError(f"unknown condition {name!r}; choose from {', '.join(list(CONDITIONS) + list(ALIASES))}")
            if n not in out:
                out.append(n)
    return out


def _rng(code: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([EVAL_SEED, code, i]))


def _prompt(words: list[str], floor_word: str = "the floor") -> str:
    return caption_for([f"<image> {w}" for w in words], floor_word)


def _source(rng, world: WorldConfig, noun: str, colour: str, pattern: str | None = None) -> Scene:
    """A held-out scene whose first object is `noun` in `colour` (pattern natural unless given), 0-2 others."""
    k_other = int(rng.integers(0, min(3, world.max_objects)))
    others = [n for n in (NOUNS[j] for j in rng.permutation(len(NOUNS))) if n != noun][:k_other]
    rest = [c for c in (COLOUR_NAMES[j] for j in rng.permutation(len(COLOUR_NAMES))) if c != colour][:k_other]
    patterns = None
    if pattern is not None:
        patterns = [pattern] * (1 + k_other)
    return sample_scene(rng, world, nouns=[noun] + others, colours=[colour] + rest, patterns=patterns)


def _crop(scene: Scene, index: int, world: WorldConfig) -> Image.Image:
    return render(scene, world.stripe_period).crop(scene.objects[index].box)


def _nouns(rng, k: int) -> list[str]:
    return [NOUNS[j] for j in rng.permutation(len(NOUNS))[:k]]


def _colours(rng, k: int) -> list[str]:
    return [COLOUR_NAMES[j] for j in rng.permutation(len(COLOUR_NAMES))[:k]]


def build_item(condition: str, i: int, world: WorldConfig | None = None, n_objects: tuple[int, ...] = (2, 3)) -> EvalItem:
    world = world or WorldConfig()
    code, cfg, _ = CONDITIONS[condition]
    rng = _rng(code, i)
    seed = code * 1_000_000 + i
    base = condition if condition not in ("g1", "g6") else "b"
    k = int(rng.choice(n_objects))
    item = EvalItem(condition, i, "", cfg=cfg, seed=seed)

    if base in ("a", "d", "e"):
        if base == "e":
            k = 2
        scene = sample_scene(rng, world, nouns=_nouns(rng, k))
        words = [o.noun for o in scene.objects]
        role = "chance" if base == "d" else "scored"
        item.targets = [Target(o.noun, o.colour, o.pattern, role) for o in scene.objects]
        if base == "d":
            item.prompt = caption_for(words)
            return item
        item.images = [_crop(scene, j, world) for j in range(len(words))]
        item.sources = [f"{condition}/{i}/0"] * len(words)
        item.source_scenes = [scene] * len(words)
        if base == "a":
            item.prompt = _prompt(words)
        else:
            floor = str(rng.choice([f for f in FLOOR_NAMES if f != scene.floor]))
            other = sample_scene(rng, world, floor=floor)
            while other.floor_box is None:
                other = sample_scene(rng, world, floor=floor)
            item.prompt = _prompt(words, "a <image> floor")
            item.images.append(render(other, world.stripe_period).crop(other.floor_box))
            item.sources.append(f"{condition}/{i}/1")
            item.source_scenes.append(other)
            item.floor = floor
        item.masks = [None] * len(item.images)
        item.weights = [1.0] * len(item.images)
        return item

    # cross-image conditions: each object from its own scene
    if base in ("c", "f0", "fm"):
        k = 2
    if base == "b2":
        k = min(k, len(PATTERNS))
    nouns, colours = _nouns(rng, k), _colours(rng, k)
    patterns = [PATTERNS[j] for j in rng.permutation(len(PATTERNS))[:k]] if base == "b2" else [None] * k
    scenes = [_source(rng, world, n, c, p) for n, c, p in zip(nouns, colours, patterns)]
    item.images = [_crop(s, 0, world) for s in scenes]
    item.sources = [f"{condition}/{i}/{j}" for j in range(k)]
    item.source_scenes = scenes
    item.masks = [object_mask(s, 0).crop(s.objects[0].box) if base == "fm" else None for s in scenes]
    item.weights = [1.0] * k
    item.targets = [Target(s.objects[0].noun, s.objects[0].colour, s.objects[0].pattern) for s in scenes]
    if base == "c":
        item.prompt = _prompt([nouns[1], nouns[0]])       # crop of nouns[0] before the word nouns[1], and back
        item.targets[0].word_noun, item.targets[1].word_noun = nouns[1], nouns[0]
    else:
        item.prompt = _prompt(nouns)
    if base == "f0":
        z = int(rng.integers(0, 2))
        item.weights[z] = 0.0
        item.targets[z].role = "chance"
    return item


def build_condition(condition: str, n: int, world: WorldConfig | None = None) -> list[EvalItem]:
    return [build_item(condition, i, world) for i in range(n)]
