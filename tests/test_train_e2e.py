"""End to end: generated images -> bootstrap -> 2-process (gloo) training -> export -> ComfyUI/diffusers load.

One training run serves every assertion here (each launch costs ~10 s of interpreter start-up on
2 cores): two CPU processes overfit one micro-batch for 8 steps, with a checkpoint at step 4 and
validation images at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"
EXPORT = REPO / "training" / "export.py"
TINY_YAML = REPO / "training" / "configs" / "tiny.yaml"
STEPS = 8

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="session")
def tiny_train_root(tmp_path_factory) -> Path:
    """Tiny components + generated, bootstrapped dataset (what tiny.yaml creates on first use)."""
    from mumu_training.config import load_config
    from mumu_training.tiny_data import ensure_tiny_assets

    root = tmp_path_factory.getbasetemp() / "train_tiny_root"
    ensure_tiny_assets(load_config(TINY_YAML, {"tiny.root": str(root), "tiny.num_images": 6}))
    return root


@pytest.fixture(scope="module")
def run(tiny_train_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_e2e")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), "--config", str(TINY_YAML),
           "--output-dir", str(out), "--max-steps", str(STEPS),
           "--set", f"tiny.root={tiny_train_root}", "--set", "tiny.num_images=6",
           "--set", "data.overfit_one_batch=true", "--set", "run.checkpoint_every=4",
           "--set", f"run.validate_every={STEPS}", "--set", "run.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=_env(ACCELERATE_USE_CPU="1", MUMU_TRAIN_DIGESTS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ranks_agree_and_frozen_weights_do_not_move(run):
    digests = [json.loads((run / f"digest-rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["trainable"] == digests[1]["trainable"]
    for d in digests:
        assert d["frozen_before"] == d["frozen_after"]
    assert digests[0]["frozen_before"] == digests[1]["frozen_before"]


def test_loss_decreases_on_an_overfit_batch(run):
    losses = _losses(run)
    assert len(losses) == STEPS
    assert losses[-1] < 0.97 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= STEPS - 2, losses


def test_checkpoints_are_complete_and_rotated(run):
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-0000004", "checkpoint-0000008"]  # no .partial left behind
    last = run / "checkpoints" / "checkpoint-0000008"
    for name in ("trainable.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "random_states_1.pkl", "train_state.json", "mumu_train.json"):
        assert (last / name).is_file(), name
    assert not (last / "model.safetensors").exists()  # frozen base weights are never copied
    assert json.loads((last / "train_state.json").read_text())["step"] == STEPS
    assert (run / "samples" / f"step-{STEPS:07d}" / "00.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*"))


def test_export_cli_matches_end_of_training_export_and_peft_keys(run, tiny_train_root, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from mumu_core.bundle import load_bundle
    from mumu_core.vlm import apply_vlm_lora, load_vlm

    out = tmp_path / "b.safetensors"
    lora = tmp_path / "l.safetensors"
    proc = subprocess.run([sys.executable, str(EXPORT), "--checkpoint", str(run / "checkpoints" / "checkpoint-0000008"),
                           "--out", str(out), "--lora-out", str(lora)], capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    ours, final = load_bundle(out), load_bundle(run / "mumu_bundle.safetensors")
    assert ours.config == final.config
    for part in ("adapter", "vlm_lora", "unet_lora"):
        a, b = getattr(ours, part), getattr(final, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    cfg = ours.config
    assert cfg["tokens_per_image"] == 16 and cfg["vlm"]["family"] == "idefics2"
    assert cfg["vlm_lora"]["rank"] == 8 and cfg["unet_lora"]["rank"] == 8 and cfg["provenance"]["step"] == STEPS
    # vlm_lora keys are exactly what PEFT writes for this VLM (what MumuEncoder loads)
    vlm = load_vlm(tiny_train_root / "components" / "vlm")
    want = get_peft_model_state_dict(apply_vlm_lora(vlm.model, vlm.family, rank=8, alpha=8.0))
    assert set(ours.vlm_lora) == set(want)
    assert any("modality_projection" in k for k in want) and not any("vision_model" in k for k in want)
    # trained: lora_B moved off its zero init
    assert all(v.abs().sum() > 0 for k, v in ours.vlm_lora.items() if ".lora_B." in k)
    standalone = load_file(str(lora))
    assert set(standalone) == set(ours.unet_lora)
    assert all(k.startswith("lora_unet_") for k in standalone)


def test_standalone_lora_matches_every_comfyui_unet_key(run, tiny_train_root):
    """ComfyUI's LoraLoaderModelOnly maps `lora_unet_<ldm key with _>` onto `diffusion_model.<ldm key>`
    (comfy/lora.py model_lora_keys_unet); every module of ours must hit a weight of that shape."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora = load_file(str(run / "unet_lora.safetensors"))
    shapes = {}
    with safe_open(str(tiny_train_root / "components" / "sdxl_tiny.safetensors"), framework="pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
                ldm = k[len("model.diffusion_model."):-len(".weight")]
                shapes["lora_unet_" + ldm.replace(".", "_")] = tuple(f.get_slice(k).get_shape())
    stems = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in lora}
    assert stems and stems <= set(shapes), sorted(stems - set(shapes))[:5]
    for stem in stems:
        up, down = lora[f"{stem}.lora_up.weight"], lora[f"{stem}.lora_down.weight"]
        assert (up.shape[0], down.shape[1]) == shapes[stem][:2]


