"""Shapes-world MUMU stage: 2 one-thread data-parallel processes against one process (`reproduce --stage1-processes`).

    python bench/shapes_stage1_speed.py [--steps 40] [--rounds 2]

The real stage-1 step of the shapes world (configs/shapes.yaml: VLM LoRA, adapter, UNet LoRA,
grounding loss, global batch 16) on the shipped shapes model's VLM and toy SDXL, with its adapter as
the start, on a small freshly written world (temp dir). Launches, alternating, best round of each
(a shared machine):
- baseline: one process, torch's default threads (`reproduce`'s default)
- 2proc:    `reproduce --stage1-processes 2` (mumu_training.shapes.reproduce.stage1_launch): 2
            data-parallel processes of 1 thread each (gloo), batch 8 each
Seconds per step from train.py's own per-interval step times after warm-up. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16


def prepare(root: Path) -> dict:
    """A 400-scene world, and the shipped model's adapter as an `adapter_init` file."""
    sys.path.insert(0, str(REPO))
    from mumu_core.adapter import AdapterConfig, MumuAdapter
    from mumu_core.bundle import load_bundle
    from mumu_core.commands.demo import ASSETS
    from mumu_training.shapes.pretrain import save_adapter
    from mumu_training.shapes.world import write_dataset

    model = ASSETS / "shapes_model"
    write_dataset(root / "world", 400, seed=123, progress=False)
    bundle = load_bundle(model / "mumu_shapes.safetensors")
    adapter = MumuAdapter(AdapterConfig.from_dict(bundle.config["adapter"]))
    adapter.load_state_dict(bundle.adapter)
    save_adapter(root / "adapter.safetensors", adapter)
    return {"model.vlm": model / "vlm", "model.sdxl": model / "sdxl",
            "model.adapter_init": root / "adapter.safetensors", "data.annotations": root / "world" / "boot"}


def run(root: Path, sets: dict, steps: int, processes: int) -> float:
    from mumu_training.shapes.reproduce import SHAPES_CONFIG, TRAIN_SCRIPT, stage1_launch

    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)
    if processes == 1:
        cmd, env = [sys.executable], dict(os.environ)
    else:
        cmd, env, processes = stage1_launch(processes)
    cmd = [*cmd, str(TRAIN_SCRIPT), "--config", str(SHAPES_CONFIG), "--output-dir", str(out),
           "--max-steps", str(steps)]
    for k, v in {**sets, "data.batch_size": GLOBAL_BATCH // processes,
                 "run.checkpoint_every": 0, "run.export_at_end": "false", "run.progress": "false",
                 "run.log_every": 5}.items():
        cmd += ["--set", f"{k}={v}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    if p.returncode:
        raise SystemExit(f"train.py failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows                     # the first interval holds warm-up
    return sum(r["step_time_s"] for r in timed) / len(timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    launches = {"baseline": 1, "2proc": 2}
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = prepare(root)
        for r in range(args.rounds):
            for name, processes in launches.items():
                s = run(root, sets, args.steps, processes)
                best[name] = min(best.get(name, s), s)
                print(f"round {r + 1} {name}: {s:.3f} s/step", flush=True)
    result = {"steps": args.steps, "global_batch": GLOBAL_BATCH,
              **{f"{k}_s_per_step": round(v, 3) for k, v in best.items()},
              **{f"speedup_{k}_vs_baseline": round(best["baseline"] / v, 2) for k, v in best.items() if k != "baseline"}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
