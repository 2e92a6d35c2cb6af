"""Throughput and padding counters of the training loop, reported once per logging interval.

Time spent saving checkpoints or rendering validation images is left out (`paused()`), so
samples/s measures training alone. Padding fractions compare the length-grouped batches with what
the same samples would have cost ungrouped.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from mumu_training.data import padding_fraction


class Throughput:
    def __init__(self, step: int, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._reset(step, time.perf_counter())

    def _reset(self, step: int, now: float) -> None:
        self.t_last, self.last_logged, self.paused_s = now, step, 0.0
        self.pad_grouped, self.pad_plain, self.tokens = [], [], 0

    def add_micro_batch(self, mb) -> None:
        """Count one micro-batch (a `GroupedLoader` batch: token lengths grouped and ungrouped)."""
        self.pad_grouped.append(padding_fraction(mb.lengths))
        self.pad_plain.append(padding_fraction(mb.ungrouped_lengths))
        self.tokens += sum(mb.lengths)

    @contextmanager
    def paused(self):
        """Time inside this block does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def interval(self, step: int) -> dict:
        """The interval's step time, samples/s, padding and tokens; starts the next interval."""
        now = time.perf_counter()
        per_step = (now - self.t_last - self.paused_s) / max(step - self.last_logged, 1)
        rec = {"step_time_s": per_step, "samples_per_s": self.samples_per_step / max(per_step, 1e-9),
               "padding_fraction": sum(self.pad_grouped) / len(self.pad_grouped),
               "padding_fraction_ungrouped": sum(self.pad_plain) / len(self.pad_plain), "tokens": self.tokens}
        self._reset(step, now)
        return rec
