import json

import pytest
import torch
from safetensors.torch import save_file

from mumu_core.bundle import load_bundle, read_bundle_config, save_bundle
from mumu_core.encoder import MumuEncoder
from mumu_core.errors import BundleError


def test_round_trip(tmp_path, tiny):
    b = load_bundle(tiny["bundle"])
    out = save_bundle(tmp_path / "copy.safetensors", b.config, b.adapter, b.vlm_lora, b.unet_lora)
    c = load_bundle(out)
    assert c.config == b.config
    for part in ("adapter", "vlm_lora", "unet_lora"):
        x, y = getattr(b, part), getattr(c, part)
        assert x.keys() == y.keys() and len(x) > 0
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(k.endswith(".alpha") for k in c.unet_lora) and all(k.startswith("lora_unet_") for k in c.unet_lora)
    assert all(k.startswith("base_model.model.") for k in c.vlm_lora)
    assert not list(tmp_path.glob("*.tmp"))


def test_refuses_pickles(tmp_path):
    path = tmp_path / "bundle.safetensors"
    torch.save({"adapter.x": torch.zeros(2)}, path)
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(path)


def test_refuses_truncated_and_garbage(tmp_path, tiny):
    data = tiny["bundle"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated|damaged|could not be read"):
        load_bundle(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(BundleError, match="not safetensors"):
        load_bundle(junk)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.safetensors")


def test_header_length_starting_with_pickle_opcode_is_still_a_bundle(tmp_path, tiny):
    """A header of 128*k bytes begins with 0x80, the pickle opcode: sniffing must not misfire."""
    b = load_bundle(tiny["bundle"])
    for pad in range(0, 400):
        cfg = dict(b.config, provenance={"note": "x" * pad})
        path = save_bundle(tmp_path / "b.safetensors", cfg, b.adapter, b.vlm_lora, b.unet_lora)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.skip("no header length starting with 0x80 reached")
    assert read_bundle_config(path)["provenance"]["note"] == "x" * pad


def test_plain_safetensors_without_config_is_not_a_bundle(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(BundleError, match="not a MUMU bundle"):
        read_bundle_config(path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, tiny):
    b = load_bundle(tiny["bundle"])
    adapter = dict(b.adapter)
    adapter["input_proj.weight"] = torch.zeros(64, 99)
    bad = save_bundle(tmp_path / "bad.safetensors", b.config, adapter, b.vlm_lora, b.unet_lora)
    with pytest.raises(BundleError, match=r"adapter.input_proj.weight has shape \[64, 99\], the adapter config needs \[64, 64\]"):
        MumuEncoder.from_pretrained(tiny["vlm"], bad)


def test_vlm_lora_shape_mismatch_is_named(tmp_path, tiny):
    b = load_bundle(tiny["bundle"])
    lora = dict(b.vlm_lora)
    key = next(k for k in lora if "q_proj.lora_A" in k)
    lora[key] = torch.zeros(4, 7)
    bad = save_bundle(tmp_path / "bad.safetensors", b.config, b.adapter, lora, b.unet_lora)
    with pytest.raises(BundleError, match=r"vlm_lora\..*has shape \[4, 7\], but the VLM's .* takes 64 inputs"):
        MumuEncoder.from_pretrained(tiny["vlm"], bad)


def test_wrong_vlm_family_is_named(tiny):
    with pytest.raises(BundleError, match="'idefics2' VLM but is paired with a 'idefics3'"):
        MumuEncoder.from_pretrained(tiny["vlm_idefics3"], tiny["bundle"])


def test_config_records_what_loading_needs(tiny):
    cfg = read_bundle_config(tiny["bundle"])
    assert cfg["format_version"] == 1 and cfg["vlm"]["family"] == "idefics2"
    assert cfg["adapter"]["input_dim"] == cfg["vlm"]["hidden_size"]
    assert {"rank", "alpha"} <= set(cfg["vlm_lora"]) and {"rank", "alpha"} <= set(cfg["unet_lora"])
    json.dumps(cfg)
