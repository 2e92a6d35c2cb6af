"""MUMU Encode: MUMU_ENCODER + MUMU_PROMPT -> SDXL CONDITIONING (as CLIPTextEncodeSDXL emits it)."""

from __future__ import annotations

from . import _comfy

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


def _size_inputs() -> dict:
    def size(default, what):
        return ("INT", {"default": default, "min": 0, "max": MAX_RESOLUTION, "step": 8, "tooltip": what})

    # Same names, defaults and meaning as CLIPTextEncodeSDXL, so SDXL users need nothing new.
    return {
        "width": size(1024, "SDXL micro-conditioning: original image width the model should imagine (usually "
                            "the output width)."),
        "height": size(1024, "SDXL micro-conditioning: original image height (usually the output height)."),
        "crop_w": size(0, "SDXL micro-conditioning: left crop offset; 0 asks for a centred, uncropped subject."),
        "crop_h": size(0, "SDXL micro-conditioning: top crop offset; 0 asks for a centred, uncropped subject."),
        "target_width": size(1024, "SDXL micro-conditioning: target width (usually the output width)."),
        "target_height": size(1024, "SDXL micro-conditioning: target height (usually the output height)."),
    }


SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def encode_to_conditioning(patcher, prompt, sizes: dict) -> list:
    """Run the encoder under ComfyUI's model management; return the CONDITIONING list."""
    return _conditioning(_encode(_load(patcher), prompt), sizes)


def encode_with_negative(patcher, prompt, sizes: dict, negative_prompt=None) -> tuple[list, list]:
    """(positive, negative) CONDITIONING; the negative is tiled so ComfyUI batches it with the positive.

    negative_prompt None: the empty prompt's encoding (MUMU's unconditional). See
    `mumu_core.negative` for why tiling whole copies of the negative's context is exact.
    """
    negative_mod = _comfy.core("negative")
    encoder = _load(patcher)
    positive = _encode(encoder, prompt)
    negative = _encode(encoder, negative_prompt, progress=False)
    pos_cond = _conditioning(positive, sizes)
    neg_cond = _conditioning(negative, sizes)
    neg_cond[0][0] = negative_mod.tile_for_cfg_batching(neg_cond[0][0], int(pos_cond[0][0].shape[1]))
    return pos_cond, neg_cond


def _load(patcher):
    """The encoder, loaded to its device through ComfyUI's model management."""
    mm = _comfy.model_management()
    if not callable(getattr(getattr(patcher, "model", None), "encode_unconditional", None)):
        raise TypeError(
            f"mumu_encoder must come from a MUMU Encoder Loader node; got {type(patcher).__name__}.")
    # force_full_load: the encoder is plain torch modules (not comfy.ops), so ComfyUI's partial
    # "lowvram" loading would leave some layers on the CPU; load it whole or not at all.
    try:
        mm.load_models_gpu([patcher], force_full_load=True)
    except TypeError:  # ComfyUI before force_full_load existed (2024): loads fully on its own
        mm.load_models_gpu([patcher])
    mm.throw_exception_if_processing_interrupted()
    return patcher.model


def _encode(encoder, prompt, progress: bool = True):
    mm = _comfy.model_management()
    if prompt is None or prompt.is_empty:
        return encoder.encode_unconditional()
    if not progress:
        return encoder.encode(prompt)
    pbar = _comfy.utils().ProgressBar(max(len(prompt.images), 1))

    def on_image(done: int, total: int) -> None:
        pbar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()  # raising here aborts the encode

    out = encoder.encode(prompt, on_image=on_image)
    pbar.update_absolute(pbar.total, pbar.total)
    return out


def _conditioning(out, sizes: dict) -> list:
    mm = _comfy.model_management()
    context, pooled = out.context, out.pooled
    if out.mask is not None and not bool(out.mask.all()):
        # SDXL's cross-attention has no mask: padded rows would be attended, so drop them.
        context = context[:, out.mask[0].to(context.device)]
    device = mm.intermediate_device()
    extras = {"pooled_output": pooled.to(device)}
    extras.update({k: int(sizes[k]) for k in SIZE_KEYS if sizes.get(k) is not None})
    return [[context.to(device), extras]]


class MumuEncode:
    """Encodes an interleaved prompt into SDXL conditioning for the stock samplers, with its negative."""

    CATEGORY = "MUMU/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = (
        "SDXL conditioning (context [1,T,2048] + pooled_output [1,1280] + size keys), like CLIP Text Encode "
        "(SDXL); connect it to KSampler's positive.",
        "The matching negative for KSampler: MUMU's unconditional (the empty prompt, as trained), or the "
        "negative_prompt when one is connected, repeated to the positive's length so ComfyUI runs positive "
        "and negative in one UNet call per step (exact: see the node description).",
    )
    DESCRIPTION = (
        "Encodes a MUMU prompt with the MUMU encoder into the same CONDITIONING that CLIP Text Encode (SDXL) "
        "emits, so KSampler, Conditioning Combine/Concat/Set Area/Zero Out and CFG work unchanged. The second "
        "output is the negative to use with it: the unconditional embedding (what MUMU was trained to drop to), "
        "its context repeated to the positive's token length. ComfyUI batches positive and negative into one "
        "UNet call only when their lengths are compatible; a 1-token negative beside a 1000-token MUMU prompt "
        "costs a second UNet call every step. Repeating whole copies of the negative's tokens does not change "
        "cross-attention (every key appears the same number of times, so the softmax weights are the same): "
        "same image, one UNet call per step instead of two. For a written negative, connect a "
        "second MUMU Prompt to negative_prompt. Shows progress per image and can be cancelled between images."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mumu_encoder": ("MUMU_ENCODER", {"tooltip": "From MUMU Encoder Loader."}),
                "mumu_prompt": ("MUMU_PROMPT", {"tooltip": "From MUMU Prompt."}),
            },
            "optional": {
                "negative_prompt": ("MUMU_PROMPT", {
                    "tooltip": "Optional written negative (a second MUMU Prompt, e.g. 'blurry, low quality'). "
                               "Leave unconnected for MUMU's unconditional, which is what the paper uses."}),
                **_size_inputs(),
            },
        }

    def encode(self, mumu_encoder, mumu_prompt, negative_prompt=None, **sizes):
        return encode_with_negative(mumu_encoder, mumu_prompt, sizes, negative_prompt)


class MumuEncodeUnconditional:
    """The empty prompt's encoding: the negative MUMU was trained with (conditioning dropout)."""

    CATEGORY = "MUMU/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Unconditional SDXL conditioning from the MUMU encoder; connect it to KSampler's negative.",)
    DESCRIPTION = (
        "The unconditional embedding MUMU was trained with, alone (1 token). MUMU Encode's negative output "
        "is the same embedding already repeated to the positive's length, which lets ComfyUI batch the two "
        "into one UNet call per step; use this node only where no MUMU Encode is at hand."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"mumu_encoder": ("MUMU_ENCODER", {"tooltip": "From MUMU Encoder Loader."})},
            "optional": _size_inputs(),
        }

    def encode(self, mumu_encoder, **sizes):
        return (encode_to_conditioning(mumu_encoder, None, sizes),)


NODE_CLASS_MAPPINGS = {"MumuEncode": MumuEncode, "MumuEncodeUnconditional": MumuEncodeUnconditional}
NODE_DISPLAY_NAME_MAPPINGS = {"MumuEncode": "MUMU Encode", "MumuEncodeUnconditional": "MUMU Encode Unconditional"}
