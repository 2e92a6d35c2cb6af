"""Test doubles of the ComfyUI modules the MUMU nodes call, for tests without ComfyUI.

ComfyUI is not on PyPI and CI has no GPU, so node tests install these fakes into `sys.modules`
under ComfyUI's real module names and then import the pack. Each double keeps the signatures and
semantics of what the pack calls (as of ComfyUI 0.3.6x), and nothing more, plus bookkeeping the
tests assert on. Nothing here imports torch at module level (only inside `install()`), so the
"pack imports without torch" test can use it too.

Modules provided:
- `folder_paths`: `models_dir`, `folder_names_and_paths`, `get_folder_paths`,
  `add_model_folder_path` (what extra_model_paths.yaml does), `get_filename_list` (recursive,
  "/"-separated, filtered by the folder's extension set like the real one), `get_full_path`,
  `get_full_path_or_raise`, `get_output_directory`, `get_save_image_path` (ComfyUI's logic, minus
  the %date% variables). Base directory = the `tmp_path` given to `install()`.
- `comfy.model_management`: CPU devices (`get_torch_device`, `intermediate_device`,
  `unet_offload_device`, `text_encoder_offload_device`), `load_models_gpu` (records every call in
  `load_calls` and its keyword arguments in `load_kwargs`, then calls `patcher.load(load_device)`),
  `loaded_models`, `unload_all_models`, `module_size`, `interrupt_current_processing`,
  `throw_exception_if_processing_interrupted`, `InterruptProcessingException`.
- `comfy.utils`: `ProgressBar` (every instance is appended to `ProgressBar.instances`; each keeps
  `.updates`, a list of `(current, total)`), `set_progress_bar_global_hook`.
- `comfy.model_patcher`: `ModelPatcher(model, load_device, offload_device, size=0)` with
  `patches`, `parent`, `clone()` (shares the model, copies the patch lists like the real one),
  `add_patches(patches, strength_patch=1.0, strength_model=1.0) -> list of accepted keys` (keys
  absent from the model's state dict are ignored, as in ComfyUI; `add_patches_calls` counts
  calls), `model_state_dict(filter_prefix)`, `load(device_to)`, `detach`, `model_size`, and the
  test helper `patched_state_dict()`: the weights with "diff" patches applied. Other patch kinds
  (ComfyUI's LoRAAdapter) raise NotImplementedError here; `test_nodes_unet_lora.py` checks them
  against ComfyUI's own weight-adapter code when MUMU_COMFYUI_DIR names a ComfyUI checkout.
- `comfy.model_base`: `BaseModel(diffusion_model)` (an nn.Module whose state dict keys are
  `diffusion_model.*`, like ComfyUI's), `SDXL(BaseModel)`, `SDXLRefiner(BaseModel)`,
  `SD15(BaseModel)` (not a real ComfyUI class name: real SD1.5 models are plain `BaseModel`), for
  "refuses non-SDXL models" tests.

Usage in a test module (pytest picks up fixtures imported into the module namespace):

    from comfy_doubles import comfy_env  # noqa: F401  (fixture)

    def test_something(comfy_env):
        comfy_env.folder_paths.models_dir          # <tmp>/models, with models/mumu created
        comfy_env.model_management.load_calls      # [[patcher], ...]
        nodes = comfy_env.import_pack()            # the pack's nodes package, imported fresh

`comfy_env` removes the doubles and every module of the pack from sys.modules afterwards, so
each test imports the pack against a clean fake ComfyUI. Outside pytest, call `install(tmp_dir)`
and `uninstall(state)` yourself.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# ComfyUI imports a pack as a module named after its absolute path with "." replaced (nodes.py
# load_custom_node); mirror that so relative imports behave exactly as they do there.
PACK_MODULE_NAME = str(REPO_ROOT).replace(".", "_x_")

DOUBLE_MODULES = (
    "folder_paths",
    "comfy",
    "comfy.model_management",
    "comfy.utils",
    "comfy.model_patcher",
    "comfy.model_base",
)

SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


# --------------------------------------------------------------------------- folder_paths
def _make_folder_paths(base: Path) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.__file__ = "<comfy_doubles.folder_paths>"
    fp.models_dir = str(base / "models")
    fp.supported_pt_extensions = set(SUPPORTED_PT_EXTENSIONS)
    fp.folder_names_and_paths = {
        "checkpoints": ([os.path.join(fp.models_dir, "checkpoints")], fp.supported_pt_extensions),
        "loras": ([os.path.join(fp.models_dir, "loras")], fp.supported_pt_extensions),
        "diffusers": ([os.path.join(fp.models_dir, "diffusers")], ["folder"]),
    }
    fp.output_directory = str(base / "output")

    def get_folder_paths(folder_name):
        return fp.folder_names_and_paths[folder_name][0][:]

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        if folder_name in fp.folder_names_and_paths:
            paths, _ = fp.folder_names_and_paths[folder_name]
            if full_folder_path in paths:
                if is_default and paths[0] != full_folder_path:
                    paths.remove(full_folder_path)
                    paths.insert(0, full_folder_path)
            elif is_default:
                paths.insert(0, full_folder_path)
            else:
                paths.append(full_folder_path)
        else:
            # the real one creates the name with an empty extension set (= every file)
            fp.folder_names_and_paths[folder_name] = ([full_folder_path], set())

    def _filter(files, extensions):
        extensions = set(extensions)
        return [f for f in files if not extensions or os.path.splitext(f)[1].lower() in extensions]

    def get_filename_list(folder_name):
        paths, exts = fp.folder_names_and_paths[folder_name]
        out = set()
        for root in paths:
            if not os.path.isdir(root):
                continue
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = [d for d in dirnames if d != ".git"]
                for name in filenames:
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    out.add(rel.replace(os.sep, "/"))
        return sorted(_filter(out, exts))

    def get_full_path(folder_name, filename):
        if folder_name not in fp.folder_names_and_paths:
            return None
        # same normalisation as ComfyUI: strips leading "/" and collapses ".." at the root
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root in fp.folder_names_and_paths[folder_name][0]:
            full = os.path.join(root, filename)
            if os.path.isfile(full):
                return full
        return None

    def get_full_path_or_raise(folder_name, filename):
        full = get_full_path(folder_name, filename)
        if full is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return full

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        # ComfyUI's own logic: refuse folders outside output_dir, counter = highest existing + 1
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")

        def map_filename(name):
            try:
                digits = int(name[len(filename) + 1:].split("_")[0])
            except ValueError:
                digits = 0
            return digits, name[:len(filename) + 1]

        try:
            counter = max(d for d, prefix in map(map_filename, os.listdir(full_output_folder))
                          if os.path.normcase(prefix[:-1]) == os.path.normcase(filename) and prefix[-1:] == "_") + 1
        except ValueError:
            counter = 1
        except FileNotFoundError:
            os.makedirs(full_output_folder, exist_ok=True)
            counter = 1
        return full_output_folder, filename, counter, subfolder, filename_prefix

    fp.get_folder_paths = get_folder_paths
    fp.add_model_folder_path = add_model_folder_path
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.get_output_directory = lambda: fp.output_directory
    fp.get_save_image_path = get_save_image_path
    return fp


# --------------------------------------------------------------------------- model_management
def _make_model_management(torch) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.__file__ = "<comfy_doubles.model_management>"
    cpu = torch.device("cpu")

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm.load_calls = []  # one entry (list of patchers) per load_models_gpu call
    mm.load_kwargs = []  # the keyword arguments of each call (e.g. force_full_load)
    mm.current_loaded_models = []  # patchers, most recent first
    mm.interrupt_processing = False

    for name in ("get_torch_device", "intermediate_device", "unet_offload_device", "text_encoder_offload_device"):
        setattr(mm, name, lambda: cpu)

    def module_size(module):
        return sum(t.nelement() * t.element_size() for t in module.state_dict().values())

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        models = list(models)
        mm.load_calls.append(models)
        mm.load_kwargs.append(dict(memory_required=memory_required, force_patch_weights=force_patch_weights,
                                   minimum_memory_required=minimum_memory_required,
                                   force_full_load=force_full_load))
        for m in models:
            m.load(m.load_device)
            if m in mm.current_loaded_models:
                mm.current_loaded_models.remove(m)
            mm.current_loaded_models.insert(0, m)

    def unload_all_models():
        for m in mm.current_loaded_models:
            m.detach()
        mm.current_loaded_models.clear()

    def interrupt_current_processing(value=True):
        mm.interrupt_processing = value

    def throw_exception_if_processing_interrupted():
        if mm.interrupt_processing:
            mm.interrupt_processing = False
            raise InterruptProcessingException()

    mm.module_size = module_size
    mm.load_models_gpu = load_models_gpu
    mm.loaded_models = lambda only_currently_used=False: list(mm.current_loaded_models)
    mm.unload_all_models = unload_all_models
    mm.interrupt_current_processing = interrupt_current_processing
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


# --------------------------------------------------------------------------- utils
def _make_utils() -> types.ModuleType:
    ut = types.ModuleType("comfy.utils")
    ut.__file__ = "<comfy_doubles.utils>"
    ut.PROGRESS_BAR_HOOK = None

    class ProgressBar:
        instances: list = []

        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.node_id = node_id
            self.updates = []
            ProgressBar.instances.append(self)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            self.updates.append((self.current, self.total))
            if ut.PROGRESS_BAR_HOOK is not None:
                ut.PROGRESS_BAR_HOOK(self.current, self.total, preview, node_id=self.node_id)

        def update(self, value):
            self.update_absolute(self.current + value)

    ProgressBar.instances = []

    def set_progress_bar_global_hook(function):
        ut.PROGRESS_BAR_HOOK = function

    ut.ProgressBar = ProgressBar
    ut.set_progress_bar_global_hook = set_progress_bar_global_hook
    return ut


# --------------------------------------------------------------------------- model_patcher
def _make_model_patcher(torch, mm) -> types.ModuleType:
    mp = types.ModuleType("comfy.model_patcher")
    mp.__file__ = "<comfy_doubles.model_patcher>"

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0):
            self.size = size
            self.model = model
            if getattr(self.model, "device", None) is None:
                try:
                    self.model.device = offload_device
                except AttributeError:  # read-only property on some modules
                    pass
            self.patches = {}
            self.load_device = load_device
            self.offload_device = offload_device
            self.parent = None
            self.add_patches_calls = 0
            self.load_count = 0
            self.detach_count = 0
            self.model_size()

        def model_size(self):
            if self.size > 0:
                return self.size
            self.size = mm.module_size(self.model)
            return self.size

        def clone(self):
            n = self.__class__(self.model, self.load_device, self.offload_device, self.size)
            n.patches = {k: v[:] for k, v in self.patches.items()}
            n.parent = self
            return n

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            self.add_patches_calls += 1
            model_sd = self.model.state_dict()
            accepted = set()
            for k in patches:
                offset = function = None
                if isinstance(k, str):
                    key = k
                else:
                    key, offset = k[0], k[1]
                    if len(k) > 2:
                        function = k[2]
                if key in model_sd:
                    accepted.add(k)
                    self.patches.setdefault(key, []).append(
                        (strength_patch, patches[k], strength_model, offset, function))
            return list(accepted)

        def model_state_dict(self, filter_prefix=None):
            sd = self.model.state_dict()
            if filter_prefix is not None:
                sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
            return sd

        def patched_state_dict(self):
            """Test helper: weights with this patcher's ("diff", (t,)) patches applied, in fp32."""
            out = {}
            for key, weight in self.model.state_dict().items():
                w = weight.detach().float().clone()
                for strength_patch, value, strength_model, offset, function in self.patches.get(key, []):
                    if offset is not None or function is not None:
                        raise NotImplementedError("comfy_doubles: offset/function patches are not simulated")
                    if isinstance(value, tuple) and len(value) == 2 and value[0] == "diff":
                        w = w * strength_model + strength_patch * value[1][0].float()
                    else:
                        raise NotImplementedError(
                            f"comfy_doubles: patch kind {type(value).__name__} is not simulated (only 'diff')")
                out[key] = w
            return out

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            self.load_count += 1
            if device_to is not None and hasattr(self.model, "to"):
                self.model.to(device_to)

        def detach(self, unpatch_all=True):
            self.detach_count += 1
            if hasattr(self.model, "to"):
                self.model.to(self.offload_device)
            return self.model

    mp.ModelPatcher = ModelPatcher
    return mp


