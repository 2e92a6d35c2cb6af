"""Open-vocabulary detectors behind one interface: `detect(image, caption) -> [Detection]`.

- Grounding DINO (default, as in the paper): the caption itself is the text prompt. For each query
  box above ``box_threshold``, the caption tokens whose probability exceeds ``text_threshold`` form
  runs; the run holding the box's best token, widened to whole words and stripped of stopwords, is
  the box's phrase, with its character span in the caption (via the tokenizer's offsets).
- OWLv2: phrases come from the offline chunker (`phrases.py`) and are the text queries; a box gets
  the phrase with the highest score, if above ``box_threshold``. ``text_threshold`` is unused.
  Images are padded (bottom/right, black) and resized with PIL, not with the image processor's
  scipy resize, so neither scipy nor torchvision is needed.

Detections are raw (in image pixels, clipped); `filters.filter_detections` applies the paper's rules.
Folders are local Hugging Face layouts (config.json, weights, tokenizer, processor config).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mumu_core.compat import image_processor_class, transformers_dtype_kwarg
from mumu_core.errors import ModelFolderError, MumuError

from .filters import Detection, clip_box
from .phrases import extract_phrases, trim_span

DETECTOR_TYPES = {"grounding-dino": "grounding_dino", "owlv2": "owlv2"}
DEFAULT_BOX_THRESHOLD = {"grounding_dino": 0.35, "owlv2": 0.2}


def detector_type_of(folder: str | Path) -> str:
    """'grounding_dino' or 'owlv2' from the folder's config.json; clear errors otherwise."""
    folder = Path(folder)
    cfg = folder / "config.json"
    if not folder.is_dir():
        raise ModelFolderError(f"detector folder {folder} does not exist. Pass --detector DIR with a Grounding DINO or "
                               f"OWLv2 folder in Hugging Face layout (config.json, model.safetensors, tokenizer files), "
                               f"e.g. one written by `mumu tiny --out X` (X/detectors/grounding_dino).")
    if not cfg.is_file():
        raise ModelFolderError(f"{folder} has no config.json; expected a Hugging Face model folder (save_pretrained "
                               f"layout) of a Grounding DINO or OWLv2 detector.")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if model_type not in DETECTOR_TYPES:
        raise ModelFolderError(f"{folder} holds a '{model_type}' model; --detector needs Grounding DINO "
                               f"(model_type 'grounding-dino') or OWLv2 ('owlv2').")
    return DETECTOR_TYPES[model_type]


