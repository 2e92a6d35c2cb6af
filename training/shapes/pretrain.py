"""Stage 0 of the shapes world: what SDXL's own pretraining gives MUMU, learnt on the world.

MUMU starts from a pretrained SDXL (a VAE and a text-to-image UNet). The world has none, so:
  1. `train_vae`   an AutoencoderKL (64 px <-> 16x16x4) trained on world renders (MSE + a tiny KL);
                   its scaling factor sets the latents' std to `PretrainConfig.latent_std` (0.25, not
                   SDXL's 1: see there why).
  2. `train_text_to_image`  the SDXL-topology UNet, fully trained, text-to-image on captions only,
                   conditioned through the MUMU encoder (frozen VLM + a fresh adapter) — the stand-in
                   for SDXL's CLIP-conditioned pretraining. Like SDXL's captions, these describe
                   appearance (`a red striped ball and a dotted box on the navy floor`, each word
                   named 80 % of the time: world.described_caption), so the UNet learns to bind a
                   colour to its object, as SDXL does; MUMU then teaches it to take the appearance
                   from a crop instead. (Run 3's stage 0 on appearance-free captions left every object
                   condition of the MUMU stage at chance. Measured since: 2000 steps do not yet teach
                   this tiny UNet to bind a named colour to its object — the README's run 5.)
                   An optional grounding loss keeps each object's phrase read from inside its box
                   (`PretrainConfig.t2i_grounding_weight`, off: the README's run 12).
The result is an ordinary diffusers SDXL pipeline folder (+ the adapter), which stage 1 (the MUMU
recipe, `training/train.py`) loads exactly as it loads real SDXL.

Both loops checkpoint with accelerate's `save_state` every `checkpoint_every` steps (written to a
temporary folder, renamed when complete) and resume from the last checkpoint when rerun.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mumu_core.atomic import atomic_write, fsync_dir

RESOLUTION = 64


@dataclass
class PretrainConfig:
    vae_steps: int = 700
    vae_lr: float = 1e-3
    vae_batch: int = 32
    # The latents' std after the VAE's scaling factor. SDXL's is ~1; here 0.25, which divides every
    # timestep's SNR by 16. Why: an object's colour is a large latent offset (colour centroids 1.5-7.5
    # apart, |values| up to 4.4, against a latent std of 1) summed over ~36 latent pixels, so at unit
    # std it is still readable from x_t at t = 901-999 (d' ~ 1-2): the UNet learns to copy colour from
    # the noisy input instead of from the conditioning, and at inference, where x_T is pure noise,
    # the noise picks it. Measured on run 7's stage 0 (8 seeds x 8 named colours, one ball): at CFG 1
    # the seed decided the colour (majority share per seed 58 %, per named colour 47 %), 19 % right;
    # only CFG 3 pulled it to 45 %. A noisier schedule (as SD3 shifts it for resolution) hides the
    # colour at the top steps, so only the conditioning can supply it there (run 8: one named object
    # 30 -> 61.5 % right). A stronger shift, 0.15, was worse in the same 3000 steps (42.7 %).
    latent_std: float = 0.25
    t2i_steps: int = 700
    t2i_lr: float = 6e-4
    t2i_batch: int = 32
    # min-SNR-γ loss weighting (Hang et al. 2023): the plain ε loss is dominated by the least noisy
    # steps (fine texture: the floors' grids and stripes), where an object's colour is already decided;
    # γ = 5 down-weights steps with SNR > 5 (t < ~150 of 1000), so more of the gradient goes where
    # layout and colour are decided. Stage 1 uses the same weighting (shapes.yaml loss.min_snr_gamma).
    t2i_min_snr_gamma: float | None = 5.0
    # Grounding loss on each object's phrase (`red striped ball`: its tokens should be read from inside
    # the object's box; training/grounding_loss.py, TokenCompose's token loss with the adjectives in
    # the token set). Off by default: run 12 (0.01) lifted stage 0's text binding (2-3 named objects
    # 16.5 -> 24.0 % in their colours) but the MUMU stage built on it composed worse (cross-image
    # 32.0 -> 25.8 % per object), so the shipped model's stage 0 has none. `reproduce
    # --stage0-grounding-weight 0.01` runs it.
    t2i_grounding_weight: float = 0.0
    checkpoint_every: int = 100
    seed: int = 0
    threads: int | None = None


# ---------------------------------------------------------------- resumable loop plumbing

class _Resumable:
    """accelerate save_state/load_state into `root/<name>_state`, written atomically."""

    def __init__(self, accelerator, root: Path, name: str):
        self.acc, self.root, self.name = accelerator, root, name
        self.state = root / f"{name}_state"

    def resume(self) -> int:
        if (self.state / "step.json").is_file():
            self.acc.load_state(str(self.state))
            return int(json.loads((self.state / "step.json").read_text())["step"])
        return 0

    def save(self, step: int) -> None:
        tmp = self.root / f".{self.name}_state.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        self.acc.save_state(str(tmp))
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        old = self.root / f".{self.name}_state.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.state.exists():
            self.state.rename(old)
        tmp.rename(self.state)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.root)

    def finish(self) -> None:
        """The final weights are saved: the resume state is no longer needed."""
        shutil.rmtree(self.state, ignore_errors=True)


def _log(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _render_batch(rng, n: int, world_cfg):
    import numpy as np

    from .world import render, sample_scene

    arr = np.stack([np.asarray(render(sample_scene(rng, world_cfg), world_cfg.stripe_period)) for _ in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- 1. VAE

def train_vae(out: Path, cfg: PretrainConfig, world_cfg, progress: bool = True):
    """-> the trained AutoencoderKL (also saved under out/vae)."""
    import numpy as np
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from .components import build_vae

    final = out / "vae"
    if (final / "config.json").is_file():
        return AutoencoderKL.from_pretrained(final)
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(cpu=True)
    vae = build_vae(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    vae, opt = acc.prepare(vae, opt)
    saver = _Resumable(acc, out, "vae")
    start = saver.resume()
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="stage 0: VAE",
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        # scenes are a pure function of (seed, step): a resumed run sees what a straight run saw
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7, step]))
        x = _render_batch(rng, cfg.vae_batch, world_cfg)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        rec = F.mse_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        bar.set_postfix(mse=f"{rec.item():.4f}")
        if (step + 1) % 20 == 0:
            _log(out / "vae_log.jsonl", {"step": step + 1, "mse": rec.item(), "kl": kl.item()})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.vae_steps:
            saver.save(step + 1)
    vae = acc.unwrap_model(vae).eval()
    with torch.no_grad():  # latents of std cfg.latent_std (PretrainConfig says why not 1)
        x = _render_batch(np.random.default_rng(np.random.SeedSequence([cfg.seed, 8])), 64, world_cfg)
        std = vae.encode(x).latent_dist.mean.std().item()
        psnr = _psnr(vae, x)
    vae.register_to_config(scaling_factor=round(cfg.latent_std / std, 5))
    _save_atomic_dir(final, vae.save_pretrained)
    (out / "vae_summary.json").write_text(json.dumps({"psnr_db": psnr, "latent_std": std, "steps": cfg.vae_steps,
                                                      "scaled_latent_std": cfg.latent_std}))
    saver.finish()
    return vae


def _psnr(vae, x) -> float:
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))


def _save_atomic_dir(final: Path, save) -> None:
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)


# ---------------------------------------------------------------- 2. text-to-image UNet

def text_only_builder():
    """The real sample builder with every crop off: caption-only prompts, 10 % dropped for CFG."""
    from ..samples import SampleBuilderConfig

    return SampleBuilderConfig(stage=1, resolution=RESOLUTION, max_crops=0, min_crops=0, edge_map_prob=0.0,
                               augment_prob=0.0, cond_dropout_prob=0.1, stage1_tokens=16, patch_size=14)


def described_prompts(dataset, idx: list[int], samples, seed: int, step: int) -> tuple[list, list]:
    """Each sample's prompt with appearance words (world.described_caption; dropped ones stay empty)
    and its phrases: per object, (character span of `red striped ball` in the caption, its box)."""
    import numpy as np

    from mumu_core.prompt import InterleavedPrompt

    from .world import Scene, described_caption_spans

    rng = np.random.default_rng(np.random.SeedSequence([seed, 9, step]))
    prompts, phrases = [], []
    for i, sample in zip(idx, samples):
        if sample.dropped:
            prompts.append(sample.prompt)
            phrases.append([])
            continue
        scene = Scene.from_dict(dataset.record(i)["scene"])
        if (sample.target.height, sample.target.width) != (scene.size, scene.size):
            raise ValueError(f"stage 0 expects targets at the world's size ({scene.size} px), got "
                             f"{sample.target.width}x{sample.target.height}: the object boxes would not match")
        caption, spans = described_caption_spans(scene, rng)
        prompts.append(InterleavedPrompt.parse(caption, []))
        phrases.append([(span, o.box) for span, o in zip(spans, scene.objects)])
    return prompts, phrases


def train_text_to_image(out: Path, vlm_dir: Path, annotations: Path, vae, cfg: PretrainConfig,
                        adapter_shape: dict, progress: bool = True) -> Path:
    """Train the UNet (fully) + a fresh adapter text-to-image; writes out/sdxl and out/adapter.safetensors."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from mumu_core.adapter import AdapterConfig, MumuAdapter
    from mumu_core.encoder import MumuEncoder
    from mumu_core.vlm import load_vlm

    from ..diffusion_loss import add_training_noise, diffusion_loss
    from ..grounding_loss import CrossAttentionRecorder, grounding_loss, phrase_targets
    from ..lr_schedule import lr_factor
    from ..model import MumuTrainModel
    from ..annotation_dataset import AnnotationDataset
    from ..samples import collate_samples
    from .components import build_unet, save_sdxl, training_noise_scheduler

    sdxl_dir, adapter_path = out / "sdxl", out / "adapter.safetensors"
    if (sdxl_dir / "model_index.json").is_file() and adapter_path.is_file():
        return sdxl_dir
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(cpu=True)
    vlm = load_vlm(vlm_dir).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    adapter = MumuAdapter(AdapterConfig(input_dim=vlm.hidden_size, **adapter_shape))
    unet = build_unet(cfg.seed)
    model = MumuTrainModel(MumuEncoder(vlm, adapter), unet)
    recorder = CrossAttentionRecorder(unet) if cfg.t2i_grounding_weight > 0 else None
    vae.requires_grad_(False).eval()
    noise_scheduler = training_noise_scheduler()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.t2i_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 50, cfg.t2i_steps, "cosine"))
    model, opt, sched = acc.prepare(model, opt, sched)
    saver = _Resumable(acc, out, "t2i")
    start = saver.resume()

    dataset = AnnotationDataset(annotations, text_only_builder(), seed=cfg.seed)
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    bar = tqdm(range(start, cfg.t2i_steps), initial=start, total=cfg.t2i_steps, desc="stage 0: text-to-image UNet",
               disable=not progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(dataset), (cfg.t2i_batch,), generator=g).tolist()
        dataset.set_epoch(step)
        samples = collate_samples([dataset[i] for i in idx])
        prompts, phrases = described_prompts(dataset, idx, samples, cfg.seed, step)
        inputs = model.encoder.prepare(prompts)
        pixels = torch.stack([s.target_tensor() for s in samples])
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
        batch = add_training_noise(latents, noise_scheduler, g)
        record = {}
        with (recorder.recording() if recorder else contextlib.nullcontext()) as maps:
            pred = model(inputs, batch.noisy, batch.timesteps, time_ids.expand(len(samples), -1))
            loss = diffusion_loss(pred, batch.target, batch.timesteps, noise_scheduler, cfg.t2i_min_snr_gamma)
            if recorder:
                targets = phrase_targets(vlm.tokenizer, inputs.tokens.input_ids, [p.text for p in prompts],
                                         phrases, (RESOLUTION, RESOLUTION))
                grounding = grounding_loss(maps, targets)
                record = {"loss/diffusion": loss.item(), "loss/grounding": grounding.item()}
                loss = loss + cfg.t2i_grounding_weight * grounding
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)   # inside recording(), like train.py (gradient checkpointing recomputes)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 10 == 0 or step + 1 == cfg.t2i_steps:
            _log(out / "t2i_log.jsonl", {"step": step + 1, "loss": loss.item(), **record})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.t2i_steps:
            saver.save(step + 1)

    model = acc.unwrap_model(model)
    save_adapter(adapter_path, model.encoder.adapter)
    _save_atomic_dir(sdxl_dir, lambda d: save_sdxl(d, model.unet.eval(), vae))
    saver.finish()
    return sdxl_dir


def save_adapter(path: Path, adapter) -> Path:
    """The adapter's weights with its config in the metadata (what `model.adapter_init` reads)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    meta = {"adapter": json.dumps(adapter.config.to_dict())}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
