"""The bootstrap run: plan work units, skip completed shards, annotate the rest, write atomically,
and (on the main process, once every unit is done) the manifest and stats report.

Resume: a shard exists only once complete (temp name + rename), so rerunning the same command
skips finished units and redoes the rest; leftover temp files of a killed run are removed. The
run's configuration is stored in run_config.json and a rerun with different settings is refused,
so one folder never mixes annotations from two configurations.

Fault injection for tests (env MUMU_BOOTSTRAP_FAULT): ``after_shard:N`` SIGKILLs this process
right after its N-th shard is renamed; ``before_rename:N`` SIGKILLs it with the N-th shard's temp
file written but not renamed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mumu_core.errors import MumuError

from .detectors import DEFAULT_BOX_THRESHOLD, detector_config_hash, detector_type_of, load_detector
from .filters import FilterConfig, filter_detections
from .imageio import DEFAULT_MAX_PIXELS, ImageSkip, open_image
from .phrases import is_person_phrase
from .records import (FORMAT_VERSION, atomic_write_bytes, atomic_write_json, encode_records, round_box,
                      round_score, shard_name, stats_name)
from .sources import WorkUnit, image_root_for, iter_unit, plan_units

log = logging.getLogger("mumu_training.bootstrap")
TOP_PHRASES = 50


@dataclass
class BootstrapOptions:
    input: str
    format: str
    detector: str
    out: str
    detector_type: str | None = None
    box_threshold: float | None = None      # None: 0.35 Grounding DINO, 0.2 OWLv2
    text_threshold: float = 0.25            # Grounding DINO only
    shard_size: int = 1000
    filters: FilterConfig = field(default_factory=FilterConfig)
    heads: bool = True                      # find head boxes inside person boxes
    max_head_fraction: float = 0.75         # a "head" covering more of the person box is rejected
    min_head_side: float = 16.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    min_image_side: int = 64
    batch_size: int = 1                     # images per detector call (padding makes results batch-dependent)
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True

    def run_config(self, detector_type: str) -> dict[str, Any]:
        """Everything that determines the shards' bytes (not where or how fast they are computed)."""
        return {
            "format_version": FORMAT_VERSION,
            "input": {"path": str(Path(self.input).resolve()), "format": self.format},
            "image_root": str(image_root_for(self.input, self.format)),
            "detector": {"path": str(Path(self.detector).resolve()), "type": detector_type,
                         "config_hash": detector_config_hash(self.detector)},
            "thresholds": {"box": self.box_threshold if self.box_threshold is not None else DEFAULT_BOX_THRESHOLD[detector_type],
                           "text": self.text_threshold if detector_type == "grounding_dino" else None},
            "filters": self.filters.as_dict(),
            "heads": {"enabled": self.heads, "max_fraction": self.max_head_fraction, "min_side": self.min_head_side},
            "images": {"max_pixels": self.max_image_pixels, "min_side": self.min_image_side},
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
        }


