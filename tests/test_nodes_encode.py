"""Loader -> prompt -> encode through the node classes, on the tiny components (no ComfyUI).

Checks the CONDITIONING structure CLIPTextEncodeSDXL emits, ComfyUI model management (patcher,
load before use, outputs on the intermediate device), progress per image and interrupts.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from comfy_doubles import comfy_env  # noqa: F401  (fixture)

SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


@pytest.fixture
def pack(comfy_env, tiny):
    """The pack against fake ComfyUI, with the tiny VLM folder and bundle in models/mumu.

    `tiny` (tests/conftest.py) is `mumu_core.tiny.write_tiny_components` run once per session."""
    shutil.copytree(tiny["vlm"], comfy_env.mumu_dir / "tiny-idefics2")
    shutil.copy2(tiny["bundle"], comfy_env.mumu_dir / "mumu_tiny.safetensors")
    nodes = comfy_env.import_pack()
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture
def encoder(pack):
    (patcher,) = pack["MumuEncoderLoader"]().load("tiny-idefics2", "mumu_tiny.safetensors", "auto")
    return patcher


def _images(n, h=48, w=32):
    g = torch.Generator().manual_seed(0)
    return {f"image_{i}": torch.rand(1, h, w, 3, generator=g) for i in range(1, n + 1)}


def _prompt(pack, text, **inputs):
    return pack["MumuInterleavedPrompt"]().build(text, **inputs)[0]


def test_loader_lists_the_tiny_files_and_wraps_the_encoder_in_a_model_patcher(pack, encoder, comfy_env):
    spec = pack["MumuEncoderLoader"].INPUT_TYPES()["required"]
    assert spec["vlm_folder"][0] == ["tiny-idefics2"]
    assert spec["bundle"][0] == ["mumu_tiny.safetensors"]  # not the VLM's own model.safetensors
    mp = comfy_env.model_patcher
    assert isinstance(encoder, mp.ModelPatcher)
    assert encoder.load_device == torch.device("cpu") and encoder.offload_device == torch.device("cpu")
    assert encoder.model_size() > 0
    assert next(encoder.model.parameters()).dtype == torch.float32  # auto on CPU
    assert encoder.model.mumu_source["bundle"] == "mumu_tiny.safetensors"
    assert comfy_env.model_management.load_calls == []  # loading to the device waits for Encode


def test_loader_dtype_choice_is_applied(pack):
    (patcher,) = pack["MumuEncoderLoader"]().load("tiny-idefics2", "mumu_tiny.safetensors", "bf16")
    assert {p.dtype for p in patcher.model.parameters()} == {torch.bfloat16}


def test_loader_refuses_names_outside_models_mumu(pack):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        pack["MumuEncoderLoader"]().load("../tiny-idefics2", "mumu_tiny.safetensors", "auto")


def test_encode_emits_clip_text_encode_sdxl_conditioning(pack, encoder, comfy_env):
    text = "a <image> man and his <image> dog in an <image> animated style"
    prompt = _prompt(pack, text, **_images(3))
    sizes = dict(width=832, height=1216, crop_w=0, crop_h=16, target_width=832, target_height=1216)
    cond, _neg = pack["MumuEncode"]().encode(encoder, prompt, **sizes)

    assert isinstance(cond, list) and len(cond) == 1 and len(cond[0]) == 2
    context, extras = cond[0]
    assert context.dim() == 3 and context.shape[0] == 1 and context.shape[2] == 2048
    assert context.shape[1] >= 3 * 324  # three images of 324 tokens plus the text
    assert set(extras) == {"pooled_output", *SIZE_KEYS}
    assert extras["pooled_output"].shape == (1, 1280)
    assert {k: extras[k] for k in SIZE_KEYS} == sizes
    assert all(isinstance(extras[k], int) for k in SIZE_KEYS)
    assert context.dtype == torch.float32 and torch.isfinite(context).all()

    # same numbers as the core encoder called directly
    direct = encoder.model.encode(prompt)
    torch.testing.assert_close(context, direct.context)
    torch.testing.assert_close(extras["pooled_output"], direct.pooled)

    mm = comfy_env.model_management
    assert mm.load_calls == [[encoder]]  # loaded through model management before use
    assert mm.load_kwargs[0]["force_full_load"] is True


def test_progress_bar_advances_once_per_image(pack, encoder, comfy_env):
    prompt = _prompt(pack, "a <image> man and his <image> dog", **_images(2))
    pack["MumuEncode"]().encode(encoder, prompt)
    (bar,) = comfy_env.utils.ProgressBar.instances
    assert bar.total == 2
    assert bar.updates[:2] == [(1, 2), (2, 2)]


def test_interrupt_between_images_aborts_the_encode(pack, encoder, comfy_env):
    mm, ut = comfy_env.model_management, comfy_env.utils
    seen = []

    def press_cancel_after_first_image(value, total, preview, node_id=None):
        seen.append(value)
        mm.interrupt_current_processing(True)

    ut.set_progress_bar_global_hook(press_cancel_after_first_image)
    prompt = _prompt(pack, "a <image> man and his <image> dog in an <image> animated style", **_images(3))
    with pytest.raises(mm.InterruptProcessingException):
        pack["MumuEncode"]().encode(encoder, prompt)
    assert seen == [1]  # stopped after the first image, not after all three


def test_empty_prompt_gives_the_unconditional_embedding(pack, encoder):
    neg, _ = pack["MumuEncode"]().encode(encoder, _prompt(pack, ""), **dict.fromkeys(SIZE_KEYS, 1024))
    (neg2,) = pack["MumuEncodeUnconditional"]().encode(encoder, **dict.fromkeys(SIZE_KEYS, 1024))
    uncond = encoder.model.encode_unconditional()
    for c in (neg, neg2):
        torch.testing.assert_close(c[0][0], uncond.context)
        torch.testing.assert_close(c[0][1]["pooled_output"], uncond.pooled)
        assert c[0][1]["width"] == 1024


def test_size_keys_absent_when_not_given_so_sdxl_uses_its_defaults(pack, encoder):
    (cond,) = pack["MumuEncodeUnconditional"]().encode(encoder)
    assert set(cond[0][1]) == {"pooled_output"}


def test_outputs_go_to_comfys_intermediate_device(pack, encoder, comfy_env, monkeypatch):
    # "meta" stands in for a device other than the one the encoder ran on
    monkeypatch.setattr(comfy_env.model_management, "intermediate_device", lambda: torch.device("meta"))
    (cond,) = pack["MumuEncodeUnconditional"]().encode(encoder)
    assert cond[0][0].device.type == "meta" and cond[0][1]["pooled_output"].device.type == "meta"


def test_image_weight_scales_only_that_images_tokens(pack, encoder):
    images = _images(2)
    plain = _prompt(pack, "a <image> man and his <image> dog", **images)
    weighted = _prompt(pack, "a <image> man and his <image> dog", weight_2=0.5, **images)
    a, _ = pack["MumuEncode"]().encode(encoder, plain)
    b, _ = pack["MumuEncode"]().encode(encoder, weighted)
    layout = encoder.model.encode(plain).layouts[0]
    s1, e1 = layout[0]["start"], layout[0]["end"]
    s2, e2 = layout[1]["start"], layout[1]["end"]
    torch.testing.assert_close(b[0][0][:, s2:e2], a[0][0][:, s2:e2] * 0.5)
    torch.testing.assert_close(b[0][0][:, s1:e1], a[0][0][:, s1:e1])


def test_encode_rejects_something_that_is_not_a_mumu_encoder(pack):
    with pytest.raises(TypeError, match="MUMU Encoder Loader"):
        pack["MumuEncode"]().encode(object(), None)


def test_patcher_lets_comfy_offload_the_encoder(pack, encoder, comfy_env):
    mm = comfy_env.model_management
    pack["MumuEncodeUnconditional"]().encode(encoder)
    assert encoder in mm.loaded_models()
    mm.unload_all_models()  # what ComfyUI does to make room for the UNet
    assert encoder.detach_count == 1 and mm.loaded_models() == []
    pack["MumuEncodeUnconditional"]().encode(encoder)  # and it comes back for the next encode
    assert encoder.load_count == 2


# --------------------------------------------------------------------------- batched negative
def test_negative_output_is_the_unconditional_tiled_to_the_positive_length(pack, encoder):
    prompt = _prompt(pack, "a <image> man and his <image> dog", **_images(2))
    sizes = dict.fromkeys(SIZE_KEYS, 1024)
    pos, neg = pack["MumuEncode"]().encode(encoder, prompt, **sizes)
    uncond = encoder.model.encode_unconditional()
    T, n = pos[0][0].shape[1], uncond.context.shape[1]
    assert n == 1 and neg[0][0].shape == (1, T, 2048)
    torch.testing.assert_close(neg[0][0], uncond.context.repeat(1, T // n, 1))
    torch.testing.assert_close(neg[0][1]["pooled_output"], uncond.pooled)
    assert set(neg[0][1]) == set(pos[0][1]) and neg[0][1]["width"] == 1024  # same keys: ComfyUI batches


def test_positive_and_negative_run_in_one_unet_call_with_the_same_prediction(pack, encoder):
    """ComfyUI's batching rule (tests/comfy_cond_batching.py): 2 calls with the 1-token negative, 1 with ours."""
    from comfy_cond_batching import calc_cond_batch, model_conds

    prompt = _prompt(pack, "a <image> man and his <image> dog in an <image> animated style", **_images(3))
    pos, neg = pack["MumuEncode"]().encode(encoder, prompt)
    (plain_neg,) = pack["MumuEncodeUnconditional"]().encode(encoder)
    g = torch.Generator().manual_seed(0)
    to_k, to_v = torch.randn(2048, 32, generator=g) / 45, torch.randn(2048, 32, generator=g) / 45
    q = torch.randn(1, 16, 32, generator=g)

    def apply_model(x, t, c_crossattn, y):  # one cross-attention, the only place SDXL reads the context
        k, v = c_crossattn @ to_k, c_crossattn @ to_v
        attn = torch.softmax(q.expand(x.shape[0], -1, -1) @ k.transpose(1, 2) / 32 ** 0.5, dim=-1)
        return x + (attn @ v) + y.sum(dim=1).view(-1, 1, 1)

    x, t = torch.randn(1, 16, 32, generator=g), torch.zeros(1)
    y = torch.zeros(1, 8)
    before, calls_before = calc_cond_batch(apply_model, [model_conds(pos[0][0], y), model_conds(plain_neg[0][0], y)], x, t)
    after, calls_after = calc_cond_batch(apply_model, [model_conds(pos[0][0], y), model_conds(neg[0][0], y)], x, t)
    assert (calls_before, calls_after) == (2, 1)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float summation order only


