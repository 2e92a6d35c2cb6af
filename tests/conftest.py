"""Shared fixtures. Everything runs offline on tiny models written by `mumu_core.tiny`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny components (`mumu tiny` without detectors), written once per test session."""
    from mumu_core.tiny import write_tiny_components

    return write_tiny_components(tmp_path_factory.mktemp("tiny"), detectors=False)


@pytest.fixture(scope="session")
def tiny_encoder(tiny):
    from mumu_core.encoder import MumuEncoder

    return MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"])


def run_mumu(*args: str, timeout: int = 600):
    """Run the real `mumu` CLI in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "mumu_core.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """For modules of thousands of tiny tensor ops (`pytestmark = pytest.mark.usefixtures(...)`):
    OpenMP workers spinning on a loaded 2-core box cost far more than they save."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
