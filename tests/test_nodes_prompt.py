"""MUMU Interleaved Prompt node: binding ComfyUI IMAGE/MASK sockets to placeholders, and its errors."""

from __future__ import annotations

import pytest
import torch

from comfy_doubles import comfy_env  # noqa: F401  (fixture)


@pytest.fixture
def node(comfy_env):
    nodes = comfy_env.import_pack()
    return nodes.NODE_CLASS_MAPPINGS["MumuInterleavedPrompt"]()


def _image(h=40, w=30, value=0.5, batch=1):
    return torch.full((batch, h, w, 3), value)  # ComfyUI IMAGE: [B,H,W,C] float 0..1


def _error(excinfo) -> str:
    # ComfyUI shows str(exception) in its error dialog
    return str(excinfo.value)


def test_default_text_is_the_papers_example_and_binds_three_images(node):
    spec = node.INPUT_TYPES()
    text = spec["required"]["text"][1]["default"]
    assert text == "a <image> man and his <image> dog in an <image> animated style"
    images = {f"image_{i}": _image(value=i / 10) for i in (1, 2, 3)}
    (prompt,) = node.build(text, **images)
    assert prompt.image_order == [0, 1, 2]
    assert [type(s).__name__ for s in prompt.segments] == ["str", "int", "str", "int", "str", "int", "str"]
    # first frame taken, batch axis dropped: [H,W,C]
    assert tuple(prompt.images[0].image.shape) == (40, 30, 3)
    assert float(prompt.images[2].image[0, 0, 0]) == pytest.approx(0.3)


def test_eight_image_inputs_with_mask_weight_and_tokens_named_like_ipadapter(node):
    optional = node.INPUT_TYPES()["optional"]
    for i in range(1, 9):
        assert optional[f"image_{i}"][0] == "IMAGE"
        assert optional[f"mask_{i}"][0] == "MASK"
        assert optional[f"weight_{i}"][0] == "FLOAT" and optional[f"weight_{i}"][1]["default"] == 1.0
        assert optional[f"tokens_per_image_{i}"][1]["default"] == 324


def test_per_image_mask_weight_and_tokens_reach_the_prompt(node):
    mask = torch.zeros(1, 40, 30)
    mask[:, 10:20, 10:20] = 1.0
    (prompt,) = node.build("a <image> man and his <image> dog", image_1=_image(), image_2=_image(),
                           mask_2=mask, weight_1=0.5, tokens_per_image_2=1296)
    first, second = prompt.images
    assert first.weight == 0.5 and first.mask is None and first.tokens_per_image == 324
    assert second.weight == 1.0 and second.tokens_per_image == 1296
    assert tuple(second.mask.shape) == (40, 30)


def test_explicit_index_reuses_an_image(node):
    (prompt,) = node.build("<image> and again <image:1>", image_1=_image())
    assert prompt.image_order == [0, 0]


def test_empty_text_without_images_is_the_unconditional_prompt(node):
    (prompt,) = node.build("")
    assert prompt.is_empty


def test_too_few_images_names_the_connected_and_next_inputs(node):
    with pytest.raises(ValueError) as err:
        node.build("a <image> man and his <image> dog in an <image> animated style",
                   image_1=_image(), image_2=_image())
    msg = _error(err)
    assert "3 <image> placeholder(s) but 2 image(s)" in msg
    assert "connected inputs: image_1, image_2" in msg and "next free input is image_3" in msg


def test_unused_image_is_reported_with_its_number(node):
    with pytest.raises(ValueError) as err:
        node.build("a <image> man", image_1=_image(), image_2=_image())
    msg = _error(err)
    assert "image(s) 2 are connected but the prompt never uses them" in msg
    assert "image_1, image_2" in msg


def test_gap_between_connected_inputs_says_which_link_to_move(node):
    with pytest.raises(ValueError) as err:
        node.build("a <image> man and his <image> dog", image_1=_image(), image_3=_image())
    msg = _error(err)
    assert "image_3 is connected but image_2 is not" in msg
    assert "move the link from image_3 to image_2" in msg


