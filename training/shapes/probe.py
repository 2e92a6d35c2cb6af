"""The attribute probe: reads each noun's presence, colour and pattern (and the floor) off an image.

`mumu eval` scores generated images with it, so it is trained only on ground-truth world renders
(`world.render`) from its own seed namespace (`SeedSequence([PROBE_SEED, i])`, disjoint from the
training scenes' `[TRAIN_SEED, i]` and the evaluation prompts'). Given the model's VAE, half of its
training scenes are seen through an encode -> decode round trip, so it reads the softened edges and
colours of generated images too; light blur and noise do the rest.

Architecture: a small conv trunk at 16x16 resolution, then per noun a spatial attention map
(softmax over positions) that pools the trunk's features into that noun's vector; shared heads
read colour (8) and pattern (3) from it, presence from the map's peak logit, and the floor from
the mean feature. Binding a colour to a shape is then a local question, which a CNN learns fast.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .world import COLOUR_NAMES, FLOOR_NAMES, NOUNS, PATTERNS, WorldConfig, render, sample_scene

PROBE_SEED = 7_001           # probe scenes: SeedSequence([PROBE_SEED, i]); training uses [0, i]
PROBE_FORMAT = "mumu-shapes-probe"


@dataclass
class ProbeConfig:
    size: int = 64
    width: int = 32
    scenes: int = 4000
    held_out: int = 600
    epochs: int = 5
    batch: int = 64
    lr: float = 3e-3
    vae_fraction: float = 0.5    # share of training scenes seen as VAE round trips (when a VAE is given)
    seed: int = 0


class AttributeProbe(nn.Module):
    def __init__(self, cfg: ProbeConfig | None = None):
        super().__init__()
        self.cfg = cfg or ProbeConfig()
        w = self.cfg.width

        def block(cin, cout, stride=1, dilation=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation),
                                 nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(
            block(3, w // 2, 2),          # 32x32
            block(w // 2, w),
            block(w, 2 * w, 2),           # 16x16
            block(2 * w, 2 * w),
            block(2 * w, 2 * w, dilation=2),
            block(2 * w, 2 * w, dilation=3),
        )
        c = 2 * w
        self.where = nn.Conv2d(c, len(NOUNS), 1)
        self.noun_embed = nn.Parameter(torch.zeros(len(NOUNS), c))
        self.head = nn.Sequential(nn.Linear(c, c), nn.SiLU())
        self.colour = nn.Linear(c, len(COLOUR_NAMES))
        self.pattern = nn.Linear(c, len(PATTERNS))
        self.floor = nn.Linear(c, len(FLOOR_NAMES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B,3,H,W] in 0..1 -> presence [B,5] logits, colour [B,5,8], pattern [B,5,3], floor [B,4]."""
        if x.shape[-1] != self.cfg.size or x.shape[-2] != self.cfg.size:
            x = F.interpolate(x, size=(self.cfg.size, self.cfg.size), mode="bilinear", align_corners=False)
        f = self.trunk(x * 2 - 1)                        # [B,C,h,w]
        logits = self.where(f).flatten(2)                # [B,5,hw]
        attn = logits.softmax(-1)
        pooled = torch.einsum("bnp,bcp->bnc", attn, f.flatten(2)) + self.noun_embed
        h = self.head(pooled)
        return {"presence": logits.amax(-1), "colour": self.colour(h), "pattern": self.pattern(h),
                "floor": self.floor(f.mean((2, 3)))}

    @torch.no_grad()
    def read(self, images) -> list[dict]:
        """PIL images (or a [B,3,H,W] 0..1 tensor) -> per image {floor, nouns: {noun: {present, colour, pattern}}}."""
        x = images if isinstance(images, torch.Tensor) else pil_to_tensor(images, self.cfg.size)
        self.eval()
        out = self(x.float())
        res = []
        for b in range(x.shape[0]):
            nouns = {}
            for j, noun in enumerate(NOUNS):
                nouns[noun] = {"present": bool(out["presence"][b, j] > 0),
                               "p_present": float(torch.sigmoid(out["presence"][b, j])),
                               "colour": COLOUR_NAMES[int(out["colour"][b, j].argmax())],
                               "pattern": PATTERNS[int(out["pattern"][b, j].argmax())]}
            res.append({"floor": FLOOR_NAMES[int(out["floor"][b].argmax())], "nouns": nouns})
        return res


def pil_to_tensor(images, size: int) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), 2), dtype=np.float32) / 255.0
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def scene_targets(scene) -> dict[str, np.ndarray]:
    present = np.zeros(len(NOUNS), np.float32)
    colour = np.full(len(NOUNS), -100, np.int64)   # -100: ignored by cross_entropy
    pattern = np.full(len(NOUNS), -100, np.int64)
    for o in scene.objects:
        j = NOUNS.index(o.noun)
        present[j] = 1.0
        colour[j] = COLOUR_NAMES.index(o.colour)
        pattern[j] = PATTERNS.index(o.pattern)
    return {"present": present, "colour": colour, "pattern": pattern,
            "floor": np.int64(FLOOR_NAMES.index(scene.floor))}


def probe_dataset(n: int, seed: int = PROBE_SEED, world: WorldConfig | None = None, offset: int = 0):
    """n ground-truth renders from the probe's seed namespace: images [n,3,S,S] 0..1 + targets."""
    world = world or WorldConfig()
    images, targets = [], []
    for i in range(offset, offset + n):
        scene = sample_scene(np.random.default_rng(np.random.SeedSequence([seed, i])), world)
        images.append(np.asarray(render(scene, world.stripe_period), dtype=np.float32) / 255.0)
        targets.append(scene_targets(scene))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    t = {k: torch.from_numpy(np.stack([d[k] for d in targets])) for k in targets[0]}
    return x, t