# --------------------------------------------------------------------------- model_base
def _make_model_base(torch) -> types.ModuleType:
    mb = types.ModuleType("comfy.model_base")
    mb.__file__ = "<comfy_doubles.model_base>"

    class BaseModel(torch.nn.Module):
        """Holds `diffusion_model` so state-dict keys read `diffusion_model.*`, as in ComfyUI."""

        def __init__(self, diffusion_model, model_config=None):
            super().__init__()
            self.diffusion_model = diffusion_model
            self.model_config = model_config
            self.device = None

    class SDXL(BaseModel):
        pass

    class SDXLRefiner(BaseModel):
        pass

    class SD15(BaseModel):
        pass

    mb.BaseModel, mb.SDXL, mb.SDXLRefiner, mb.SD15 = BaseModel, SDXL, SDXLRefiner, SD15
    return mb


# --------------------------------------------------------------------------- install / fixture
@dataclass
class ComfyEnv:
    base: Path
    folder_paths: types.ModuleType
    model_management: types.ModuleType | None
    utils: types.ModuleType | None
    model_patcher: types.ModuleType | None
    model_base: types.ModuleType | None
    saved: dict = field(default_factory=dict)

    @property
    def mumu_dir(self) -> Path:
        return self.base / "models" / "mumu"

    def import_pack(self, submodule: str = "nodes"):
        """Import the pack root like ComfyUI does, then return `<pack>.<submodule>` (or the root)."""
        return import_pack(submodule)


