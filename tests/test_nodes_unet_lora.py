"""UNet LoRA and merge nodes against the ComfyUI doubles: patches, clone + one add_patches call, exact deltas,
refusals, save; and the patches against ComfyUI's own weight-adapter code when MUMU_COMFYUI_DIR is set."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_doubles import comfy_env  # noqa: F401  (fixture)
from mumu_core.sdxl import keys as K
from mumu_core.tiny.configs import tiny_unet_config, tiny_vae_config

RANK, ALPHA = 4, 2.0


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


@pytest.fixture(scope="module")
def kohya(tiny_unet):
    from mumu_core.unet_lora import normalize_unet_lora

    g = torch.Generator().manual_seed(2)
    shapes = K.ldm_unet_shapes(tiny_unet.config)
    sd = {}
    for ldm in [k for k in shapes if k.endswith(("attn2.to_q.weight", "attn1.to_out.0.weight", "proj_in.weight"))]:
        out_f, in_f = shapes[ldm]
        stem = K.kohya_stem(ldm[: -len(".weight")])
        sd[f"{stem}.lora_down.weight"] = torch.randn(RANK, in_f, generator=g) * 0.1
        sd[f"{stem}.lora_up.weight"] = torch.randn(out_f, RANK, generator=g) * 0.1
        sd[f"{stem}.alpha"] = torch.tensor(ALPHA)
    return normalize_unet_lora(sd)[0]


class _Holder(torch.nn.Module):
    pass


def _module_from_state_dict(sd):
    root = _Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, _Holder())
            m = getattr(m, p)
        m.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return root


def _patcher(env, unet, cls_name="SDXL"):
    ldm = {K.diffusers_to_ldm(k, unet.config): v for k, v in unet.state_dict().items()}
    model = getattr(env.model_base, cls_name)(_module_from_state_dict(ldm))
    cpu = torch.device("cpu")
    return env.model_patcher.ModelPatcher(model, cpu, cpu)


def _put_lora(env, kohya, where="loras"):
    folder = env.base / "models" / where
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"unet_lora.{k}": v for k, v in kohya.items()} if where == "mumu" else dict(kohya)
    if where == "mumu":
        sd["adapter.w"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "mumu_unet.safetensors"),
              metadata={"mumu_config": json.dumps({"format_version": 1})} if where == "mumu" else None)
    return f"{where}/mumu_unet.safetensors"


def _expected(kohya, strength, blocks=None):
    out = {}
    for stem in {k.split(".")[0] for k in kohya}:
        ldm = K.stem_to_ldm_module(stem, tiny_unet_config()) + ".weight"
        up, down = kohya[f"{stem}.lora_up.weight"], kohya[f"{stem}.lora_down.weight"]
        mult = strength * K.block_weight(ldm, blocks)
        out["diffusion_model." + ldm] = mult * (ALPHA / RANK) * (up @ down)
    return out


@pytest.mark.parametrize("where", ["loras", "mumu"])
def test_apply_returns_patched_clone_with_exact_deltas(comfy_env, tiny_unet, kohya, where):
    nodes = comfy_env.import_pack("nodes.unet_lora")
    choice = _put_lora(comfy_env, kohya, where)
    assert choice in nodes.MumuApplyUnetLora.INPUT_TYPES()["required"]["lora"][0]
    model = _patcher(comfy_env, tiny_unet)
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    (out,) = nodes.MumuApplyUnetLora().apply(model, choice, 0.6)
    assert out is not model and out.model is model.model
    assert model.patches == {} and model.add_patches_calls == 0  # the input MODEL is untouched
    assert out.add_patches_calls == 1
    expected = _expected(kohya, 0.6)
    assert set(out.patches) == set(expected)
    patched = out.patched_state_dict()
    for k, w in before.items():
        assert torch.equal(model.model_state_dict()[k], w)  # weights themselves never mutated
        if k in expected:
            torch.testing.assert_close(patched[k], w + expected[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(patched[k], w)


def test_apply_blocks_weights_each_block(comfy_env, tiny_unet, kohya):
    nodes = comfy_env.import_pack("nodes.unet_lora")
    choice = _put_lora(comfy_env, kohya)
    model = _patcher(comfy_env, tiny_unet)
    blocks = {f"input_{i}": 0.0 for i in range(9)} | {"middle": 0.5} | {f"output_{i}": 1.0 for i in range(9)}
    blocks["output_3"] = 2.0
    (out,) = nodes.MumuApplyUnetLoraBlocks().apply(model, choice, 1.0, **blocks)
    weights = [0.0] * 9 + [0.5] + [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    expected = {k: v for k, v in _expected(kohya, 1.0, weights).items() if v.abs().max() > 0}
    assert out.add_patches_calls == 1 and set(out.patches) == set(expected)
    assert not any(k.startswith("diffusion_model.input_blocks.") for k in out.patches)
    patched, base = out.patched_state_dict(), model.model_state_dict()
    for k, d in expected.items():
        torch.testing.assert_close(patched[k], base[k] + d, rtol=1e-5, atol=1e-6)


def test_refuses_non_sdxl_model(comfy_env, tiny_unet, kohya):
    nodes = comfy_env.import_pack("nodes.unet_lora")
    choice = _put_lora(comfy_env, kohya)
    for cls_name, found in (("SD15", "SD15"), ("SDXLRefiner", "SDXLRefiner")):
        model = _patcher(comfy_env, tiny_unet, cls_name)
        with pytest.raises(ValueError, match=f"SDXL models only.*{found}"):
            nodes.MumuApplyUnetLora().apply(model, choice, 1.0)
        assert model.patches == {}


def test_lora_names_cannot_escape_the_model_folders(comfy_env, tiny_unet, kohya):
    nodes = comfy_env.import_pack("nodes.unet_lora")
    model = _patcher(comfy_env, tiny_unet)
    for bad in ("loras/../../secret.safetensors", "/etc/passwd", "checkpoints/x.safetensors", "loras/x.ckpt"):
        with pytest.raises(ValueError):
            nodes.MumuApplyUnetLora().apply(model, bad, 1.0)


def test_save_merged_checkpoint_streams_to_output(comfy_env, tiny_unet, kohya):
    from diffusers import AutoencoderKL

    from mumu_core.sdxl.single_file import write_sdxl_single_file

    nodes = comfy_env.import_pack("nodes.merge")
    choice = _put_lora(comfy_env, kohya)
    ckpt_dir = comfy_env.base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    vae = AutoencoderKL(**tiny_vae_config())
    ckpt = write_sdxl_single_file(tiny_unet.state_dict(), vae.state_dict(), ckpt_dir / "finetune.safetensors",
                                  dtype=torch.float16, vae_config=vae.config)
    spec = nodes.MumuSaveMergedCheckpoint.INPUT_TYPES()["required"]
    assert "finetune.safetensors" in spec["ckpt_name"][0]
    result = nodes.MumuSaveMergedCheckpoint().save("finetune.safetensors", choice, 0.5, "", "checkpoints/mumu_ft")
    assert "rounding to the checkpoint" in result["ui"]["text"][0]
    out = comfy_env.base / "output" / "checkpoints" / "mumu_ft_00001_.safetensors"
    merged, src = load_file(str(out)), load_file(str(ckpt))
    expected = {"model." + k: d for k, d in _expected(kohya, 0.5).items()}
    for k, w in src.items():
        if k in expected:
            torch.testing.assert_close(merged[k].float(), (w.float() + expected[k]).half().float(), rtol=1e-3,
                                       atol=1e-3)
        else:
            assert torch.equal(merged[k], w)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["mumu_merge"])["strength"] == 0.5
    assert comfy_env.utils.ProgressBar.instances[-1].updates[-1] == (1000, 1000)
    # a second run never overwrites: the counter moves on
    nodes.MumuSaveMergedCheckpoint().save("finetune.safetensors", choice, 0.5, "", "checkpoints/mumu_ft")
    assert (out.parent / "mumu_ft_00002_.safetensors").exists()
    with pytest.raises(ValueError, match="output folder"):
        nodes.MumuSaveMergedCheckpoint().save("finetune.safetensors", choice, 0.5, "", "../escape")
    # Cancel in ComfyUI aborts the merge and leaves no file behind
    comfy_env.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        nodes.MumuSaveMergedCheckpoint().save("finetune.safetensors", choice, 0.5, "", "checkpoints/cancelled")
    assert not list((out.parent).glob("cancelled*")) and not list(out.parent.glob(".*partial*"))


def _model_state(unet):
    ldm = {K.diffusers_to_ldm(k, unet.config): v for k, v in unet.state_dict().items()}
    return {f"diffusion_model.{k}": v for k, v in ldm.items()}


def test_comfy_patches_diff_form(comfy_env, tiny_unet, kohya):
    from mumu_core.errors import MumuError
    from mumu_core.unet_lora import lora_deltas

    lora_patches = comfy_env.import_pack("nodes.lora_patches")
    state = _model_state(tiny_unet)
    blocks = K.parse_block_weights("output=0")
    patches = lora_patches.comfy_patches(kohya, state, strength=0.5, block_weights=blocks, form="diff")
    expected = {f"diffusion_model.{k}": d for k, d in lora_deltas(kohya, 0.5, blocks) if d.abs().max() > 0}
    assert set(patches) == set(expected)
    for k, (kind, (delta,)) in patches.items():
        assert kind == "diff" and delta.shape == state[k].shape
        torch.testing.assert_close(delta, expected[k])
    with pytest.raises(MumuError, match="no weight in this model"):
        lora_patches.comfy_patches(kohya, {k: v for k, v in state.items() if "attn2" not in k}, strength=1.0,
                                   form="diff")


def test_comfy_patches_lora_adapter_form_folds_strength_into_alpha(comfy_env, tiny_unet, kohya, monkeypatch):
    # a hand copy of LoRAAdapter.calculate_weight's arithmetic; the test below runs ComfyUI's own
    import sys
    import types

    from mumu_core.unet_lora import lora_deltas

    class LoRAAdapter:
        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

        def apply(self, weight, strength):
            up, down, alpha = self.weights[:3]
            alpha = alpha / down.shape[0]
            return weight + strength * alpha * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)

    mod = types.ModuleType("comfy.weight_adapter.lora")
    mod.LoRAAdapter = LoRAAdapter
    monkeypatch.setitem(sys.modules, "comfy.weight_adapter", types.ModuleType("comfy.weight_adapter"))
    monkeypatch.setitem(sys.modules, "comfy.weight_adapter.lora", mod)
    lora_patches = comfy_env.import_pack("nodes.lora_patches")
    state = _model_state(tiny_unet)
    patches = lora_patches.comfy_patches(kohya, state, strength=-0.8)
    expected = dict(lora_deltas(kohya, -0.8))
    assert len(patches) == len(expected)
    for k, adapter in patches.items():
        assert isinstance(adapter, LoRAAdapter)
        torch.testing.assert_close(adapter.apply(state[k], 1.0), state[k] + expected[k[len("diffusion_model."):]])


COMFYUI_DIR = os.environ.get("MUMU_COMFYUI_DIR")

# Runs in a fresh interpreter with the real ComfyUI on sys.path (no doubles): builds the patches the
# apply nodes hand to add_patches and applies them with comfy.lora.calculate_weight, the function
# ModelPatcher uses to patch a weight, against the exact deltas of the LoRA.
_REAL_COMFY_CHECK = r"""
import sys

