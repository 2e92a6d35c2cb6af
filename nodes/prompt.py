"""MUMU Prompt: text with <image> placeholders + up to 8 images -> MUMU_PROMPT.

The node a person meets shows what every prompt needs — the text, the token budget ("auto" =
what the bundle was trained with) and image sockets — and nothing else:
- per-image weight is written in the text, the way ComfyUI users weight words `(word:1.2)`:
  `a (<image>:0.8) man`, `(<image:2>:1.3)`;
- mask, weight and a per-image token budget come from a small "MUMU Image Options" node placed
  between the image and the socket, only where an image needs one. The sockets accept both a
  plain IMAGE and the options node's MUMU_IMAGE (a ComfyUI union type "IMAGE,MUMU_IMAGE",
  checked by comfy_execution/validation.py validate_node_input and by the frontend).

"MUMU Interleaved Prompt" (8 image + 8 mask sockets, 16 widgets) stays registered, marked
deprecated, so saved workflows keep loading.
"""

from __future__ import annotations

from dataclasses import replace

from . import _comfy

MAX_IMAGES = 8
DEFAULT_TEXT = "a <image> man and his <image> dog in an <image> animated style"
DEFAULT_TOKENS = 324  # stage-1 budget of the paper: 18x18 patches, 252 px for Idefics2


def _image_inputs() -> dict:
    inputs = {}
    for i in range(1, MAX_IMAGES + 1):
        inputs[f"image_{i}"] = ("IMAGE", {
            "tooltip": f"Image {i}: the {i}th <image> in the text (or <image:{i}>). One image, not a batch. "
                       f"Segmented subjects on black work best (see mask_{i})."})
        inputs[f"mask_{i}"] = ("MASK", {
            "tooltip": f"Optional mask for image_{i}: 1 (white) = subject to keep, 0 = background to black "
                       f"out, as segmentation nodes (SAM, BiRefNet, Remove Background) output. Load Image's "
                       f"MASK of a cut-out PNG is the opposite (1 = transparent): put Invert Mask in between."})
    # widgets after the sockets, grouped per image so the node reads top to bottom
    for i in range(1, MAX_IMAGES + 1):
        inputs[f"weight_{i}"] = ("FLOAT", {
            "default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
            "tooltip": f"Strength of image_{i}: scales its tokens in the conditioning (1 = as trained, "
                       f">1 stronger; 0 leaves it out of the prompt). Ignored when image_{i} is not connected."})
        inputs[f"tokens_per_image_{i}"] = ("INT", {
            "default": DEFAULT_TOKENS, "min": 1, "max": 4900, "step": 1,
            "tooltip": f"Patch tokens image_{i} contributes; must be a square g x g (Idefics2: 324 = 18x18 "
                       f"-> 252 px, 1296 = 36x36 -> 504 px). More tokens = more detail, slower encode. Use "
                       f"what the bundle was trained with."})
    return inputs


IMAGE_SOCKET = "IMAGE,MUMU_IMAGE"
TOKEN_CHOICES = ["auto"] + [str(g * g) for g in (8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 36)]
AUTO_TOOLTIP = ("Patch tokens per image (a square g x g). auto = what the bundle was trained with (stage 1: 324 = "
                "18x18 -> 252 px; stage 2: 1296 = 36x36 -> 504 px). More tokens = more detail, slower encode.")


def _tokens_choice(value, where: str):
    """"auto" -> None (the bundle's budget); a number -> checked square count."""
    if value is None or value == "auto":
        return None
    prompt_mod = _comfy.core("prompt")
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise prompt_mod.PromptError(f"{where} must be 'auto' or a square number such as 324; got {value!r}.") from None
    return prompt_mod.check_tokens_per_image(value, where=where)