def import_pack(submodule: str = "nodes"):
    """Import the pack root like ComfyUI does (fresh), then return `<pack>.<submodule>` (or the root)."""
    _drop_pack_modules()
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE_NAME, str(REPO_ROOT / "__init__.py"), submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    if not submodule:
        return module
    return importlib.import_module(f"{PACK_MODULE_NAME}.{submodule}")


def _drop_pack_modules() -> None:
    for name in list(sys.modules):
        if name == PACK_MODULE_NAME or name.startswith(PACK_MODULE_NAME + "."):
            del sys.modules[name]


def install(base_dir, *, with_torch: bool = True) -> ComfyEnv:
    """Put the doubles into sys.modules (base_dir = the fake ComfyUI base directory).

    with_torch=False installs only `folder_paths` (no torch import), for import-cost tests.
    """
    base = Path(base_dir)
    (base / "models" / "mumu").mkdir(parents=True, exist_ok=True)
    saved = {name: sys.modules.get(name) for name in DOUBLE_MODULES}
    fp = _make_folder_paths(base)
    sys.modules["folder_paths"] = fp
    mm = ut = mp = mb = None
    if with_torch:
        import torch

        comfy = types.ModuleType("comfy")
        comfy.__path__ = []  # a package, so `import comfy.utils` resolves through sys.modules
        mm = _make_model_management(torch)
        ut = _make_utils()
        mp = _make_model_patcher(torch, mm)
        mb = _make_model_base(torch)
        comfy.model_management, comfy.utils, comfy.model_patcher, comfy.model_base = mm, ut, mp, mb
        sys.modules.update({"comfy": comfy, "comfy.model_management": mm, "comfy.utils": ut,
                            "comfy.model_patcher": mp, "comfy.model_base": mb})
    return ComfyEnv(base=base, folder_paths=fp, model_management=mm, utils=ut, model_patcher=mp,
                    model_base=mb, saved=saved)


def uninstall(env: ComfyEnv) -> None:
    _drop_pack_modules()
    for name, old in env.saved.items():
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old


try:
    import pytest
except ImportError:  # used outside pytest (e.g. a subprocess check)
    pytest = None

if pytest is not None:

    @pytest.fixture
    def comfy_env(tmp_path):
        """Fake ComfyUI (base dir = tmp_path/comfy) in sys.modules; see the module docstring."""
        env = install(tmp_path / "comfy")
        try:
            yield env
        finally:
            uninstall(env)
