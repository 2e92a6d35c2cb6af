"""MUMU training: VLM LoRA + adapter + SDXL UNet LoRA on bootstrapped interleaved prompts (paper §2).

Launch (from the repo root; every knob is in the YAML, see README.md "Train your own MUMU"):

    # tiny components + generated data, created on first use; laptop CPU, minutes
    accelerate launch --cpu training/train.py --config training/configs/tiny.yaml
    # same, 2 CPU processes (gloo)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train.py --config training/configs/tiny.yaml
    # one GPU
    accelerate launch --config_file training/accelerate/single_gpu.yaml training/train.py --config training/configs/stage1.yaml
    # one 8-GPU node (DDP; fsdp_8gpu.yaml shards the frozen VLM when memory is short)
    accelerate launch --config_file training/accelerate/ddp_8gpu.yaml training/train.py --config training/configs/stage1.yaml
    # several nodes: run on every node with its --machine_rank
    accelerate launch --config_file training/accelerate/multi_node.yaml --machine_rank R --main_process_ip HOST \
        training/train.py --config training/configs/stage1.yaml
    # resume (exact: weights, AdamW moments, LR schedule, RNG, data position)
    accelerate launch ... training/train.py --config ... --resume latest
    # stage 2 starts from stage 1's export (model.init_from in stage2.yaml)
    accelerate launch ... training/train.py --config training/configs/stage2.yaml

Options: --output-dir DIR, --max-steps N, --resume latest|PATH, --set key.sub=value (YAML value).

One optimizer step = `gradient_accumulation_steps` micro-batches of `data.batch_size` samples per
process. Per micro-batch (one aspect-ratio bucket): build samples (workers) -> tokenise + square
prompt images -> VAE latents of the bucket-cropped targets (frozen; on the fly, or from the latent
cache) -> noise at a uniform timestep of SDXL's DDPM schedule -> MUMU encoder -> UNet, with each
sample's original size / crop / bucket as SDXL time ids -> ε-MSE (min-SNR weighted if configured). Noise and timesteps come from a generator
seeded by (seed, step, micro, rank), so a resumed run draws exactly what the straight run drew.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Running by path puts training/ first on sys.path; its module names (config, data, model) must
# not shadow anything, and the package is imported as mumu_training anyway.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
# DataLoader workers fork after the tokenizer ran in the main process (sample lengths)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mumu_core.atomic import atomic_write  # noqa: E402
from mumu_core.dtypes import DTYPES  # noqa: E402
from mumu_core.errors import MumuError  # noqa: E402
from mumu_training import checkpoints as ckpt  # noqa: E402
from mumu_training.config import TrainConfigError, check_paths, load_config, sample_builder_config  # noqa: E402
from mumu_training.data import GroupedLoader, PromptLength  # noqa: E402
from mumu_training.lr_schedule import lr_factor  # noqa: E402
from mumu_training.diffusion_loss import add_training_noise, diffusion_loss, timestep_weights_for  # noqa: E402
from mumu_training.grounding_loss import CrossAttentionRecorder, grounding_loss, grounding_targets  # noqa: E402
from mumu_training.model import build_components, param_groups  # noqa: E402
from mumu_training.run_hooks import RunHooks  # noqa: E402
from mumu_training.throughput import Throughput  # noqa: E402

if TYPE_CHECKING:
    from mumu_training.latent_cache import LatentCache
    from mumu_training.sample_stats import SampleStats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train MUMU (VLM LoRA + adapter + SDXL UNet LoRA) with accelerate.")
    p.add_argument("--config", required=True, help="YAML config (training/configs/{stage1,stage2,tiny}.yaml)")
    p.add_argument("--output-dir", default=None, help="overrides run.output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="overrides run.max_steps")
    p.add_argument("--resume", default=None, help="'latest' (newest checkpoint in the output dir, if any) or a folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. data.batch_size=2")
    return p.parse_args(argv)


def overrides_from_args(args) -> dict:
    import yaml

    out = {}
    for item in args.set:
        if "=" not in item:
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr_adapter=2e-5")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    if args.output_dir:
        out["run.output_dir"] = args.output_dir
    if args.max_steps is not None:
        out["run.max_steps"] = args.max_steps
    return out


def step_generator(device, seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    # a pure function of the position: resume needs no generator state, ranks never share noise
    g = torch.Generator(device=device)
    return g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()[:8], "little") >> 1)


def main(argv=None) -> int:
    try:
        return train(parse_args(argv))
    except MumuError as exc:  # a config/data problem: the message says what and how to fix it
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(args) -> int:
    from tqdm.auto import tqdm

    cfg = load_config(args.config, overrides_from_args(args))
    run, o = cfg.run, cfg.optim
    out_dir = Path(run.output_dir)
    resume_from = ckpt.resolve_resume(args.resume, out_dir)  # before anything heavy loads
    accelerator = _accelerator(out_dir, run.mixed_precision)
    main_proc, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if cfg.tiny is not None:
        from mumu_training.tiny_data import ensure_tiny_assets

        with accelerator.main_process_first():  # the main process creates; the others find it done
            ensure_tiny_assets(cfg)
    check_paths(cfg)
    device = accelerator.device
    weight_dtype = DTYPES.get(run.mixed_precision, torch.float32)  # mixed_precision "no": fp32

    # ---- model: frozen VLM vision tower + LoRA'd LLM/projection, adapter, LoRA'd UNet, VAE
    comps, builder_cfg = _build_model(cfg, device, weight_dtype)
    model, vae, noise_scheduler = comps.model, comps.vae, comps.noise_scheduler
    t_weights = timestep_weights_for(cfg.loss, noise_scheduler.config.num_train_timesteps)
    hooks = RunHooks.from_env()  # tests only: weight digests, fault injection
    hooks.before_training(model)

    # ---- data: bootstrapped annotations -> interleaved samples, grouped by token length
    data = _build_data(cfg, builder_cfg, model.encoder.vlm, vae, accelerator, out_dir)

    # ---- optimizer: AdamW with the paper's per-module learning rates, linear warmup then constant (or cosine)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, o.warmup_steps, run.max_steps, o.lr_schedule, o.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt.register_hooks(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    accum = run.gradient_accumulation_steps
    layout = {"world_size": world, "batch_size": cfg.data.batch_size, "group_size": cfg.data.group_size,
              "gradient_accumulation_steps": accum, "seed": run.seed, "group_by_length": cfg.data.group_by_length}
    step = _resume(accelerator, resume_from, layout)
    log = _MetricsLog(accelerator, out_dir, step, cfg)
    validation = _Validation(cfg, builder_cfg, accelerator, comps, out_dir, log.writer)

    grounding = CrossAttentionRecorder(unwrapped.unet) if cfg.loss.grounding_weight else None
    model.train()
    micro_iter = data.loader.iterate(step * accum)
    fixed = None  # overfit_one_batch: the first micro-batch, reused every step
    bar = tqdm(total=run.max_steps, initial=step, desc="train", disable=not (main_proc and run.progress),
               dynamic_ncols=True)
    meter = Throughput(step, samples_per_step=cfg.data.batch_size * accum * world)
    last_saved = None
    while step < run.max_steps:
        step_loss = torch.zeros((), device=device)
        step_grounding = torch.zeros((), device=device)
        for micro in range(accum):
            mb = fixed or next(micro_iter)
            if cfg.data.overfit_one_batch:
                fixed = mb
            meter.add_micro_batch(mb)
            data.stats.update(mb.samples)
            gen = step_generator(device, run.seed, 0 if cfg.data.overfit_one_batch else step, micro, rank)
            sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss, g_loss = _micro_batch_backward(cfg, accelerator, model, comps, data, grounding, t_weights,
                                                     mb.samples, gen, weight_dtype)
            step_loss += loss / accum
            step_grounding += g_loss / accum
        if o.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % run.log_every == 0 or step == run.max_steps:  # one all-reduce; everything else is local
            mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
            extra = {"loss/grounding": accelerator.reduce(step_grounding, reduction="mean").item()} if grounding else {}
            rec = log.write(step, mean_loss, {**meter.interval(step), **extra}, optimizer, data)
            bar.set_postfix(loss=f"{mean_loss:.4f}", pad=f"{rec['padding_fraction']:.2f}")
        with meter.paused():  # samples/s measures training, not saving or sampling
            if (run.checkpoint_every and step % run.checkpoint_every == 0) or step == run.max_steps:
                last_saved = _checkpoint(accelerator, model, out_dir, step, layout, cfg, comps, data)
                hooks.after_checkpoint(step)
            if validation.due(step):
                validation.run(unwrapped, step)
    bar.close()

    hooks.after_training(model, out_dir, rank)
    final = last_saved or resume_from  # a run resumed at max_steps still exports what it has
    if main_proc and run.export_at_end and final is not None:
        from mumu_training.export import export_checkpoint

        print(json.dumps(export_checkpoint(final, out_dir / "mumu_bundle.safetensors",
                                           out_dir / "unet_lora.safetensors")))
    accelerator.end_training()
    return 0


# ---------------------------------------------------------------- setup, one helper per stage of train()

def _accelerator(out_dir: Path, mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    return Accelerator(
        mixed_precision=mixed_precision, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer step ourselves
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _build_model(cfg, device, weight_dtype):
    """-> (components, sample-builder config), with the conditioning image size checked against the VLM."""
    comps = build_components(cfg, device, weight_dtype)
    builder_cfg = sample_builder_config(cfg)
    vlm = comps.model.encoder.vlm
    side = vlm.side_for_tokens(builder_cfg.tokens_per_image)  # PromptError names valid values
    if side != builder_cfg.conditioning_side:
        raise TrainConfigError(
            f"data.sample.patch_size={builder_cfg.patch_size} makes {builder_cfg.conditioning_side} px conditioning "
            f"images, but this VLM needs {side} px for {builder_cfg.tokens_per_image} tokens; set "
            f"data.sample.patch_size: {vlm.grid_unit}.")
    comps.export_meta["tokens_per_image"] = builder_cfg.tokens_per_image
    comps.export_meta["provenance"] = {"config": cfg.source, "stage": builder_cfg.stage, "trainer": "training/train.py"}
    return comps, builder_cfg


@dataclass
class _RunData:
    loader: GroupedLoader
    stats: "SampleStats"
    latent_cache: "LatentCache | None"


def _build_data(cfg, builder_cfg, vlm, vae, accelerator, out_dir: Path) -> _RunData:
    """The dataset, its length-grouped (and bucketed) loader, the latent cache and the sample counters."""
    from mumu_training.latent_cache import LatentCache
    from mumu_training.latent_cache import resolve_config as latent_cache_config
    from mumu_training.sample_stats import SampleStats, write_data_stats
    from mumu_training.annotation_dataset import AnnotationDataset

    d = cfg.data
    dataset = AnnotationDataset(d.annotations, builder_cfg, seed=cfg.run.seed, image_root=d.image_root)
    weights = dataset.sample_weights(d.person_weight) if d.person_weight != 1.0 else None
    length_fn = PromptLength(vlm.tokenizer, vlm.family.image_prefix, vlm.family.image_suffix)
    # aspect-ratio buckets: micro-batches of one target size (one bucket needs no pass over the shards)
    bucket_ids = dataset.bucket_ids() if len(builder_cfg.bucket_list) > 1 else None
    loader = GroupedLoader(dataset, length_fn, batch_size=d.batch_size, group_size=d.group_size,
                           world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.run.seed,
                           group_by_length=d.group_by_length, num_workers=d.num_workers, weights=weights,
                           buckets=bucket_ids)
    lc_cfg = latent_cache_config(d)
    latent_cache = None
    if lc_cfg.enabled:  # VAE latents of the targets computed once, reused across epochs and resumes
        with accelerator.main_process_first():
            latent_cache = LatentCache(lc_cfg.dir, vae, dtype=lc_cfg.dtype)
    if accelerator.is_main_process:
        write_data_stats(out_dir, dataset, builder_cfg, bucket_ids, latent_cache)
    return _RunData(loader, SampleStats(), latent_cache)


def _resume(accelerator, resume_from: Path | None, layout: dict) -> int:
    """Load a checkpoint (weights, AdamW moments, LR schedule, RNG) -> the step it was saved at (0: none)."""
    if resume_from is None:
        return 0
    accelerator.load_state(str(resume_from))
    state = ckpt.read_train_state(resume_from)
    if accelerator.is_main_process:
        if state.get("layout") != layout:
            print(f"warning: resuming with a different data layout ({state.get('layout')} -> {layout}); the sample "
                  f"order from here on differs from an uninterrupted run.", file=sys.stderr)
        print(f"resumed from {resume_from} at step {state['step']}", file=sys.stderr)
    return int(state["step"])


def _micro_batch_backward(cfg, accelerator, model, comps, data: _RunData, grounding, t_weights, samples, gen,
                          weight_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch (gradients scaled for accumulation); returns its
    diffusion and grounding losses, detached (the grounding one 0 when the loss is off)."""
    unwrapped, device = accelerator.unwrap_model(model), accelerator.device
    accum = cfg.run.gradient_accumulation_steps
    inputs = unwrapped.encoder.prepare([s.prompt for s in samples])
    # SDXL micro-conditioning per sample: original size, crop top-left, target (bucket) size
    time_ids = torch.tensor([s.time_ids() for s in samples], dtype=torch.float32, device=device)
    latents = _target_latents(samples, comps.vae, data.latent_cache, gen, device)
    batch = add_training_noise(latents, comps.noise_scheduler, gen, cfg.loss.noise_offset, t_weights)
    g_loss = torch.zeros((), device=device)
    # the backward stays inside recording(): gradient checkpointing re-runs the forward there,
    # and the recomputation must repeat the recorder's work tensor for tensor
    with grounding.recording() if grounding else contextlib.nullcontext():
        pred = model(inputs, batch.noisy.to(weight_dtype), batch.timesteps, time_ids)
        loss = diffusion_loss(pred.float(), batch.target.float(), batch.timesteps, comps.noise_scheduler,
                              cfg.loss.min_snr_gamma, cfg.loss.v_pred_like_loss)
        total = loss
        if grounding:
            g_loss = grounding_loss(grounding.maps, grounding_targets(samples, inputs.tokens.image_spans))
            total = loss + cfg.loss.grounding_weight * g_loss
        accelerator.backward(total / accum)
    return loss.detach(), g_loss.detach()