import torch

sys.path.insert(0, sys.argv[1])
import comfy.lora
from comfy.weight_adapter.lora import LoRAAdapter

from comfy_doubles import import_pack
from diffusers import UNet2DConditionModel
from mumu_core.sdxl import keys as K
from mumu_core.tiny.configs import tiny_unet_config
from mumu_core.unet_lora import lora_deltas, normalize_unet_lora

torch.manual_seed(0)
unet = UNet2DConditionModel(**tiny_unet_config()).eval()
state = {"diffusion_model." + K.diffusers_to_ldm(k, unet.config): v for k, v in unet.state_dict().items()}
g = torch.Generator().manual_seed(2)
shapes = K.ldm_unet_shapes(unet.config)
sd = {}
for ldm in [k for k in shapes if k.endswith(("attn2.to_q.weight", "proj_in.weight", "ff.net.2.weight"))]:
    out_f, in_f = shapes[ldm][:2]
    stem = K.kohya_stem(ldm[: -len(".weight")])
    sd[stem + ".lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.1
    sd[stem + ".lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    sd[stem + ".alpha"] = torch.tensor(2.0)
kohya = normalize_unet_lora(sd)[0]
lora_patches = import_pack("nodes.lora_patches")
blocks = K.parse_block_weights("input=0.5,middle=1,output=0.25")
patches = lora_patches.comfy_patches(kohya, state, strength=-0.8, block_weights=blocks, form="lora")
expected = dict(lora_deltas(kohya, -0.8, blocks))
assert patches and len(patches) == len(expected), (len(patches), len(expected))
for key, adapter in patches.items():
    assert isinstance(adapter, LoRAAdapter), type(adapter)
    weight = state[key].detach().float().clone()
    patched = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weight, key)
    torch.testing.assert_close(patched, state[key].float() + expected[key[len("diffusion_model."):]])
print("compared", len(patches), "patches")
"""


@pytest.mark.skipif(not COMFYUI_DIR, reason="set MUMU_COMFYUI_DIR=/path/to/ComfyUI (a checkout whose requirements "
                                            "are installed here) to check the patches with ComfyUI's own code")
def test_lora_patches_match_comfyui_weight_adapter():
    import subprocess
    import sys

    from comfy_doubles import REPO_ROOT

    paths = [str(REPO_ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    result = subprocess.run([sys.executable, "-c", _REAL_COMFY_CHECK, COMFYUI_DIR], capture_output=True, text=True,
                            env=env, cwd=COMFYUI_DIR, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "compared" in result.stdout
