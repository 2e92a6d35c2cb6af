"""The pack as ComfyUI sees it: import cost, registration, node metadata, model folder safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comfy_doubles import REPO_ROOT, comfy_env  # noqa: F401  (fixture)

HEAVY = ("torch", "transformers", "diffusers", "peft", "accelerate", "safetensors", "numpy", "PIL")


def _run_isolated(code: str) -> dict:
    """Run `code` in a fresh interpreter (so sys.modules is clean); it prints one JSON line."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, cwd=str(REPO_ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("with_folder_paths", [True, False])
def test_pack_import_pulls_in_no_heavy_library(tmp_path, with_folder_paths):
    result = _run_isolated(f"""
        import json, sys
        import comfy_doubles as cd
        if {with_folder_paths}:
            env = cd.install({str(tmp_path)!r}, with_torch=False)
        else:
            env = cd.ComfyEnv(base=None, folder_paths=None, model_management=None, utils=None,
                              model_patcher=None, model_base=None)
        pack = env.import_pack("")
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        fp = sys.modules.get("folder_paths")
        print(json.dumps({{"heavy": heavy, "nodes": sorted(pack.NODE_CLASS_MAPPINGS),
                           "mumu": fp.folder_names_and_paths["mumu"][0] if fp else None}}))
    """)
    assert result["heavy"] == [], f"importing the pack imported {result['heavy']}"
    assert {"MumuEncoderLoader", "MumuInterleavedPrompt", "MumuEncode"} <= set(result["nodes"])
    if with_folder_paths:
        assert result["mumu"] == [str(tmp_path / "models" / "mumu")]


