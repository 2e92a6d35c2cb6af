"""The interleaved prompt: text with `<image>` placeholders bound to images.

`a <image> man and his <image> dog in an <image> animated style` — each image stands right before
the word it shows (MUMU, arXiv 2406.18790 §4). A bare `<image>` takes the next image in order
(the k-th bare placeholder is image k); `<image:N>` picks image N (1-based), so one image can
appear twice. Every connected image must be used, and every placeholder must find its image:
anything else is a `PromptError` that says what was found, what was expected and how to fix it.

Pure Python: images are kept as given (PIL, numpy or torch) and prepared by `mumu_core.images`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import PromptError

DEFAULT_TOKENS_PER_IMAGE = 324  # stage 1 of the paper: 18x18 patches
MAX_IMAGES = 64

_PLACEHOLDER = re.compile(r"<image(?::\s*(\d+)\s*)?>")
# Anything that looks like a placeholder but is not one (`<image 2>`, `<img>`, `<Image>`,
# `<image:x>`), so a typo is reported instead of being sent to the VLM as plain text.
_NEAR_MISS = re.compile(r"<\s*(?:image|img|picture|pic)\b[^>]*>", re.IGNORECASE)


def square_grid_neighbours(n: int) -> tuple[int, int]:
    """The valid (square) token counts just below and just above `n`."""
    root = math.isqrt(max(n, 1))
    lower = max(root, 1) ** 2
    upper = (root + 1) ** 2 if lower != n else n
    return lower, upper


def check_tokens_per_image(n: Any, *, where: str = "tokens_per_image") -> int:
    """Return `n` if it is a square grid of patches (g x g), else raise naming the nearest values."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n:
        raise PromptError(f"{where} must be a whole number such as 324 (18x18 patches); got {n!r}.")
    n = int(n)
    if n < 1:
        raise PromptError(f"{where} must be at least 1 (1x1 patch); got {n}. The paper uses 324 or 1296.")
    root = math.isqrt(n)
    if root * root != n:
        lo, hi = square_grid_neighbours(n)
        raise PromptError(
            f"{where}={n} is not a square grid of patches: each image becomes g x g patch tokens. "
            f"Nearest valid values: {lo} ({math.isqrt(lo)}x{math.isqrt(lo)}) and "
            f"{hi} ({math.isqrt(hi)}x{math.isqrt(hi)}). The paper uses 324 (stage 1) and 1296 (stage 2)."
        )
    return n


@dataclass
class PromptImage:
    """One image of a prompt.

    image: PIL image, or an array/tensor of floats in 0..1 shaped [H,W,C] (ComfyUI IMAGE without
        the batch axis) or [C,H,W].
    mask: optional, same kinds, [H,W]: 1 keeps the subject, 0 is background and is blacked out
        (the paper: segmented objects without background work best).
    weight: scales this image's tokens in the conditioning (1.0 = as trained; 0 removes its content).
    tokens_per_image: patch tokens this image contributes; a square (g x g) number.
    """

    image: Any
    mask: Any = None
    weight: float = 1.0
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE

    def __post_init__(self) -> None:
        self.tokens_per_image = check_tokens_per_image(self.tokens_per_image)
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise PromptError(f"image weight must be a number such as 1.0; got {self.weight!r}.") from None
        if not math.isfinite(self.weight):
            raise PromptError(f"image weight must be finite; got {self.weight}.")


Segment = Union[str, int]  # text, or the 0-based index of an image in `images`


@dataclass
class InterleavedPrompt:
    """Parsed, validated prompt: `segments` alternate text and 0-based image indices in order."""

    text: str
    images: list[PromptImage] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, images: list[PromptImage | Any] | None = None) -> "InterleavedPrompt":
        """Bind placeholders to images; raise `PromptError` when they do not fit together."""
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise PromptError(f"the prompt must be text; got {type(text).__name__}.")
        images = [im if isinstance(im, PromptImage) else PromptImage(im) for im in (images or [])]
        if len(images) > MAX_IMAGES:
            raise PromptError(f"{len(images)} images given; at most {MAX_IMAGES} fit in one prompt.")

        if not text.strip():
            if images:
                raise PromptError(
                    f"the prompt has no text but {len(images)} image(s) are connected. Write the prompt "
                    f"with one <image> before each word it shows, e.g. 'a <image> man and his <image> dog'. "
                    f"(An empty prompt with no images is the unconditional prompt, for the negative.)"
                )
            return cls(text=text, images=[], segments=[])

        segments: list[Segment] = []
        cursor = 0
        bare = 0
        for match in _PLACEHOLDER.finditer(text):
            _check_no_near_miss(text[cursor : match.start()])
            if match.start() > cursor:
                segments.append(text[cursor : match.start()])
            if match.group(1) is None:
                index = bare
                bare += 1
                if index >= len(images):
                    n_bare = len(_bare_placeholders(text))
                    raise PromptError(
                        f"the prompt has {n_bare} <image> placeholder(s) but {len(images)} image(s) are "
                        f"connected. Each <image> takes the next image in order (image 1, image 2, ...). "
                        f"Fix: connect {n_bare - len(images)} more image(s), remove placeholder(s), or write "
                        f"<image:N> to use image N again."
                    )
            else:
                number = int(match.group(1))
                if not 1 <= number <= len(images):
                    have = f"images 1..{len(images)}" if images else "no images"
                    raise PromptError(
                        f"<image:{number}> refers to image {number}, but the prompt has {have} connected. "
                        f"Image numbers start at 1; connect image {number} or change the number."
                    )
                index = number - 1
            segments.append(index)
            cursor = match.end()
        _check_no_near_miss(text[cursor:])
        if cursor < len(text):
            segments.append(text[cursor:])

        used = {s for s in segments if isinstance(s, int)}
        unused = [i + 1 for i in range(len(images)) if i not in used]
        if unused:
            n_places = sum(1 for s in segments if isinstance(s, int))
            raise PromptError(
                f"image(s) {', '.join(map(str, unused))} are connected but the prompt never uses them "
                f"({n_places} placeholder(s) for {len(images)} image(s)). Put an <image> (or <image:N>) "
                f"right before the word each image shows, or disconnect the unused image(s)."
            )
        return cls(text=text, images=images, segments=segments)

    @property
    def image_order(self) -> list[int]:
        """0-based image index of each placeholder, in prompt order (an image may repeat)."""
        return [s for s in self.segments if isinstance(s, int)]

    @property
    def is_empty(self) -> bool:
        return not self.segments

    def expand(self, expand_image) -> str:
        """The prompt text with each placeholder replaced by `expand_image(image)` (a token string)."""
        return "".join(s if isinstance(s, str) else expand_image(self.images[s]) for s in self.segments)


def _bare_placeholders(text: str) -> list[re.Match]:
    return [m for m in _PLACEHOLDER.finditer(text) if m.group(1) is None]


def _check_no_near_miss(chunk: str) -> None:
    bad = _NEAR_MISS.search(chunk)
    if bad:
        raise PromptError(
            f"'{bad.group(0)}' in the prompt is not a valid placeholder. Write <image> for the next "
            f"image in order or <image:N> (e.g. <image:2>) for image N."
        )
