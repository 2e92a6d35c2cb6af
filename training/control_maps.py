"""Full-image control maps for stage-1 prompts: canny edges, depth, sketch (MUMU paper §2).

In stage 1 the paper adds, 30 % of the time, "a canny-edge, depth or sketch image of the full
input image" as an extra prompt image (sketch by PiDiNet; depth model not stated). Here:

- ``canny``: OpenCV's Canny (``cv2.Canny``, the detector ControlNet's canny annotator uses) on the
  grayscale image, white edges on black. Thresholds ``canny_low`` / ``canny_high`` (100 / 200, the
  ControlNet defaults).
- ``depth``: a depth-estimation model folder the user provides in Hugging Face layout, loaded
  with transformers' ``AutoModelForDepthEstimation`` (DPT, Depth Anything / Depth Anything V2,
  ...), e.g. ``depth-anything/Depth-Anything-V2-Small-hf``. Relative depth, normalised per image
  to 0..255, near = bright (the ControlNet depth convention). It runs where the sample is built
  (DataLoader workers, CPU): ~0.1-0.3 s per map for a small model at 518 px.
- ``sketch``: a learned line extractor the user provides (``sketch_extractor:
  "package.module:factory"``, called as ``factory(sketch_model)`` and returning a callable
  ``PIL image -> PIL image``; PiDiNet as in the paper, e.g. through controlnet_aux), or, when none
  is given, **XDoG** (eXtended Difference of Gaussians, Winnemöller et al. 2012): a weightless
  filter that draws soft, stylised lines where PiDiNet would, white on black. It is a stand-in
  for PiDiNet, not PiDiNet: thinner on texture, blind to semantics.

Each map is computed on the image scaled to at most ``max_side`` px (the prompt image is only
252 px), then returned at that size; the sample builder pads it to square like any prompt image.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import numpy as np
from PIL import Image

from mumu_core.errors import MumuError

log = logging.getLogger(__name__)
KINDS = ("canny", "depth", "sketch")


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    return image


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), mode="L").convert("RGB")


def canny_map(image: Image.Image, low: float = 100.0, high: float = 200.0, max_side: int = 512) -> Image.Image:
    """Binary Canny edge map (OpenCV), white on black, RGB."""
    import cv2  # opencv-python-headless: a real Canny (non-maximum suppression + hysteresis)

    gray = np.asarray(_downscale(image, max_side).convert("L"))
    return _gray_to_rgb(cv2.Canny(gray, float(low), float(high), L2gradient=True))


def xdog_map(image: Image.Image, sigma: float = 0.8, k: float = 1.6, tau: float = 0.98, epsilon: float = 0.0,
             phi: float = 120.0, max_side: int = 512) -> Image.Image:
    """Weightless sketch: XDoG lines (Winnemöller et al. 2012), inverted to white lines on black.

    D = G_sigma(I) - tau * G_{k sigma}(I) on 0..1 luminance; paper ink = 1 where D >= epsilon,
    else 1 + tanh(phi (D - epsilon)); returned as 1 - ink so lines are bright like PiDiNet's.
    Runs at the working size (at most `max_side`), so the line weight is relative to that.
    """
    import cv2

    small = _downscale(image, max_side)
    gray = np.asarray(small.convert("L"), dtype=np.float32) / 255.0
    g1 = cv2.GaussianBlur(gray, (0, 0), sigmaX=max(sigma, 0.3))
    g2 = cv2.GaussianBlur(gray, (0, 0), sigmaX=max(sigma * k, 0.3))
    d = g1 - tau * g2
    ink = np.where(d >= epsilon, 1.0, 1.0 + np.tanh(phi * (d - epsilon)))
    return _gray_to_rgb(np.clip((1.0 - ink) * 255.0, 0, 255).round())


class DepthEstimator:
    """A transformers depth-estimation model from a local folder (loaded lazily, once per process)."""

    def __init__(self, folder: str, device: str = "cpu") -> None:
        self.folder, self.device = str(folder), device
        self._model = self._processor = None

    def _load(self) -> None:
        from pathlib import Path

        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = Path(self.folder)
        if not (folder / "config.json").is_file() or not (folder / "preprocessor_config.json").is_file():
            raise MumuError(f"data.sample.depth_model = {folder}: expected a depth-estimation model folder in "
                            f"Hugging Face layout (config.json, preprocessor_config.json, *.safetensors), e.g. "
                            f"depth-anything/Depth-Anything-V2-Small-hf.")
        try:
            self._model = AutoModelForDepthEstimation.from_pretrained(
                folder, local_files_only=True, use_safetensors=True).to(self.device).eval()
        except (ValueError, OSError) as exc:
            raise MumuError(f"data.sample.depth_model = {folder} does not load as a transformers depth-estimation "
                            f"model (DPT, Depth Anything, ...): {exc}") from None
        self._processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)

    def __call__(self, image: Image.Image, max_side: int = 512) -> Image.Image:
        import torch

        if self._model is None:
            self._load()
        small = _downscale(image, max_side)
        inputs = self._processor(images=small, return_tensors="pt").to(self.device)
        with torch.no_grad():
            depth = self._model(**inputs).predicted_depth  # [1, h, w], relative (inverse) depth
        depth = torch.nn.functional.interpolate(depth[:, None].float(), size=(small.height, small.width),
                                                mode="bicubic", align_corners=False)[0, 0].cpu().numpy()
        lo, hi = float(np.min(depth)), float(np.max(depth))
        norm = (depth - lo) / (hi - lo) if hi - lo > 1e-8 else np.zeros_like(depth)
        return _gray_to_rgb(np.clip(norm * 255.0, 0, 255).round())

    def __getstate__(self):  # DataLoader workers get the folder, not the weights; each loads lazily
        return {"folder": self.folder, "device": self.device, "_model": None, "_processor": None}


def load_sketch_extractor(spec: str, model: str | None) -> Callable[[Image.Image], Image.Image]:
    """``"package.module:factory"`` -> factory(model) (or factory() without a model): a callable
    PIL -> PIL returning a line drawing, white lines on black (invert yours if it draws black on white)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MumuError(f"data.sample.sketch_extractor must be 'package.module:factory'; got {spec!r}.")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise MumuError(f"data.sample.sketch_extractor = {spec!r} cannot be imported: {exc}") from None
    return factory(model) if model else factory()