def test_a_written_negative_prompt_is_kept_and_batches_when_its_length_allows(pack, encoder):
    prompt = _prompt(pack, "a <image> man and his <image> dog", **_images(2))
    written = _prompt(pack, "blurry")
    pos, neg = pack["MumuEncode"]().encode(encoder, prompt, negative_prompt=written)
    direct = encoder.model.encode(written)
    n, T = direct.context.shape[1], pos[0][0].shape[1]
    from mumu_core.negative import batching_repeats, can_concat

    m = batching_repeats(n, T)
    if m is None:  # no whole number of copies batches with this T: left as written (2 UNet calls, correct)
        torch.testing.assert_close(neg[0][0], direct.context)
    else:
        assert can_concat(neg[0][0].shape[1], T)
        torch.testing.assert_close(neg[0][0], direct.context.repeat(1, m, 1))
    torch.testing.assert_close(neg[0][1]["pooled_output"], direct.pooled)


def test_auto_token_budget_is_the_bundles(pack, encoder):
    (prompt,) = pack["MumuPrompt"]().build("a <image> man", "auto", image_1=_images(1)["image_1"])
    assert prompt.images[0].tokens_per_image is None
    pos, _ = pack["MumuEncode"]().encode(encoder, prompt)
    trained = encoder.model.config["tokens_per_image"]
    assert encoder.model.default_tokens_per_image == trained
    layout = encoder.model.encode(prompt).layouts[0]
    assert layout[0]["tokens"] == trained


