"""Generated datasets for tests and benchmarks: good images plus every bad-image kind, in all
input layouts (folder, img2dataset-style WebDataset tars, JSONL and Parquet indexes)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = [
    "a man and his dog in an animated style",
    "a woman riding a red scooter in new york",
    "a cat sitting on a chair next to a window",
    "a portrait of a person with glasses and a hat",
    "two people hiking in the wilderness",
    "a car on a street in the city",
]

# name -> (expected outcome, reason); "kept" ones are converted and annotated
BAD_KINDS = {
    "corrupt": "corrupt",
    "truncated": "truncated",
    "one_pixel": "too_small",
    "bomb": "decompression_bomb",
    "cmyk": "cmyk",
    "gray16": "16bit",
    "palette": "palette",
}
SKIPPED_KINDS = ("corrupt", "truncated", "one_pixel", "bomb")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def good_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(240, 420)), int(rng.integers(200, 360)))
    arr = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    for _ in range(3):  # a few solid rectangles: something for edge maps and crops to show
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width x height (900 MP): PIL refuses it at open."""
    raw = bytearray(_png_bytes(Image.new("L", (8, 8))))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[ihdr : ihdr + 17])) & 0xFFFFFFFF
    raw[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(raw)


def bad_image_bytes(kind: str, seed: int = 0) -> tuple[bytes, str]:
    """(bytes, file extension) of one bad-image kind."""
    base = good_image(seed, (256, 200))
    if kind == "corrupt":
        return b"this is not an image at all" * 10, "jpg"
    if kind == "truncated":
        data = _jpeg_bytes(base)
        return data[: len(data) // 2], "jpg"
    if kind == "one_pixel":
        return _png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), "png"
    if kind == "bomb":
        return bomb_png(), "png"
    if kind == "cmyk":
        return _jpeg_bytes(base.convert("CMYK")), "jpg"
    if kind == "gray16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        return _png_bytes(Image.fromarray(arr)), "png"  # uint16 -> mode I;16
    if kind == "palette":
        return _png_bytes(base.convert("P", palette=Image.ADAPTIVE, colors=16)), "png"
    raise ValueError(kind)


def make_examples(n_good: int, bad: bool = True, seed: int = 0) -> list[tuple[str, bytes, str, str]]:
    """[(key, image bytes, ext, caption)] in a fixed order: good images with bad kinds mixed in."""
    out = []
    for i in range(n_good):
        out.append((f"{i:05d}", _png_bytes(good_image(seed + i)), "png", CAPTIONS[i % len(CAPTIONS)]))
    if bad:
        for j, kind in enumerate(BAD_KINDS):
            data, ext = bad_image_bytes(kind, seed + j)
            pos = min(len(out), 1 + 2 * j)
            out.insert(pos, (f"bad_{kind}", data, ext, CAPTIONS[j % len(CAPTIONS)]))
    # numbered keys: a folder listing (sorted by name) sees the same order as tars and indexes
    return [(f"{i:05d}_{key}", data, ext, cap) for i, (key, data, ext, cap) in enumerate(out)]


def write_folder(root: Path, examples) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, data, ext, cap in examples:
        (root / f"{key}.{ext}").write_bytes(data)
        (root / f"{key}.txt").write_text(cap + "\n", encoding="utf-8")
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path, examples, per_tar: int) -> Path:
    """img2dataset layout: NNNNN.tar with KEY.jpg/png + KEY.txt + KEY.json per example."""
    root.mkdir(parents=True, exist_ok=True)
    for t, s in enumerate(range(0, len(examples), per_tar)):
        with tarfile.open(root / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for k, (key, data, ext, cap) in enumerate(examples[s : s + per_tar]):
                wkey = f"{t:05d}{k:04d}"
                _add(tf, f"{wkey}.{ext}", data)
                if k % 2 == 0:
                    _add(tf, f"{wkey}.txt", cap.encode())
                # odd examples: caption only in the .json (img2dataset writes both when asked)
                _add(tf, f"{wkey}.json", json.dumps({"key": wkey, "caption": cap, "url": key}).encode())
    return root


def write_index(root: Path, examples, fmt: str) -> Path:
    """Images in root/images, index root/index.jsonl or root/index.parquet with relative paths."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key, data, ext, cap in examples:
        (img_dir / f"{key}.{ext}").write_bytes(data)
        rows.append({"image": f"images/{key}.{ext}", "caption": cap})
    if fmt == "jsonl":
        path = root / "index.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "index.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def write_dataset(root: Path, fmt: str, examples, per_unit: int = 4) -> Path:
    """Write `examples` in `fmt` under root; returns the --input path."""
    if fmt == "folder":
        return write_folder(root / "folder", examples)
    if fmt == "webdataset":
        return write_webdataset(root / "wds", examples, per_unit)
    return write_index(root / fmt, examples, fmt)
