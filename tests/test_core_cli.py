"""The `mumu` CLI end to end, in subprocesses, on the tiny components."""

import json

import pytest
from safetensors import safe_open

from conftest import run_mumu


def encode(tiny, tmp_path, tokens, *extra, images=("man.png", "dog.png")):
    out = tmp_path / f"cond_{tokens}.safetensors"
    args = ["encode", "--vlm", tiny["vlm"], "--bundle", tiny["bundle"], "--prompt", "a <image> man and his <image> dog",
            "--tokens-per-image", str(tokens), "--out", out, *extra]
    for name in images:
        args += ["--image", tiny["images"] / name]
    return run_mumu(*args), out


def test_mumu_tiny_writes_every_component(tmp_path):
    r = run_mumu("tiny", "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    listing = json.loads((tmp_path / "t" / "tiny_components.json").read_text())
    for key in ("vlm", "vlm_idefics3", "bundle", "sdxl", "sdxl_single_file", "images", "grounding_dino", "owlv2"):
        assert key in listing, key
    assert (tmp_path / "t" / "vlm" / "config.json").exists()
    assert (tmp_path / "t" / "sdxl" / "unet" / "config.json").exists()
    assert (tmp_path / "t" / "detectors" / "grounding_dino" / "config.json").exists()
    assert not list((tmp_path / "t").glob(".*partial"))


def test_encode_token_counts(tiny, tmp_path):
    r16, out16 = encode(tiny, tmp_path, 16)
    r36, out36 = encode(tiny, tmp_path, 36)
    assert r16.returncode == 0 and r36.returncode == 0, r16.stderr + r36.stderr
    shapes = {}
    for tokens, out in ((16, out16), (36, out36)):
        with safe_open(str(out), "pt") as f:
            ctx, pooled, mask = f.get_tensor("context"), f.get_tensor("pooled"), f.get_tensor("mask")
            layout = json.loads(f.metadata()["layout"])
        assert ctx.shape[0] == 1 and ctx.shape[2] == 2048 and pooled.shape == (1, 1280) and mask.shape == ctx.shape[:2]
        assert [e["tokens"] for e in layout] == [tokens, tokens]
        shapes[tokens] = ctx.shape[1]
    assert shapes[36] - shapes[16] == 2 * (36 - 16)


def test_placeholder_mismatch_exits_nonzero_with_both_counts(tiny, tmp_path):
    r, out = encode(tiny, tmp_path, 16, images=("man.png",))
    assert r.returncode == 2
    assert "2 <image> placeholder(s) but 1 image(s)" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_bad_bundles_are_refused_cleanly(tiny, tmp_path):
    import torch

    pickled = tmp_path / "pickled.safetensors"
    torch.save({"a": torch.zeros(1)}, pickled)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(tiny["bundle"].read_bytes()[:1000])
    for bad, expect in ((pickled, "pickle"), (corrupt, "truncated")):
        args = ["encode", "--vlm", tiny["vlm"], "--bundle", bad, "--prompt", "a man", "--out", tmp_path / "x.safetensors"]
        r = run_mumu(*args)
        assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_tokens_per_image_names_neighbours(tiny, tmp_path):
    r, _ = encode(tiny, tmp_path, 300)
    assert r.returncode == 2 and "289" in r.stderr and "324" in r.stderr


def test_demo_writes_png_and_json(tiny, tmp_path):
    out = tmp_path / "demo"
    r = run_mumu("demo", "--random-weights", "--out", out, "--tiny", tiny["bundle"].parent, "--steps", "2",
                 "--size", "64")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out / "demo.png").size == (64, 64)
    summary = json.loads((out / "demo.json").read_text())
    assert [e["tokens"] for e in summary["layout"]] == [36, 36, 36]
    assert summary["context_shape"][2] == 2048 and summary["pooled_shape"] == [1, 1280]
    assert summary["unet_lora_layers"] > 0 and "generate_s" in summary["timings"]


@pytest.mark.parametrize("sdxl_key", ["sdxl", "sdxl_single_file"])
def test_generate_from_folder_and_single_file(tiny, tmp_path, sdxl_key):
    out = tmp_path / "gen.png"
    args = ["generate", "--sdxl", tiny[sdxl_key], "--vlm", tiny["vlm"], "--bundle", tiny["bundle"],
            "--prompt", "a <image> portrait", "--image", tiny["images"] / "man.png", "--tokens-per-image", "16",
            "--steps", "2", "--width", "64", "--height", "64", "--out", out]
    if sdxl_key == "sdxl_single_file":
        args += ["--sdxl-config", tiny["sdxl"]]
    r = run_mumu(*args)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    im = Image.open(out)
    assert im.size == (64, 64) and "a <image> portrait" in im.info["mumu"]


def test_version_flag_prints_the_package_version():
    from mumu_core import __version__
    from mumu_core.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--version"]) == 0
    assert out.getvalue().strip() == f"mumu {__version__}"


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_encode_with_8_bit_weights(tiny, tmp_path, dtype):
    out = tmp_path / "c.safetensors"
    proc = run_mumu("encode", "--vlm", tiny["vlm"], "--bundle", tiny["bundle"], "--dtype", dtype,
                    "--prompt", "a man", "--out", out)
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("context").shape[-1] == 2048
