"""Training loop throughput vs a bare hand-written loop, padding with/without length grouping, 2 vs 1 process.

    python bench/train_throughput.py [--steps 24] [--rounds 2]

All on the tiny offline components and a generated, bootstrapped dataset (created in a temp dir):
- ours: `training/train.py` (accelerate, length grouping, logging, tqdm off) in a subprocess;
  samples/s from its per-step wall times, after warm-up steps; also with grouping off, which
  isolates the loop's overhead from grouping's gain
- bare: the same models (training.model.build_components), the same dataset and sample builder,
  a plain DataLoader, forward/backward/AdamW with no accelerate, no grouping, no logging, in a
  subprocess of its own; rounds alternate ours/bare and the best round of each counts (shared machine)
- padding: the VLM sequence padding fraction of stage-1 prompts (paper: up to 4 images x 324
  tokens) with and without length grouping (batch 4, groups of 16 micro-batches), from the real
  sample builder and tokenizer
- scaling: samples/s of 2 CPU processes (gloo DDP) / 1 process, same per-process batch
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "training" / "configs" / "tiny.yaml"
WARMUP = 3


def _settings(root: Path, batch: int) -> list[str]:
    return ["--set", f"tiny.root={root}", "--set", f"data.batch_size={batch}", "--set", "data.group_size=4",
            "--set", "run.validate_every=0", "--set", "run.checkpoint_every=0", "--set", "run.export_at_end=false",
            "--set", "run.progress=false", "--set", "run.log_every=1", "--set", "data.sample.cond_dropout_prob=0.1"]


def run_ours(root: Path, out: Path, steps: int, batch: int, procs: int = 1, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    if procs == 1:
        cmd = [sys.executable, str(REPO / "training" / "train.py")]
        env = dict(os.environ)
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "training" / "train.py")]
        env = dict(os.environ, ACCELERATE_USE_CPU="1")
    cmd += ["--config", str(TINY_YAML), "--output-dir", str(out), "--max-steps", str(steps), *_settings(root, batch),
            *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if p.returncode:
        raise SystemExit(f"train.py failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[WARMUP:]
    return sum(batch * procs for _ in timed) / sum(r["step_time_s"] for r in timed)


BARE = r"""
import json, sys, time, torch
from mumu_training.config import load_config, sample_builder_config
from mumu_training.model import build_components
from mumu_training.annotation_dataset import AnnotationDataset
from mumu_training.samples import collate_samples
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
steps, batch = int(sys.argv[3]), cfg.data.batch_size
c = build_components(cfg, "cpu", torch.float32)
model, vae, sched = c.model, c.vae, c.noise_scheduler
bcfg = sample_builder_config(cfg)
ds = AnnotationDataset(cfg.data.annotations, bcfg, seed=0)
loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate_samples, drop_last=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
model.train()
times, it, r = [], iter(loader), bcfg.resolution
for step in range(steps):
    t0 = time.perf_counter()
    try:
        samples = next(it)
    except StopIteration:
        it = iter(loader); samples = next(it)
    inputs = model.encoder.prepare([s.prompt for s in samples])
    pixels = torch.stack([s.target_tensor() for s in samples])
    time_ids = torch.tensor([[*s.original_size, 0, 0, r, r] for s in samples], dtype=torch.float32)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],))
    pred = model(inputs, sched.add_noise(latents, noise, t), t, time_ids)
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({"samples_per_s": batch * len(times[%d:]) / sum(times[%d:])}))
""" % (WARMUP, WARMUP)


def run_bare(root: Path, steps: int, batch: int) -> float:
    overrides = {"tiny.root": str(root), "data.batch_size": batch}
    p = subprocess.run([sys.executable, "-c", BARE, str(TINY_YAML), json.dumps(overrides), str(steps)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    if p.returncode:
        raise SystemExit(f"bare loop failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["samples_per_s"]


def padding_report(root: Path, n_micro: int = 256) -> dict:
    """Stage-1 token counts (324 per image) through the real builder + tokenizer, no models."""
    from transformers import AutoTokenizer

    from mumu_core.vlm import FAMILIES
    from mumu_training.data import GroupedLoader, PromptLength, padding_fraction
    from mumu_training.annotation_dataset import AnnotationDataset
    from mumu_training.samples import SampleBuilderConfig

    fam = FAMILIES["idefics2"]
    tok = AutoTokenizer.from_pretrained(root / "components" / "vlm")
    ds = AnnotationDataset(root / "boot", SampleBuilderConfig(stage=1, resolution=64), seed=0)
    length = PromptLength(tok, fam.image_prefix, fam.image_suffix)
    out = {}
    for grouped in (True, False):
        loader = GroupedLoader(ds, length, batch_size=4, group_size=16, world_size=1, rank=0, seed=0,
                               group_by_length=grouped)
        it = loader.iterate(0)
        fr = [padding_fraction(next(it).lengths) for _ in range(n_micro)]
        out["grouped" if grouped else "ungrouped"] = statistics.fmean(fr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="mumu_train_bench_"))
    try:
        from mumu_training.config import load_config
        from mumu_training.tiny_data import ensure_tiny_assets

        root = tmp / "tiny"
        t0 = time.perf_counter()
        ensure_tiny_assets(load_config(TINY_YAML, {"tiny.root": str(root)}))
        print(f"tiny assets + bootstrap: {time.perf_counter() - t0:.1f} s", flush=True)
        ours, plain, bare = [], [], []
        for r in range(args.rounds):
            ours.append(run_ours(root, tmp / "ours", args.steps, args.batch))
            # the same loop without length grouping: the loop's own overhead, grouping's gain aside
            plain.append(run_ours(root, tmp / "plain", args.steps, args.batch, 1, "--set", "data.group_by_length=false"))
            bare.append(run_bare(root, args.steps, args.batch))
            print(f"round {r}: ours {ours[-1]:.2f}, ours without grouping {plain[-1]:.2f}, bare {bare[-1]:.2f} "
                  f"samples/s", flush=True)
        one = max(ours)
        two = run_ours(root, tmp / "ddp2", args.steps, args.batch, procs=2)
        print(f"2 processes: {two:.2f} samples/s (1 process: {one:.2f})", flush=True)
        pad = padding_report(root)
        print(f"stage-1 padding fraction: grouped {pad['grouped']:.3f}, ungrouped {pad['ungrouped']:.3f}", flush=True)
        result = {
            "ours_samples_per_s": round(one, 3), "bare_samples_per_s": round(max(bare), 3),
            "ours_vs_bare": round(one / max(bare), 3),
            "ours_ungrouped_vs_bare": round(max(plain) / max(bare), 3),
            "padding_fraction_grouped": round(pad["grouped"], 4), "padding_fraction_ungrouped": round(pad["ungrouped"], 4),
            "samples_per_s_2proc": round(two, 3), "scaling_2proc_vs_1proc": round(two / one, 3),
            "cpu_count": os.cpu_count(), "steps": args.steps, "batch_per_process": args.batch,
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