def test_image_options_mask_weight_and_tokens_reach_the_encoding(pack, encoder):
    images = _images(2)
    mask = torch.zeros(1, 48, 32)
    mask[:, 8:40, 8:24] = 1
    (opt,) = pack["MumuImageOptions"]().build(images["image_2"], 0.5, "16", mask=mask)
    (new,) = pack["MumuPrompt"]().build("a <image> man and his <image> dog", "auto", image_1=images["image_1"],
                                        image_2=opt)
    (old,) = pack["MumuInterleavedPrompt"]().build("a <image> man and his <image> dog", **images, mask_2=mask,
                                                   weight_2=0.5, tokens_per_image_1=encoder.model.default_tokens_per_image,
                                                   tokens_per_image_2=16)
    a, _ = pack["MumuEncode"]().encode(encoder, new)
    b, _ = pack["MumuEncode"]().encode(encoder, old)
    torch.testing.assert_close(a[0][0], b[0][0])  # every capability of the old node, same numbers


def test_weight_written_in_the_text_equals_the_options_weight(pack, encoder):
    images = _images(2)
    (syntax,) = pack["MumuPrompt"]().build("a <image> man and his (<image>:0.5) dog", "auto", **images)
    (opt,) = pack["MumuImageOptions"]().build(images["image_2"], 0.5, "auto")
    (node,) = pack["MumuPrompt"]().build("a <image> man and his <image> dog", "auto", image_1=images["image_1"],
                                         image_2=opt)
    a, _ = pack["MumuEncode"]().encode(encoder, syntax)
    b, _ = pack["MumuEncode"]().encode(encoder, node)
    torch.testing.assert_close(a[0][0], b[0][0])


@pytest.mark.parametrize("dtype, codes", [("fp8_e4m3fn", torch.uint8), ("int8", torch.int8)])
def test_loader_stores_the_vlm_linears_in_8_bits(pack, dtype, codes):
    from mumu_core.weight_storage import QuantizedLinear

    (patcher,) = pack["MumuEncoderLoader"]().load("tiny-idefics2", "mumu_tiny.safetensors", dtype)
    stored = [m for m in patcher.model.vlm.modules() if isinstance(m, QuantizedLinear)]
    assert stored and not any(type(m) is torch.nn.Linear for m in patcher.model.vlm.model.modules())
    assert all(m.weight_codes.dtype == codes and m.format == dtype for m in stored)
    pos, neg = pack["MumuEncode"]().encode(patcher, _prompt(pack, "a <image> man", **_images(1)))
    assert torch.isfinite(pos[0][0]).all()
