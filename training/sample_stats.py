"""What the sample builder actually produced: kinds of prompt images, how often, target buckets.

The training loop feeds every micro-batch it trains on to `SampleStats.update`; each log line
(metrics.jsonl, TensorBoard) gets the interval's shares under ``data/`` and OUTPUT/sample_stats.json
keeps the run's running totals, so a run shows whether its prompts look like the paper's (about
30 % of stage-1 prompts with a control map, 70 % of person crops as heads, ~10 % dropped) and how
its targets spread over the aspect-ratio buckets.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable


class SampleStats:
    def __init__(self) -> None:
        self.interval = Counter()
        self.total = Counter()

    def update(self, samples: Iterable) -> None:
        c = Counter()
        for s in samples:
            c["samples"] += 1
            c["dropped"] += bool(s.dropped)
            c[f"bucket/{s.bucket or '%dx%d' % s.target.size}"] += 1
            c[f"images/{len(s.prompt.images)}"] += 1
            for info in s.conditioning:
                c[f"kind/{info.kind}"] += 1
                if info.kind == "edge":
                    c[f"control/{info.control or 'edge'}"] += 1
                if info.augmentations:
                    c["augmented"] += 1
            for what, n in (getattr(s, "filtered", None) or {}).items():
                c[f"too_small/{what}"] += n
        self.interval.update(c)
        self.total.update(c)

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """The interval's figures (then reset): shares of samples, except kind/* = images per sample."""
        c, self.interval = self.interval, Counter()
        n = c.get("samples", 0)
        if not n:
            return {}
        out = {f"{prefix}dropped_frac": c["dropped"] / n}
        for key, v in sorted(c.items()):
            if key.startswith(("bucket/", "control/", "images/")):
                out[f"{prefix}{key}"] = v / n            # share of samples
            elif key.startswith(("kind/", "too_small/")) or key == "augmented":
                out[f"{prefix}{key}_per_sample"] = v / n
        return out

    def summary(self) -> dict:
        """Running totals for sample_stats.json: counts, and the bucket histogram sorted by count."""
        t = self.total
        groups: dict[str, dict] = {}
        for key, v in t.items():
            if "/" in key:
                g, name = key.split("/", 1)
                groups.setdefault(g, {})[name] = v
        return {"samples": t.get("samples", 0), "dropped": t.get("dropped", 0), "augmented_images": t.get("augmented", 0),
                **{g: dict(sorted(d.items(), key=lambda kv: -kv[1])) for g, d in sorted(groups.items())}}

    def write(self, path, step: int) -> None:
        import json
        from pathlib import Path

        from mumu_core.atomic import atomic_write

        data = {"step": step, "since": "this process started (rank 0's samples)", **self.summary()}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def write_data_stats(out_dir, dataset, builder_cfg, bucket_ids=None, latent_cache=None) -> dict:
    """OUTPUT/data_stats.json at start-up: records, the dataset's bucket histogram, builder settings."""
    import json
    from pathlib import Path

    from mumu_core.atomic import atomic_write

    from .buckets import histogram

    control = getattr(dataset.builder, "control", None)
    data = {
        "records": len(dataset),
        "buckets": [b.name for b in builder_cfg.bucket_list],
        "bucket_histogram": histogram(bucket_ids) if bucket_ids is not None else {builder_cfg.bucket_list[0].name: len(dataset)},
        "target_crop": builder_cfg.target_crop,
        "min_crop_side_px": builder_cfg.min_side_px,
        "min_crop_rule": builder_cfg.min_crop_rule,
        "control_map_prob": builder_cfg.edge_map_prob if builder_cfg.stage == 1 else 0.0,
        "control_map_split": dict(control.weights) if control is not None else {},
        "sketch": control.sketch_source if control is not None else None,
        "latent_cache": str(latent_cache.dir) if latent_cache is not None else None,
    }
    path = Path(out_dir) / "data_stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
    return data