class MumuPrompt:
    """Binds the images to the <image> placeholders of the text; the result goes to MUMU Encode."""

    CATEGORY = "MUMU/conditioning"
    FUNCTION = "build"
    RETURN_TYPES = ("MUMU_PROMPT",)
    RETURN_NAMES = ("mumu_prompt",)
    OUTPUT_TOOLTIPS = ("The interleaved text+image prompt; connect it to MUMU Encode.",)
    DESCRIPTION = (
        "Writes a MUMU prompt: text where each <image> stands right before the word it shows, e.g. "
        "'a <image> man and his <image> dog in an <image> animated style'. The k-th bare <image> takes "
        "image_k; <image:N> uses image_N (an image may appear twice). Weight an image like a word in "
        "ComfyUI: '(<image>:0.8)' or '(<image:2>:1.3)'. Connect images from image_1 on, without gaps; every "
        "connected image must be used. For a mask (background to black), a weight or a token budget of one "
        "image, put a MUMU Image Options node between the image and its socket."
    )

    @classmethod
    def INPUT_TYPES(cls):
        optional = {
            f"image_{i}": (IMAGE_SOCKET, {
                "tooltip": f"Image {i}: the {i}th <image> in the text (or <image:{i}>). One image, not a batch. "
                           f"An IMAGE, or a MUMU Image Options output for a mask / weight / token budget."})
            for i in range(1, MAX_IMAGES + 1)
        }
        return {
            "required": {
                "text": ("STRING", {
                    "multiline": True, "default": DEFAULT_TEXT, "dynamicPrompts": False,
                    "tooltip": "Prompt with one <image> right before each word an image shows (<image:N> = "
                               "image_N; (<image>:0.8) weights it). Leave empty (and connect no image) for "
                               "an unconditional prompt."}),
                "tokens_per_image": (TOKEN_CHOICES, {"default": "auto", "tooltip": AUTO_TOOLTIP}),
            },
            "optional": optional,
        }

    def build(self, text, tokens_per_image="auto", **kwargs):
        prompt_mod = _comfy.core("prompt")
        default_tokens = _tokens_choice(tokens_per_image, "tokens_per_image")
        connected = [i for i in range(1, MAX_IMAGES + 1) if kwargs.get(f"image_{i}") is not None]
        _check_no_gaps(connected, {})
        images = []
        for i in connected:
            value = kwargs[f"image_{i}"]
            if isinstance(value, prompt_mod.PromptImage):  # from MUMU Image Options
                image = replace(value, tokens_per_image=value.tokens_per_image or default_tokens)
            else:
                image = prompt_mod.PromptImage(image=_single_frame(value, f"image_{i}"),
                                               tokens_per_image=default_tokens)
            images.append(image)
        return (_parse(prompt_mod, text, images, connected),)


class MumuImageOptions:
    """One image of a MUMU prompt with its mask, weight and token budget."""

    CATEGORY = "MUMU/conditioning"
    FUNCTION = "build"
    RETURN_TYPES = ("MUMU_IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image with its options; connect it to an image_N socket of MUMU Prompt.",)
    DESCRIPTION = (
        "Options for one image of a MUMU prompt, placed between the image and MUMU Prompt's image_N socket: "
        "a mask (the paper: segmented subjects on black work best), a weight (scales this image's tokens; "
        "1 = as trained, 0 leaves it out of the prompt) and its own token budget. Images without options connect "
        "straight to MUMU Prompt."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "One image (not a batch)."}),
                "weight": ("FLOAT", {
                    "default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                    "tooltip": "Strength of this image: scales its tokens in the conditioning (1 = as trained, "
                               ">1 stronger; 0 leaves the image out of the prompt, so the words after it cannot "
                               "read it either). Multiplies a weight written in the text, (<image>:0.8)."}),
                "tokens_per_image": (TOKEN_CHOICES, {
                    "default": "auto",
                    "tooltip": "This image's patch tokens; auto = MUMU Prompt's setting. " + AUTO_TOOLTIP}),
            },
            "optional": {
                "mask": ("MASK", {
                    "tooltip": "Optional: 1 (white) = subject to keep, 0 = background to black out, as "
                               "segmentation nodes (SAM, BiRefNet, Remove Background) output. Load Image's MASK "
                               "of a cut-out PNG is the opposite (1 = transparent): put Invert Mask in between."}),
            },
        }

    def build(self, image, weight=1.0, tokens_per_image="auto", mask=None):
        prompt_mod = _comfy.core("prompt")
        return (prompt_mod.PromptImage(
            image=_single_frame(image, "image"), mask=_single_mask(mask, "mask"), weight=weight,
            tokens_per_image=_tokens_choice(tokens_per_image, "tokens_per_image")),)


def _parse(prompt_mod, text, images, connected):
    try:
        return prompt_mod.InterleavedPrompt.parse(text, images)
    except prompt_mod.PromptError as exc:
        # The core counts images 1..n; here they are sockets, so say which ones are in use.
        names = ", ".join(f"image_{i}" for i in connected) or "none"
        nxt = f"; the next free input is image_{len(connected) + 1}" if len(connected) < MAX_IMAGES else ""
        raise prompt_mod.PromptError(f"{exc} [MUMU Prompt: connected inputs: {names}{nxt}.]") from None