class ControlMaps:
    """Picks a kind by the configured weights and renders it; picklable for DataLoader workers."""

    def __init__(self, weights: dict[str, float], *, depth_model: str | None = None, depth_device: str = "cpu",
                 sketch_extractor: str | None = None, sketch_model: str | None = None,
                 canny_low: float = 100.0, canny_high: float = 200.0, max_side: int = 512) -> None:
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise MumuError(f"data.sample.control_maps: unknown kind(s) {unknown}; the kinds are {list(KINDS)}.")
        if any(float(v) < 0 for v in weights.values()):
            raise MumuError(f"data.sample.control_maps weights must be >= 0; got {weights}.")
        self.weights = {k: float(weights.get(k, 0.0)) for k in KINDS}
        if self.weights["depth"] > 0 and not depth_model:
            raise MumuError("data.sample.control_maps.depth > 0 needs data.sample.depth_model: a depth-estimation "
                            "model folder in Hugging Face layout (e.g. depth-anything/Depth-Anything-V2-Small-hf). "
                            "Or set control_maps.depth: 0.")
        self.depth = DepthEstimator(depth_model, depth_device) if depth_model else None
        self.sketch_extractor, self.sketch_model = sketch_extractor, sketch_model
        self._sketch = None
        self.canny_low, self.canny_high, self.max_side = canny_low, canny_high, max_side

    @property
    def enabled(self) -> bool:
        return sum(self.weights.values()) > 0

    @property
    def sketch_source(self) -> str:
        return self.sketch_extractor or "xdog"

    def choose(self, rng: np.random.Generator) -> str:
        kinds = [k for k in KINDS if self.weights[k] > 0]
        p = np.array([self.weights[k] for k in kinds], dtype=np.float64)
        return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]

    def render(self, kind: str, image: Image.Image) -> Image.Image:
        if kind == "canny":
            return canny_map(image, self.canny_low, self.canny_high, self.max_side)
        if kind == "depth":
            return self.depth(image, self.max_side)
        if kind == "sketch":
            if self.sketch_extractor is None:
                return xdog_map(image, max_side=self.max_side)
            if self._sketch is None:
                self._sketch = load_sketch_extractor(self.sketch_extractor, self.sketch_model)
            return self._sketch(_downscale(image, self.max_side)).convert("RGB")
        raise MumuError(f"unknown control map kind {kind!r}; the kinds are {list(KINDS)}.")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_sketch"] = None  # a learned extractor is rebuilt lazily in each worker
        return state
