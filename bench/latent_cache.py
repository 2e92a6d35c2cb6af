"""Training samples/s with the latent cache vs without, on the tiny config, measured in one run.

    python bench/latent_cache.py [--steps 6] [--rounds 2]

Runs training/train.py's loop (in this process, the real code path) on training/configs/tiny.yaml
with 4 generated images (an epoch is 2 steps): a short warm-up run, then per round one run without
the cache, one with a cold cache (its first epoch encodes and writes every target) and one with
the now warm cache, in an order that rotates between rounds. Per run the median step time of its
logged steps (the first, with warm-up, dropped); per configuration the best run (the machine is
shared: load only ever slows a run down):

  cached_vs_uncached    samples/s, warm cache / no cache       (> 1: the cache pays)
  first_epoch_overhead  step time, cold cache's first epoch / no cache (the price of filling it)

On the tiny models the VAE is a small share of a step (a 64 px target through an 8-16 channel
VAE), so the ratio stays near 1 here; at 1024² with SDXL's VAE the encode is a large share of a
GPU step. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


N_IMAGES = 4


def _run(train_mod, root: Path, out: Path, steps: int, cache_dir: Path | None) -> list[dict]:
    args = ["--config", str(REPO / "training" / "configs" / "tiny.yaml"), "--output-dir", str(out),
            "--max-steps", str(steps), "--set", f"tiny.root={root}", "--set", f"tiny.num_images={N_IMAGES}",
            "--set", "run.progress=false",
            "--set", "run.validate_every=0", "--set", "run.checkpoint_every=0", "--set", "run.export_at_end=false",
            "--set", "run.log_every=1", "--set", "data.num_workers=0"]
    if cache_dir is not None:
        args += ["--set", "data.latent_cache.enabled=true", "--set", f"data.latent_cache.dir={cache_dir}"]
    shutil.rmtree(out, ignore_errors=True)
    rc = train_mod.train(train_mod.parse_args(args))
    if rc != 0:
        raise SystemExit(f"training run failed (rc={rc})")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _step_time(metrics: list[dict], lo: int = 1, hi: int | None = None) -> float:
    """Median step time of a run's logged steps [lo, hi) (step 1 carries the run's warm-up)."""
    return statistics.median(m["step_time_s"] for m in metrics[lo:hi])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (an epoch is 2 steps)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import importlib.util

    spec = importlib.util.spec_from_file_location("mumu_train_script", REPO / "training" / "train.py")
    train_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_mod)

    tmp = Path(tempfile.mkdtemp(prefix="mumu_bench_latents_"))
    try:
        from mumu_training.config import load_config
        from mumu_training.tiny_data import ensure_tiny_assets

        root = tmp / "assets"
        cfg = load_config(REPO / "training" / "configs" / "tiny.yaml", {"tiny.root": str(root),
                                                                         "tiny.num_images": N_IMAGES})
        ensure_tiny_assets(cfg)
        from mumu_training.data import BatchPlan
        from mumu_training.annotation_dataset import AnnotationDataset

        d = cfg.data
        n = len(AnnotationDataset(d.annotations, image_root=d.image_root))
        epoch_steps = BatchPlan(n, d.batch_size, d.group_size, 1, 0, 0).epoch_len // (
            d.batch_size * cfg.run.gradient_accumulation_steps)  # 4 records -> 2 steps
        samples_per_step = d.batch_size * cfg.run.gradient_accumulation_steps
        _run(train_mod, root, tmp / "warmup", 2, None)  # first-run costs (lazy imports, thread pools)
        times = {"plain": [], "cold_first_epoch": [], "warm": []}
        for r in range(args.rounds):
            cache = tmp / f"cache{r}"
            order = ["plain", "cache"] if r % 2 == 0 else ["cache", "plain"]
            for what in order:
                if what == "plain":
                    times["plain"].append(_step_time(_run(train_mod, root, tmp / "plain", args.steps, None)))
                else:
                    cold = _run(train_mod, root, tmp / "cold", args.steps, cache)
                    times["cold_first_epoch"].append(_step_time(cold, 1, epoch_steps))
                    warm = _run(train_mod, root, tmp / "warm", args.steps, cache)
                    times["warm"].append(_step_time(warm))
                    print(f"round {r}: cold hit rates {[m.get('latent_cache/hit_rate') for m in cold]}, warm "
                          f"{[m.get('latent_cache/hit_rate') for m in warm]}", file=sys.stderr)
        best = {k: min(v) for k, v in times.items()}
        print(f"{'run (best of ' + str(args.rounds) + ')':<28}{'step s':>10}{'samples/s':>12}   all runs")
        for k, v in times.items():
            print(f"{k:<28}{best[k]:>10.3f}{samples_per_step / best[k]:>12.3f}   {[round(x, 3) for x in v]}")
        print(json.dumps({"cached_vs_uncached": round(best["plain"] / best["warm"], 3),
                          "first_epoch_overhead": round(best["cold_first_epoch"] / best["plain"], 3),
                          "uncached_samples_per_s": round(samples_per_step / best["plain"], 3),
                          "cached_samples_per_s": round(samples_per_step / best["warm"], 3),
                          "steps": args.steps, "rounds": args.rounds}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