def test_bundle_loads_in_encoder_and_lora_in_diffusers_and_makes_an_image(run, tiny_train_root):
    from PIL import Image
    from safetensors.torch import load_file

    from mumu_core.encoder import MumuEncoder
    from mumu_core.pipeline import generate, load_sdxl_pipeline, load_unet_lora_into_pipeline
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    comps = tiny_train_root / "components"
    encoder = MumuEncoder.from_pretrained(comps / "vlm", run / "mumu_bundle.safetensors")
    man = Image.open(comps / "images" / "man.png").convert("RGB")
    positive = encoder.encode(InterleavedPrompt.parse("a <image> man", [PromptImage(man, tokens_per_image=16)]))
    negative = encoder.encode_unconditional()
    assert positive.context.shape[-1] == 2048 and torch.isfinite(positive.context).all()
    pipe = load_sdxl_pipeline(comps / "sdxl")
    n_layers = load_unet_lora_into_pipeline(pipe, run / "unet_lora.safetensors")
    injected = [m for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "mumu" in m.lora_A]
    file_layers = {k.split(".")[0] for k in load_file(run / "unet_lora.safetensors")}
    assert n_layers == len(injected) == len(file_layers) > 0  # every layer of the file placed
    image = generate(pipe, positive, negative, steps=2, cfg=6.0, seed=0, width=64, height=64, progress=False)
    assert image.size == (64, 64)


@pytest.mark.parametrize("source", ["bundle", "checkpoint"])
def test_stage2_starts_from_stage1(run, tiny_train_root, tmp_path, source):
    """init_from a bundle or a checkpoint folder loads adapter + both LoRAs exactly (learning rates 0)."""
    from mumu_core.bundle import load_bundle

    init = run / "mumu_bundle.safetensors" if source == "bundle" else run / "checkpoints" / f"checkpoint-{STEPS:07d}"
    out = tmp_path / "stage2"
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY_YAML), "--output-dir", str(out), "--max-steps", "1",
           "--set", f"tiny.root={tiny_train_root}", "--set", "tiny.num_images=6",
           "--set", f"model.init_from={init}", "--set", "data.sample.stage=2",
           "--set", "data.sample.stage2_tokens=36", "--set", "run.validate_every=0", "--set", "run.progress=false",
           "--set", "optim.lr_vlm_lora=0", "--set", "optim.lr_adapter=0", "--set", "optim.lr_unet_lora=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    stage1, stage2 = load_bundle(run / "mumu_bundle.safetensors"), load_bundle(out / "mumu_bundle.safetensors")
    assert stage2.config["tokens_per_image"] == 36 and stage2.config["provenance"]["stage"] == 2
    for part in ("adapter", "vlm_lora", "unet_lora"):
        a, b = getattr(stage1, part), getattr(stage2, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a), part


def test_bf16_mixed_precision_keeps_trainable_weights_fp32(tiny_train_root, tmp_path):
    """The production precision (bf16 autocast, frozen weights bf16, fp32 masters), on CPU; with the
    grounding loss on, which must log its own term and leave validation sampling alone."""
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY_YAML), "--output-dir", str(out), "--max-steps", "2",
           "--set", f"tiny.root={tiny_train_root}", "--set", "tiny.num_images=6", "--set", "run.mixed_precision=bf16",
           "--set", "run.validate_every=2", "--set", "run.progress=false", "--set", "loss.grounding_weight=0.01"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = load_file(str(out / "checkpoints" / "checkpoint-0000002" / "trainable.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    grounding = [json.loads(line)["loss/grounding"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < g <= 1 for g in grounding), grounding
    assert (out / "samples" / "step-0000002" / "00.png").is_file()
