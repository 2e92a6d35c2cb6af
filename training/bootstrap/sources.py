"""Streaming inputs, cut into deterministic work units (one unit -> one output shard).

- ``folder``: images (.jpg .jpeg .png .webp .bmp .gif .tif .tiff, any depth) with a same-name
  ``.txt`` caption beside each. Units: ``--shard-size`` images of the sorted relative paths.
- ``webdataset``: a .tar file or a folder of .tar files as written by img2dataset; members are
  grouped by key (the member name up to its first dot), image = .jpg/.jpeg/.png/.webp, caption =
  .txt, else the "caption" field of .json. Units: one per tar file (``--shard-size`` is unused:
  a tar is already a shard).
- ``jsonl`` / ``parquet``: an index file (or a folder of them, sorted) with an image path column
  (``image``, ``image_path``, ``path``, ``file_name`` or ``file``) and a caption column
  (``caption`` or ``text``); relative paths are relative to the index file. Units: ``--shard-size``
  rows of one file (JSONL units record their byte offset, Parquet units read only their row groups).

Only names, line offsets and row-group metadata are gathered up front; images and captions are
read while their unit runs. Unit numbering depends only on the input and ``--shard-size``, so every
process derives the same plan and takes units ``index % num_processes == process_index``.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mumu_core.errors import MumuError

FORMATS = ("folder", "webdataset", "jsonl", "parquet")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATH_KEYS = ("image", "image_path", "path", "file_name", "file")
CAPTION_KEYS = ("caption", "text")


@dataclass
class Item:
    """One input example; `data` holds image bytes for tar members (read with the member), else None."""

    source: dict[str, Any]
    caption: str | None
    data: bytes | None = None
    problem: str | None = None  # a reason to skip found while reading the input (e.g. missing_caption)


@dataclass
class WorkUnit:
    index: int
    kind: str
    file: str                        # folder: input root; others: the tar / index file
    start: int = 0                   # first item (row) of the unit
    count: int | None = None         # items in the unit (None: unknown until read, webdataset)
    byte_offset: int = 0             # jsonl: where line `start` begins
    paths: list[str] = field(default_factory=list)  # folder: relative image paths of this unit

    def describe(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "count": self.count}


def _files(root: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MumuError(f"--input {root} does not exist; expected {what}.")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise MumuError(f"--input {root} holds no {'/'.join(suffixes)} files; expected {what}.")
    return files


def image_root_for(path: str | Path, fmt: str) -> Path:
    p = Path(path).resolve()
    return p if p.is_dir() else p.parent


def plan_units(path: str | Path, fmt: str, shard_size: int) -> list[WorkUnit]:
    if fmt not in FORMATS:
        raise MumuError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if shard_size < 1:
        raise MumuError(f"--shard-size must be at least 1; got {shard_size}.")
    root = Path(path).resolve()
    if fmt == "folder":
        if not root.is_dir():
            raise MumuError(f"--input {root} is not a folder; --format folder expects a folder of images with "
                            f"same-name .txt captions.")
        names = sorted(
            os.path.relpath(os.path.join(d, f), root)
            for d, _, fs in os.walk(root) for f in fs
            if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
        )
        if not names:
            raise MumuError(f"--input {root} has no images ({', '.join(IMAGE_EXTS)}).")
        return [WorkUnit(i, fmt, str(root), start=s, count=len(names[s:s + shard_size]), paths=names[s:s + shard_size])
                for i, s in enumerate(range(0, len(names), shard_size))]
    if fmt == "webdataset":
        return [WorkUnit(i, fmt, str(f)) for i, f in enumerate(_files(root, (".tar",), "WebDataset .tar shards"))]
    units: list[WorkUnit] = []
    if fmt == "jsonl":
        for f in _files(root, (".jsonl", ".json"), "a JSONL index (one {\"image\": ..., \"caption\": ...} per line)"):
            line, offset = 0, 0
            with open(f, "rb") as fh:
                for raw in fh:
                    if raw.strip():
                        if line % shard_size == 0:
                            units.append(WorkUnit(len(units), fmt, str(f), start=line, count=0, byte_offset=offset))
                        units[-1].count += 1
                        line += 1
                    offset += len(raw)
        return units
    import pyarrow.parquet as pq

    for f in _files(root, (".parquet",), "a Parquet index with image path and caption columns"):
        n = pq.ParquetFile(f).metadata.num_rows
        units += [WorkUnit(len(units) + k, fmt, str(f), start=s, count=min(shard_size, n - s))
                  for k, s in enumerate(range(0, n, shard_size))]
    return units


def _rel(path: Path, image_root: Path) -> str:
    try:
        return str(path.resolve().relative_to(image_root))
    except ValueError:
        return str(path.resolve())  # outside the root: keep absolute (Path join keeps it absolute)


def _row_item(row: dict[str, Any], index_file: Path, image_root: Path) -> Item:
    img = next((row[k] for k in PATH_KEYS if isinstance(row.get(k), str) and row[k]), None)
    cap = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
    if img is None:
        return Item({"path": ""}, cap, problem="missing_image")
    path = Path(img) if os.path.isabs(img) else index_file.parent / img
    return Item({"path": _rel(path, image_root)}, cap)


def iter_unit(unit: WorkUnit, image_root: Path) -> Iterator[Item]:
    if unit.kind == "folder":
        root = Path(unit.file)
        for rel in unit.paths:
            txt = (root / rel).with_suffix(".txt")
            cap = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
            yield Item({"path": rel}, cap, problem=None if cap is not None else "missing_caption")
    elif unit.kind == "webdataset":
        yield from _iter_tar(Path(unit.file), image_root)
    elif unit.kind == "jsonl":
        f = Path(unit.file)
        with open(f, "rb") as fh:
            fh.seek(unit.byte_offset)
            done = 0
            for raw in fh:
                if done >= unit.count:
                    break
                if not raw.strip():
                    continue
                done += 1
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    row = None
                if not isinstance(row, dict):
                    yield Item({"path": ""}, None, problem="bad_index_row")
                    continue
                yield _row_item(row, f, image_root)
    else:
        yield from _iter_parquet(unit, image_root)


def _iter_parquet(unit: WorkUnit, image_root: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    f = Path(unit.file)
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    cols = [c for c in (*PATH_KEYS, *CAPTION_KEYS) if c in names]
    if not any(c in names for c in PATH_KEYS) or not any(c in names for c in CAPTION_KEYS):
        raise MumuError(f"{f} has columns {names}; need an image path column ({', '.join(PATH_KEYS)}) and a "
                        f"caption column ({', '.join(CAPTION_KEYS)}).")
    end = unit.start + unit.count
    groups, first_row, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):  # read only the row groups that overlap this unit
        n = pf.metadata.row_group(g).num_rows
        if row < end and row + n > unit.start:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    pos = first_row or 0
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=cols):
        for r in batch.to_pylist():
            if unit.start <= pos < end:
                yield _row_item(r, f, image_root)
            pos += 1


def _key(name: str) -> tuple[str, str]:
    head, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(head, key), ext.lower()


def _iter_tar(path: Path, image_root: Path) -> Iterator[Item]:
    rel = _rel(path, image_root)
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise MumuError(f"{path} is not a readable tar file ({exc}); --format webdataset expects img2dataset's "
                        f".tar shards.") from None
    with tf:
        group: list[tarfile.TarInfo] = []
        current = None
        try:
            for m in tf:  # members arrive in file order; img2dataset writes each key's files together
                if not m.isfile():
                    continue
                key, _ = _key(m.name)
                if current is not None and key != current:
                    yield _tar_item(tf, group, rel)
                    group = []
                current = key
                group.append(m)
        except tarfile.ReadError:
            pass  # a truncated tar ends the shard; what was read is kept
        if group:
            yield _tar_item(tf, group, rel)


def _tar_item(tf: tarfile.TarFile, group: list[tarfile.TarInfo], rel: str) -> Item:
    by_ext = {_key(m.name)[1]: m for m in group}
    img = next((by_ext[e] for e in ("jpg", "jpeg", "png", "webp") if e in by_ext), None)
    caption = None
    if "txt" in by_ext:
        caption = tf.extractfile(by_ext["txt"]).read().decode("utf-8", errors="replace")
    elif "json" in by_ext:
        try:
            meta = json.loads(tf.extractfile(by_ext["json"]).read())
            caption = meta.get("caption") if isinstance(meta, dict) and isinstance(meta.get("caption"), str) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            caption = None
    if img is None:
        return Item({"tar": rel, "member": group[0].name, "offset": 0, "size": 0}, caption, problem="missing_image")
    source = {"tar": rel, "member": img.name, "offset": img.offset_data, "size": img.size}
    try:
        data = tf.extractfile(img).read()
    except (tarfile.TarError, OSError):
        return Item(source, caption, problem="truncated")
    return Item(source, caption, data=data, problem=None if caption is not None else "missing_caption")
