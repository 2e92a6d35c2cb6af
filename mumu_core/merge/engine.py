"""Streaming merge of MUMU's UNet changes into an SDXL finetune.

Two modes, one engine:
  lora:           W' = W + strength * block_weight * alpha/rank * up @ down
  add-difference: W' = W + strength * block_weight * (mumu_unet - base_unet)

The finetune is read tensor by tensor and written in its own dtype to a temporary file next to
the output, renamed only when complete. Everything is validated (SDXL architecture, every LoRA key
matched, shapes, output path, disk space) before the first byte is written. Tensors the merge does
not change (CLIP, VAE, untouched UNet layers) are copied byte for byte. Peak memory is about one
fp32 copy of the largest changed tensor plus fixed buffers, whatever the model size.

How much of the change survives rounding into the output dtype is measured on a sample of rows
of every changed tensor and written into the metadata: fp16/bf16 lose a visible share of a small
LoRA change, which is why the runtime (unbaked) path stays the default in the nodes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import MumuError
from ..safetensors_io import DTYPES, FLOAT_DTYPES
from ..sdxl import keys as K
from .io import (COPY_CHUNK, AtomicSafetensorsWriter, Piece, Prefetcher, check_free_space, check_output_path,
                 remove_stale_partials)
from .sources import ModelSource, open_model

_SAMPLE_ELEMENTS = 1 << 16  # per changed tensor, for the rounding measurement
_HEADER_RESERVE = 8192


@dataclass
class MergeReport:
    out_path: Path
    mode: str
    tensors_total: int
    tensors_changed: int
    bytes_written: int
    seconds: float
    delta_retained: float | None  # share of the intended change present after rounding (1.0 = all)
    delta_relative_error: float | None  # ||actual - intended|| / ||intended||
    checkpoint_sha256: str | None
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.delta_relative_error is None:
            precision = "no change measured"
        else:
            precision = (f"rounding to the checkpoint's dtype kept {self.delta_retained:.1%} of the change, "
                         f"with an error of {self.delta_relative_error:.1%} of it")
        return (f"wrote {self.out_path} ({self.bytes_written / 1e9:.2f} GB, {self.tensors_changed}/"
                f"{self.tensors_total} tensors changed, {self.seconds:.1f} s); {precision}")


class _Stats:
    def __init__(self):
        self.dot = self.intended = self.error = self.weight = 0.0

    def add(self, before: torch.Tensor, after: torch.Tensor, intended: torch.Tensor) -> None:
        before = before.flatten()
        actual = after.flatten() - before
        intended = intended.flatten()
        error = actual - intended
        self.dot += float(actual @ intended)
        self.intended += float(intended @ intended)
        self.error += float(error @ error)
        self.weight += float(before @ before)

    def result(self) -> dict:
        if not self.intended > 0 or not all(map(math.isfinite, (self.dot, self.intended, self.error, self.weight))):
            # nothing changed, or the checkpoint holds inf/NaN weights: no meaningful figure (and
            # NaN is not valid JSON metadata)
            return {"delta_retained": None, "delta_relative_error": None, "delta_to_weight": None}
        return {"delta_retained": self.dot / self.intended,
                "delta_relative_error": math.sqrt(self.error / self.intended),
                "delta_to_weight": math.sqrt(self.intended / max(self.weight, 1e-30))}


def _sample_rows(rows: int, cols: int) -> slice:
    step = max(1, (rows * cols) // _SAMPLE_ELEMENTS)
    return slice(0, rows, step)


class _DeltaPlan:
    """Per ldm key: how to form the fp32 change (LoRA factors, or two tensors to subtract)."""

    def __init__(self, strength: float, block_weights: list[float] | None):
        self.strength = strength
        self.block_weights = block_weights
        self.lora: dict = {}  # ldm key -> LoraModule
        self.diff: tuple[ModelSource, ModelSource] | None = None

    def multiplier(self, ldm_key: str) -> float:
        return self.strength * K.block_weight(ldm_key, self.block_weights)

    def targets(self, unet_keys) -> set[str]:
        keys = set(self.lora) if self.diff is None else set(unet_keys)
        return {k for k in keys if self.multiplier(k) != 0.0}

    def apply(self, ldm_key: str, w32: torch.Tensor, rows: slice) -> torch.Tensor:
        """Add the change to w32 in place; return the intended change on the sampled rows."""
        c = self.multiplier(ldm_key)
        m2 = w32.view(w32.shape[0], -1)
        if self.diff is None:
            mod = self.lora[ldm_key]
            up = mod.up.reshape(mod.up.shape[0], -1).float()
            down = mod.down.reshape(mod.rank, -1).float()
            m2.addmm_(up, down, alpha=c * mod.scale)
            return (up[rows] @ down) * (c * mod.scale)
        mumu, base = self.diff
        d = mumu.read_tensor(mumu.ldm_index[ldm_key]).float() - base.read_tensor(base.ldm_index[ldm_key]).float()
        d.mul_(c)
        w32.add_(d.view(w32.shape))
        return d.view(d.shape[0], -1)[rows].clone() if d.dim() else d.clone()


def _check_lora_matches(src: ModelSource, modules: dict) -> None:
    index = src.ldm_index
    missing = [k for k in modules if k not in index]
    wrong = []
    for k, m in modules.items():
        if k in index:
            shape = src.entry(index[k]).shape
            if math.prod(shape) != math.prod(m.out_shape()):
                wrong.append(f"{k}: LoRA {list(m.out_shape())} vs checkpoint {list(shape)}")
    if missing or wrong:
        raise MumuError(f"only {len(modules) - len(missing) - len(wrong)} of {len(modules)} LoRA modules match the "
                        f"checkpoint's UNet. Unmatched: {', '.join((missing + wrong)[:10])}"
                        f"{' ...' if len(missing) + len(wrong) > 10 else ''}. Nothing was written.")
    for k in modules:
        entry = src.entry(index[k])
        if entry.dtype not in FLOAT_DTYPES:
            raise MumuError(f"checkpoint tensor {index[k]} is {entry.dtype}, not a float weight; cannot merge into it.")
        if index[k][: -len("weight")] + "scale_weight" in src.where:
            raise MumuError("the checkpoint is a scaled-fp8 checkpoint (per-tensor scale_weight keys); merge into "
                            "its fp16/bf16 release instead.")


def _check_difference_sources(src: ModelSource, mumu: ModelSource, base: ModelSource) -> None:
    f_idx, m_idx, b_idx = src.ldm_index, mumu.ldm_index, base.ldm_index
    for other, idx in ((mumu, m_idx), (base, b_idx)):
        missing = [k for k in f_idx if k not in idx]
        wrong = [k for k in f_idx if k in idx and other.entry(idx[k]).shape != src.entry(f_idx[k]).shape]
        if missing or wrong:
            raise MumuError(f"{other.path.name} does not have the finetune's UNet layout: "
                            f"{len(missing)} keys missing, {len(wrong)} shapes differ (e.g. "
                            f"{', '.join((missing + wrong)[:3])}). Nothing was written.")


def _output_plan(src: ModelSource) -> list[tuple[str, str]]:
    """(output name, source tensor name) in source file order; diffusers names become single-file ones."""
    order = sorted(src.where, key=lambda n: (src.where[n][0], src.where[n][1].start))
    if src.layout.kind == "diffusers-unet":
        return [(K.LDM_UNET_PREFIX + src.layout.to_ldm[n], n) for n in order if n in src.layout.to_ldm]
    return [(n, n) for n in order]


def _base_metadata(src: ModelSource, out: Path, info: dict) -> dict[str, str]:
    meta = {k: v for k, v in src.headers[0].metadata.items() if not k.startswith(("modelspec.", "mumu_merge"))} \
        if src.layout.kind == "single-file" else {}
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": out.stem,
        "modelspec.description": f"{src.path.name} with MUMU (arXiv 2406.18790) UNet changes merged in",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mumu_merge": json.dumps(info, sort_keys=True),
    })
    return meta


def merge_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, lora: str | os.PathLike | None = None,
                     add_difference: tuple[str | os.PathLike, str | os.PathLike] | None = None,
                     strength: float = 1.0, block_weights: list[float] | str | None = None,
                     overwrite: bool = False, hash_checkpoint: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Stream `checkpoint` + MUMU's UNet change into `out` (.safetensors). See the module docstring.

    `progress(done_bytes, total_bytes)` is called as data is written; raising in it aborts the merge
    (the temporary file is removed, nothing appears at `out`). `hash_checkpoint` adds the finetune's
    sha256 to the metadata (computed while streaming, but every byte must then pass through user
    space instead of being copied by the kernel: ~1.5-2x the time on 2 cores, so it is opt-in).
    The LoRA's sha256 is always recorded.
    """
    import time

    t0 = time.perf_counter()
    if (lora is None) == (add_difference is None):
        raise MumuError("give exactly one of a LoRA (--lora) or an add-difference pair (--add-difference MUMU BASE).")
    blocks = K.parse_block_weights(block_weights) if isinstance(block_weights, str) else (
        None if block_weights is None else K.parse_block_weights(list(block_weights)))
    out = Path(out)
    plan = _DeltaPlan(float(strength), blocks)
    info: dict = {"tool": f"ComfyUI-MUMU {__version__}", "strength": float(strength), "block_weights": blocks}
    sources: list[ModelSource] = []
    try:
        src = open_model(checkpoint, "checkpoint")
        sources.append(src)
        info["checkpoint"] = {"name": src.path.name, "layout": src.layout.kind, "variant": src.layout.variant}
        if lora is not None:
            from ..unet_lora import load_unet_lora, lora_modules

            lora_sd, lora_info = load_unet_lora(lora, unet_config=src.layout.config)
            plan.lora = lora_modules(lora_sd, unet_config=src.layout.config)
            _check_lora_matches(src, plan.lora)
            info["mode"] = "lora"
            info["lora"] = {k: lora_info.get(k) for k in ("name", "sha256", "format", "ranks", "alphas", "num_modules")}
        else:
            mumu, base = (open_model(p, what) for p, what in zip(add_difference, ("MUMU UNet", "base UNet")))
            sources += [mumu, base]
            _check_difference_sources(src, mumu, base)
            plan.diff = (mumu, base)
            info["mode"] = "add_difference"
            info["mumu_unet"] = {"name": mumu.path.name, "size": sum(f.stat().st_size for f in mumu.files)}
            info["base_unet"] = {"name": base.path.name, "size": sum(f.stat().st_size for f in base.files)}
        check_output_path(out, [f for s in sources for f in s.files] + ([Path(lora)] if lora is not None else []),
                          overwrite=overwrite)
        remove_stale_partials(out)
        return _stream(src, out, plan, info, hash_checkpoint, progress, t0)
    finally:
        for s in sources:
            s.close()