def _fault_hook():
    spec = os.environ.get("MUMU_BOOTSTRAP_FAULT", "")
    kind, _, n = spec.partition(":")
    return (kind, int(n)) if kind in ("after_shard", "before_rename") and n.isdigit() else (None, 0)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Annotator:
    """Detect, filter and find heads for a batch of images (one model call per batch)."""

    def __init__(self, opts: BootstrapOptions, detector) -> None:
        self.opts, self.detector = opts, detector

    def _heads(self, images, jobs) -> list[tuple[list[float], float] | None]:
        """jobs: (image index, person box) -> best head box in image pixels, or None."""
        crops, offsets = [], []
        for i, box in jobs:
            x0, y0 = int(box[0]), int(box[1])
            crops.append(images[i].crop((x0, y0, int(round(box[2])), int(round(box[3])))))
            offsets.append((x0, y0))
        found = []
        bs = max(1, self.opts.batch_size)
        for s in range(0, len(crops), bs):
            found += self.detector.detect_batch(crops[s : s + bs], ["head"] * len(crops[s : s + bs]))
        out = []
        for crop, (x0, y0), dets in zip(crops, offsets, found):
            area = crop.width * crop.height
            best = None
            for d in dets:
                w, h = d.box[2] - d.box[0], d.box[3] - d.box[1]
                if min(w, h) < self.opts.min_head_side or w * h > self.opts.max_head_fraction * area:
                    continue
                if best is None or d.score > best.score:
                    best = d
            b = best.box if best else None
            out.append((round_box((b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0)), round_score(best.score)) if best else None)
        return out

    def crops(self, images, captions: list[str], stats: Counter) -> list[list[dict[str, Any]]]:
        kept_all = []
        for image, dets in zip(images, self.detector.detect_batch(images, captions)):
            stats["boxes_detected"] += len(dets)
            kept, dropped = filter_detections(dets, image.width, image.height, self.opts.filters)
            for reason, n in dropped.items():
                stats[f"boxes_dropped_{reason}"] += n
            kept_all.append(kept)
        jobs = [(i, d.box) for i, kept in enumerate(kept_all) for d in kept if is_person_phrase(d.phrase)]
        heads = iter(self._heads(images, jobs) if (jobs and self.opts.heads) else [None] * len(jobs))
        out = []
        for kept in kept_all:
            rows = []
            for d in kept:
                person = is_person_phrase(d.phrase)
                head = next(heads) if person else None
                if person:
                    stats["person_crops"] += 1
                    stats["person_crops_with_head"] += head is not None
                rows.append({"phrase": d.phrase, "start": d.start, "end": d.end, "box": round_box(d.box),
                             "score": round_score(d.score), "person": person,
                             "head_box": head[0] if head else None, "head_score": head[1] if head else None})
            out.append(rows)
        return out


@dataclass
class _UnitTally:
    """What annotating one work unit produced: its records (with input positions) and its counters."""

    counts: Counter = field(default_factory=Counter)  # seen, boxes_*, person_crops, person_crops_with_head
    skipped: Counter = field(default_factory=Counter)  # reason -> images
    converted: Counter = field(default_factory=Counter)  # colour conversion -> images
    crops_per_image: Counter = field(default_factory=Counter)
    phrases: Counter = field(default_factory=Counter)
    records: list = field(default_factory=list)  # (position, record)

    def stats(self, unit: WorkUnit) -> dict:
        c = self.counts
        return {
            "unit": unit.index, "input": unit.describe(), "seen": c["seen"], "kept": len(self.records),
            "skipped": dict(sorted(self.skipped.items())), "converted": dict(sorted(self.converted.items())),
            "boxes": {k[len("boxes_"):]: v for k, v in sorted(c.items()) if k.startswith("boxes_")},
            "person_crops": c["person_crops"], "person_crops_with_head": c["person_crops_with_head"],
            "crops_per_image": {str(k): v for k, v in sorted(self.crops_per_image.items())},
            "phrases": dict(sorted(self.phrases.items())),
        }


def _annotate(group, unit: WorkUnit, ann: _Annotator, tally: _UnitTally) -> None:
    """Detect on a batch of (position, item, caption, loaded image) and add its records to `tally`."""
    c_local: Counter = Counter()
    try:
        crops_list = ann.crops([g[3].image for g in group], [g[2] for g in group], c_local)
    except Exception as exc:  # one pathological image must not end a multi-day run
        if len(group) > 1:  # find the culprit: redo the batch one image at a time
            for g in group:
                _annotate([g], unit, ann, tally)
            return
        log.warning("detector failed on %s: %s: %s", group[0][1].source, type(exc).__name__, exc,
                    exc_info=tally.skipped["detector_error"] == 0)
        tally.skipped["detector_error"] += 1
        return
    tally.counts.update(c_local)
    for (pos, item, caption, loaded), crops in zip(group, crops_list):
        if loaded.converted:
            tally.converted[loaded.converted] += 1
        tally.crops_per_image[len(crops)] += 1
        tally.phrases.update(cr["phrase"].lower() for cr in crops)
        tally.records.append((pos, {"id": f"{unit.index:06d}/{pos:06d}", "source": item.source, "caption": caption,
                                    "width": loaded.image.width, "height": loaded.image.height,
                                    "mode": loaded.original_mode, "crops": crops}))


