"""Length-grouped, resumable batches of training samples for one process.

Why not a plain DataLoader: a MUMU prompt's VLM sequence length depends on how many crops the
sample builder drew (0-4 images x 324 tokens + text), so random batches pad a lot and the LLM
and adapter waste compute on padding. Lengths are only known after a sample is built, so we
build a *megabatch* of `group_size` micro-batches, sort it by true token length and cut it into
micro-batches (the megabatch-sort trick of HF's LengthGroupedSampler, on exact lengths), then
shuffle the micro-batch order so steps do not sweep from short to long.

Position is a single integer, the global micro-batch index: megabatch m = micro // group_size
holds dataset indices from a permutation fixed by (seed, epoch), cut into world_size-interleaved
slices, so process r and a resumed run compute the same megabatch without any saved sampler
state. Samples are reproducible too (the builder's RNG is (seed, epoch, index)).

Workers (torch DataLoader over megabatch ids) build samples, the expensive PIL part, in the
background; prompts are tokenized for their lengths there as well.

Aspect-ratio buckets (training/buckets.py): targets of one micro-batch must share a size. Given
each record's bucket (`AnnotationDataset.bucket_ids()`, from the stored image sizes), the epoch
order is regrouped into bucket-pure runs (a bucket's last partial run is filled with its own
records again), the runs are shuffled, and whole runs make up the megabatches; the length sort
then orders by (bucket, length), so every micro-batch stays within one bucket and is still
length-grouped. A run is a whole per-process megabatch (`batch_size x group_size`, so length
grouping works as well as without buckets) when that repeats at most 5 % of the records, else one
micro-batch (small datasets). The few runs beyond the fixed epoch length are dropped (different
ones each epoch). With a single bucket the order is exactly the plain one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch.utils.data

from mumu_core.errors import MumuError


@dataclass
class MicroBatch:
    index: int                 # global micro-batch index (the data position)
    epoch: int
    samples: list              # list[TrainingSample], sorted by length when grouping
    lengths: list[int]         # VLM tokens per sample
    ungrouped_lengths: list[int]  # what this micro-batch would hold without grouping (for the padding report)


def padding_fraction(lengths: Sequence[int]) -> float:
    """Share of a right-padded [B, max_len] batch that is padding."""
    if not lengths:
        return 0.0
    m = max(lengths)
    return float(sum(m - x for x in lengths)) / float(m * len(lengths))


class PromptLength:
    """Exact VLM token count of a prompt (picklable: runs in DataLoader workers)."""

    def __init__(self, tokenizer, image_prefix: Sequence[str], image_suffix: Sequence[str], image_token: str = "<image>"):
        self.tokenizer = tokenizer
        self.prefix, self.suffix, self.image_token = "".join(image_prefix), "".join(image_suffix), image_token

    def __call__(self, prompt) -> int:
        text = prompt.expand(lambda im: self.prefix + self.image_token * im.tokens_per_image + self.suffix)
        return max(1, len(self.tokenizer(text, add_special_tokens=True)["input_ids"]))


class _Megabatches(torch.utils.data.Dataset):
    def __init__(self, plan: "BatchPlan", dataset, length_fn):
        self.plan, self.dataset, self.length_fn = plan, dataset, length_fn

    def __len__(self) -> int:  # effectively unbounded; the loop decides when to stop
        return 2**62

    def __getitem__(self, m: int):
        epoch, indices = self.plan.megabatch_indices(m)
        self.dataset.set_epoch(epoch)
        samples = [self.dataset[int(i)] for i in indices]
        lengths = [self.length_fn(s.prompt) for s in samples]
        return m, epoch, samples, lengths


class BatchPlan:
    """Which dataset indices each (process, megabatch) gets; pure arithmetic on (seed, epoch)."""

    def __init__(self, n_records: int, batch_size: int, group_size: int, world_size: int, rank: int, seed: int,
                 weights: Sequence[float] | None = None, buckets: Sequence[str] | None = None):
        if n_records < 1:
            raise MumuError("the annotation dataset holds no records; bootstrap some images first.")
        self.n, self.b, self.g, self.w, self.rank, self.seed = n_records, batch_size, group_size, world_size, rank, seed
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.buckets = None
        if buckets is not None:
            if len(buckets) != n_records:
                raise MumuError(f"{len(buckets)} bucket ids for {n_records} records; reload the dataset.")
            names, codes = np.unique(np.asarray(list(buckets), dtype=object).astype(str), return_inverse=True)
            if len(names) > 1:  # one bucket: nothing to regroup
                self.buckets = codes.astype(np.int64)
                counts = np.bincount(self.buckets)
                mega = batch_size * group_size
                self.run = mega if int(np.sum((-counts) % mega)) <= 0.05 * n_records else batch_size
        per_mega = batch_size * group_size * world_size
        # small datasets repeat within an epoch so every process always gets a full megabatch
        self.epoch_len = max(per_mega, (n_records // per_mega) * per_mega)
        self.megabatches_per_epoch = self.epoch_len // per_mega

    def epoch_order(self, epoch: int) -> np.ndarray:
        # memoised: a permutation of millions of records costs ~50 ms, a megabatch needs one slice
        cached = getattr(self, "_order", None)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 7919]))
        if self.weights is not None:  # biased sampling (paper: toward people), with replacement
            order = rng.choice(self.n, size=self.epoch_len, replace=True, p=self.weights / self.weights.sum())
        else:
            reps = -(-self.epoch_len // self.n)
            order = np.concatenate([rng.permutation(self.n) for _ in range(reps)])[: self.epoch_len]
        if self.buckets is not None:
            order = self._bucket_runs(order, rng)
        self._order = (epoch, order)
        return order

    def _bucket_runs(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Regroup into shuffled bucket-pure runs (self.run samples), cut to the epoch length."""
        b = self.run
        codes = self.buckets[order]
        runs = []
        for c in np.unique(codes):
            members = order[codes == c]  # keeps the shuffled order inside the bucket
            short = (-len(members)) % b
            if short:
                members = np.concatenate([members, np.resize(members, short)])
            runs.extend(members.reshape(-1, b))
        picked = rng.permutation(len(runs))[: self.epoch_len // b]
        return np.concatenate([runs[int(i)] for i in picked])

    def megabatch_indices(self, m: int) -> tuple[int, np.ndarray]:
        epoch, k = divmod(m, self.megabatches_per_epoch)
        size = self.b * self.g
        start = (k * self.w + self.rank) * size
        return epoch, self.epoch_order(epoch)[start : start + size]


class GroupedLoader:
    """Iterate micro-batches from a global micro-batch index on; `group_by_length` off = plain order."""

    def __init__(self, dataset, length_fn, *, batch_size: int, group_size: int, world_size: int, rank: int,
                 seed: int, group_by_length: bool = True, num_workers: int = 0, weights=None, buckets=None):
        """`buckets`: per-record bucket ids (AnnotationDataset.bucket_ids()) for size-pure micro-batches."""
        self.dataset, self.length_fn = dataset, length_fn
        self.plan = BatchPlan(len(dataset), batch_size, group_size, world_size, rank, seed, weights, buckets)
        self.batch_size, self.group_size, self.group_by_length = batch_size, group_size, group_by_length
        self.num_workers, self.seed = num_workers, seed

    def _split(self, m: int, epoch: int, samples: list, lengths: list[int]) -> list[MicroBatch]:
        b, g = self.batch_size, self.group_size
        plain = [lengths[i * b : (i + 1) * b] for i in range(g)]
        order = list(range(len(samples)))
        if self.group_by_length:  # within a bucket: each bucket holds whole micro-batches (BatchPlan)
            order.sort(key=lambda i: (getattr(samples[i], "bucket", ""), lengths[i]))
        chunks = [order[i * b : (i + 1) * b] for i in range(g)]
        if self.group_by_length:  # step order stays random; only the membership is length-sorted
            perm = np.random.default_rng(np.random.SeedSequence([self.seed, m, 104729])).permutation(g)
            chunks = [chunks[int(j)] for j in perm]
        return [MicroBatch(m * g + j, epoch, [samples[i] for i in c], [lengths[i] for i in c], plain[j])
                for j, c in enumerate(chunks)]

    def iterate(self, start_micro: int = 0) -> Iterator[MicroBatch]:
        first_m, skip = divmod(start_micro, self.group_size)
        mega = _Megabatches(self.plan, self.dataset, self.length_fn)
        sampler = _Counting(first_m)
        loader = torch.utils.data.DataLoader(
            mega, batch_size=None, sampler=sampler, num_workers=self.num_workers,
            collate_fn=_identity, persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
        )
        for m, epoch, samples, lengths in loader:
            for mb in self._split(m, epoch, samples, lengths)[skip:]:
                yield mb
            skip = 0


def _identity(x):
    return x


class _Counting(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        m = self.start
        while True:
            yield m
            m += 1
