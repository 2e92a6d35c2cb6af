"""Contact sheet of bootstrap annotations, to eyeball a detector and its thresholds before a long run.

    python -m mumu_training.bootstrap.preview OUT_DIR --out preview.png [--n 16] [--side 384]

Each tile is one record: its boxes (red; person boxes green, their head boxes yellow) labelled
with the grounded phrase and score, and the caption underneath.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from mumu_core.atomic import atomic_write
from mumu_core.errors import MumuError

from .imageio import ImageSkip, load_source_image
from .records import iter_shard, shard_paths


def render_preview(out_dir: str | Path, n: int = 16, side: int = 384) -> Image.Image:
    out_dir = Path(out_dir)
    shards = shard_paths(out_dir)
    cfg_path = out_dir / "run_config.json"
    if not shards or not cfg_path.is_file():
        raise MumuError(f"{out_dir} holds no bootstrap shards; pass the --out folder of `mumu bootstrap`.")
    root = Path(json.loads(cfg_path.read_text())["image_root"])
    tiles = []
    for shard in shards:
        for rec in iter_shard(shard):
            if len(tiles) >= n:
                break
            try:
                img = load_source_image(rec["source"], root)
            except ImageSkip:
                continue
            tiles.append(_tile(img, rec, side))
        if len(tiles) >= n:
            break
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    sheet = Image.new("RGB", (cols * side, rows * (side + 28)), (24, 24, 24))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * side, (i // cols) * (side + 28)))
    return sheet


def _tile(img: Image.Image, rec: dict, side: int) -> Image.Image:
    scale = side / max(img.size)
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    tile = Image.new("RGB", (side, side + 28), (24, 24, 24))
    tile.paste(small, (0, 0))
    draw = ImageDraw.Draw(tile)
    for c in rec["crops"]:
        colour = (60, 220, 60) if c["person"] else (230, 50, 50)
        box = [v * scale for v in c["box"]]
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 3, box[1] + 2), f"{c['phrase']} {c['score']:.2f}", fill=colour)
        if c.get("head_box"):
            draw.rectangle([v * scale for v in c["head_box"]], outline=(240, 220, 40), width=1)
    draw.text((4, side + 8), rec["caption"][: side // 6], fill=(220, 220, 220))
    return tile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mumu_training.bootstrap.preview", description=__doc__.splitlines()[0])
    p.add_argument("annotations", help="the --out folder of mumu bootstrap")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=16, help="records to show")
    p.add_argument("--side", type=int, default=384, help="tile size in px")
    args = p.parse_args(argv)
    try:
        image = render_preview(args.annotations, args.n, args.side)
        fmt = Image.registered_extensions().get(Path(args.out).suffix.lower())  # the temp name has no extension
        atomic_write(args.out, lambda tmp: image.save(tmp, format=fmt))
    except MumuError as exc:
        print(f"preview: error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
