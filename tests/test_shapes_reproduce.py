"""The shapes-world reproduce command end to end at tiny step counts (`--quick`), and its resume."""

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_reproduce_quick_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "shapes"
    cmd = [sys.executable, "-m", "mumu_training.shapes", "reproduce", "--quick", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "expected time on 2 CPU cores" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    model = out / "model"
    for rel in ["world/boot/manifest.json", "stage0/vae/config.json", "stage0/sdxl/model_index.json",
                "stage0/adapter.safetensors", "stage1/mumu_bundle.safetensors", "model/vlm/config.json",
                "model/sdxl/unet/config.json", "model/mumu_shapes.safetensors", "model/probe.safetensors",
                "eval/eval.json", "eval/contact_sheet.png", "stage0/text_check.json", "stage0/text_check.png"]:
        assert (out / rel).is_file(), rel
    assert summary["model"] == str(model)
    # the VAE's scaling factor gives latents of PretrainConfig.latent_std, not SDXL's unit std
    from mumu_training.shapes.pretrain import PretrainConfig

    vae_summary = json.loads((out / "stage0" / "vae_summary.json").read_text())
    vae_config = json.loads((model / "sdxl" / "vae" / "config.json").read_text())
    assert vae_summary["scaled_latent_std"] == PretrainConfig.latent_std < 0.5
    assert vae_config["scaling_factor"] == pytest.approx(PretrainConfig.latent_std / vae_summary["latent_std"], rel=1e-3)
    # the stage-0 text check scored both settings with intervals (4 prompts each at --quick)
    checked = json.loads((out / "stage0" / "text_check.json").read_text())
    assert checked["objects_2_3"]["colour"]["n"] >= 8 and checked["object_1"]["colour"]["n"] == 4
    assert summary["stage0_text_check"]["object_1"] == checked["object_1"]["colour"]
    # the toy SDXL has SDXL base's ε schedule (components.SCHEDULE) and cross-attention at every level,
    # and its UNet LoRA (trained on that non-SDXL layout) was exported and loaded by `mumu eval`
    sched = json.loads((model / "sdxl" / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["rescale_betas_zero_snr"], sched["timestep_spacing"]) == (
        "epsilon", False, "leading")
    unet = json.loads((model / "sdxl" / "unet" / "config.json").read_text())
    assert unet["down_block_types"][0] == "CrossAttnDownBlock2D"
    assert (out / "stage1" / "unet_lora.safetensors").is_file()
    # stage 1 trained with the grounding loss (configs/shapes.yaml) and logged it beside the diffusion loss
    logged = [json.loads(line) for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(0.0 < rec["loss/grounding"] <= 1.0 for rec in logged)
    # then continued from its own bundle at half the learning rates; that second bundle is the model's
    from mumu_core.bundle import load_bundle
    from mumu_training.checkpoints import read_train_state
    from mumu_training.shapes.reproduce import QUICK, _shapes_config

    # (QUICK continues twice: stage1_more from stage1, stage1_more2 from stage1_more)
    assert QUICK.stage1_more_rounds == 2
    # every stage-1 run is QUICK.stage1_processes data-parallel processes splitting the global batch
    state = read_train_state(sorted((out / "stage1" / "checkpoints").glob("checkpoint-*"))[-1])
    layout = state["layout"]
    assert layout["world_size"] == QUICK.stage1_processes == 2
    assert layout["world_size"] * layout["batch_size"] == QUICK.stage1_batch != QUICK.batch
    peak = _shapes_config()["optim"]["lr_adapter"] * QUICK.stage1_more_lr_scale
    for d in ("stage1_more", "stage1_more2"):
        more = [json.loads(line) for line in (out / d / "metrics.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in more][-1] == QUICK.stage1_more_steps
        assert max(rec["lr/adapter"] for rec in more) <= peak * (1 + 1e-6)
        state = read_train_state(sorted((out / d / "checkpoints").glob("checkpoint-*"))[-1])
        layout = state["layout"]
        assert layout["world_size"] * layout["batch_size"] == QUICK.stage1_more_batch != QUICK.stage1_batch
    first, second, last = (load_bundle(out / d / "mumu_bundle.safetensors")
                           for d in ("stage1", "stage1_more", "stage1_more2"))
    assert any(not torch.equal(first.adapter[k], second.adapter[k]) for k in first.adapter)
    assert any(not torch.equal(second.adapter[k], last.adapter[k]) for k in first.adapter)
    assert torch.equal(load_bundle(model / "mumu_shapes.safetensors").adapter[k := next(iter(last.adapter))],
                       last.adapter[k].half())
    # --quick also runs stage 0's optional grounding loss on each object's phrase and box (off by default)
    logged = [json.loads(line) for line in (out / "stage0" / "t2i_log.jsonl").read_text().splitlines()]
    assert logged and all(0.0 < rec["loss/grounding"] <= 1.0 for rec in logged)
    # the eval's JSON line carries every condition it ran, with Wilson intervals
    figures = summary["eval"]
    assert {"a", "b", "d"} <= set(figures["conditions"])
    colour = figures["conditions"]["b"]["colour"]
    assert 0.0 <= colour["lo"] <= colour["p"] <= colour["hi"] <= 1.0
    # every shipped weight is stored in fp16 (the package budget)
    from safetensors import safe_open

    with safe_open(str(model / "mumu_shapes.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} <= {"F16"}
    # `ship` installs a copy with the UNet LoRA fused: no unet_lora tensors, the same UNet output
    _assert_ship_fuses_the_unet_lora(model, tmp_path)
    # a rerun finds every stage complete and only re-runs the eval
    again = subprocess.run(cmd + ["--no-eval"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 0: VAE" not in again.stderr and "train:" not in again.stderr



def _assert_ship_fuses_the_unet_lora(model, tmp_path):
    """Ship a copy of the quick model whose LoRA is scaled up (3 training steps barely move it, and a
    fused delta below fp16's step would vanish), then compare UNet outputs: LoRA'd, fused, base."""
    import shutil

    import torch

    from mumu_core.bundle import load_bundle, read_bundle_config, save_bundle
    from mumu_core.pipeline import load_sdxl_pipeline, load_unet_lora_into_pipeline

    strong = tmp_path / "strong_model"
    shutil.copytree(model, strong)
    b = load_bundle(strong / "mumu_shapes.safetensors")
    up = {k: (v.float() * 300 if "lora_up" in k else v) for k, v in b.unet_lora.items()}
    save_bundle(strong / "mumu_shapes.safetensors", b.config, b.adapter, b.vlm_lora, up)
    shipped = tmp_path / "shipped"
    res = subprocess.run([sys.executable, "-m", "mumu_training.shapes", "ship", "--model", str(strong), "--to",
                          str(shipped)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["unet_lora_fused"] is True
    assert not (tmp_path / ".shipped.partial").exists()
    assert read_bundle_config(shipped / "mumu_shapes.safetensors")["unet_lora"] == {}

    with_lora = load_sdxl_pipeline(strong / "sdxl")
    assert load_unet_lora_into_pipeline(with_lora, strong / "mumu_shapes.safetensors") > 0
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 2048, generator=g)
    cond = {"text_embeds": torch.randn(2, 1280, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        out = {name: pipe.unet(x, 500, ctx, added_cond_kwargs=cond).sample for name, pipe in
               [("lora", with_lora), ("fused", load_sdxl_pipeline(shipped / "sdxl")),
                ("base", load_sdxl_pipeline(strong / "sdxl"))]}
    fused_err = (out["lora"] - out["fused"]).abs().max()
    assert (out["lora"] - out["base"]).abs().max() > 10 * fused_err  # the LoRA is in the fused weights


def test_expected_minutes_count_each_continued_stage1_round():
    from dataclasses import replace

    from mumu_training.shapes.reproduce import Plan, expected_minutes

    plan = Plan()
    per_round = dict(plan.minutes)["stage 1 continued"]
    default = dict(expected_minutes(plan))
    assert sum(default.values()) <= 120                 # the budget on 2 cores
    assert default["stage 1 continued"] == pytest.approx(per_round * plan.stage1_more_rounds)
    more = dict(expected_minutes(replace(plan, stage1_more_rounds=plan.stage1_more_rounds + 1)))
    assert sum(more.values()) == pytest.approx(sum(default.values()) + per_round)
    assert "stage 1 continued" not in dict(expected_minutes(replace(plan, stage1_more_rounds=0)))
    assert "stage 1 continued" not in dict(expected_minutes(replace(plan, stage1_more_steps=0)))


def test_stage1_launch_splits_a_cpu_over_one_thread_processes(monkeypatch, tmp_path):
    from mumu_training.shapes import reproduce

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)
    cmd, env, n = reproduce.stage1_launch(2)
    assert n == 2 and cmd[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
    assert (env["ACCELERATE_USE_CPU"], env["OMP_NUM_THREADS"]) == ("1", "1")
    assert reproduce.stage1_launch(1)[0] == [sys.executable]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # a GPU: one process on it
    assert reproduce.stage1_launch(2)[2] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = reproduce.Plan(stage1_processes=3, stage1_batch=16)
    with pytest.raises(ValueError, match="a stage-1 batch of 16 does not split over 3 processes"):
        reproduce._train_stage1(tmp_path, tmp_path / "stage1", 10, plan, plan.stage1_batch, {})
