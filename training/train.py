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
process. Per micro-batch: build samples (workers) -> tokenise + square images -> VAE latents
(frozen, on the fly) -> noise at a uniform timestep of SDXL's DDPM schedule -> MUMU encoder ->
UNet -> ε-MSE (min-SNR weighted if configured). Noise and timesteps come from a generator
seeded by (seed, step, micro, rank), so a resumed run draws exactly what the straight run drew.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# Running by path puts training/ first on sys.path; its module names (config, data, model) must
# not shadow anything, and the package is imported as mumu_training anyway.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
# DataLoader workers fork after the tokenizer ran in the main process (sample lengths)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mumu_core.errors import MumuError  # noqa: E402
from mumu_training import checkpoints as ckpt  # noqa: E402
from mumu_training.config import TrainConfigError, check_paths, load_config, sample_builder_config  # noqa: E402
from mumu_training.data import GroupedLoader, PromptLength, padding_fraction  # noqa: E402
from mumu_training.model import build_components, frozen_named_parameters, param_groups  # noqa: E402


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


def digest(named) -> str:
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda x: x[0]):
        h.update(name.removeprefix("module.").encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    try:
        return train(parse_args(argv))
    except MumuError as exc:  # a config/data problem: the message says what and how to fix it
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
    from tqdm.auto import tqdm

    cfg = load_config(args.config, overrides_from_args(args))
    run = cfg.run
    out_dir = Path(run.output_dir)
    resume_from = ckpt.resolve_resume(args.resume, out_dir)  # before anything heavy loads
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer step ourselves
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    main_proc, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if cfg.tiny is not None:
        from mumu_training.tiny_data import ensure_tiny_assets

        with accelerator.main_process_first():  # the main process creates; the others find it done
            ensure_tiny_assets(cfg)
    check_paths(cfg)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.mixed_precision, torch.float32)

    # ---- model: frozen VLM vision tower + LoRA'd LLM/projection, adapter, LoRA'd UNet, VAE
    comps = build_components(cfg, device, weight_dtype)
    model, vae, noise_scheduler = comps.model, comps.vae, comps.noise_scheduler
    builder_cfg = sample_builder_config(cfg)
    vlm = model.encoder.vlm
    side = vlm.side_for_tokens(builder_cfg.tokens_per_image)  # PromptError names valid values
    if side != builder_cfg.conditioning_side:
        raise TrainConfigError(
            f"data.sample.patch_size={builder_cfg.patch_size} makes {builder_cfg.conditioning_side} px conditioning "
            f"images, but this VLM needs {side} px for {builder_cfg.tokens_per_image} tokens; set "
            f"data.sample.patch_size: {vlm.grid_unit}.")
    comps.export_meta["tokens_per_image"] = builder_cfg.tokens_per_image
    comps.export_meta["provenance"] = {"config": cfg.source, "stage": builder_cfg.stage, "trainer": "training/train.py"}
    want_digests = os.environ.get("MUMU_TRAIN_DIGESTS") == "1"
    frozen_before = digest(frozen_named_parameters(model)) if want_digests else None

    # ---- data: bootstrapped annotations -> interleaved samples, grouped by token length
    from mumu_training.samples import AnnotationDataset

    dataset = AnnotationDataset(cfg.data.annotations, builder_cfg, seed=run.seed, image_root=cfg.data.image_root)
    weights = dataset.sample_weights(cfg.data.person_weight) if cfg.data.person_weight != 1.0 else None
    length_fn = PromptLength(vlm.tokenizer, vlm.family.image_prefix, vlm.family.image_suffix)
    loader = GroupedLoader(dataset, length_fn, batch_size=cfg.data.batch_size, group_size=cfg.data.group_size,
                           world_size=world, rank=rank, seed=run.seed, group_by_length=cfg.data.group_by_length,
                           num_workers=cfg.data.num_workers, weights=weights)

    # ---- optimizer: AdamW with the paper's per-module learning rates, linear warmup then constant
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    warmup = o.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt.register_hooks(accelerator)
    unwrapped = accelerator.unwrap_model(model)

    step, accum = 0, run.gradient_accumulation_steps
    layout = {"world_size": world, "batch_size": cfg.data.batch_size, "group_size": cfg.data.group_size,
              "gradient_accumulation_steps": accum, "seed": run.seed, "group_by_length": cfg.data.group_by_length}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = ckpt.read_train_state(resume_from)
        step = int(state["step"])
        if state.get("layout") != layout and main_proc:
            print(f"warning: resuming with a different data layout ({state.get('layout')} -> {layout}); the sample "
                  f"order from here on differs from an uninterrupted run.", file=sys.stderr)
        if main_proc:
            print(f"resumed from {resume_from} at step {step}", file=sys.stderr)
    metrics_path = out_dir / "metrics.jsonl"
    if main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, step)  # a killed run may have logged past its last checkpoint
        accelerator.init_trackers("mumu", config=_flat_hparams(cfg))
    writer = _tb_writer(accelerator) if main_proc else None
    validation = _validation_setup(cfg, builder_cfg, main_proc)
    # same answer on every rank (it guards a barrier); FSDP shards the weights the images need
    has_validation = (bool(cfg.validation.prompts) and run.validate_every > 0
                      and accelerator.distributed_type != DistributedType.FSDP)

    model.train()
    micro_iter = loader.iterate(step * accum)
    fixed = None  # overfit_one_batch: the first micro-batch, reused every step
    bar = tqdm(total=run.max_steps, initial=step, desc="train", disable=not (main_proc and run.progress),
               dynamic_ncols=True)
    last_saved, t_last, last_logged, paused = None, time.perf_counter(), step, 0.0
    pad_grouped, pad_plain, tokens = [], [], 0
    while step < run.max_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            mb = fixed or next(micro_iter)
            if cfg.data.overfit_one_batch:
                fixed = mb
            pad_grouped.append(padding_fraction(mb.lengths))
            pad_plain.append(padding_fraction(mb.ungrouped_lengths))
            tokens += sum(mb.lengths)
            samples = mb.samples
            inputs = unwrapped.encoder.prepare([s.prompt for s in samples])
            pixels = torch.stack([s.target_tensor() for s in samples]).to(device=device, dtype=vae.dtype)
            res = builder_cfg.resolution
            time_ids = torch.tensor([[*s.original_size, 0, 0, res, res] for s in samples], dtype=torch.float32,
                                    device=device)  # SDXL micro-conditioning: original size, crop top-left, target
            gen = step_generator(device, run.seed, 0 if cfg.data.overfit_one_batch else step, micro, rank)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
            latents = latents.float()  # noise, targets and the loss stay fp32; only the UNet input is cast
            noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
            if cfg.loss.noise_offset:
                noise = noise + cfg.loss.noise_offset * torch.randn(
                    (*latents.shape[:2], 1, 1), generator=gen, device=device, dtype=latents.dtype)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      generator=gen, device=device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                pred = model(inputs, noisy, timesteps, time_ids)
                loss = _loss(pred.float(), target.float(), timesteps, noise_scheduler, cfg.loss.min_snr_gamma)
                accelerator.backward(loss / accum)
            step_loss += loss.detach() / accum
        if o.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        # ---- logging (one all-reduce for the loss; everything else is local)
        if step % run.log_every == 0 or step == run.max_steps:
            mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
            now = time.perf_counter()
            if main_proc:
                n_samples = cfg.data.batch_size * accum * world
                per_step = (now - t_last - paused) / max(step - last_logged, 1)
                rec = {"step": step, "loss": mean_loss, "step_time_s": per_step,
                       "samples_per_s": n_samples / max(per_step, 1e-9),
                       "padding_fraction": sum(pad_grouped) / len(pad_grouped),
                       "padding_fraction_ungrouped": sum(pad_plain) / len(pad_plain), "tokens": tokens,
                       **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", pad=f"{rec['padding_fraction']:.2f}")
            t_last, last_logged, paused = now, step, 0.0
            pad_grouped, pad_plain, tokens = [], [], 0  # padding/tokens are per logging interval

        # ---- checkpoint (collective) and validation images (main process)
        t_pause = time.perf_counter()  # samples/s measures training, not saving or sampling
        if (run.checkpoint_every and step % run.checkpoint_every == 0) or step == run.max_steps:
            train_state = {"step": step, "micro_step": step * accum, "layout": layout,
                           "samples_seen": step * accum * cfg.data.batch_size * world}
            last_saved = ckpt.save_checkpoint(accelerator, model, out_dir, step, train_state, comps.export_meta,
                                              run.checkpoints_total_limit)
            _fault_after_checkpoint(step)
        if has_validation and (step % run.validate_every == 0 or step == run.max_steps):
            if main_proc:
                _validate(cfg, validation, unwrapped, vae, comps, accelerator, writer, out_dir, builder_cfg, step)
            accelerator.wait_for_everyone()
        paused += time.perf_counter() - t_pause
    bar.close()

    if want_digests:  # for tests: ranks must agree on trainable weights, frozen ones must not move
        from mumu_training.model import trainable_state_dict

        trained = [(n.removeprefix("module."), p) for n, p in trainable_state_dict(model).items()]
        (out_dir / f"digest-rank{rank}.json").write_text(json.dumps({
            "trainable": digest(trained), "frozen_before": frozen_before,
            "frozen_after": digest(frozen_named_parameters(model))}))
    final = last_saved or resume_from  # a run resumed at max_steps still exports what it has
    if main_proc and run.export_at_end and final is not None:
        from mumu_training.export import export_checkpoint

        summary = export_checkpoint(final, out_dir / "mumu_bundle.safetensors", out_dir / "unet_lora.safetensors")
        print(json.dumps(summary))
    accelerator.end_training()
    return 0


def _loss(pred, target, timesteps, noise_scheduler, min_snr_gamma):
    if min_snr_gamma is None:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=min_snr_gamma) / snr  # ε-prediction: min(SNR, γ) / SNR
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weight).mean()


