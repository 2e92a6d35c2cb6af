"""Open a model for streaming: an SDXL single-file checkpoint, a UNet-only file or a diffusers UNet folder.

A `ModelSource` knows its files, their validated headers and where each UNet tensor lives (by
ldm key), but holds no tensor data; readers are opened on demand.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MumuError
from ..safetensors_io import SafetensorsHeader, TensorEntry, read_header
from ..sdxl.detect import UnetLayout, detect_sdxl_unet
from .io import StreamReader

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                      "diffusion_pytorch_model.bf16.safetensors")
_DIFFUSERS_INDEX = ("diffusion_pytorch_model.safetensors.index.json",
                    "diffusion_pytorch_model.safetensors.index.fp16.json")


@dataclass
class ModelSource:
    path: Path  # what the user named
    files: list[Path]
    headers: list[SafetensorsHeader]
    where: dict[str, tuple[int, TensorEntry]]  # tensor name -> (file index, entry), in file order
    layout: UnetLayout
    diffusers_config: dict | None = None
    _readers: dict[int, StreamReader] = field(default_factory=dict)

    @functools.cached_property
    def ldm_index(self) -> dict[str, str]:
        """ldm key -> tensor name in this source."""
        return {ldm: name for name, ldm in self.layout.to_ldm.items()}

    def entry(self, name: str) -> TensorEntry:
        return self.where[name][1]

    def reader(self, name: str) -> StreamReader:
        i = self.where[name][0]
        if i not in self._readers:
            self._readers[i] = StreamReader(self.headers[i])
        return self._readers[i]

    def read_tensor(self, name: str, copy: bool = False):
        return self.reader(name).read_tensor(self.entry(name), copy=copy)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _diffusers_files(folder: Path) -> tuple[list[Path], dict | None]:
    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    config = None
    if (unet / "config.json").is_file():
        try:
            config = json.loads((unet / "config.json").read_text())
        except ValueError as exc:
            raise MumuError(f"{unet / 'config.json'} is not valid JSON ({exc}).") from None
    for name in _DIFFUSERS_INDEX:
        if (unet / name).is_file():
            index = json.loads((unet / name).read_text())
            shards = sorted(set(index.get("weight_map", {}).values()))
            return [unet / s for s in shards], config
    for name in _DIFFUSERS_WEIGHTS:
        if (unet / name).is_file():
            return [unet / name], config
    if any(unet.glob("*.bin")):
        raise MumuError(f"{unet} holds only pickled .bin weights; MUMU reads safetensors only. Convert it with "
                        f"diffusers in a trusted environment (`save_pretrained(..., safe_serialization=True)`).")
    raise MumuError(f"{folder} is a folder but not a diffusers UNet: expected {unet}/config.json and "
                    f"{_DIFFUSERS_WEIGHTS[0]} (or a sharded index).")


def open_model(path: str | os.PathLike, what: str = "checkpoint") -> ModelSource:
    """Validate headers and SDXL architecture of `path`; no tensor data is read."""
    path = Path(path)
    config = None
    if path.is_dir():
        files, config = _diffusers_files(path)
    else:
        files = [path]
    headers = [read_header(f, what=what) for f in files]
    where: dict[str, tuple[int, TensorEntry]] = {}
    for i, h in enumerate(headers):
        for name, e in h.tensors.items():
            if name in where:
                raise MumuError(f"{what} {path}: tensor {name!r} appears in two shards; the folder is inconsistent.")
            where[name] = (i, e)
    shapes = {name: e.shape for name, (_, e) in where.items()}
    layout = detect_sdxl_unet(shapes, what=f"{what} {path.name}", diffusers_config=config)
    return ModelSource(path, files, headers, where, layout, config)