@torch.no_grad()
def vae_round_trip(vae, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """encode -> decode (the latent's mean) through an AutoencoderKL; 0..1 in and out."""
    vae = vae.eval()
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, len(x), batch):
        xb = (x[i : i + batch] * 2 - 1).to(dtype)
        z = vae.encode(xb).latent_dist.mean
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light blur (random strength), brightness jitter and pixel noise."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    a = torch.rand(b, 1, 1, 1, generator=g) * 0.7
    x = x * (1 - a) + blurred * a
    x = x * (1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.08)
    x = x + torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * 0.04)
    return x.clamp(0, 1)


def probe_loss(out: dict, t: dict) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(out["presence"], t["present"])
            + F.cross_entropy(out["colour"].flatten(0, 1), t["colour"].flatten(), ignore_index=-100)
            + F.cross_entropy(out["pattern"].flatten(0, 1), t["pattern"].flatten(), ignore_index=-100)
            + 0.5 * F.cross_entropy(out["floor"], t["floor"]))


@torch.no_grad()
def probe_accuracy(model: AttributeProbe, x: torch.Tensor, t: dict, batch: int = 256) -> dict[str, float]:
    model.eval()
    outs = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    present = t["present"] > 0.5
    return {
        "presence": float(((out["presence"] > 0) == present).float().mean()),
        "colour": float((out["colour"].argmax(-1) == t["colour"])[present].float().mean()),
        "pattern": float((out["pattern"].argmax(-1) == t["pattern"])[present].float().mean()),
        "floor": float((out["floor"].argmax(-1) == t["floor"]).float().mean()),
        "n_images": int(len(x)),
        "n_objects": int(present.sum()),
    }


def train_probe(out: str | Path | None = None, *, vae=None, vae_dir: str | Path | None = None,
                scenes: int | None = None, cfg: ProbeConfig | None = None, progress: bool = True,
                max_seconds: float | None = None) -> tuple[AttributeProbe, dict]:
    """Train the probe (a few CPU minutes at the defaults); save to `out` if given. Returns (probe, metrics).

    vae / vae_dir: the model's AutoencoderKL (or its diffusers folder): `vae_fraction` (half) of the
    training images are VAE round trips, and held-out accuracy is reported on both raw and round-tripped renders.
    max_seconds: stop training early (tests)."""
    from tqdm.auto import tqdm

    cfg = cfg or ProbeConfig()
    if scenes is not None:
        cfg = ProbeConfig(**{**asdict(cfg), "scenes": int(scenes), "held_out": min(cfg.held_out, max(16, scenes // 8))})
    if vae is None and vae_dir is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).float()
    t0 = time.perf_counter()
    x, t = probe_dataset(cfg.scenes)
    xv, tv = probe_dataset(cfg.held_out, offset=10_000_000)   # held out: same namespace, far indices
    xv_rt = None
    if vae is not None:
        # the first vae_fraction of the training scenes are seen only as VAE round trips (the scenes
        # are i.i.d., so which ones does not matter; round-tripping only those halves the VAE cost)
        m = int(round(len(x) * cfg.vae_fraction))
        x = torch.cat([vae_round_trip(vae, x[:m]), x[m:]]) if m else x
        xv_rt = vae_round_trip(vae, xv)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = AttributeProbe(cfg)
    batch = max(1, min(cfg.batch, len(x)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * max(1, len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(total=steps, desc="probe", disable=not progress)
    step = 0
    stopped_early = False
    while step < steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            if torch.rand(1, generator=g).item() < 0.5:
                xb = xb.flip(-1)   # mirror: every shape and pattern of the world is mirror-symmetric
            xb = augment(xb, g)
            model.train()
            loss = probe_loss(model(xb), {k: v[idx] for k, v in t.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stopped_early = True
                step = steps
                break
    bar.close()
    metrics = {"held_out": probe_accuracy(model, xv, tv)}
    if xv_rt is not None:
        metrics["held_out_vae"] = probe_accuracy(model, xv_rt, tv)
    metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["stopped_early"] = stopped_early
    model.eval()
    if out is not None:
        save_probe(out, model, metrics)
    return model, metrics


def save_probe(path: str | Path, model: AttributeProbe, metrics: dict) -> Path:
    from safetensors.torch import save_file

    from mumu_core.atomic import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": PROBE_FORMAT, "config": json.dumps(asdict(model.cfg)), "metrics": json.dumps(metrics),
            "vocab": json.dumps({"nouns": NOUNS, "colours": COLOUR_NAMES, "patterns": PATTERNS, "floors": FLOOR_NAMES}),
            "probe_seed": str(PROBE_SEED)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return path


def load_probe(path: str | Path) -> tuple[AttributeProbe, dict]:
    """-> (probe in eval mode, metadata with config / metrics decoded)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path} is not a shapes attribute probe (format {meta.get('format')!r}).")
    cfg = ProbeConfig(**json.loads(meta["config"]))
    model = AttributeProbe(cfg)
    model.load_state_dict(load_file(str(path)))
    info = {"config": asdict(cfg), "metrics": json.loads(meta.get("metrics", "{}")), "path": str(path)}
    return model.eval(), info


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mumu_training.shapes.probe", description="train the attribute probe")
    p.add_argument("--out", required=True, type=Path, help="probe .safetensors to write")
    p.add_argument("--vae", type=Path, default=None, help="diffusers AutoencoderKL folder (e.g. MODEL/sdxl/vae)")
    p.add_argument("--scenes", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    a = p.parse_args(argv)
    cfg = ProbeConfig()
    if a.epochs:
        cfg.epochs = a.epochs
    _, metrics = train_probe(a.out, vae_dir=a.vae, scenes=a.scenes, cfg=cfg)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