def detector_config_hash(folder: str | Path) -> str:
    """sha256 of the folder's JSON configs plus weight file names and sizes (cheap; no weight hashing)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix == ".json":
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        elif p.suffix in (".safetensors", ".bin"):
            h.update(f"{p.name}\0{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # float32 is everyone's default, so pass nothing then (the checkpoint loads as before)
    return {} if dtype == torch.float32 else transformers_dtype_kwarg(dtype)


def _lower_same_length(text: str) -> str:
    # str.lower() can change the length ("İ" -> "i̇"); keep offsets valid by lowering per character.
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


class GroundingDinoDetector:
    type = "grounding_dino"

    def __init__(self, folder: str | Path, box_threshold: float = 0.35, text_threshold: float = 0.25,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.device, self.dtype = torch.device(device), dtype
        self.model = GroundingDinoForObjectDetection.from_pretrained(folder, **_dtype_kwargs(dtype)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = image_processor_class("grounding_dino").from_pretrained(folder)
        self.max_text_len = int(self.model.config.max_text_len)

    def detect(self, image: Image.Image, caption: str) -> list[Detection]:
        return self.detect_batch([image], [caption])[0]

    @torch.no_grad()
    def detect_batch(self, images: list[Image.Image], captions: list[str]) -> list[list[Detection]]:
        texts = []
        for caption in captions:
            text = _lower_same_length(caption).rstrip()
            texts.append(text if text.endswith(".") else text + ".")  # GDINO was trained on '.'-ended prompts
        enc = self.tokenizer(texts, return_offsets_mapping=True, truncation=True, max_length=self.max_text_len,
                             padding="longest", return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        # Batched images are padded to a common size; pixel_mask tells the model the valid area and
        # boxes come back relative to each image's own extent.
        pix = self.image_processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        inputs["pixel_values"] = pix["pixel_values"].to(self.device, self.dtype)
        if "pixel_mask" in pix:
            inputs["pixel_mask"] = pix["pixel_mask"].to(self.device)
        out = self.model(**inputs)
        n_tok = len(offsets[0])
        probs = torch.sigmoid(out.logits[:, :, :n_tok].float()).cpu().numpy()  # [batch, queries, tokens]
        boxes = out.pred_boxes.float().cpu().numpy()  # cx, cy, w, h relative to the image
        return [self._decode(images[b], captions[b], offsets[b], probs[b], boxes[b]) for b in range(len(images))]

    def _decode(self, image, caption, offsets, probs, boxes) -> list[Detection]:
        n_tok = len(offsets)
        # Chunks = runs of content words; a box's phrase never crosses a stopword or punctuation, so a
        # weak model lighting up the whole caption still yields "scooter", not "dog riding a scooter".
        chunks = extract_phrases(caption, max_words=10_000, max_phrases=10_000, dedupe=False)
        chunk_of = [next((c for c in chunks if c.start <= s < c.end), None) if e > s else None for s, e in offsets]
        usable = np.array([c is not None for c in chunk_of], dtype=bool)
        W, H = image.size
        dets: list[Detection] = []
        for q in np.nonzero(probs.max(axis=1) > self.box_threshold)[0]:
            p = np.where(usable, probs[q], 0.0)
            best = int(p.argmax())
            if p[best] <= self.text_threshold:
                continue
            lo = hi = best  # grow the run of above-threshold tokens around the best one
            while lo > 0 and p[lo - 1] > self.text_threshold:
                lo -= 1
            while hi + 1 < n_tok and p[hi + 1] > self.text_threshold:
                hi += 1
            chunk = chunk_of[best]
            span = trim_span(caption, max(offsets[lo][0], chunk.start), min(offsets[hi][1], chunk.end))
            if span is None:
                continue
            cx, cy, bw, bh = boxes[q]
            box = clip_box(((cx - bw / 2) * W, (cy - bh / 2) * H, (cx + bw / 2) * W, (cy + bh / 2) * H), W, H)
            dets.append(Detection(caption[span[0]:span[1]], span[0], span[1], box, float(probs[q].max())))
        return dets


class Owlv2Detector:
    type = "owlv2"

    def __init__(self, folder: str | Path, box_threshold: float = 0.2, text_threshold: float | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        self.box_threshold = float(box_threshold)
        self.device, self.dtype = torch.device(device), dtype
        self.model = Owlv2ForObjectDetection.from_pretrained(folder, **_dtype_kwargs(dtype)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = image_processor_class("owlv2").from_pretrained(folder)
        size = self.image_processor.size
        self.side = int(size["height"] if isinstance(size, dict) else size.height)
        self.max_query_len = int(self.model.config.text_config.max_position_embeddings)

    def detect(self, image: Image.Image, caption: str) -> list[Detection]:
        return self.detect_batch([image], [caption])[0]

    def _square(self, image: Image.Image) -> Image.Image:
        S = max(image.size)
        square = Image.new("RGB", (S, S))
        square.paste(image, (0, 0))  # OWLv2 pads bottom/right; boxes are relative to the square
        return square.resize((self.side, self.side), Image.BILINEAR)

    @torch.no_grad()
    def detect_batch(self, images: list[Image.Image], captions: list[str]) -> list[list[Detection]]:
        phrases = [extract_phrases(c) for c in captions]
        results: list[list[Detection]] = [[] for _ in images]
        live = [i for i, ph in enumerate(phrases) if ph]
        if not live:
            return results
        n_q = max(len(phrases[i]) for i in live)
        # every image gets n_q queries; padding queries ("") are ignored when reading the scores
        queries = [q for i in live for q in [p.text for p in phrases[i]] + [""] * (n_q - len(phrases[i]))]
        enc = self.tokenizer(queries, padding="max_length", truncation=True, max_length=self.max_query_len,
                             return_tensors="pt")
        pix = self.image_processor(images=[self._square(images[i]) for i in live], do_resize=False, do_pad=False,
                                   return_tensors="pt")
        out = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
                         pixel_values=pix["pixel_values"].to(self.device, self.dtype))
        all_probs = torch.sigmoid(out.logits.float()).cpu().numpy()  # [batch, patches, n_q]
        all_boxes = out.pred_boxes.float().cpu().numpy()
        for row, i in enumerate(live):
            ph = phrases[i]
            probs, boxes = all_probs[row][:, : len(ph)], all_boxes[row]
            W, H = images[i].size
            S = max(W, H)
            for k in np.nonzero(probs.max(axis=1) > self.box_threshold)[0]:
                qi = int(probs[k].argmax())
                cx, cy, bw, bh = boxes[k] * S
                box = clip_box((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), W, H)
                results[i].append(Detection(ph[qi].text, ph[qi].start, ph[qi].end, box, float(probs[k, qi])))
        return results


def load_detector(folder: str | Path, detector_type: str | None = None, box_threshold: float | None = None,
                  text_threshold: float = 0.25, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    found = detector_type_of(folder)
    if detector_type is not None and detector_type != found:
        raise MumuError(f"--detector-type {detector_type} but {folder} holds a {found} model; drop --detector-type "
                        f"or point --detector at a {detector_type} folder.")
    cls = GroundingDinoDetector if found == "grounding_dino" else Owlv2Detector
    bt = DEFAULT_BOX_THRESHOLD[found] if box_threshold is None else box_threshold
    return cls(folder, box_threshold=bt, text_threshold=text_threshold, device=device, dtype=dtype)