def _stream(src: ModelSource, out: Path, plan: _DeltaPlan, info: dict, hash_checkpoint: bool,
            progress, t0: float) -> MergeReport:
    # One torch thread: the other threads read and hash; OpenMP workers spinning against them
    # made the merge >20x slower on 2 cores, and the work is I/O-bound anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stream_inner(src, out, plan, info, hash_checkpoint, progress, t0)
    finally:
        torch.set_num_threads(threads)


def _pieces(src: ModelSource, rows_plan, targets, kernel_copy: bool) -> tuple[list[Piece], int]:
    """Byte ranges in output order: whole tensors to merge, COPY_CHUNK slices of the rest.

    With `kernel_copy` the untouched slices are not read by us at all (copy_file_range)."""
    pieces, biggest = [], 0
    to_ldm = src.layout.to_ldm
    for out_name, name in rows_plan:
        entry = src.entry(name)
        fd = src.reader(name).fd
        if to_ldm.get(name) in targets:
            pieces.append(Piece((out_name, name, True), fd, entry.start, entry.nbytes))
            biggest = max(biggest, entry.nbytes)
            continue
        for pos in range(entry.start, entry.end, COPY_CHUNK):
            pieces.append(Piece((out_name, name, False), fd, pos, min(COPY_CHUNK, entry.end - pos),
                                read=not kernel_copy))
    return pieces, max(biggest, min(COPY_CHUNK, max((p.length for p in pieces if p.read), default=0)))


