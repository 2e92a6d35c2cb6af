"""Streaming merge on tiny SDXL-architecture single-file checkpoints.

Expected values are computed here independently of the engine: LoRA stems are derived by plain
string replacement from the checkpoint's own keys, and the arithmetic is written out in full.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mumu_core.errors import MumuError
from mumu_core.merge import merge_checkpoint
from mumu_core.sdxl.single_file import write_sdxl_single_file
from mumu_core.tiny.configs import tiny_unet_config, tiny_vae_config

PREFIX = "model.diffusion_model."
RANK, ALPHA = 4, 6.0



pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

@pytest.fixture(scope="module")
def models():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()), AutoencoderKL(**tiny_vae_config())


@pytest.fixture(scope="module")
def files(tmp_path_factory, models):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from mumu_core.unet_lora import peft_unet_lora_to_kohya

    unet, vae = models
    d = tmp_path_factory.mktemp("merge")
    out = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[name] = write_sdxl_single_file(unet.state_dict(), vae.state_dict(), d / f"ft_{name}.safetensors",
                                           dtype=dtype, unet_config=unet.config, vae_config=vae.config)
    import copy

    lora_unet = copy.deepcopy(unet)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]), lora_unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in lora_unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    kohya = peft_unet_lora_to_kohya(get_peft_model_state_dict(lora_unet), unet.config, alpha=ALPHA)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(d / "lora.safetensors"))
    out["lora"] = d / "lora.safetensors"
    out["dir"] = d
    return out


def _lora_factors(lora_path):
    sd = load_file(str(lora_path))
    stems = {k.split(".")[0] for k in sd}
    return {s: (sd[f"{s}.lora_up.weight"].float(), sd[f"{s}.lora_down.weight"].float(), sd[f"{s}.alpha"].item())
            for s in stems}


def _block_multiplier(ldm_key, blocks):
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", ldm_key)
    if blocks is None or not m:
        return 1.0
    i = int(m.group(2))
    return blocks[i] if m.group(1) == "input_blocks" else blocks[9] if m.group(1) == "middle_block" else blocks[10 + i]


def _expected_lora_merge(ckpt, lora_path, strength, blocks=None):
    src = load_file(str(ckpt))
    factors = _lora_factors(lora_path)
    expected, changed = {}, set()
    for k, w in src.items():
        stem = "lora_unet_" + k[len(PREFIX):-len(".weight")].replace(".", "_") if k.startswith(PREFIX) else None
        mult = strength * _block_multiplier(k[len(PREFIX):], blocks) if stem else 0.0
        if stem in factors and mult != 0.0:
            up, down, alpha = factors[stem]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0]) * mult
            expected[k] = (w.float() + delta).to(w.dtype)
            changed.add(k)
        else:
            expected[k] = w
    return src, expected, changed


def _assert_merged(out, src, expected, changed):
    got = load_file(str(out))
    assert list(got) == list(src) or set(got) == set(src)
    for k in src:
        if k in changed:
            tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[src[k].dtype]
            torch.testing.assert_close(got[k].float(), expected[k].float(), rtol=tol, atol=tol)
            assert not torch.equal(got[k], src[k])
        else:
            assert torch.equal(got[k].view(torch.uint8), src[k].view(torch.uint8)), f"{k} not byte-identical"


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_lora_merge_equals_independent_computation(files, dtype, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = merge_checkpoint(files[dtype], out, lora=files["lora"], strength=0.7, hash_checkpoint=True)
    src, expected, changed = _expected_lora_merge(files[dtype], files["lora"], 0.7)
    _assert_merged(out, src, expected, changed)
    assert report.tensors_changed == len(changed) == len(_lora_factors(files["lora"]))
    assert any(k.startswith("first_stage_model.") for k in src)  # the VAE rode along untouched
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    info = json.loads(meta["mumu_merge"])
    assert info["checkpoint"]["sha256"] == hashlib.sha256(files[dtype].read_bytes()).hexdigest()
    assert info["lora"]["sha256"] == hashlib.sha256(files["lora"].read_bytes()).hexdigest()
    assert info["strength"] == 0.7 and info["lora"]["ranks"] == [RANK] and info["mode"] == "lora"
    precision = info["precision"]
    assert 0.9 < precision["delta_retained"] < 1.1
    # rounding error of the change: none in fp32, some in fp16, ~8x more in bf16 (3 fewer mantissa bits)
    err = precision["delta_relative_error"]
    assert {"fp32": err < 1e-5, "fp16": 1e-4 < err < 0.05, "bf16": 1e-3 < err < 0.4}[dtype], err
    assert not list(tmp_path.glob(".*partial*"))


def test_block_weights(files, tmp_path):
    blocks = [0.0] * 9 + [0.5] + [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    out = tmp_path / "blocks.safetensors"
    merge_checkpoint(files["fp32"], out, lora=files["lora"], strength=0.5,
                     block_weights="input=0,middle=0.5,output=1,output3=2")
    src, expected, changed = _expected_lora_merge(files["fp32"], files["lora"], 0.5, blocks)
    assert not any(k.startswith(PREFIX + "input_blocks.") for k in changed)
    _assert_merged(out, src, expected, changed)


def test_add_difference(files, models, tmp_path):
    unet, vae = models
    torch.manual_seed(5)
    mumu_unet = {k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()}
    mumu = write_sdxl_single_file(mumu_unet, None, tmp_path / "mumu_unet.safetensors", dtype=torch.float16)
    base = files["fp16"]
    finetune = write_sdxl_single_file({k: v * 1.5 for k, v in unet.state_dict().items()}, vae.state_dict(),
                                      tmp_path / "finetune.safetensors", dtype=torch.float16, vae_config=vae.config)
    out = tmp_path / "diff.safetensors"
    report = merge_checkpoint(finetune, out, add_difference=(mumu, base), strength=0.8, block_weights="middle=0")
    ft, m, b, got = (load_file(str(p)) for p in (finetune, mumu, base, out))
    changed = 0
    for k, w in ft.items():
        if k.startswith(PREFIX) and not k.startswith(PREFIX + "middle_block."):
            exp = (w.float() + 0.8 * (m[k].float() - b[k].float())).half()
            torch.testing.assert_close(got[k].float(), exp.float(), rtol=1e-3, atol=1e-3)
            changed += 1
        else:
            assert torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)), k
    assert report.tensors_changed == changed and report.mode == "add_difference"


def test_diffusers_unet_folder_input(files, models, tmp_path):
    unet, _ = models
    unet.save_pretrained(tmp_path / "ft_unet")  # fp32 diffusers layout
    out = tmp_path / "from_folder.safetensors"
    merge_checkpoint(tmp_path / "ft_unet", out, lora=files["lora"], strength=1.0)
    src, expected, changed = _expected_lora_merge(files["fp32"], files["lora"], 1.0)
    unet_only = {k: v for k, v in src.items() if k.startswith(PREFIX)}
    _assert_merged(out, unet_only, {k: expected[k] for k in unet_only}, changed)


def test_merged_file_loads_with_diffusers_single_file(files, tmp_path, models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from mumu_core.sdxl import keys as K

    unet, vae = models
    folder = tmp_path / "sdxl"
    StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(), text_encoder=None,
                              text_encoder_2=None, tokenizer=None, tokenizer_2=None).save_pretrained(folder)
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(files["fp32"], out, lora=files["lora"], strength=1.0)
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), text_encoder=None,
                                                      text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                                      local_files_only=True)
    merged = load_file(str(out))
    for name, t in pipe.unet.state_dict().items():
        assert torch.equal(t, merged[PREFIX + K.diffusers_to_ldm(name, unet.config)]), name


def test_fp8_checkpoint_copy_through_and_merge(files, tmp_path):
    src = load_file(str(files["fp16"]))
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.startswith(PREFIX) else v) for k, v in src.items()}
    path = tmp_path / "fp8.safetensors"
    save_file(fp8, str(path))
    out = tmp_path / "fp8_merged.safetensors"
    merge_checkpoint(path, out, lora=files["lora"], strength=1.0)
    _, expected, changed = _expected_lora_merge(path, files["lora"], 1.0)
    got = load_file(str(out))
    for k, v in fp8.items():
        if k in changed:
            assert got[k].dtype == torch.float8_e4m3fn
            assert torch.equal(got[k].view(torch.uint8), expected[k].view(torch.uint8)) or \
                torch.allclose(got[k].float(), expected[k].float(), rtol=0.07, atol=0.02)
        else:
            assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8))


def test_refuses_to_overwrite_inputs(files, tmp_path):
    with pytest.raises(MumuError, match="never overwrites"):
        merge_checkpoint(files["fp16"], files["fp16"], lora=files["lora"], overwrite=True)
    link = tmp_path / "link.safetensors"
    os.link(files["fp16"], link)  # a hard link is the same file under another name
    with pytest.raises(MumuError, match="never overwrites"):
        merge_checkpoint(files["fp16"], link, lora=files["lora"], overwrite=True)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(MumuError, match="already exists"):
        merge_checkpoint(files["fp16"], existing, lora=files["lora"])
    assert existing.read_bytes() == b"keep me"


def _fake_checkpoint(path, tensors):
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("kind,tensors,message", [
    ("sd15", {PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
              PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              **{f"{PREFIX}time_embed.{i}.weight": (4, 4) for i in range(6)}}, "SD 1.x"),
    ("sd2", {PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
             PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
             **{f"{PREFIX}time_embed.{i}.weight": (4, 4) for i in range(6)}}, "SD 2.x"),
    ("flux", {f"double_blocks.{i}.img_attn.qkv.weight": (6, 2) for i in range(3)}, "Flux"),
    ("sd3", {f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight": (6, 2) for i in range(6)}, "SD3"),
    ("vae", {"first_stage_model.encoder.conv_in.weight": (2, 3, 3, 3)}, "without a UNet"),
])
def test_refuses_non_sdxl(files, tmp_path, kind, tensors, message):
    ckpt = _fake_checkpoint(tmp_path / f"{kind}.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MumuError, match=message):
        merge_checkpoint(ckpt, out, lora=files["lora"])
    assert not out.exists()


def test_truncated_and_corrupt_inputs_fail_cleanly(files, tmp_path):
    data = files["fp16"].read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out.safetensors"
    with pytest.raises(MumuError, match="truncated"):
        merge_checkpoint(trunc, out, lora=files["lora"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"#" + data[9:])
    with pytest.raises(MumuError, match="JSON"):
        merge_checkpoint(bad, out, lora=files["lora"])
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(MumuError, match="pickle"):
        merge_checkpoint(pickle, out, lora=files["lora"])
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_unmatched_lora_keys_are_listed_and_nothing_written(files, tmp_path):
    sd = load_file(str(files["lora"]))
    # SDXL has 10 transformer blocks at input_blocks.7; the tiny UNet only 2
    extra = "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_q"
    sd.update({f"{extra}.lora_down.weight": torch.zeros(RANK, 64), f"{extra}.lora_up.weight": torch.zeros(64, RANK),
               f"{extra}.alpha": torch.tensor(4.0)})
    lora = tmp_path / "lora_plus.safetensors"
    save_file(sd, str(lora))
    out = tmp_path / "out.safetensors"
    with pytest.raises(MumuError, match="input_blocks.7.1.transformer_blocks.9.attn2.to_q"):
        merge_checkpoint(files["fp16"], out, lora=lora)
    assert not out.exists()


def test_sigkill_mid_write_leaves_no_output_and_input_intact(files, tmp_path):
    ckpt = files["fp16"]
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "killed.safetensors"
    env = dict(os.environ, MUMU_MERGE_TEST_SLOW_WRITE="0.02", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mumu_core.cli", "merge", "--checkpoint", str(ckpt), "--lora",
                             str(files["lora"]), "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".killed.safetensors.partial-*") if p.stat().st_size > 100_000]
        if partial:
            break
        time.sleep(0.05)
    assert partial and proc.poll() is None, f"merge did not start writing: {proc.stderr.read() if proc.poll() else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
    # the next merge to the same name removes the dead process's leftover and succeeds
    merge_checkpoint(ckpt, out, lora=files["lora"])
    assert out.exists() and not list(tmp_path.glob(".killed.safetensors.partial-*"))


def test_cli_merge(files, tmp_path):
    out = tmp_path / "cli.safetensors"
    r = subprocess.run([sys.executable, "-m", "mumu_core.cli", "merge", "--checkpoint", str(files["fp16"]),
                        "--lora", str(files["lora"]), "--strength", "0.7", "--blocks", "input=1,middle=1,output=1",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rounding to the checkpoint" in r.stdout
    src, expected, changed = _expected_lora_merge(files["fp16"], files["lora"], 0.7)
    _assert_merged(out, src, expected, changed)
    r = subprocess.run([sys.executable, "-m", "mumu_core.cli", "merge", "--checkpoint", str(files["fp16"]),
                        "--lora", str(files["lora"]), "--out", str(files["fp16"])], capture_output=True, text=True)
    assert r.returncode == 2 and "never overwrites" in r.stderr and "Traceback" not in r.stderr


def test_kernel_copy_fallback_and_hashing_paths_give_the_same_file(files, tmp_path, monkeypatch):
    """copy_file_range (default), its pread+write fallback and the hashing path write identical data."""
    import errno

    from safetensors.torch import load_file as load

    outs = {}
    outs["kernel"] = tmp_path / "kernel.safetensors"
    merge_checkpoint(files["fp16"], outs["kernel"], lora=files["lora"], strength=0.9)
    outs["hash"] = tmp_path / "hash.safetensors"
    merge_checkpoint(files["fp16"], outs["hash"], lora=files["lora"], strength=0.9, hash_checkpoint=True)

    def no_kernel_copy(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    outs["fallback"] = tmp_path / "fallback.safetensors"
    merge_checkpoint(files["fp16"], outs["fallback"], lora=files["lora"], strength=0.9)
    ref = load(str(outs["kernel"]))
    for name in ("hash", "fallback"):
        got = load(str(outs[name]))
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref), name