def _target_latents(samples, vae, latent_cache, gen, device) -> torch.Tensor:
    """Scaled VAE latents of the targets, drawn with the step's generator (fp32)."""
    from mumu_training.latent_cache import sample_latents

    with torch.no_grad():
        if latent_cache is not None:  # the same draw as latent_dist.sample(gen), from cached parameters
            params = latent_cache.params(samples, lambda px: vae.encode(
                px.to(device=device, dtype=vae.dtype)).latent_dist.parameters)
            latents = sample_latents(params.to(device=device, dtype=vae.dtype), gen)
        else:
            pixels = torch.stack([s.target_tensor() for s in samples]).to(device=device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=gen)
    # noise, targets and the loss stay fp32; only the UNet input is cast
    return (latents * vae.config.scaling_factor).float()


def _checkpoint(accelerator, model, out_dir: Path, step: int, layout: dict, cfg, comps, data: _RunData) -> Path:
    """A resumable checkpoint (collective) + this process's sample counters; -> the checkpoint folder."""
    accum, world = cfg.run.gradient_accumulation_steps, accelerator.num_processes
    train_state = {"step": step, "micro_step": step * accum, "layout": layout,
                   "samples_seen": step * accum * cfg.data.batch_size * world}
    saved = ckpt.save_checkpoint(accelerator, model, out_dir, step, train_state, comps.export_meta,
                                 cfg.run.checkpoints_total_limit)
    if accelerator.is_main_process:
        data.stats.write(out_dir / "sample_stats.json", step)
    return saved


