"""Exact resume: N steps straight == N/2 steps, SIGKILL, `--resume latest` to N (losses and weights).

Real data path (length grouping on, gradient accumulation 2, conditioning dropout, augmentation),
so the data position, AdamW moments, LR warmup and noise draws all have to come back exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"
TINY_YAML = REPO / "training" / "configs" / "tiny.yaml"
N = 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_train_root(tmp_path_factory) -> Path:
    from mumu_training.config import load_config
    from mumu_training.tiny_data import ensure_tiny_assets

    root = tmp_path_factory.getbasetemp() / "train_tiny_root"
    ensure_tiny_assets(load_config(TINY_YAML, {"tiny.root": str(root), "tiny.num_images": 6}))
    return root


def _train(root: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY_YAML), "--output-dir", str(out), "--max-steps", str(N),
           "--set", f"tiny.root={root}", "--set", "tiny.num_images=6", "--set", "run.checkpoint_every=3",
           "--set", "run.validate_every=0", "--set", "run.progress=false", "--set", "run.export_at_end=false",
           "--set", "run.gradient_accumulation_steps=2", "--set", "optim.warmup_steps=4", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_killed_and_resumed_run_equals_straight_run(tiny_train_root, tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    p = _train(tiny_train_root, straight)
    assert p.returncode == 0, p.stderr[-4000:]

    p = _train(tiny_train_root, resumed, env={"MUMU_TRAIN_KILL_AFTER": str(N // 2)})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    assert [c.name for c in (resumed / "checkpoints").iterdir()] == [f"checkpoint-{N // 2:07d}"]
    p = _train(tiny_train_root, resumed, "--resume", "latest")
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stderr

    a, b = _losses(straight), _losses(resumed)
    assert [s for s, _ in a] == list(range(1, N + 1)) and [s for s, _ in b] == list(range(1, N + 1))
    assert [l for _, l in a] == [l for _, l in b]  # bit-identical on CPU
    wa = load_file(str(straight / "checkpoints" / f"checkpoint-{N:07d}" / "trainable.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / f"checkpoint-{N:07d}" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the LR warmup spans the kill: the resumed run continued it instead of restarting it
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr/adapter"] for r in rows] == [r["lr/adapter"] for r in rows_b]
    assert rows[0]["lr/adapter"] < rows[-1]["lr/adapter"]


def test_resume_path_must_be_a_checkpoint(tiny_train_root, tmp_path):
    p = _train(tiny_train_root, tmp_path / "x", "--resume", str(tmp_path), "--max-steps", "1")
    assert p.returncode == 2
    assert "not a checkpoint folder" in p.stderr and "Traceback" not in p.stderr


def test_two_process_resume_is_exact(tiny_train_root, tmp_path):
    """DDP (gloo): every rank SIGKILLed after checkpoint 2, resumed: per-rank RNG files, the DDP-wrapped
    model's load hook and the sharded data position all come back."""
    from safetensors.torch import load_file

    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), "--config", str(TINY_YAML),
              "--max-steps", "4", "--set", f"tiny.root={tiny_train_root}", "--set", "tiny.num_images=6",
              "--set", "run.checkpoint_every=2", "--set", "run.validate_every=0", "--set", "run.progress=false",
              "--set", "run.export_at_end=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")

    def go(out, *extra, **more):
        return subprocess.run([*launch, "--output-dir", str(out), *extra], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=dict(env, **more))

    a, b = tmp_path / "a", tmp_path / "b"
    assert go(a).returncode == 0
    assert go(b, MUMU_TRAIN_KILL_AFTER="2").returncode != 0
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["checkpoint-0000002"]
    p = go(b, "--resume", "latest")
    assert p.returncode == 0, p.stderr[-4000:]
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4
    wa = load_file(str(a / "checkpoints" / "checkpoint-0000004" / "trainable.safetensors"))
    wb = load_file(str(b / "checkpoints" / "checkpoint-0000004" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