def _process_unit(unit: WorkUnit, image_root: Path, ann: _Annotator, bar) -> tuple[list[dict], dict]:
    opts = ann.opts
    tally = _UnitTally()
    batch: list[tuple[int, Any, str, Any]] = []  # (position, item, caption, loaded image)
    for pos, item in enumerate(iter_unit(unit, image_root)):
        tally.counts["seen"] += 1
        if bar is not None:
            bar.update(1)
        caption = (item.caption or "").strip()
        reason = item.problem or (None if caption else "missing_caption")
        if reason is None:
            try:
                data = item.data if item.data is not None else image_root / item.source["path"]
                loaded = open_image(data, max_pixels=opts.max_image_pixels, min_side=opts.min_image_side)
            except ImageSkip as exc:
                reason = exc.reason
        if reason is not None:
            tally.skipped[reason] += 1
            continue
        batch.append((pos, item, caption, loaded))
        if len(batch) >= max(1, opts.batch_size):
            _annotate(batch, unit, ann, tally)
            batch = []
    if batch:
        _annotate(batch, unit, ann, tally)
    tally.records.sort(key=lambda r: r[0])  # a batch retried image by image still lands in input order
    return [r for _, r in tally.records], tally.stats(unit)


def _check_run_config(out: Path, cfg: dict[str, Any], is_main: bool, wait) -> None:
    """Main process records the settings on a fresh folder; every process then checks them, so a
    mismatch stops all processes with the same error instead of leaving some at a barrier."""
    path = out / "run_config.json"
    if is_main:
        out.joinpath("shards").mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            atomic_write_json(path, cfg)
    wait()
    old = json.loads(path.read_text())
    if old != cfg:
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        raise MumuError(f"{out} already holds shards made with different settings ({', '.join(diff)} differ). "
                        f"Rerun with the original settings to resume, or choose a new --out folder.")