def test_mask_without_its_image_is_an_error(node):
    with pytest.raises(ValueError, match="mask_2 connected without image_2"):
        node.build("a <image> man", image_1=_image(), mask_2=torch.ones(1, 8, 8))


def test_image_batch_is_refused_with_a_fix(node):
    with pytest.raises(ValueError) as err:
        node.build("a <image> man", image_1=_image(batch=3))
    assert "image_1 is a batch of 3 images" in _error(err) and "Image From Batch" in _error(err)


def test_non_square_token_count_names_the_input_and_nearest_values(node):
    with pytest.raises(ValueError) as err:
        node.build("a <image> man", image_1=_image(), tokens_per_image_1=300)
    msg = _error(err)
    assert "tokens_per_image_1=300" in msg and "289" in msg and "324" in msg


def test_placeholder_typo_is_reported(node):
    with pytest.raises(ValueError, match="not a valid placeholder"):
        node.build("a <image 1> man", image_1=_image())


def test_prompt_errors_are_the_core_prompt_error_type(node):
    from mumu_core.errors import PromptError

    with pytest.raises(PromptError):
        node.build("a <image> man")


# --------------------------------------------------------------------------- MUMU Prompt
@pytest.fixture
def new_node(comfy_env):
    nodes = comfy_env.import_pack()
    return nodes.NODE_CLASS_MAPPINGS["MumuPrompt"](), nodes.NODE_CLASS_MAPPINGS["MumuImageOptions"]()


def test_mumu_prompt_shows_text_token_budget_and_image_sockets_only(new_node):
    prompt, _ = new_node
    spec = prompt.INPUT_TYPES()
    assert list(spec["required"]) == ["text", "tokens_per_image"]
    assert spec["required"]["tokens_per_image"][0][0] == "auto"
    assert spec["required"]["tokens_per_image"][1]["default"] == "auto"
    assert list(spec["optional"]) == [f"image_{i}" for i in range(1, 9)]
    assert all(entry[0] == "IMAGE,MUMU_IMAGE" for entry in spec["optional"].values())


def test_old_node_is_deprecated_but_still_registered(comfy_env):
    nodes = comfy_env.import_pack()
    old = nodes.NODE_CLASS_MAPPINGS["MumuInterleavedPrompt"]
    assert old.DEPRECATED is True and "deprecated" in nodes.NODE_DISPLAY_NAME_MAPPINGS["MumuInterleavedPrompt"]
    assert not getattr(nodes.NODE_CLASS_MAPPINGS["MumuPrompt"], "DEPRECATED", False)


def test_auto_budget_stays_open_until_encode_and_a_number_is_applied(new_node):
    prompt, _ = new_node
    (auto,) = prompt.build("a <image> man", "auto", image_1=_image())
    (fixed,) = prompt.build("a <image> man", "1296", image_1=_image())
    assert auto.images[0].tokens_per_image is None and fixed.images[0].tokens_per_image == 1296


def test_image_options_carry_mask_weight_and_own_budget(new_node):
    prompt, options = new_node
    mask = torch.ones(1, 40, 30)
    (opt,) = options.build(_image(), 0.5, "64", mask=mask)
    (plain_opt,) = options.build(_image(), 1.0, "auto")
    (p,) = prompt.build("a (<image>:2) man and his <image> dog", "1296", image_1=opt, image_2=plain_opt)
    first, second = p.images
    assert first.weight == 1.0 and first.tokens_per_image == 64 and tuple(first.mask.shape) == (40, 30)
    assert second.tokens_per_image == 1296  # auto -> the prompt node's budget


def test_new_node_errors_name_the_sockets(new_node):
    prompt, _ = new_node
    with pytest.raises(ValueError) as err:
        prompt.build("a <image> man and his <image> dog", "auto", image_1=_image())
    assert "[MUMU Prompt: connected inputs: image_1; the next free input is image_2.]" in str(err.value)
    with pytest.raises(ValueError, match="never closed"):
        prompt.build("a <image cat", "auto", image_1=_image())
    with pytest.raises(ValueError, match="image_1 is a batch of 2"):
        prompt.build("a <image> man", "auto", image_1=_image(batch=2))
