import numpy as np
import pytest
import torch
from PIL import Image

from mumu_core.errors import PromptError
from mumu_core.images import pad_to_square, prepare_image


def test_pad_to_square_centres_on_black_without_stretching():
    rgb = np.ones((50, 100, 3), dtype=np.float32)
    sq = pad_to_square(rgb)
    assert sq.shape == (100, 100, 3)
    assert sq[:25].max() == 0 and sq[75:].max() == 0 and sq[25:75].min() == 1


def test_prepare_image_resizes_to_side_and_keeps_aspect():
    out = np.asarray(prepare_image(Image.new("RGB", (200, 100), (255, 0, 0)), 252))
    assert out.shape == (252, 252, 3)
    assert out[:55].max() == 0 and out[-55:].max() == 0  # black bands top and bottom
    assert (out[100:150, :, 0] > 250).all() and out[100:150, :, 1].max() < 5


def test_mask_blacks_out_background():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[:, :32] = 1.0
    out = np.asarray(prepare_image(image, 64, mask=mask))
    assert out[:, :30].min() > 250 and out[:, 34:].max() == 0


def test_alpha_channel_is_used_as_mask():
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 16, 32))
    out = np.asarray(prepare_image(rgba, 32))
    assert out[:, :14].min() > 250 and out[:, 18:].max() == 0


@pytest.mark.parametrize("layout", ["hwc", "chw", "bhwc"])
def test_tensor_inputs(layout):
    t = torch.zeros(40, 20, 3)
    t[..., 1] = 1.0
    if layout == "chw":
        t = t.permute(2, 0, 1)
    if layout == "bhwc":
        t = t[None]
    out = np.asarray(prepare_image(t, 28))
    assert out.shape == (28, 28, 3) and out[14, 14, 1] == 255 and out[14, 1].max() == 0


def test_bad_shapes_raise_prompt_errors():
    with pytest.raises(PromptError):
        prepare_image(np.zeros((2, 3, 4, 5, 6)), 28)
    with pytest.raises(PromptError):
        prepare_image(np.zeros((8, 8, 3)), 28, mask=np.zeros((2, 8, 8, 2)))
