"""Test-only hooks of the training loop, switched on by environment variables; no-ops otherwise.

- MUMU_TRAIN_DIGESTS=1: each rank writes `digest-rank{R}.json` at the end with sha256 digests of
  its trainable weights (ranks must agree) and of the frozen weights before and after (must not move).
- MUMU_TRAIN_KILL_AFTER=N: every process SIGKILLs itself right after checkpoint N is complete
  (the resume tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from mumu_core.atomic import atomic_write


def digest(named) -> str:
    """sha256 over (name, fp32 bytes) of named tensors, in name order; DDP's `module.` prefix ignored."""
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda x: x[0]):
        h.update(name.removeprefix("module.").encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class RunHooks:
    def __init__(self, digests: bool = False, kill_after: str | None = None):
        self.digests, self.kill_after = digests, kill_after
        self.frozen_before = None

    @classmethod
    def from_env(cls) -> "RunHooks":
        return cls(digests=os.environ.get("MUMU_TRAIN_DIGESTS") == "1",
                   kill_after=os.environ.get("MUMU_TRAIN_KILL_AFTER"))

    def before_training(self, model) -> None:
        if self.digests:
            from mumu_training.model import frozen_named_parameters

            self.frozen_before = digest(frozen_named_parameters(model))

    def after_checkpoint(self, step: int) -> None:
        if self.kill_after == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_training(self, model, out_dir: Path, rank: int) -> None:
        if not self.digests:
            return
        from mumu_training.model import frozen_named_parameters, trainable_state_dict

        trained = [(n.removeprefix("module."), p) for n, p in trainable_state_dict(model).items()]
        text = json.dumps({"trainable": digest(trained), "frozen_before": self.frozen_before,
                           "frozen_after": digest(frozen_named_parameters(model))})
        atomic_write(Path(out_dir) / f"digest-rank{rank}.json", lambda tmp: Path(tmp).write_text(text))
