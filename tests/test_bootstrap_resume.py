"""Faults and scale: a SIGKILLed run resumes to byte-identical output; two accelerate processes
split the work units with no overlap and no gap (and produce the single-process bytes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mumu_training.bootstrap.records import shard_paths
from mumu_training.bootstrap.synthetic import make_examples, write_dataset

ARGS = ["--shard-size", "3", "--box-threshold", "0.3", "--min-box-area", "8000", "--max-boxes-per-image", "4",
        "--no-progress"]


@pytest.fixture(scope="session")
def tiny_detectors(tmp_path_factory):
    from mumu_training.bootstrap.tiny_detectors import write_tiny_detectors

    return write_tiny_detectors(tmp_path_factory.getbasetemp() / "tiny_detectors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("resume_data"), "jsonl", make_examples(10), per_unit=3)


def _env(**extra):
    # one thread per process: tiny models, and OpenMP spin-waits badly on a shared machine
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def _bootstrap(data, det, out, env=None):
    cmd = [sys.executable, "-m", "mumu_training.bootstrap", "--input", str(data), "--format", "jsonl",
           "--detector", str(det), "--out", str(out), *ARGS]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env or _env())


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every output file except the run log (the only file with timings)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "run_log.jsonl"}


def test_killed_run_resumes_to_identical_output(tmp_path, data, tiny_detectors):
    det = tiny_detectors["grounding_dino"]
    ref = _bootstrap(data, det, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = _snapshot(tmp_path / "ref")
    assert len(shard_paths(tmp_path / "ref")) == 6  # 17 inputs / 3 per shard

    out = tmp_path / "run"
    # 1) SIGKILL right after the 2nd shard is complete
    r = _bootstrap(data, det, out, _env(MUMU_BOOTSTRAP_FAULT="after_shard:2"))
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in shard_paths(out)] == ["000000.jsonl.gz", "000001.jsonl.gz"]
    assert not (out / "manifest.json").exists()
    # 2) resume, SIGKILL again with the next shard written to its temp name but not renamed
    r = _bootstrap(data, det, out, _env(MUMU_BOOTSTRAP_FAULT="before_rename:1"))
    assert r.returncode == -signal.SIGKILL
    assert len(shard_paths(out)) == 2, "a half-written shard must never appear under its final name"
    assert list((out / "shards").glob(".000002.jsonl.gz.*.tmp")), "the fault hit between write and rename"
    # 3) resume to the end
    r = _bootstrap(data, det, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list((out / "shards").glob(".*")), "temp files of killed runs are cleaned up"
    assert _snapshot(out) == expected
    log = [json.loads(l) for l in (out / "run_log.jsonl").read_text().splitlines()]
    assert log[-1]["units_already_complete"] == 2 and log[-1]["unit_indices"] == [2, 3, 4, 5]


def test_two_processes_split_units_without_overlap_or_gap(tmp_path, data, tiny_detectors):
    det = tiny_detectors["owlv2"]
    single = _bootstrap(data, det, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-2000:]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "mumu_training.bootstrap", "--input", str(data), "--format", "jsonl", "--detector", str(det),
           "--out", str(out), *ARGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(l) for l in (out / "run_log.jsonl").read_text().splitlines()]
    assert sorted(e["process"] for e in log) == [0, 1] and all(e["num_processes"] == 2 for e in log)
    units = {e["process"]: set(e["unit_indices"]) for e in log}
    assert units[0] and units[1] and not units[0] & units[1]
    assert units[0] | units[1] == set(range(6))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"{i:06d}.jsonl.gz" for i in range(6)]
    assert _snapshot(out) == _snapshot(tmp_path / "one")
