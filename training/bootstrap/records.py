"""The annotation format: one JSON record per image, in gzip'd JSONL shards.

Layout of a bootstrap output folder (`--out DIR`)::

    DIR/run_config.json          what produced the shards (checked on resume)
    DIR/shards/000000.jsonl.gz   annotation records for work unit 0 (written atomically)
    DIR/shards/000000.stats.json counts for work unit 0 (seen / kept / skipped by reason, ...)
    DIR/manifest.json            totals + shard list (written once every shard is complete)
    DIR/stats.json               report: skipped by reason, crops-per-image histogram, top phrases
    DIR/run_log.jsonl            one line per run/process with timings (the only non-deterministic file)

A record (one line of a shard)::

    {"id": "000003/000017",                      # work unit / position: unique and stable
     "source": {"path": "imgs/a.jpg"}            # relative to manifest["image_root"], or
            |  {"tar": "00001.tar", "member": "000123.jpg"},
     "caption": "a man and his dog",
     "width": 640, "height": 480,                # of the stored image, in pixels
     "mode": "RGB",                              # PIL mode as stored (CMYK/P/I;16 are converted on load)
     "crops": [{"phrase": "dog", "start": 14, "end": 17,   # caption[start:end] == phrase
                "box": [x0, y0, x1, y1],          # pixels of the stored image, x1/y1 exclusive
                "score": 0.4121,
                "person": false,
                "head_box": null, "head_score": null}]}  # person crops: head box in image pixels

Boxes, not pixels: the sample builder crops at train time, so one annotation pass serves every
stage and augmentation. Numbers are rounded (boxes 0.01 px, scores 1e-4) so that the bytes of a
shard only depend on the inputs, and gzip is written with mtime=0 and no file name, so an
interrupted-and-resumed run produces byte-identical shards to an uninterrupted one.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from mumu_core.atomic import atomic_write

FORMAT_VERSION = 1
SHARD_SUFFIX = ".jsonl.gz"
STATS_SUFFIX = ".stats.json"


def shard_name(index: int) -> str:
    return f"{index:06d}{SHARD_SUFFIX}"


def stats_name(index: int) -> str:
    return f"{index:06d}{STATS_SUFFIX}"


def round_box(box: Iterable[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def round_score(score: float) -> float:
    return round(float(score), 4)


def encode_records(records: Iterable[dict[str, Any]]) -> bytes:
    """Deterministic gzip'd JSONL bytes (mtime 0, no name in the header, sorted keys)."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        for rec in records:
            gz.write(json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            gz.write(b"\n")
    return raw.getvalue()


def read_shard(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of one shard (shards are small: `--shard-size` records)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, before_rename=None) -> None:
    """Write `data` atomically (`mumu_core.atomic`): readers never see half a file.

    `before_rename()` runs between fsync and rename (the fault-injection hook of the resume tests).
    """
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), before_rename=before_rename)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """Completed shards of an output folder, in work-unit order (temp files are never listed)."""
    folder = Path(out_dir) / "shards"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."))