def _validation_setup(cfg, builder_cfg, main_proc):
    if not (main_proc and cfg.validation.prompts and cfg.run.validate_every):  # prompts load on rank 0 only
        return None
    from mumu_training.validation import load_prompts

    return load_prompts(cfg.validation.prompts, builder_cfg.tokens_per_image)


def _validate(cfg, prompts, unwrapped, vae, comps, accelerator, writer, out_dir, builder_cfg, step):
    from mumu_training.validation import render, save_and_log

    v = cfg.validation
    images = render(unwrapped, vae, comps.sdxl_scheduler_config, prompts, steps=v.steps, cfg=v.cfg, seed=v.seed,
                    width=v.width or builder_cfg.resolution, height=v.height or builder_cfg.resolution,
                    autocast=accelerator.autocast)
    save_and_log(images, [t for t, _ in prompts], out_dir, step, writer)


def _tb_writer(accelerator):
    try:
        return accelerator.get_tracker("tensorboard", unwrap=True)
    except Exception:  # tracker missing (tensorboard not installed): images still go to samples/
        return None


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
    path.write_text("".join(line + "\n" for line in keep))


def _fault_after_checkpoint(step: int) -> None:
    # tests: MUMU_TRAIN_KILL_AFTER=N SIGKILLs every process right after checkpoint N is complete
    if os.environ.get("MUMU_TRAIN_KILL_AFTER") == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
