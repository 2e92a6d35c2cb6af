"""Bootstrap throughput for 1 and 2 processes on the tiny Grounding DINO (CPU), in one run.

Creates its own data (JPEG photos-sized images + JSONL index) and tiny detector in a temp folder,
runs `python -m mumu_training.bootstrap` (1 process) and `accelerate launch --multi_gpu
--num_processes 2 -m mumu_training.bootstrap` (ACCELERATE_USE_CPU=1), one torch thread per
process in both. The two set-ups alternate `--repeats` times and each one's best run is kept
(the machine is shared; other load only slows runs down). images/s is reported two ways:
- annotate: images / the slowest process's time in the annotation loop (decode + detect + write),
- wall: images / the whole command's wall time (interpreter start, imports, model load included).
Also 1 process with --batch-size 8, for reference (on CPU batching mostly adds padding work).
The last line is one JSON object. Usage: python bench/bootstrap_scaling.py [--images 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make_data(root: Path, n: int) -> Path:
    from mumu_training.bootstrap.synthetic import CAPTIONS, good_image

    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    lines = []
    for i in range(n):
        buf = io.BytesIO()
        good_image(i, (640, 480)).save(buf, format="JPEG", quality=90)
        (img_dir / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        lines.append(json.dumps({"image": f"images/{i:05d}.jpg", "caption": CAPTIONS[i % len(CAPTIONS)]}))
    index = root / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    return index


def _run(cmd: list[str], out: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench: command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    log = [json.loads(l) for l in (out / "run_log.jsonl").read_text().splitlines()]
    images = sum(e["images"] for e in log)
    slowest = max(e["annotate_seconds"] for e in log)
    return {"images": images, "wall_s": wall, "annotate_s": slowest, "processes": len(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per set-up (alternating); the best is reported")
    args = ap.parse_args()
    from mumu_training.bootstrap.tiny_detectors import write_tiny_detectors

    tmp = Path(tempfile.mkdtemp(prefix="mumu_boot_bench_"))
    try:
        det = write_tiny_detectors(tmp / "det")["grounding_dino"]
        index = _make_data(tmp / "data", args.images)
        common = ["--input", str(index), "--format", "jsonl", "--detector", str(det), "--shard-size",
                  str(args.shard_size), "--box-threshold", "0.3", "--no-progress"]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        one_cmd = [sys.executable, "-m", "mumu_training.bootstrap", *common, "--threads", "1"]
        two_cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "mumu_training.bootstrap", *common]
        ones, twos = [], []
        # Alternate the two set-ups and keep each one's best run: the machine is shared, and load
        # from other jobs only ever slows a run down.
        for r in range(args.repeats):
            for cmd, runs, extra_env, name in ((one_cmd, ones, {}, "one"), (two_cmd, twos, {"ACCELERATE_USE_CPU": "1"}, "two")):
                out = tmp / f"{name}{r}"
                runs.append(_run([*cmd, "--out", str(out)], out, dict(env, **extra_env)))
        one = min(ones, key=lambda x: x["annotate_s"])
        two = min(twos, key=lambda x: x["annotate_s"])
        one["wall_s"] = min(x["wall_s"] for x in ones)
        two["wall_s"] = min(x["wall_s"] for x in twos)
        batched = _run([*one_cmd, "--batch-size", "8", "--out", str(tmp / "batch8")], tmp / "batch8", env)
        same = all((tmp / "one0" / "shards" / p.name).read_bytes() == p.read_bytes()
                   for p in (tmp / "two0" / "shards").glob("*.jsonl.gz"))
        res = {
            "images": one["images"],
            "one_process_images_per_s": round(one["images"] / one["annotate_s"], 2),
            "two_process_images_per_s": round(two["images"] / two["annotate_s"], 2),
            "one_process_wall_images_per_s": round(one["images"] / one["wall_s"], 2),
            "two_process_wall_images_per_s": round(two["images"] / two["wall_s"], 2),
            "one_process_batch8_images_per_s": round(batched["images"] / batched["annotate_s"], 2),
            "repeats": args.repeats,
            "cpu_cores": os.cpu_count(),
            "outputs_identical": same,
        }
        res["two_vs_one"] = round(res["two_process_images_per_s"] / res["one_process_images_per_s"], 3)
        res["two_vs_one_wall"] = round(res["two_process_wall_images_per_s"] / res["one_process_wall_images_per_s"], 3)
        print(f"1 process : {res['one_process_images_per_s']} img/s annotate, {res['one_process_wall_images_per_s']} img/s wall")
        print(f"2 processes: {res['two_process_images_per_s']} img/s annotate, {res['two_process_wall_images_per_s']} img/s wall")
        print(json.dumps(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