class _MetricsLog:
    """metrics.jsonl (append-only, truncated to the resumed step) + accelerate's trackers, main process only."""

    def __init__(self, accelerator, out_dir: Path, step: int, cfg) -> None:
        self.acc, self.path, self.writer = accelerator, out_dir / "metrics.jsonl", None
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.path, step)  # a killed run may have logged past its last checkpoint
            accelerator.init_trackers("mumu", config=_flat_hparams(cfg))
            self.writer = _tb_writer(accelerator)

    def write(self, step: int, loss: float, throughput: dict, optimizer, data: _RunData) -> dict:
        rec = {"step": step, "loss": loss, **throughput,
               **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups},
               **data.stats.metrics()}  # this process's samples: kinds, control maps, buckets
        if data.latent_cache is not None:
            hits, misses = data.latent_cache.take_counts()
            rec["latent_cache/hit_rate"] = hits / max(hits + misses, 1)
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        return rec


class _Validation:
    """Validation images every `run.validate_every` steps, drawn on the main process."""

    def __init__(self, cfg, builder_cfg, accelerator, comps, out_dir: Path, writer) -> None:
        from accelerate.utils import DistributedType

        self.cfg, self.builder_cfg, self.acc, self.comps, self.out_dir, self.writer = (
            cfg, builder_cfg, accelerator, comps, out_dir, writer)
        # the same answer on every rank (it guards a barrier); FSDP shards the weights the images need
        self.enabled = (bool(cfg.validation.prompts) and cfg.run.validate_every > 0
                        and accelerator.distributed_type != DistributedType.FSDP)
        self.prompts = None
        if self.enabled and accelerator.is_main_process:  # prompts load on rank 0 only
            from mumu_training.validation import load_prompts

            self.prompts = load_prompts(cfg.validation.prompts, builder_cfg.tokens_per_image)

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.run.validate_every == 0 or step == self.cfg.run.max_steps)

    def run(self, unwrapped, step: int) -> None:
        if self.acc.is_main_process:
            try:
                self._render(unwrapped, step)
            except Exception:  # noqa: BLE001  images are a by-product: never leave the others at the barrier
                if self.acc.num_processes == 1:
                    raise
                import traceback

                print(f"validation at step {step} failed; training continues:\n{traceback.format_exc()}",
                      file=sys.stderr)
        self.acc.wait_for_everyone()

    def _render(self, unwrapped, step: int) -> None:
        from mumu_training.validation import render, save_and_log

        v, res = self.cfg.validation, self.builder_cfg.resolution
        images = render(unwrapped, self.comps.vae, self.comps.sdxl_scheduler_config, self.prompts, steps=v.steps,
                        cfg=v.cfg, seed=v.seed, width=v.width or res, height=v.height or res,
                        autocast=self.acc.autocast)
        save_and_log(images, [t for t, _ in self.prompts], self.out_dir, step, self.writer)


def _tb_writer(accelerator):
    """tensorboard's SummaryWriter, or None: images then go to samples/ only.

    Without tensorboard installed, accelerate drops the tracker and `get_tracker` hands back a
    blank `GeneralTracker`, which has no `add_image`: only a real writer is returned.
    """
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except Exception:  # noqa: BLE001  (tracker missing)
        return None
    is_writer = type(writer).__name__ == "SummaryWriter" and all(
        callable(getattr(writer, name, None)) for name in ("add_image", "add_text"))
    return writer if is_writer else None


def _flat_hparams(cfg) -> dict:
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float, str, bool)):
                out[f"{prefix}{k}"] = v
    walk("", cfg.to_dict())
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


if __name__ == "__main__":
    sys.exit(main())
