"""The pack's only contact points with ComfyUI internals and with `mumu_core`.

Why this module exists:
- ComfyUI modules (`folder_paths`, `comfy.*`) are imported lazily so that the node classes import
  in tests with test doubles in `sys.modules` (tests/comfy_doubles.py) and nothing heavy (torch)
  is pulled in when ComfyUI imports the pack.
- `mumu_core` ships inside the pack folder, but ComfyUI imports the pack by file path, so the
  folder is not on `sys.path` and `import mumu_core` would fail after a plain `git clone` into
  custom_nodes. `ensure_core()` registers the in-tree copy under its own name (without putting the
  pack folder on sys.path, which would expose our `nodes/` next to ComfyUI's `nodes` module).
- Names in a workflow come from strangers: `check_relative_name` is the one check every name passes
  (model folders, bundles, LoRAs, output prefixes), and `resolve_*` only return paths inside a
  folder registered for `mumu`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("comfyui_mumu")

FOLDER = "mumu"  # ComfyUI model folder name: models/mumu (+ extra_model_paths.yaml entries)
BUNDLE_EXTENSIONS = {".safetensors"}  # never list pickles: bundles are safetensors only
PACK_ROOT = Path(__file__).resolve().parents[1]
_MAX_VLM_DEPTH = 3  # models/mumu/<org>/<name>/config.json is the deepest layout we look for


# --------------------------------------------------------------------------- mumu_core
def ensure_core():
    """Make `import mumu_core` work, preferring an installed copy; return the package."""
    if "mumu_core" in sys.modules:
        return sys.modules["mumu_core"]
    spec = importlib.util.find_spec("mumu_core")
    in_tree = PACK_ROOT / "mumu_core" / "__init__.py"
    if spec is None:
        if not in_tree.is_file():
            raise ImportError(f"ComfyUI-MUMU: {in_tree} is missing; the pack folder is incomplete (re-clone it).")
        spec = importlib.util.spec_from_file_location(
            "mumu_core", str(in_tree), submodule_search_locations=[str(in_tree.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mumu_core"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["mumu_core"]
            raise
        return module
    module = importlib.import_module("mumu_core")
    origin = Path(module.__file__).resolve().parent
    if origin != in_tree.parent:
        log.warning("ComfyUI-MUMU: using mumu_core from %s, not this pack's copy in %s; if the versions "
                    "differ, `pip uninstall comfyui-mumu` or `pip install -e %s`.", origin, in_tree.parent,
                    PACK_ROOT)
    return module


def core(name: str):
    """`mumu_core.<name>`, imported on first use (the heavy modules import torch)."""
    ensure_core()
    return importlib.import_module(f"mumu_core.{name}")


# --------------------------------------------------------------------------- ComfyUI modules
def _comfy_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(
            f"ComfyUI-MUMU nodes need ComfyUI's `{name}` module ({exc}); run them inside ComfyUI."
        ) from exc


def folder_paths():
    return _comfy_module("folder_paths")


def model_management():
    return _comfy_module("comfy.model_management")


def utils():
    return _comfy_module("comfy.utils")


def model_patcher():
    return _comfy_module("comfy.model_patcher")


def register_model_folder() -> bool:
    """Register models/mumu for `mumu`, keeping paths users added in extra_model_paths.yaml.

    Called at pack import (after ComfyUI has read extra_model_paths.yaml). Returns False when
    ComfyUI's folder_paths is absent (tests, plain Python).
    """
    try:
        fp = importlib.import_module("folder_paths")
    except ImportError:
        return False
    default = os.path.join(fp.models_dir, FOLDER)
    existing = list(fp.folder_names_and_paths.get(FOLDER, ([], set()))[0])
    paths = [default] + [p for p in existing if os.path.normpath(p) != os.path.normpath(default)]
    fp.folder_names_and_paths[FOLDER] = (paths, set(BUNDLE_EXTENSIONS))
    return True


def mumu_dirs() -> list[str]:
    fp = folder_paths()
    if FOLDER not in fp.folder_names_and_paths:
        register_model_folder()
    return [p for p in fp.get_folder_paths(FOLDER)]


# --------------------------------------------------------------------------- listings
def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def list_vlm_folders() -> list[str]:
    """Folders holding config.json under every `mumu` dir, as "/"-separated relative names.

    Called by INPUT_TYPES on every /object_info request, so it only walks a few levels and never
    descends into a model folder it found.
    """
    found: set[str] = set()
    for root in mumu_dirs():
        if not os.path.isdir(root):
            continue
        stack = [(root, 0)]
        while stack:
            current, depth = stack.pop()
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
                    continue
                if _is_hf_folder(entry.path):
                    found.add(os.path.relpath(entry.path, root).replace(os.sep, "/"))
                elif depth + 1 < _MAX_VLM_DEPTH:
                    stack.append((entry.path, depth + 1))
    return sorted(found)


def _inside_hf_folder(name: str) -> bool:
    """True for "idefics2-8b/model-00001-of-00004.safetensors": VLM shards are not bundles."""
    parts = name.split("/")[:-1]
    for root in mumu_dirs():
        for i in range(1, len(parts) + 1):
            if _is_hf_folder(os.path.join(root, *parts[:i])):
                return True
    return False


def list_bundles() -> list[str]:
    fp = folder_paths()
    mumu_dirs()  # registers the folder if the import-time registration did not run
    names = fp.get_filename_list(FOLDER)
    return [n for n in names if os.path.splitext(n)[1].lower() in BUNDLE_EXTENSIONS and not _inside_hf_folder(n)]


# --------------------------------------------------------------------------- resolution
class UnsafeNameError(ValueError):
    pass


def check_relative_name(name: str, what: str, where: str = f"ComfyUI/models/{FOLDER}/") -> list[str]:
    """The "/"-separated parts of `name`, a plain relative name inside `where`; UnsafeNameError otherwise.

    The one lexical check for every name a workflow hands the pack (model folders, bundles, LoRAs,
    output prefixes): no absolute path, drive letter, NUL byte, "..", "." or empty part.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafeNameError(f"no {what} selected. Put one into {where} and pick it in the list.")
    if "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeNameError(
            f"{what} '{name}' is an absolute path; workflows may only name files inside {where} "
            f"(pick it from the list).")
    parts = name.replace("\\", "/").split("/")
    if any(p in ("..", ".") for p in parts) or any(p == "" for p in parts):
        raise UnsafeNameError(
            f"{what} '{name}' is not a plain relative name (it contains '..', '.' or an empty part); "
            f"pick it from the list of files in {where}.")
    return parts


