"""Reproduce the shapes-world result from nothing: world -> stage 0 -> MUMU stage 1 -> probe -> eval.

    python -m mumu_training.shapes reproduce --out runs/shapes            # ~2 hours on 2 CPU cores (printed up front)
    python -m mumu_training.shapes reproduce --out runs/shapes --quick    # a minute: the plumbing only
    python -m mumu_training.shapes ship --model runs/shapes/model         # install it as the package default

Every step writes its result atomically and is skipped when rerun, and the long steps checkpoint
as they go, so an interrupted run resumes where it stopped (rerun the same command). Steps:

  1. world       20k training scenes: caption folder + annotation shards (ground-truth phrase boxes)
  2. vlm         the Idefics2-topology VLM, its image path briefly pretrained to describe world crops
                 (vlm_pretrain.py: the toy's stand-in for Idefics2's pretraining; MUMU then trains its LoRA)
  3. stage 0     VAE, then the SDXL-topology UNet text-to-image on captions (pretrain.py; with
                 --stage0-grounding-weight, each object's phrase grounded in its box: ~50 min, not 35)
  4. stage 1     the MUMU recipe through training/train.py + training/configs/shapes.yaml, exported
                 by training/export.py into an ordinary bundle (OUT/stage1), then continued from that
                 bundle at half the learning rates, Plan.stage1_more_rounds times (OUT/stage1_more,
                 OUT/stage1_more2: warm restarts, a longer stage 1 on a budget); optionally as
                 data-parallel processes of one thread each (--stage1-processes N)
  5. model       OUT/model: vlm/ + sdxl/ + mumu_shapes.safetensors (+ probe) — what `mumu eval`,
                 `mumu demo` and the package ship
  6. probe       the attribute probe, trained on ground-truth renders through the VAE; then the
                 stage-0 text check (text_check.py: does the stage-0 UNet draw the colours a caption
                 names? OUT/stage0/text_check.json)
  7. eval        `mumu eval --model OUT/model` (table + JSON, OUT/eval/)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TRAIN_SEED = 0            # training scenes: SeedSequence([0, i]); probe and eval use their own seeds
SHAPES_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
BUNDLE_NAME = "mumu_shapes.safetensors"


@dataclass
class Plan:
    scenes: int = 20_000
    vlm_steps: int = 500
    vae_steps: int = 600
    t2i_steps: int = 3000
    stage1_steps: int = 2000
    batch: int = 32              # stage 0's text-to-image batch (the VAE's is half)
    stage1_batch: int = 32       # global, over stage1_processes (train.py's data.batch_size is per process)
    # data-parallel CPU processes of 1 thread each for the MUMU stage (stage1_launch): on 2 cores only
    # 1.05-1.14x faster per step than one 2-thread process (bench/shapes_stage1_speed.py): not the default
    stage1_processes: int = 1
    eval_n: int = 256
    eval_steps: int = 10
    probe_scenes: int = 8000
    probe_epochs: int = 8
    text_check_n: int = 96
    stage0_grounding_weight: float = 0.0   # PretrainConfig.t2i_grounding_weight (run 12: 0.01)
    # stage 1 continued from its own bundle, stage1_more_rounds times, each from the previous bundle
    # with the next seed (data order): a warm restart of the cosine at the config's learning rates x
    # stage1_more_lr_scale, in twice as many steps of half the batch (run 14, 1,000 steps of 32: 35.4 ->
    # 41.8 % cross-image per object; run 16, 2,000 of 16: 46.0 %; run 17, a second round: 51.9 %, but
    # the whole command then overruns its 2 hours)
    stage1_more_steps: int = 2000
    stage1_more_batch: int = 16
    stage1_more_lr_scale: float = 0.5
    stage1_more_rounds: int = 1
    # measured on 2 cores (minutes), printed up front; stage 1 from 50-60-step runs alone with the
    # grounding recorder that reuses the layers' q/k (1.14 s per batch-32 step, 0.65 s per batch 16)
    minutes: tuple = (("world", 1), ("vlm", 1), ("stage 0 VAE", 2.5), ("stage 0 UNet", 35), ("stage 1 MUMU", 39),
                      ("stage 1 continued", 23), ("probe", 1.7), ("eval", 7))


QUICK = Plan(scenes=64, vlm_steps=3, vae_steps=4, t2i_steps=4, stage1_steps=3, stage1_more_steps=2,
             stage1_more_batch=2, stage1_more_rounds=2, batch=4, stage1_batch=6, stage1_processes=2, eval_n=8,
             eval_steps=2, probe_scenes=64,
             probe_epochs=1, text_check_n=4, stage0_grounding_weight=0.01,   # every code path runs
             minutes=(("all", 1.5),))


def expected_minutes(plan: Plan) -> list[tuple[str, float]]:
    """plan.minutes with the continued stage 1 counted once per round (none when it is off)."""
    rounds = plan.stage1_more_rounds if plan.stage1_more_steps else 0
    return [(k, m * rounds if k == "stage 1 continued" else m) for k, m in plan.minutes
            if rounds or k != "stage 1 continued"]


def _say(msg: str) -> None:
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def reproduce(out: Path, plan: Plan, progress: bool = True, run_eval: bool = True) -> dict:
    from .components import TOKENS_PER_IMAGE, write_vlm
    from .pretrain import PretrainConfig, train_text_to_image, train_vae
    from .world import WorldConfig, write_dataset

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    minutes = expected_minutes(plan)
    total = sum(m for _, m in minutes)
    _say(f"reproducing the shapes world into {out}; expected time on 2 CPU cores: about {total:.0f} min "
         f"({', '.join(f'{k} {m:g}' for k, m in minutes)}). Rerun the same command to resume.")
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
    world_cfg = WorldConfig()
    t0 = time.perf_counter()

    _say("1/7 world")
    write_dataset(out / "world", plan.scenes, TRAIN_SEED, world_cfg, progress=progress)
    _say("2/7 VLM")
    vlm_dir = out / "components" / "vlm"
    if not (vlm_dir / "config.json").is_file():
        from .pretrain import _save_atomic_dir
        from .vlm_pretrain import VlmPretrainConfig, pretrain_vlm

        def build_vlm(tmp: Path) -> None:  # random init, then the image path learns to describe crops
            write_vlm(tmp)
            pretrain_vlm(tmp, world_cfg, VlmPretrainConfig(steps=plan.vlm_steps), TOKENS_PER_IMAGE, progress)

        _save_atomic_dir(vlm_dir, build_vlm)
    _say("3/7 stage 0 (VAE, text-to-image UNet)")
    pre = PretrainConfig(vae_steps=plan.vae_steps, t2i_steps=plan.t2i_steps, vae_batch=max(1, plan.batch // 2),
                         t2i_batch=plan.batch, t2i_grounding_weight=plan.stage0_grounding_weight)
    vae = train_vae(out / "stage0", pre, world_cfg, progress=progress)
    adapter_shape = _stage1_adapter_shape()
    train_text_to_image(out / "stage0", vlm_dir, out / "world" / "boot", vae, pre, adapter_shape, progress=progress)
    _say("4/7 stage 1 (MUMU recipe via training/train.py, then continued from its bundle)")
    bundle = run_stage1(out, plan)
    _say("5/7 model folder")
    model = assemble_model(out, bundle)
    _say("6/7 attribute probe")
    from .probe import train_probe

    from .probe import ProbeConfig

    train_probe(model / "probe.safetensors", vae_dir=model / "sdxl" / "vae", scenes=plan.probe_scenes,
                cfg=ProbeConfig(epochs=plan.probe_epochs), progress=progress)
    from .text_check import text_check

    checked = text_check(out, model / "probe.safetensors", n=plan.text_check_n, steps=plan.eval_steps)
    _say(f"stage-0 text check: the colour a caption names, per object: "
         f"{checked['objects_2_3']['colour']['p']:.1%} (2-3 objects), {checked['object_1']['colour']['p']:.1%} (1 object)")
    summary = {"out": str(out), "model": str(model), "minutes": round((time.perf_counter() - t0) / 60, 1),
               "stage0_text_check": {k: checked[k]["colour"] for k in ("objects_2_3", "object_1")}}
    if run_eval:
        _say("7/7 eval")
        summary["eval"] = run_mumu_eval(model, out / "eval", plan)
    (out / "reproduce_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _shapes_config() -> dict:
    import yaml

    return yaml.safe_load(SHAPES_CONFIG.read_text())


def _stage1_adapter_shape() -> dict:
    return dict(_shapes_config()["model"]["adapter"])


def run_stage1(out: Path, plan: Plan) -> Path:
    """The MUMU stage: training/train.py on configs/shapes.yaml, then plan.stage1_more_rounds times, for
    plan.stage1_more_steps each, the same config again starting from the previous run's bundle
    (model.init_from) at scaled learning rates, plan.stage1_more_batch and the next seed (data order),
    into OUT/stage1_more, OUT/stage1_more2, ... Every run writes an ordinary bundle; -> the last one."""
    bundle = _train_stage1(out, out / "stage1", plan.stage1_steps, plan, plan.stage1_batch, {})
    if not plan.stage1_more_steps:
        return bundle
    optim = _shapes_config()["optim"]
    for rnd in range(1, plan.stage1_more_rounds + 1):
        more = {"model.init_from": bundle, "run.seed": rnd}
        more.update({f"optim.{k}": float(optim[k]) * plan.stage1_more_lr_scale
                     for k in ("lr_vlm_lora", "lr_adapter", "lr_unet_lora")})
        run_dir = out / ("stage1_more" if rnd == 1 else f"stage1_more{rnd}")
        bundle = _train_stage1(out, run_dir, plan.stage1_more_steps, plan, plan.stage1_more_batch, more)
    return bundle


def _train_stage1(out: Path, run_dir: Path, steps: int, plan: Plan, batch: int, extra: dict) -> Path:
    """training/train.py in child processes (their own accelerate state); resumes, skips when done.
    `batch` is the global batch, split over the stage1_launch processes."""
    bundle = run_dir / "mumu_bundle.safetensors"
    if bundle.is_file() and (run_dir / "done.json").is_file():
        return bundle
    launcher, env, processes = stage1_launch(plan.stage1_processes)
    if batch % processes:
        raise ValueError(f"a stage-1 batch of {batch} does not split over {processes} processes; "
                         f"pick a multiple of {processes}")
    sets = {"model.vlm": out / "components" / "vlm", "model.sdxl": out / "stage0" / "sdxl",
            "model.adapter_init": out / "stage0" / "adapter.safetensors",
            "data.annotations": out / "world" / "boot", "data.batch_size": batch // processes, **extra}
    cmd = [*launcher, str(TRAIN_SCRIPT), "--config", str(SHAPES_CONFIG), "--output-dir", str(run_dir),
           "--max-steps", str(steps), "--resume", "latest"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    subprocess.run(cmd, check=True, env=env)
    (run_dir / "done.json").write_text(json.dumps({"steps": steps, "processes": processes}))
    return bundle


def stage1_launch(processes: int) -> tuple[list[str], dict, int]:
    """How to start train.py: (command prefix, environment, processes).

    On a CPU, `processes` data-parallel workers (accelerate, gloo) of one thread each, one per core,
    the trainer's multi-GPU path on CPU processes (2 on 2 cores: 1.05-1.14x one 2-thread process,
    bench/shapes_stage1_speed.py). With a GPU: one process on it."""
    import torch

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if processes <= 1 or torch.cuda.is_available():
        return [sys.executable], env, 1
    threads = max(1, (os.cpu_count() or processes) // processes)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
             "--num_machines", "1", "--dynamo_backend", "no"], env, processes)


def assemble_model(out: Path, bundle: Path) -> Path:
    """OUT/model: the folder `mumu eval` / `mumu demo` read and the package ships.

    Every weight file is stored in fp16 to fit the package (about 23 MB instead of 45); `mumu`
    loads them back in fp32 on a CPU, and the shipped model is the one the eval measures.
    """
    from .pretrain import _save_atomic_dir

    model = out / "model"
    if (model / BUNDLE_NAME).is_file():
        return model

    def build(tmp: Path) -> None:
        shutil.copytree(out / "components" / "vlm", tmp / "vlm")
        shutil.copytree(out / "stage0" / "sdxl", tmp / "sdxl")
        shutil.copy2(bundle, tmp / BUNDLE_NAME)
        for f in sorted(tmp.rglob("*.safetensors")):
            store_fp16(f)
        card = {"what": "MUMU trained on the procedural shapes world (a toy world, not SDXL)",
                "reproduce": "python -m mumu_training.shapes reproduce --out runs/shapes",
                "plan": json.loads((out / "plan.json").read_text())}
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2))

    _save_atomic_dir(model, build)
    return model


def store_fp16(path: Path) -> None:
    """Rewrite a safetensors file with its fp32 tensors in fp16 (metadata kept), atomically."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mumu_core.atomic import atomic_write

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def run_mumu_eval(model: Path, eval_dir: Path, plan: Plan) -> dict:
    cmd = [sys.executable, "-m", "mumu_core.cli", "eval", "--model", str(model), "--out", str(eval_dir),
           "--n", str(plan.eval_n), "--steps", str(plan.eval_steps)]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(res.stdout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mumu_training.shapes",
                                description="The shapes world: MUMU trained and measured on a CPU.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reproduce", help="world -> stage 0 -> stage 1 -> probe -> eval, resumable")
    r.add_argument("--out", default="runs/shapes", help="output folder (rerun to resume)")
    r.add_argument("--quick", action="store_true", help="tiny step counts: checks the plumbing in about a minute")
    r.add_argument("--no-eval", action="store_true", help="stop after the probe")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--stage1-more-rounds", type=int, default=None, metavar="N",
                   help="continue the MUMU stage N times from its own bundle, ~23 min each (default 1; "
                        "2 overruns the 2-hour budget; run 17 measured a second round)")
    r.add_argument("--stage1-processes", type=int, default=None, metavar="N",
                   help="data-parallel CPU processes for the MUMU stage, one thread each (default 1; on 2 "
                        "cores 2 are only 1.05-1.14x faster: bench/shapes_stage1_speed.py)")
    r.add_argument("--stage0-grounding-weight", type=float, default=None, metavar="W",
                   help="grounding loss on each object's phrase in stage 0 (run 12 used 0.01; default off)")
    s = sub.add_parser("ship", help="install a trained model into the package (mumu_core/assets/shapes_model), "
                                    "its UNet LoRA fused to fit the 25 MiB budget (ship.py)")
    s.add_argument("--model", required=True, help="a shapes model folder, e.g. runs/shapes/model")
    s.add_argument("--to", default=None, help="destination (default: the package's mumu_core/assets/shapes_model)")
    args = p.parse_args(argv)
    if args.command == "ship":
        from mumu_core.errors import MumuError

        from .ship import ship

        try:
            print(json.dumps(ship(Path(args.model), Path(args.to) if args.to else None)))
        except MumuError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    plan = QUICK if args.quick else Plan()
    if args.stage0_grounding_weight is not None:
        if args.stage0_grounding_weight < 0:
            p.error(f"--stage0-grounding-weight must be >= 0, got {args.stage0_grounding_weight}")
        plan = replace(plan, stage0_grounding_weight=args.stage0_grounding_weight)
    if args.stage1_more_rounds is not None:
        if args.stage1_more_rounds < 0:
            p.error(f"--stage1-more-rounds must be >= 0, got {args.stage1_more_rounds}")
        plan = replace(plan, stage1_more_rounds=args.stage1_more_rounds)
    if args.stage1_processes is not None:
        if args.stage1_processes < 1 or plan.stage1_batch % args.stage1_processes or \
                plan.stage1_more_batch % args.stage1_processes:
            p.error(f"--stage1-processes must be >= 1 and split the stage-1 batches ({plan.stage1_batch}, "
                    f"{plan.stage1_more_batch}) evenly, got {args.stage1_processes}")
        plan = replace(plan, stage1_processes=args.stage1_processes)
    summary = reproduce(Path(args.out), plan, progress=not args.no_progress,
                        run_eval=not args.no_eval)
    print(json.dumps(summary))
    return 0
