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
from dataclasses import dataclass, field, replace
from typing import Any, Union

from .errors import PromptError

DEFAULT_TOKENS_PER_IMAGE = 324  # stage 1 of the paper: 18x18 patches
MAX_IMAGES = 64

# `<image>`, `<image:N>`, and the weighted forms `(<image>:0.8)` / `(<image:2>:1.3)` written the
# way ComfyUI users weight words, `(word:1.2)`. Groups: index, weight (None when absent).
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_PLACEHOLDER = re.compile(
    rf"\(\s*<image(?::\s*(?P<windex>\d+)\s*)?>\s*:\s*(?P<weight>{_NUMBER})\s*\)"
    r"|<image(?::\s*(?P<index>\d+)\s*)?>"
)
# `(<image>:x)` with something that is not a number after the colon
_BAD_WEIGHT = re.compile(r"\(\s*<image(?::\s*\d+\s*)?>\s*:[^)]*\)?")
# `<image` that is never closed with `>` before the next `<` or the end of the text
_UNCLOSED = re.compile(r"<\s*(?:image|img)\b(?::\s*\d*)?(?![^<>]*>)", re.IGNORECASE)
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
    weight: scales this image's tokens in the conditioning (1.0 = as trained); 0 leaves the image out of
        the prompt (`InterleavedPrompt.without_silenced_images` says why).
    tokens_per_image: patch tokens this image contributes; a square (g x g) number, or None
        ("auto") for the budget the bundle was trained with, filled in by the encoder.
    """

    image: Any
    mask: Any = None
    weight: float = 1.0
    tokens_per_image: int | None = DEFAULT_TOKENS_PER_IMAGE  # None / "auto": the bundle's budget

    def __post_init__(self) -> None:
        if self.tokens_per_image is None or self.tokens_per_image == "auto":
            self.tokens_per_image = None
        else:
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

        _check_closed(text)
        segments: list[Segment] = []
        cursor = 0
        bare = 0
        place_weights: dict[int, list[float]] = {}
        for match in _PLACEHOLDER.finditer(text):
            _check_no_near_miss(text[cursor : match.start()])
            if match.start() > cursor:
                segments.append(text[cursor : match.start()])
            explicit = match.group("index") or match.group("windex")
            if explicit is None:
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
                number = int(explicit)
                if not 1 <= number <= len(images):
                    have = f"images 1..{len(images)}" if images else "no images"
                    raise PromptError(
                        f"<image:{number}> refers to image {number}, but the prompt has {have} connected. "
                        f"Image numbers start at 1; connect image {number} or change the number."
                    )
                index = number - 1
            segments.append(index)
            weight = match.group("weight")
            place_weights.setdefault(index, []).append(1.0 if weight is None else _place_weight(weight, match.group(0)))
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
        return cls(text=text, images=_apply_place_weights(images, place_weights), segments=segments)

    @property
    def image_order(self) -> list[int]:
        """0-based image index of each placeholder, in prompt order (an image may repeat)."""
        return [s for s in self.segments if isinstance(s, int)]

    @property
    def is_empty(self) -> bool:
        return not self.segments

    def with_default_tokens(self, tokens_per_image: int) -> "InterleavedPrompt":
        """This prompt with every "auto" (None) token budget set to `tokens_per_image`."""
        if all(im.tokens_per_image is not None for im in self.images):
            return self
        images = [im if im.tokens_per_image is not None else replace(im, tokens_per_image=tokens_per_image)
                  for im in self.images]
        return InterleavedPrompt(text=self.text, images=images, segments=list(self.segments))

    def without_silenced_images(self) -> tuple["InterleavedPrompt", list[int]]:
        """This prompt without its weight-0 images and their placeholders; -> (prompt, kept).

        `kept` holds the original 0-based index of each image left. A weight scales an image's own
        tokens after the encoder, but the VLM (causal) and the adapter mix every token with the
        others, so the words after an image have already read it: at weight 0 the image's content
        would still reach the picture through its noun. Weight 0 means "leave it out", so the image
        goes, and `a <image> ball` is encoded exactly as `a ball`.
        """
        silenced = {i for i, im in enumerate(self.images) if im.weight == 0}
        if not silenced:
            return self, list(range(len(self.images)))
        kept = [i for i in range(len(self.images)) if i not in silenced]
        new_index = {old: new for new, old in enumerate(kept)}
        segments: list[Segment] = []
        for seg in self.segments:
            if isinstance(seg, int):
                if seg in new_index:
                    segments.append(new_index[seg])
                continue
            if segments and isinstance(segments[-1], str):  # text on both sides of a removed image
                before = segments.pop()
                seg = before + seg.lstrip() if before[-1:].isspace() else before + seg
            elif not segments:
                seg = seg.lstrip()
            if seg:
                segments.append(seg)
        text = "".join(s if isinstance(s, str) else f"<image:{s + 1}>" for s in segments)
        return InterleavedPrompt(text=text, images=[self.images[i] for i in kept], segments=segments), kept

    def expand(self, expand_image) -> str:
        """The prompt text with each placeholder replaced by `expand_image(image)` (a token string)."""
        return "".join(s if isinstance(s, str) else expand_image(self.images[s]) for s in self.segments)


def _bare_placeholders(text: str) -> list[re.Match]:
    return [m for m in _PLACEHOLDER.finditer(text) if m.group("index") is None and m.group("windex") is None]


def _place_weight(raw: str, written: str) -> float:
    weight = float(raw)
    if not math.isfinite(weight):
        raise PromptError(f"'{written}': the weight must be a finite number such as 0.8.")
    return weight


def _apply_place_weights(images: list[PromptImage], place_weights: dict[int, list[float]]) -> list[PromptImage]:
    """Multiply each image's weight by the weight written at its placeholder(s), `(<image>:0.8)`.

    An image has one weight (it scales that image's tokens), so an image placed twice must be
    written with the same weight at both places. The caller's PromptImage objects are not changed.
    """
    out = list(images)
    for index, weights in place_weights.items():
        if len(set(weights)) > 1:
            listed = ", ".join(f"{w:g}" for w in weights)
            raise PromptError(
                f"image {index + 1} is placed {len(weights)} times with different weights ({listed}); an image "
                f"has one weight. Write the same weight at each place, e.g. (<image:{index + 1}>:{weights[0]:g}), "
                f"or set it once on the image (MUMU Image Options / --weight).")
        if weights[0] != 1.0:
            out[index] = replace(images[index], weight=images[index].weight * weights[0])
    return out


def _check_closed(text: str) -> None:
    """`a <image cat`: the placeholder is never closed, so it would be read as plain text."""
    unclosed = _UNCLOSED.search(text)
    if unclosed:
        rest = text[unclosed.end():].split("<", 1)[0]
        shown = (unclosed.group(0) + rest)[:40].rstrip()
        word = rest.strip().split()[0] if rest.strip() else ""
        fix = f"'<image> {word}'" if word else "'<image>'"
        raise PromptError(
            f"'{shown}' opens an image placeholder that is never closed with '>': write {fix} (the image "
            f"right before the word it shows), or <image:N> for image N.")
    bad = next((m for m in _BAD_WEIGHT.finditer(text) if not _PLACEHOLDER.match(text, m.start())), None)
    if bad:
        raise PromptError(
            f"'{bad.group(0)}' is not a weighted placeholder: write (<image>:0.8) or (<image:2>:1.3), with a "
            f"number after the colon, like ComfyUI's (word:1.2).")


def check_context_length(n_tokens: int, max_tokens: int | None, prompt: "InterleavedPrompt | None" = None) -> None:
    """Raise before any compute when a tokenized prompt is longer than the VLM's context."""
    if not max_tokens or n_tokens <= max_tokens:
        return
    detail = ""
    if prompt is not None and prompt.images:
        budgets = [prompt.images[i].tokens_per_image or 0 for i in prompt.image_order]
        image_tokens = sum(budgets)
        detail = (f" ({len(budgets)} image placeholder(s) x tokens_per_image = {image_tokens} image tokens, "
                  f"{n_tokens - image_tokens} for the text and image markers)")
    raise PromptError(
        f"the prompt is {n_tokens} tokens long{detail}, but this VLM reads at most {max_tokens} tokens "
        f"(its max_position_embeddings). Use fewer images, a smaller tokens_per_image (e.g. 324 instead of "
        f"1296) or a shorter text.")


def _check_no_near_miss(chunk: str) -> None:
    bad = _NEAR_MISS.search(chunk)
    if bad:
        raise PromptError(
            f"'{bad.group(0)}' in the prompt is not a valid placeholder. Write <image> for the next "
            f"image in order or <image:N> (e.g. <image:2>) for image N."
        )
