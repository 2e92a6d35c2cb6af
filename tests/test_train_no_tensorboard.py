"""The README's tiny training runs where tensorboard is not installed.

Without tensorboard, accelerate drops the "tensorboard" tracker and `get_tracker(..., unwrap=True)`
returns a blank GeneralTracker; validation used to call `add_image` on it and crash, leaving the
second process waiting at the barrier. Here a `sitecustomize` on PYTHONPATH makes `tensorboard`
(and tensorboardX) unimportable in every launched process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_e2e import tiny_train_root  # noqa: F401  (session fixture: the generated tiny dataset)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"
TINY_YAML = REPO / "training" / "configs" / "tiny.yaml"
STEPS = 2

NO_TENSORBOARD = """\
import sys
for _name in ("tensorboard", "tensorboardX", "pyarrow"):  # + the other [train] extra
    sys.modules[_name] = None  # `import tensorboard` raises ImportError; find_spec() returns None
"""


def test_tb_writer_is_none_for_accelerates_blank_tracker():
    from accelerate.tracking import GeneralTracker

    from mumu_training import train

    class FakeAccelerator:
        def __init__(self, tracker):
            self.tracker = tracker

        def get_tracker(self, name, unwrap=False):
            return self.tracker

    assert train._tb_writer(FakeAccelerator(GeneralTracker(_blank=True))) is None
    assert train._tb_writer(FakeAccelerator(object())) is None

    class SummaryWriter:  # the duck type of torch.utils.tensorboard's writer
        def add_image(self, *a, **k): ...
        def add_text(self, *a, **k): ...

    writer = SummaryWriter()
    assert train._tb_writer(FakeAccelerator(writer)) is writer


@pytest.mark.slow
def test_two_process_tiny_training_with_validation_runs_without_tensorboard(tmp_path, tiny_train_root):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_TENSORBOARD)
    check = subprocess.run([sys.executable, "-c", "import tensorboard"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(shim)))
    assert check.returncode != 0 and "import of tensorboard halted" in check.stderr  # the shim works

    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), "--config", str(TINY_YAML),
           "--output-dir", str(out), "--max-steps", str(STEPS),
           "--set", f"tiny.root={tiny_train_root}", "--set", "tiny.num_images=6",
           "--set", "data.overfit_one_batch=true", "--set", f"run.checkpoint_every={STEPS}",
           "--set", f"run.validate_every={STEPS}", "--set", "run.progress=false", "--set", "run.export_at_end=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "validation at step" not in proc.stderr  # validation itself ran, not just survived
    assert (out / "samples" / f"step-{STEPS:07d}" / "00.png").is_file()
    assert not list(out.rglob("events.out.tfevents.*"))