def test_pack_file_loaded_without_a_package_registers_nothing_and_does_not_fail():
    """pytest loads the root __init__.py as a lone module when the checkout folder's name is not an
    identifier (e.g. `ComfyUI-MUMU`); that must not break, and must not import the nodes."""
    result = _run_isolated(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("__init__", {str(REPO_ROOT / "__init__.py")!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(json.dumps({{"nodes": mod.NODE_CLASS_MAPPINGS, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert result == {"nodes": {}, "heavy": []}


def test_node_metadata_follows_the_pack_conventions(comfy_env):
    nodes = comfy_env.import_pack()
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()}
    assert ours and all(k.startswith("Mumu") for k in ours)
    for node_id, cls in ours.items():
        assert cls.CATEGORY.startswith("MUMU/"), node_id
        assert len(cls.DESCRIPTION) > 40, node_id
        assert node_id in nodes.NODE_DISPLAY_NAME_MAPPINGS
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), node_id


def test_every_node_module_is_registered(comfy_env):
    nodes = comfy_env.import_pack()
    assert {"MumuEncoderLoader", "MumuApplyUnetLora", "MumuApplyUnetLoraBlocks",
            "MumuSaveMergedCheckpoint"} <= set(nodes.NODE_CLASS_MAPPINGS)


def test_registration_keeps_user_paths_from_extra_model_paths(comfy_env, tmp_path):
    fp = comfy_env.folder_paths
    extra = str(tmp_path / "bigdisk" / "mumu")
    fp.add_model_folder_path("mumu", extra)  # what extra_model_paths.yaml does before packs load
    comfy_env.import_pack()
    paths, exts = fp.folder_names_and_paths["mumu"]
    assert paths == [os.path.join(fp.models_dir, "mumu"), extra]
    assert exts == {".safetensors"}


def _hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "idefics2"}')
    (path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    return path


def test_dropdowns_list_vlm_folders_and_bundles_from_every_mumu_path(comfy_env, tmp_path):
    fp = comfy_env.folder_paths
    extra = tmp_path / "bigdisk"
    fp.add_model_folder_path("mumu", str(extra))
    nodes = comfy_env.import_pack()
    mumu = comfy_env.mumu_dir
    _hf_folder(mumu / "idefics2-8b")
    _hf_folder(extra / "HuggingFaceM4" / "idefics3")
    (mumu / "mumu_sdxl.safetensors").write_bytes(b"x")
    (mumu / "sub").mkdir()
    (mumu / "sub" / "other.safetensors").write_bytes(b"x")
    (mumu / "legacy.ckpt").write_bytes(b"x")  # pickles are never offered
    (mumu / ".cache").mkdir()
    (mumu / ".cache" / "config.json").write_text("{}")  # huggingface-cli's cache dir is not a model
    spec = nodes.NODE_CLASS_MAPPINGS["MumuEncoderLoader"].INPUT_TYPES()["required"]
    assert spec["vlm_folder"][0] == ["HuggingFaceM4/idefics3", "idefics2-8b"]
    assert spec["bundle"][0] == ["mumu_sdxl.safetensors", "sub/other.safetensors"]


@pytest.mark.parametrize("name, fragment", [
    ("../../etc", "'..'"),
    ("idefics2-8b/../../../secret", "'..'"),
    ("/etc", "absolute path"),
    ("C:\\models\\x", "absolute path"),
    ("", "no VLM folder selected"),
    ("./idefics2-8b", "'.'"),
])
def test_vlm_folder_names_cannot_leave_the_mumu_folder(comfy_env, tmp_path, name, fragment):
    comfy_env.import_pack()
    from importlib import import_module

    _comfy = import_module(f"{comfy_env.import_pack().__name__}._comfy")
    _hf_folder(comfy_env.mumu_dir / "idefics2-8b")
    with pytest.raises(ValueError) as err:
        _comfy.resolve_vlm_folder(name)
    assert fragment in str(err.value)


def test_resolution_finds_files_only_inside_registered_dirs(comfy_env, tmp_path):
    from importlib import import_module

    nodes = comfy_env.import_pack()
    _comfy = import_module(f"{nodes.__name__}._comfy")
    vlm = _hf_folder(comfy_env.mumu_dir / "idefics2-8b")
    (comfy_env.mumu_dir / "b.safetensors").write_bytes(b"x")
    outside = _hf_folder(tmp_path / "outside")
    assert _comfy.resolve_vlm_folder("idefics2-8b") == str(vlm)
    assert _comfy.resolve_bundle("b.safetensors") == str(comfy_env.mumu_dir / "b.safetensors")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        _comfy.resolve_vlm_folder("outside")
    with pytest.raises(ValueError, match="absolute path"):
        _comfy.resolve_vlm_folder(str(outside))
    with pytest.raises(ValueError, match="safetensors only"):
        _comfy.resolve_bundle("evil.ckpt")
    with pytest.raises(FileNotFoundError, match="models/mumu"):
        _comfy.resolve_bundle("missing.safetensors")


def test_symlinked_model_folder_inside_mumu_is_allowed(comfy_env, tmp_path):
    from importlib import import_module

    nodes = comfy_env.import_pack()
    _comfy = import_module(f"{nodes.__name__}._comfy")
    real = _hf_folder(tmp_path / "bigdisk" / "idefics2-8b")
    (comfy_env.mumu_dir / "idefics2-8b").symlink_to(real, target_is_directory=True)
    assert _comfy.resolve_vlm_folder("idefics2-8b") == str(comfy_env.mumu_dir / "idefics2-8b")


def test_loader_validation_explains_where_files_go(comfy_env):
    nodes = comfy_env.import_pack()
    loader = nodes.NODE_CLASS_MAPPINGS["MumuEncoderLoader"]
    msg = loader.VALIDATE_INPUTS(vlm_folder="idefics2-8b")
    assert isinstance(msg, str) and "idefics2-8b" in msg and "huggingface-cli download" in msg
    assert "'..'" in loader.VALIDATE_INPUTS(vlm_folder="../x")
    _hf_folder(comfy_env.mumu_dir / "idefics2-8b")
    assert loader.VALIDATE_INPUTS(vlm_folder="idefics2-8b") is True


def test_loader_resolves_the_bundle_safely_even_past_validation(comfy_env):
    nodes = comfy_env.import_pack()
    _hf_folder(comfy_env.mumu_dir / "idefics2-8b")
    loader = nodes.NODE_CLASS_MAPPINGS["MumuEncoderLoader"]()
    with pytest.raises(ValueError, match="'..'"):
        loader.load("idefics2-8b", "../../secret.safetensors")
    with pytest.raises(FileNotFoundError, match="bundle 'mumu.safetensors' was not found"):
        loader.load("idefics2-8b", "mumu.safetensors")


def test_pack_uses_its_in_tree_core_when_mumu_core_is_not_installed(tmp_path):
    """A plain `git clone` into custom_nodes: no site-packages at all (python -S), still imports."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        import comfy_doubles as cd
        env = cd.install({str(tmp_path)!r}, with_torch=False)
        pack = env.import_pack("")
        core = sys.modules["mumu_core"]
        print(json.dumps({{"core": core.__file__, "nodes": sorted(pack.NODE_CLASS_MAPPINGS),
                           "torch": "torch" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["core"] == str(REPO_ROOT / "mumu_core" / "__init__.py")
    assert "MumuEncode" in result["nodes"] and result["torch"] is False
