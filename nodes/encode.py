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
    encoder = patcher.model

    n_images = len(prompt.images) if prompt is not None else 0
    pbar = _comfy.utils().ProgressBar(max(n_images, 1))

    def on_image(done: int, total: int) -> None:
        pbar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()  # raising here aborts the encode

    if prompt is None or prompt.is_empty:
        out = encoder.encode_unconditional()
    else:
        out = encoder.encode(prompt, on_image=on_image)
    pbar.update_absolute(pbar.total, pbar.total)

    context, pooled = out.context, out.pooled
    if out.mask is not None and not bool(out.mask.all()):
        # SDXL's cross-attention has no mask: padded rows would be attended, so drop them.
        context = context[:, out.mask[0].to(context.device)]
    device = mm.intermediate_device()
    extras = {"pooled_output": pooled.to(device)}
    extras.update({k: int(sizes[k]) for k in SIZE_KEYS if sizes.get(k) is not None})
    return [[context.to(device), extras]]


class MumuEncode:
    """Encodes an interleaved prompt into SDXL conditioning for the stock samplers."""

    CATEGORY = "MUMU/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("SDXL conditioning (context [1,T,2048] + pooled_output [1,1280] + size keys), like "
                       "CLIP Text Encode (SDXL); connect it to KSampler's positive or negative.",)
    DESCRIPTION = (
        "Encodes a MUMU prompt with the MUMU encoder into the same CONDITIONING that CLIP Text Encode (SDXL) "
        "emits, so KSampler, Conditioning Combine/Concat/Set Area/Zero Out and CFG work unchanged. An empty "
        "prompt gives the unconditional embedding: use it for the negative. Shows progress per image and "
        "can be cancelled between images."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mumu_encoder": ("MUMU_ENCODER", {"tooltip": "From MUMU Encoder Loader."}),
                "mumu_prompt": ("MUMU_PROMPT", {"tooltip": "From MUMU Interleaved Prompt."}),
            },
            "optional": _size_inputs(),
        }

    def encode(self, mumu_encoder, mumu_prompt, **sizes):
        return (encode_to_conditioning(mumu_encoder, mumu_prompt, sizes),)


class MumuEncodeUnconditional:
    """The empty prompt's encoding: the negative MUMU was trained with (conditioning dropout)."""

    CATEGORY = "MUMU/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Unconditional SDXL conditioning from the MUMU encoder; connect it to KSampler's negative.",)
    DESCRIPTION = (
        "Shortcut for MUMU Encode of an empty prompt: the unconditional embedding MUMU was trained with, "
        "for KSampler's negative (classifier-free guidance). Not zeros and not a CLIP negative."
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
