"""Control maps: OpenCV canny, a user's transformers depth model (tiny, random, offline), sketch."""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest
from PIL import Image

from mumu_core.errors import MumuError
from mumu_training.control_maps import ControlMaps, DepthEstimator, canny_map, xdog_map


def _scene():
    arr = np.full((120, 200, 3), 30, np.uint8)
    arr[20:100, 40:120] = (220, 200, 180)  # a bright square on a dark background
    return Image.fromarray(arr)


def test_canny_is_opencv_canny():
    import cv2

    img = _scene()
    out = np.asarray(canny_map(img))[..., 0]
    assert out.shape == (120, 200) and set(np.unique(out)) <= {0, 255}
    ref = cv2.Canny(np.asarray(img.convert("L")), 100.0, 200.0, L2gradient=True)
    assert np.array_equal(out, ref)
    assert out[60, 38:43].max() == 255 and out[60, 60:100].max() == 0  # edge at x=40, flat inside


def test_xdog_sketch_draws_lines_at_edges_only():
    out = np.asarray(xdog_map(_scene()))[..., 0].astype(int)
    assert out.shape == (120, 200)
    assert out[60, 36:45].max() > 128          # a line along the square's left side
    assert out[60, 70:90].max() < 30 and out[5:15, 150:190].max() < 30  # flat regions stay dark


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory):
    """A tiny random Depth Anything (DINOv2 backbone) + DPT processor, saved in HF layout."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    try:
        from transformers import DPTImageProcessorPil as Proc  # transformers 5: no torchvision needed
    except ImportError:
        from transformers import DPTImageProcessor as Proc

    folder = tmp_path_factory.mktemp("depth")
    backbone = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, head_hidden_size=8,
                              neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32)
    DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(folder)
    Proc(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(folder)
    return folder


def test_depth_from_a_user_model_folder(tiny_depth):
    est = DepthEstimator(str(tiny_depth))
    out = est(_scene())
    arr = np.asarray(out)
    assert out.size == (200, 120) and out.mode == "RGB" and arr.min() == 0 and arr.max() == 255
    assert np.array_equal(arr[..., 0], arr[..., 1])
    clone = pickle.loads(pickle.dumps(est))  # DataLoader workers get the folder, not the weights
    assert clone._model is None and np.array_equal(np.asarray(clone(_scene())), arr)


def test_depth_in_prompts(tiny_depth):
    from mumu_training.samples import SampleBuilder, SampleBuilderConfig, sample_rng

    cfg = SampleBuilderConfig(resolution=64, patch_size=2, edge_map_prob=1.0, cond_dropout_prob=0.0,
                              control_maps={"depth": 1.0}, depth_model=str(tiny_depth))
    s = SampleBuilder(cfg).build({"id": "x", "caption": "a box", "crops": []}, _scene(), sample_rng(0, 0, 0))
    assert s.control_kinds() == ["depth"] and s.prompt.images[-1].image.size == (36, 36)


def test_bad_depth_folder_is_named(tmp_path):
    with pytest.raises(MumuError, match="depth-estimation model folder"):
        DepthEstimator(str(tmp_path))(_scene())
    with pytest.raises(MumuError, match="depth_model"):
        ControlMaps({"depth": 1.0})


def test_learned_sketch_extractor_hook(tmp_path, monkeypatch):
    (tmp_path / "my_lines.py").write_text(textwrap.dedent("""
        from PIL import ImageOps
        CALLS = []
        def factory(model=None):
            CALLS.append(model)
            return lambda im: ImageOps.invert(im.convert("L"))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    maps = ControlMaps({"sketch": 1.0}, sketch_extractor="my_lines:factory", sketch_model="weights/pidinet")
    out = maps.render("sketch", _scene())
    import my_lines

    assert my_lines.CALLS == ["weights/pidinet"] and out.mode == "RGB"
    assert np.asarray(out)[5, 5, 0] > 200  # inverted dark background
    assert maps.sketch_source == "my_lines:factory" and ControlMaps({"sketch": 1.0}).sketch_source == "xdog"
    with pytest.raises(MumuError, match="package.module:factory"):
        ControlMaps({"sketch": 1.0}, sketch_extractor="nocolon").render("sketch", _scene())
