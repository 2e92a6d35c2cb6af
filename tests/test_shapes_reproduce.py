"""The shapes-world reproduce command end to end at tiny step counts (`--quick`), and its resume."""

import json
import subprocess
import sys

import pytest


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
    # the eval's JSON line carries every condition it ran, with Wilson intervals
    figures = summary["eval"]
    assert {"a", "b", "d"} <= set(figures["conditions"])
    colour = figures["conditions"]["b"]["colour"]
    assert 0.0 <= colour["lo"] <= colour["p"] <= colour["hi"] <= 1.0
    # every shipped weight is stored in fp16 (the package budget)
    from safetensors import safe_open

    with safe_open(str(model / "mumu_shapes.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} <= {"F16"}
    # a rerun finds every stage complete and only re-runs the eval
    again = subprocess.run(cmd + ["--no-eval"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 0: VAE" not in again.stderr and "train:" not in again.stderr