class MumuInterleavedPrompt:
    """Deprecated: MUMU Prompt + MUMU Image Options. Kept so saved workflows still load and run."""

    DEPRECATED = True
    CATEGORY = "MUMU/conditioning"
    FUNCTION = "build"
    RETURN_TYPES = ("MUMU_PROMPT",)
    RETURN_NAMES = ("mumu_prompt",)
    OUTPUT_TOOLTIPS = ("The interleaved text+image prompt; connect it to MUMU Encode.",)
    DESCRIPTION = (
        "Deprecated: use MUMU Prompt (with MUMU Image Options where an image needs a mask, weight or token "
        "budget). Writes a MUMU prompt: text where each <image> stands right before the word it shows, e.g. "
        "'a <image> man and his <image> dog in an <image> animated style'. The k-th bare <image> takes "
        "image_k; <image:N> uses image_N (an image may appear twice). Connect images from image_1 on, "
        "without gaps; every connected image must be used. Optional per image: a mask (background to "
        "black), a weight and a token budget. An empty text with no images is the unconditional prompt "
        "(for the negative)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {
                    "multiline": True, "default": DEFAULT_TEXT, "dynamicPrompts": False,
                    "tooltip": "Prompt with one <image> right before each word an image shows "
                               "(<image:N> = image_N). Leave empty (and connect no image) for the negative."}),
            },
            "optional": _image_inputs(),
        }

    def build(self, text, **kwargs):
        prompt_mod = _comfy.core("prompt")
        connected = [i for i in range(1, MAX_IMAGES + 1) if kwargs.get(f"image_{i}") is not None]
        _check_no_gaps(connected, kwargs)
        images = []
        for i in connected:
            tokens = prompt_mod.check_tokens_per_image(
                kwargs.get(f"tokens_per_image_{i}", DEFAULT_TOKENS), where=f"tokens_per_image_{i}")
            images.append(prompt_mod.PromptImage(
                image=_single_frame(kwargs[f"image_{i}"], f"image_{i}"),
                mask=_single_mask(kwargs.get(f"mask_{i}"), f"mask_{i}"),
                weight=kwargs.get(f"weight_{i}", 1.0),
                tokens_per_image=tokens,
            ))
        try:
            prompt = prompt_mod.InterleavedPrompt.parse(text, images)
        except prompt_mod.PromptError as exc:
            # The core counts images 1..n; here they are sockets, so say which ones are in use.
            names = ", ".join(f"image_{i}" for i in connected) or "none"
            nxt = f"; the next free input is image_{len(connected) + 1}" if len(connected) < MAX_IMAGES else ""
            raise prompt_mod.PromptError(f"{exc} [MUMU Interleaved Prompt: connected inputs: {names}{nxt}.]") from None
        return (prompt,)


def _check_no_gaps(connected: list[int], kwargs: dict) -> None:
    prompt_mod = _comfy.core("prompt")
    if connected and connected[-1] != len(connected):
        missing = [i for i in range(1, connected[-1]) if i not in connected]
        raise prompt_mod.PromptError(
            f"image_{connected[-1]} is connected but {', '.join(f'image_{i}' for i in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. <image> placeholders take the images in input order, "
            f"so connect them to image_1, image_2, ... without gaps (move the link from "
            f"image_{connected[-1]} to image_{missing[0]}).")
    stray = [i for i in range(1, MAX_IMAGES + 1) if kwargs.get(f"mask_{i}") is not None and i not in connected]
    if stray:
        raise prompt_mod.PromptError(
            f"{', '.join(f'mask_{i}' for i in stray)} connected without "
            f"{', '.join(f'image_{i}' for i in stray)}: a mask belongs to the image with the same number. "
            f"Connect the image or disconnect the mask.")


def _single_frame(image, name: str):
    """ComfyUI IMAGE is [B,H,W,C]; MUMU puts one picture at one place in the text."""
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) == 4:
        if shape[0] != 1:
            raise _comfy.core("errors").PromptError(
                f"{name} is a batch of {shape[0]} images, but each image input takes one picture (it stands "
                f"before one word). Pick one with 'Image From Batch', or connect the images to separate "
                f"inputs (image_1, image_2, ...) with one <image> each.")
        return image[0]
    return image


def _single_mask(mask, name: str):
    if mask is None:
        return None
    shape = tuple(getattr(mask, "shape", ()))
    if len(shape) == 3:
        if shape[0] != 1:
            raise _comfy.core("errors").PromptError(f"{name} is a batch of {shape[0]} masks; connect one mask per image.")
        return mask[0]
    return mask


NODE_CLASS_MAPPINGS = {"MumuPrompt": MumuPrompt, "MumuImageOptions": MumuImageOptions,
                       "MumuInterleavedPrompt": MumuInterleavedPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"MumuPrompt": "MUMU Prompt", "MumuImageOptions": "MUMU Image Options",
                              "MumuInterleavedPrompt": "MUMU Interleaved Prompt (deprecated)"}