def _inside(path: str, root: str) -> bool:
    # Lexical on purpose: symlinks a user placed inside models/mumu (e.g. to a big disk) are
    # trusted; what must never happen is a workflow string walking out with ".." or "/abs".
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path != root and os.path.commonpath([path, root]) == root


def resolve_vlm_folder(name: str) -> str:
    """Absolute path of VLM folder `name`, which must lie inside a registered `mumu` dir."""
    parts = check_relative_name(name, "VLM folder")
    roots = mumu_dirs()
    for root in roots:
        candidate = os.path.join(root, *parts)
        if _inside(candidate, root) and os.path.isdir(candidate) and _is_hf_folder(candidate):
            return candidate
    raise FileNotFoundError(
        f"VLM folder '{name}' was not found (or has no config.json) in: {', '.join(roots) or '(no mumu folder)'}. "
        f"Download the VLM in Hugging Face layout there, e.g. "
        f"`huggingface-cli download HuggingFaceM4/idefics2-8b --local-dir ComfyUI/models/{FOLDER}/idefics2-8b`.")


def resolve_bundle(name: str) -> str:
    """Absolute path of bundle file `name` (a .safetensors inside a registered `mumu` dir)."""
    parts = check_relative_name(name, "bundle")
    if os.path.splitext(parts[-1])[1].lower() not in BUNDLE_EXTENSIONS:
        raise UnsafeNameError(f"bundle '{name}' is not a .safetensors file; MUMU bundles are safetensors only.")
    roots = mumu_dirs()
    for root in roots:
        candidate = os.path.join(root, *parts)
        if _inside(candidate, root) and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"bundle '{name}' was not found in: {', '.join(roots) or '(no mumu folder)'}. Put the trained MUMU "
        f"bundle (.safetensors) into ComfyUI/models/{FOLDER}/ and refresh the page (R).")


def resolve_lora(choice: str) -> str:
    """Absolute path of a LoRA choice "mumu/<bundle>" or "loras/<file>.safetensors" from the node's list."""
    folder, _, name = str(choice).partition("/")
    if folder not in ("mumu", "loras") or not name:
        raise UnsafeNameError(f"LoRA '{choice}' is not from the list; pick a file from models/mumu or models/loras.")
    if folder == "mumu":
        return resolve_bundle(name)
    check_relative_name(name, "LoRA", "ComfyUI/models/loras/")
    if not name.lower().endswith(".safetensors"):
        raise UnsafeNameError(f"LoRA '{choice}' is not a .safetensors file; pick it from the list.")
    return folder_paths().get_full_path_or_raise("loras", name)


def output_path(filename_prefix: str, default: str, extension: str = ".safetensors") -> str:
    """A new file path in ComfyUI's output folder for `filename_prefix` ("sub/name" + counter + extension).

    The prefix passes the same name check as model names (plus no characters Windows forbids);
    ComfyUI's own `folder_paths.get_save_image_path` picks the folder and the next counter, and a
    file that exists already is never overwritten.
    """
    fp = folder_paths()
    root = os.path.abspath(fp.get_output_directory())
    prefix = str(filename_prefix).strip().replace("\\", "/") or default
    where = f"ComfyUI's output folder, like '{default}'"
    try:
        check_relative_name(prefix, "filename_prefix", where)
    except UnsafeNameError:
        raise UnsafeNameError(f"filename_prefix '{filename_prefix}' must be a plain relative name inside "
                              f"{where}.") from None
    if re.search(r"[\x00:*?\"<>|]", prefix):
        raise UnsafeNameError(f"filename_prefix '{filename_prefix}' has a character file names cannot hold "
                              f"(:*?\"<>|); use a plain relative name inside {where}.")
    folder, name, counter, _, _ = fp.get_save_image_path(prefix, root)
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_{extension}")
        if not os.path.exists(path):
            return path
        counter += 1