def _merge_tensor(view, entry, ldm: str, plan: _DeltaPlan, fbuf: torch.Tensor, stats: _Stats) -> torch.Tensor:
    """Apply the change to the tensor in `view` in place (fp32 math, one rounding); returns fbuf."""
    w = torch.frombuffer(view, dtype=getattr(torch, DTYPES[entry.dtype][0])).view(entry.shape)
    n = w.numel()
    if fbuf.numel() < n:
        fbuf = torch.empty(n, dtype=torch.float32)
    w32 = fbuf[:n].view(w.shape)
    w32.copy_(w)
    rows = _sample_rows(w.shape[0], max(1, n // max(1, w.shape[0])))
    before = (w.view(w.shape[0], -1)[rows] if w.dim() else w).to(torch.float32, copy=True)
    intended = plan.apply(ldm, w32, rows)
    w.copy_(w32)  # round once into the checkpoint's dtype, in the read buffer
    after = (w.view(w.shape[0], -1)[rows] if w.dim() else w).float()
    stats.add(before, after, intended)
    return fbuf


def _stream_inner(src: ModelSource, out: Path, plan: _DeltaPlan, info: dict, hash_checkpoint: bool,
                  progress, t0: float) -> MergeReport:
    import hashlib
    import time

    rows_plan = _output_plan(src)
    targets = plan.targets(src.ldm_index)
    to_ldm = src.layout.to_ldm
    entries = [(o, src.entry(n).dtype, src.entry(n).shape) for o, n in rows_plan]
    info["tensors_changed"] = sum(1 for _, n in rows_plan if to_ldm.get(n) in targets)
    metadata = _base_metadata(src, out, info)
    data_bytes = sum(src.entry(n).nbytes for _, n in rows_plan)
    check_free_space(out.parent, data_bytes + _HEADER_RESERVE + 1024 * 1024)
    # the finetune is read front to back, so its sha256 can be computed on the way (but then every
    # byte must pass through user space; without it, untouched tensors are copied by the kernel)
    hashing = hash_checkpoint and len(src.files) == 1 and src.layout.kind == "single-file"
    pieces, buf_size = _pieces(src, rows_plan, targets, kernel_copy=not hashing)
    prefetch = Prefetcher(pieces, buf_size, hashlib.sha256() if hashing else None, src.headers[0].file_size)
    # reserve header room for the figures only known at the end (hash, precision)
    writer = AtomicSafetensorsWriter(out, entries, metadata, reserve=_HEADER_RESERVE)
    stats = _Stats()
    fbuf = torch.empty(0, dtype=torch.float32)
    total = writer.total_bytes
    done = total - data_bytes  # the header is already written
    try:
        for piece, view in prefetch:
            out_name, name, merge = piece.tag
            if view is None:
                writer.copy_from(out_name, piece.fd, piece.start, piece.length)
            else:
                if merge:
                    prefetch.wait_hash()  # the input's hash must see the original bytes
                    fbuf = _merge_tensor(view, src.entry(name), to_ldm[name], plan, fbuf, stats)
                writer.write(out_name, view)
            done += piece.length
            if progress:
                progress(done, total)
        sha = prefetch.finish()
        precision = stats.result()
        info["precision"] = dict(precision, output_dtypes=sorted({e[1] for e in entries}),
                                 sampled="up to 65536 elements per changed tensor")
        info["checkpoint"]["sha256"] = sha
        final_meta = _base_metadata(src, out, info)
        final_meta["modelspec.date"] = metadata["modelspec.date"]
        writer.commit(final_meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        prefetch.close()
    return MergeReport(out, info["mode"], len(rows_plan), info["tensors_changed"], writer.total_bytes,
                       time.perf_counter() - t0, precision["delta_retained"], precision["delta_relative_error"],
                       sha, final_meta)