def run_bootstrap(opts: BootstrapOptions, process_index: int = 0, num_processes: int = 1,
                  wait=lambda: None) -> dict[str, Any]:
    """Annotate this process's units; the main process then writes manifest.json and stats.json.

    `wait` is a barrier across processes (accelerate's wait_for_everyone); returns a summary.
    """
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    is_main = process_index == 0
    dtype_name = opts.dtype
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise MumuError(f"--dtype {dtype_name!r} is not a torch dtype; use float32, float16 or bfloat16.")
    det_type = detector_type_of(opts.detector)
    if opts.detector_type is not None and opts.detector_type != det_type:
        raise MumuError(f"--detector-type {opts.detector_type} but {opts.detector} holds a {det_type} model; drop "
                        f"--detector-type or point --detector at a {opts.detector_type} folder.")
    cfg = opts.run_config(det_type)
    units = plan_units(opts.input, opts.format, opts.shard_size)
    out = Path(opts.out)
    _check_run_config(out, cfg, is_main, wait)
    shards_dir = out / "shards"
    image_root = Path(cfg["image_root"])

    mine = [u for u in units if u.index % num_processes == process_index]
    for u in mine:  # temp files of a killed run (any pid) for this process's units
        for leftover in shards_dir.glob(f".{u.index:06d}.*.tmp*"):
            leftover.unlink(missing_ok=True)
    todo = [u for u in mine if not (shards_dir / shard_name(u.index)).is_file()]
    fault, fault_n = _fault_hook()
    done_here, images_here, annotate_s = 0, 0, 0.0
    if todo:
        detector = load_detector(opts.detector, det_type, cfg["thresholds"]["box"], opts.text_threshold,
                                 device=opts.device, dtype=dtype)
        ann = _Annotator(opts, detector)
        total = sum(u.count for u in todo) if all(u.count is not None for u in todo) else None
        bar = tqdm(total=total, unit="img", desc="bootstrap", disable=not (is_main and opts.progress), dynamic_ncols=True)
        t_ann = time.perf_counter()
        try:
            for u in todo:
                records, stats = _process_unit(u, image_root, ann, bar)
                images_here += stats["seen"]
                # stats first: a shard on disk always has its stats beside it
                atomic_write_json(shards_dir / stats_name(u.index), dict(stats, records=len(records)))
                hook = _kill_self if (fault == "before_rename" and done_here + 1 == fault_n) else None
                atomic_write_bytes(shards_dir / shard_name(u.index), encode_records(records), before_rename=hook)
                done_here += 1
                if fault == "after_shard" and done_here == fault_n:
                    _kill_self()
        finally:
            bar.close()
            annotate_s = time.perf_counter() - t_ann
    seconds = time.perf_counter() - t0
    with open(out / "run_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"process": process_index, "num_processes": num_processes, "units": len(mine),
                            "units_done": done_here, "units_already_complete": len(mine) - len(todo),
                            "unit_indices": [u.index for u in todo], "images": images_here,
                            "seconds": round(seconds, 3), "annotate_seconds": round(annotate_s, 3),
                            "images_per_s": round(images_here / seconds, 3) if seconds > 0 else None,
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    wait()
    summary = {"units": len(units), "units_done_here": done_here, "images_here": images_here, "seconds": seconds}
    if is_main:
        summary.update(finalize(out, units, cfg))
    return summary


def finalize(out: Path, units: list[WorkUnit], cfg: dict[str, Any]) -> dict[str, Any]:
    """Aggregate per-shard stats into manifest.json + stats.json (deterministic: no timings)."""
    shards_dir = out / "shards"
    missing = [u.index for u in units if not (shards_dir / shard_name(u.index)).is_file()]
    if missing:
        log.warning("%d of %d shards are missing (e.g. %s); rerun the same command to finish them.",
                    len(missing), len(units), missing[:5])
        return {"complete": False, "missing_units": missing}
    totals: Counter = Counter()
    skipped: Counter = Counter()
    converted: Counter = Counter()
    boxes: Counter = Counter()
    hist: Counter = Counter()
    phrases: Counter = Counter()
    shards = []
    for u in units:
        st = json.loads((shards_dir / stats_name(u.index)).read_text())
        totals.update({k: st[k] for k in ("seen", "kept", "person_crops", "person_crops_with_head")})
        skipped.update(st["skipped"])
        converted.update(st["converted"])
        boxes.update(st["boxes"])
        hist.update({int(k): v for k, v in st["crops_per_image"].items()})
        phrases.update(st["phrases"])
        shards.append({"name": shard_name(u.index), "records": st["records"], "input": st["input"]})
    n_crops = sum(k * v for k, v in hist.items())
    counts = {"images_seen": totals["seen"], "images_kept": totals["kept"],
              "images_skipped": sum(skipped.values()), "crops": n_crops,
              "person_crops": totals["person_crops"], "person_crops_with_head": totals["person_crops_with_head"]}
    stats = {
        "counts": counts,
        "skipped_by_reason": dict(sorted(skipped.items())),
        "converted_by_mode": dict(sorted(converted.items())),
        "boxes": dict(sorted(boxes.items())),
        "crops_per_image": {str(k): hist[k] for k in sorted(hist)},
        "top_phrases": [[p, n] for p, n in sorted(phrases.items(), key=lambda x: (-x[1], x[0]))[:TOP_PHRASES]],
    }
    from mumu_core import __version__ as mumu_version

    manifest = {"format": "mumu-bootstrap-annotations", "mumu_version": mumu_version, **cfg,
                "counts": counts, "shards": shards}
    atomic_write_json(out / "stats.json", stats)
    atomic_write_json(out / "manifest.json", manifest)
    return {"complete": True, "counts": counts}
