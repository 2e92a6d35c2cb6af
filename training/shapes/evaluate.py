"""The engine of `mumu eval` and `mumu demo`: condition prompts -> the real MUMU path -> probe -> figures.

Generation goes through the project's own inference code, nothing special-cased for the toy:
`MumuEncoder.from_pretrained(MODEL/vlm, bundle)` -> `load_sdxl_pipeline(MODEL/sdxl)` +
`load_unet_lora_into_pipeline` -> `generate_batch` (DDIM, CFG 3 by default, one seed per prompt).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mumu_core.errors import MumuError

from .conditions import CONDITIONS, EvalItem, build_condition
from .metrics import CHANCE, Proportion, both_right_chance, format_table

BUNDLE_NAME = "mumu_shapes.safetensors"
PROBE_NAME = "probe.safetensors"


def shipped_model_dir() -> Path:
    import mumu_core

    return Path(mumu_core.__file__).resolve().parent / "assets" / "shapes_model"


def model_paths(model: str | Path) -> dict[str, Path]:
    """The files of a shapes model folder, or a MumuError saying what is missing and how to get it."""
    model = Path(model)
    how = ("Build one with `python -m mumu_training.shapes reproduce --out runs/shapes` (its model is "
           "runs/shapes/model) or pass --model DIR.")
    if not model.is_dir():
        raise MumuError(f"shapes model folder {model} does not exist. {how}")
    paths = {"vlm": model / "vlm", "sdxl": model / "sdxl", "bundle": model / BUNDLE_NAME, "probe": model / PROBE_NAME}
    if not paths["bundle"].is_file():
        others = sorted(p for p in model.glob("*.safetensors") if p.name != PROBE_NAME)
        if len(others) == 1:
            paths["bundle"] = others[0]
    missing = [f"{k} ({p.name})" for k, p in paths.items() if not p.exists()]
    if missing:
        extra = (" Train the probe with `python -m mumu_training.shapes.probe --out MODEL/probe.safetensors "
                 "--vae MODEL/sdxl/vae`." if not paths["probe"].exists() else "")
        raise MumuError(f"{model} is not a complete shapes model folder: missing {', '.join(missing)}. "
                        f"It needs vlm/, sdxl/, {BUNDLE_NAME} and {PROBE_NAME}.{extra} {how}")
    return paths


@dataclass
class Settings:
    steps: int = 15
    cfg: float = 3.0
    size: int = 64
    scheduler: str = "ddim"
    batch: int = 32


class ShapesModel:
    """Everything `mumu eval` needs, loaded once: the encoder, the SDXL pipeline with the UNet LoRA, the probe."""

    def __init__(self, model: str | Path | None, device: str = "cpu", paths: dict[str, Path] | None = None):
        from mumu_core.bundle import read_bundle_config
        from mumu_core.encoder import MumuEncoder
        from mumu_core.pipeline import load_sdxl_pipeline, load_unet_lora_into_pipeline

        from .probe import load_probe

        self.paths = paths or model_paths(model)   # paths: vlm, sdxl, bundle, probe given one by one
        self.config = read_bundle_config(self.paths["bundle"])
        self.encoder = MumuEncoder.from_pretrained(self.paths["vlm"], self.paths["bundle"], device=device)
        self.pipe = load_sdxl_pipeline(self.paths["sdxl"], dtype=torch.float32, device=device)
        self.lora_layers = 0
        if self.config.get("unet_lora"):
            self.lora_layers = load_unet_lora_into_pipeline(self.pipe, self.paths["bundle"])
        self.probe, self.probe_info = load_probe(self.paths["probe"])
        self._negative = None

    @property
    def negative(self):
        if self._negative is None:
            self._negative = self.encoder.encode_unconditional(1)
        return self._negative

    def prompts(self, items: list[EvalItem]):
        from mumu_core.prompt import InterleavedPrompt, PromptImage

        return [InterleavedPrompt.parse(it.prompt, [PromptImage(im, mask=m, weight=w, tokens_per_image=None)
                                                    for im, m, w in zip(it.images, it.masks, it.weights)])
                for it in items]

    def generate(self, items: list[EvalItem], s: Settings, progress=None) -> list:
        """One image per item, batched by CFG; `progress(n)` after each batch."""
        from mumu_core.pipeline import generate_batch

        out: list = [None] * len(items)
        groups: dict[float, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(s.cfg if it.cfg is None else it.cfg, []).append(i)
        for cfg, idx in groups.items():
            for j in range(0, len(idx), s.batch):
                chunk = idx[j : j + s.batch]
                batch = [items[i] for i in chunk]
                pos = self.encoder.encode(self.prompts(batch))
                images = generate_batch(self.pipe, pos, self.negative, steps=s.steps, cfg=cfg,
                                        seeds=[it.seed for it in batch], width=s.size, height=s.size,
                                        scheduler=s.scheduler, progress=False)
                for i, im in zip(chunk, images):
                    out[i] = im
                if progress:
                    progress(len(chunk))
        return out

    def read(self, images: list) -> list[dict]:
        res = []
        for i in range(0, len(images), 128):
            res += self.probe.read(images[i : i + 128])
        return res


# ------------------------------------------------------------------ scoring

def _right(t, r, attr: str) -> bool:
    n = r["nouns"][t.noun]
    return bool(n["present"] and n[attr] == getattr(t, attr))


def score_condition(name: str, items: list[EvalItem], readings: list[dict]) -> dict:
    """Every figure of one condition (Proportions as dicts), plus the table rows it contributes."""
    pairs = [(it, r) for it, r in zip(items, readings)]
    scored = [(t, r) for it, r in pairs for t in it.targets if t.role == "scored"]
    chance_t = [(t, r) for it, r in pairs for t in it.targets if t.role == "chance"]
    primary = scored or chance_t
    role = "scored" if scored else "chance"
    colour = Proportion(sum(_right(t, r, "colour") for t, r in primary), len(primary))
    pattern = Proportion(sum(_right(t, r, "pattern") for t, r in primary), len(primary))
    presence = Proportion(sum(r["nouns"][t.noun]["present"] for it, r in pairs for t in it.targets),
                          sum(len(it.targets) for it in items))
    per_item = [(it, r, [t for t in it.targets if t.role == role]) for it, r in pairs]
    per_item = [(it, r, ts) for it, r, ts in per_item if ts]
    all_right = Proportion(sum(all(_right(t, r, "colour") for t in ts) for _, r, ts in per_item), len(per_item))
    chance_all = both_right_chance([len(ts) for _, _, ts in per_item])
    floors = [(it, r) for it, r in pairs if it.floor]
    floor = Proportion(sum(r["floor"] == it.floor for it, r in floors), len(floors)) if floors else None
    code, cfg, desc = CONDITIONS[name]
    fig = {"description": desc, "n_prompts": len(items), "cfg": cfg, "scored_as": role,
           "colour": colour.to_dict(), "all_right": all_right.to_dict(), "pattern": pattern.to_dict(),
           "presence": presence.to_dict(), "chance": {"colour": CHANCE["colour"], "pattern": CHANCE["pattern"],
                                                     "all_right": round(chance_all, 5)}}
    by_k = {}
    for k in sorted({len(ts) for _, _, ts in per_item}):
        sel = [(r, ts) for _, r, ts in per_item if len(ts) == k]
        by_k[str(k)] = {"colour": Proportion(sum(_right(t, r, "colour") for r, ts in sel for t in ts),
                                             sum(len(ts) for _, ts in sel)).to_dict(),
                        "all_right": Proportion(sum(all(_right(t, r, "colour") for t in ts) for r, ts in sel),
                                                len(sel)).to_dict()}
    fig["by_objects"] = by_k
    rows = [{"name": f"{name} {desc}", "colour": colour, "all_right": all_right, "pattern": pattern,
             "presence": presence, "floor": floor, "chance_all": chance_all, "n": len(items)}]
    if floor:
        fig["floor"] = floor.to_dict()
        fig["chance"]["floor"] = CHANCE["floor"]
    if role == "chance":
        lo, hi = colour.ci
        fig["colour_inside_chance_interval"] = bool(lo <= CHANCE["colour"] <= hi)
    if name == "c":
        word = [(t, r) for t, r in scored if t.word_noun]
        follows_word = Proportion(sum(bool(r["nouns"][t.word_noun]["present"] and r["nouns"][t.word_noun]["colour"] == t.colour)
                                      for t, r in word), len(word))
        fig["follows_crop"] = colour.to_dict()
        fig["follows_word"] = follows_word.to_dict()
        rows.append({"name": "c  ...follows the word", "colour": follows_word, "n": len(items)})
    if chance_t and scored:   # f0: the weight-0 object
        zero = Proportion(sum(_right(t, r, "colour") for t, r in chance_t), len(chance_t))
        lo, hi = zero.ci
        fig["weight0_colour"] = zero.to_dict()
        fig["weight0_inside_chance_interval"] = bool(lo <= CHANCE["colour"] <= hi)
        rows.append({"name": f"{name} ...weight-0 object", "colour": zero,
                     "pattern": Proportion(sum(_right(t, r, "pattern") for t, r in chance_t), len(chance_t)),
                     "chance_all": CHANCE["colour"], "n": len(items)})
    return {"figures": fig, "rows": rows}


# ------------------------------------------------------------------ CLIP / DINO

class Similarity:
    """CLIP-I / CLIP-T (transformers CLIPModel folder) and DINO (Dinov2Model folder) cosine similarities."""

    def __init__(self, clip_dir: str | Path | None = None, dino_dir: str | Path | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model

        self.clip = self.dino = None
        if clip_dir:
            self.clip = CLIPModel.from_pretrained(clip_dir).eval()
            self.clip_proc = AutoImageProcessor.from_pretrained(clip_dir)
            self.clip_tok = AutoTokenizer.from_pretrained(clip_dir)
        if dino_dir:
            self.dino = Dinov2Model.from_pretrained(dino_dir).eval()
            self.dino_proc = AutoImageProcessor.from_pretrained(dino_dir)

    @torch.no_grad()
    def _clip_images(self, images):
        x = self.clip_proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.clip.get_image_features(pixel_values=x)
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def _clip_texts(self, texts):
        tok = self.clip_tok(texts, padding=True, truncation=True, max_length=self.clip.config.text_config.max_position_embeddings,
                            return_tensors="pt")
        out = self.clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def _dino(self, images):
        x = self.dino_proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(self.dino(pixel_values=x).pooler_output.float(), dim=-1)

    def score(self, items: list[EvalItem], outputs: list) -> dict:
        """Mean over prompts of: CLIP-I / DINO (output vs each input image, averaged), CLIP-T (output vs text)."""
        res: dict[str, list[float]] = {"clip_i": [], "clip_t": [], "dino": []}
        for it, out in zip(items, outputs):
            text = " ".join(it.prompt.replace("<image>", " ").split())
            if self.clip is not None:
                e = self._clip_images([out] + list(it.images))
                if it.images:
                    res["clip_i"].append(float((e[1:] @ e[0]).mean()))
                res["clip_t"].append(float(self._clip_texts([text])[0] @ e[0]))
            if self.dino is not None and it.images:
                e = self._dino([out] + list(it.images))
                res["dino"].append(float((e[1:] @ e[0]).mean()))
        return {k: {"mean": round(sum(v) / len(v), 4), "n": len(v)} for k, v in res.items() if v}


# ------------------------------------------------------------------ contact sheet

def contact_sheet(rows: list[tuple[str, list, object]], path: str | Path, cell: int = 96, max_inputs: int = 3) -> Path:
    """rows: (label, input crops, output image) -> one PNG, inputs -> output per row, label on the left."""
    from PIL import Image, ImageDraw

    from mumu_core.atomic import atomic_write

    label_w = 230
    w = label_w + cell * (max_inputs + 1) + 24
    h = max(1, len(rows)) * (cell + 8) + 8
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for r, (label, inputs, output) in enumerate(rows):
        y = 8 + r * (cell + 8)
        for li, line in enumerate(_wrap(label, 36)[:6]):
            d.text((6, y + 2 + 12 * li), line, fill=(0, 0, 0))
        for j, im in enumerate(inputs[:max_inputs]):
            sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
        x_out = label_w + max_inputs * cell + 24
        d.text((x_out - 18, y + cell // 2 - 6), "->", fill=(0, 0, 0))
        if output is not None:
            sheet.paste(output.convert("RGB").resize((cell, cell), Image.NEAREST), (x_out, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return [ln for part in text.split("\n") for ln in (textwrap.wrap(part, width) or [""])]


# ------------------------------------------------------------------ the whole evaluation

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_eval(model: str | Path, conditions: list[str], n: int, settings: Settings, out: str | Path | None = None,
             clip: str | Path | None = None, dino: str | Path | None = None, sheet_rows: int = 3,
             progress: bool = True, shapes: ShapesModel | None = None) -> dict:
    """Generate and score every condition; returns the result (what eval.json holds) with a 'table' string."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # g3 is condition b (which runs at the default CFG): reuse it instead of sampling it twice
    items = {c: build_condition(c, n) for c in conditions}
    total = sum(len(v) for v in items.values())
    _say(f"mumu eval: {len(conditions)} condition(s) x {n} prompts = {total} images, {settings.steps} DDIM steps, "
         f"CFG {settings.cfg:g} (g1/g6: 1/6), {settings.size} px")
    shapes = shapes or ShapesModel(model)
    # calibrate: one batch at 1 step, to print the expected time before the long part
    probe_items = [it for v in items.values() for it in v][: min(settings.batch, total)]
    tc = time.perf_counter()
    shapes.generate(probe_items, Settings(**{**settings.__dict__, "steps": 1}))
    per_step = (time.perf_counter() - tc) / max(1, len(probe_items))
    est = per_step * total * (settings.steps + 0.5)
    _say(f"mumu eval: expected time about {est / 60:.1f} min ({per_step * 1000:.0f} ms per image-step on this machine)")
    outputs: dict[str, list] = {}
    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress)
    for c, its in items.items():
        bar.set_postfix(condition=c)
        outputs[c] = shapes.generate(its, settings, progress=bar.update)
    bar.close()
    figures, rows = {}, []
    readings = {c: shapes.read(outputs[c]) for c in conditions}
    for c in conditions:
        s = score_condition(c, items[c], readings[c])
        figures[c] = s["figures"]
        rows += s["rows"]
    sim = None
    if clip or dino:
        scorer = Similarity(clip, dino)
        sim = {c: scorer.score(items[c], outputs[c]) for c in tqdm(conditions, desc="clip/dino", disable=not progress)}
        for c in conditions:
            figures[c]["similarity"] = sim[c]
    table = format_table(rows)
    if sim:
        lines = [f"{'condition':<10}  {'CLIP-I':>7}  {'CLIP-T':>7}  {'DINO':>7}"]
        for c in conditions:
            v = sim[c]
            lines.append(f"{c:<10}  " + "  ".join(f"{v[k]['mean']:7.4f}" if k in v else f"{'-':>7}"
                                                 for k in ("clip_i", "clip_t", "dino")))
        table += "\n\n" + "\n".join(lines)
    result = {
        "format": "mumu-shapes-eval",
        "model": str(shapes.paths["bundle"].parent),
        "probe": shapes.probe_info["metrics"],
        "settings": {**settings.__dict__, "n": n, "conditions": conditions},
        "conditions": figures,
        "headline": _headline(figures),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        sheet = []
        for c in conditions:
            for it, im, r in list(zip(items[c], outputs[c], readings[c]))[:sheet_rows]:
                marks = " ".join(f"{t.noun}:{'ok' if _right(t, r, 'colour') else 'x'}" for t in it.targets)
                sheet.append((f"{c} {CONDITIONS[c][2]}\n{it.prompt}\nw={it.weights} {marks}", _shown_inputs(it), im))
        result["contact_sheet"] = str(contact_sheet(sheet, out / "contact_sheet.png"))
        result["eval_json"] = str(out / "eval.json")
        from mumu_core.atomic import atomic_write

        atomic_write(out / "eval.json", lambda tmp: Path(tmp).write_text(json.dumps({**result, "table": table}, indent=2)))
    result["table"] = table
    return result


def _shown_inputs(it: EvalItem) -> list:
    from PIL import Image

    shown = []
    for im, m in zip(it.images, it.masks):
        if m is not None:
            black = Image.new("RGB", im.size)
            im = Image.composite(im.convert("RGB"), black, m.convert("L"))
        shown.append(im)
    return shown


def _headline(figures: dict) -> dict:
    h = {}
    for c, key in (("a", "same_image"), ("b", "cross_image"), ("b2", "unseen_combinations"), ("d", "text_only")):
        if c in figures:
            h[f"{key}_colour"] = figures[c]["colour"]["p"]
            h[f"{key}_all_right"] = figures[c]["all_right"]["p"]
    if "d" in figures:
        h["text_only_inside_chance"] = figures["d"].get("colour_inside_chance_interval")
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items()}
