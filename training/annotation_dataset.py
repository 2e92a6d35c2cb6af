"""The training dataset: a bootstrap output folder (annotation shards + images) as a torch Dataset.

Each item is one `TrainingSample` built by `samples.SampleBuilder` from a record and its image, with
a per-sample RNG of (seed, epoch, index), so an epoch is reproducible and a resumed run sees what
an uninterrupted one saw.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch.utils.data

from mumu_core.errors import MumuError

from .bootstrap.imageio import ImageSkip, load_source_image
from .bootstrap.records import read_shard, shard_paths
from .buckets import Bucket
from .samples import SampleBuilder, SampleBuilderConfig, TrainingSample, sample_rng

log = logging.getLogger(__name__)


class AnnotationDataset(torch.utils.data.Dataset):
    """Map-style torch Dataset over a bootstrap output folder (or a list of shard files).

    Only per-shard record counts are held in memory; shards are decompressed on demand and the
    last ``shard_cache`` are kept, so memory stays flat for millions of records. With a global
    shuffle each access may decompress one small shard (``--shard-size`` records, ~ms).
    A record whose image cannot be read at train time is replaced by the next index (logged), so
    one vanished file does not stop a multi-day run.
    """

    def __init__(self, annotations: str | Path | Sequence[str | Path], config: SampleBuilderConfig | None = None,
                 seed: int = 0, image_root: str | Path | None = None, shard_cache: int = 8) -> None:
        self.builder = SampleBuilder(config)
        self.seed, self.epoch = int(seed), 0
        self._cache: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._cache_size = max(1, shard_cache)
        counts: list[int] | None = None
        if isinstance(annotations, (str, Path)) and Path(annotations).is_dir():
            root = Path(annotations)
            manifest = root / "manifest.json"
            if manifest.is_file():
                meta = json.loads(manifest.read_text())
                self.shards = [root / "shards" / s["name"] for s in meta["shards"]]
                counts = [int(s["records"]) for s in meta["shards"]]
                self.image_root = Path(image_root or meta["image_root"])
            else:
                self.shards = shard_paths(root)
                self.image_root = Path(image_root) if image_root else None
                run_cfg = root / "run_config.json"
                if self.image_root is None and run_cfg.is_file():
                    self.image_root = Path(json.loads(run_cfg.read_text())["image_root"])
        else:
            items = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
            self.shards = [Path(p) for p in items]
            self.image_root = Path(image_root) if image_root else None
        if not self.shards:
            raise MumuError(f"no annotation shards found in {annotations}. Run `mumu bootstrap --out DIR` first and "
                            f"pass DIR (it holds shards/*.jsonl.gz and manifest.json).")
        if counts is None:
            counts = [len(self._shard(i)) for i in range(len(self.shards))]
        self._offsets = np.cumsum([0] + counts).tolist()
        self.skipped_at_load = 0

    @property
    def config(self) -> SampleBuilderConfig:
        return self.builder.config

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._offsets[-1]

    def _shard(self, i: int) -> list[dict[str, Any]]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        records = read_shard(self.shards[i])
        self._cache[i] = records
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return records

    def record(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        s = bisect.bisect_right(self._offsets, index) - 1
        return self._shard(s)[index - self._offsets[s]]

    def record_bucket(self, record: dict[str, Any]) -> Bucket:
        """The target bucket of a record from its stored size (the square one when it has none)."""
        w, h = record.get("width"), record.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return self.config.bucket_for(w, h)
        return self.config.bucket_for(1, 1)  # no stored size (a foreign shard): the square bucket

    def bucket_ids(self) -> list[str]:
        """Per-record bucket name ("WxH"), streaming every shard
        once: what bucket-aware batching (data.BatchPlan) groups by without loading an image."""
        from .bootstrap.records import iter_shard

        out: list[str] = []
        for shard in self.shards:
            for rec in iter_shard(shard):
                out.append(self.record_bucket(rec).name)
        if len(out) != len(self):
            raise MumuError(f"the shards hold {len(out)} records but the manifest lists {len(self)}; the "
                            f"annotation folder changed after loading — reload the dataset.")
        return out

    def sample_weights(self, person_weight: float = 2.0) -> list[float]:
        """Per-record weights for torch's WeightedRandomSampler: records with a person crop get
        `person_weight`, others 1.0 (the paper biases sampling toward people; its ratio is NS).
        Reads every shard once, streaming."""
        from .bootstrap.records import iter_shard

        weights: list[float] = []
        for shard in self.shards:
            for rec in iter_shard(shard):
                weights.append(person_weight if any(c.get("person") for c in rec.get("crops", [])) else 1.0)
        if len(weights) != len(self):
            raise MumuError(f"the shards hold {len(weights)} records but the manifest lists {len(self)}; the "
                            f"annotation folder changed after loading — reload the dataset.")
        return weights

    def __getitem__(self, index: int) -> TrainingSample:
        n = len(self)
        # the bucket is the requested record's, also when an unreadable image is replaced by the next
        # record: bucket-aware batches (data.BatchPlan) stay single-size
        bucket = self.record_bucket(self.record(int(index) % n))
        for attempt in range(min(n, 16)):
            i = (int(index) + attempt) % n
            rec = self.record(i)
            try:
                image = load_source_image(rec["source"], self.image_root)
            except ImageSkip as exc:
                self.skipped_at_load += 1
                log.warning("skipping record %s at train time: %s", rec.get("id"), exc)
                continue
            return self.builder.build(rec, image, sample_rng(self.seed, self.epoch, index), bucket=bucket)
        raise MumuError(f"16 consecutive records from index {index} have unreadable images; check image_root "
                        f"({self.image_root}) — pass image_root= if the images moved since bootstrapping.")
