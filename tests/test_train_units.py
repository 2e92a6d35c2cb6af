"""Training pieces without training: config errors, batch plan, length grouping, resume position, loss."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mumu_core.errors import MumuError
from mumu_training.config import TrainConfigError, check_paths, config_from_dict, load_config
from mumu_training.data import BatchPlan, GroupedLoader, padding_fraction

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


def _raw(**sections) -> dict:
    raw = {"model": {"vlm": "v", "sdxl": "s"}, "data": {"annotations": "a"}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize("name", ["stage1", "stage2", "tiny"])
def test_shipped_configs_parse_and_follow_the_paper(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.vlm_lora.rank == 8 and cfg.model.unet_lora.rank == 8
    if name != "tiny":  # Table 1 learning rates, bf16
        assert (cfg.optim.lr_vlm_lora, cfg.optim.lr_adapter, cfg.optim.lr_unet_lora) == (3e-6, 1e-5, 5e-6)
        assert cfg.run.mixed_precision == "bf16" and cfg.model.adapter["depth"] == 16
    tokens = {"stage1": ("stage1_tokens", 324), "stage2": ("stage2_tokens", 1296)}.get(name)
    if tokens:
        assert cfg.data.sample[tokens[0]] == tokens[1]
    if name == "stage2":
        assert cfg.data.sample["stage"] == 2 and cfg.model.init_from


def test_lr_schedule_warms_up_then_holds_or_anneals():
    from mumu_training.lr_schedule import lr_factor

    assert [lr_factor(s, 4, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 4, 100, "cosine", 0.1) for s in range(100)]
    assert cos[3] == 1.0 and cos[4] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(cos[4:], cos[5:]))  # monotone after warm-up
    assert lr_factor(52, 4, 100, "cosine", 0.0) == pytest.approx(0.5)
    with pytest.raises(TrainConfigError, match="optim.lr_schedule.*constant.*cosine"):
        config_from_dict(_raw(optim={"lr_schedule": "linear"}))
    with pytest.raises(TrainConfigError, match="optim.min_lr_ratio"):
        config_from_dict(_raw(optim={"lr_schedule": "cosine", "min_lr_ratio": 2}))


def test_unknown_keys_name_the_valid_ones():
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['lr_adaptor'\].*lr_adapter"):
        config_from_dict(_raw(optim={"lr_adaptor": 1e-5}))
    with pytest.raises(TrainConfigError, match="data.sample.*Valid keys"):
        config_from_dict(_raw(data={"sample": {"stage1_token": 324}}))


def test_tokens_per_image_must_be_a_square_grid():
    with pytest.raises(MumuError, match=r"stage1_tokens=300 is not a square grid.*289.*324"):
        config_from_dict(_raw(data={"sample": {"stage1_tokens": 300}}))


def test_bad_numbers_are_refused_with_the_key():
    with pytest.raises(TrainConfigError, match="data.batch_size"):
        config_from_dict(_raw(data={"batch_size": 0}))
    with pytest.raises(TrainConfigError, match="run.mixed_precision"):
        config_from_dict(_raw(run={"mixed_precision": "fp8"}))


def test_missing_data_and_wrong_vlm_family_are_clear(tmp_path):
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    cfg = config_from_dict(_raw(model={"vlm": str(vlm), "sdxl": str(sdxl)}, data={"annotations": str(tmp_path / "nope")}))
    with pytest.raises(TrainConfigError, match=r"holds a 'idefics3' model, but model.vlm_family is 'idefics2'"):
        check_paths(cfg)
    cfg.model.vlm_family = "idefics3"
    with pytest.raises(TrainConfigError, match=r"no bootstrapped annotations.*mumu bootstrap"):
        check_paths(cfg)


def test_batch_plan_splits_each_epoch_between_ranks_without_overlap():
    plans = [BatchPlan(48, batch_size=2, group_size=3, world_size=2, rank=r, seed=1) for r in (0, 1)]
    per_epoch = plans[0].megabatches_per_epoch
    assert per_epoch == 4
    seen = np.concatenate([p.megabatch_indices(m)[1] for p in plans for m in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(48))  # every record once per epoch
    assert plans[0].megabatch_indices(per_epoch)[0] == 1  # next epoch, new order
    assert not np.array_equal(plans[0].megabatch_indices(0)[1], plans[0].megabatch_indices(per_epoch)[1])
    tiny = BatchPlan(3, batch_size=2, group_size=2, world_size=2, rank=1, seed=0)  # fewer records than a megabatch
    assert len(tiny.megabatch_indices(0)[1]) == 4


@dataclass
class _Prompt:
    n: int


@dataclass
class _Sample:
    prompt: _Prompt
    index: int
    epoch: int


class _FakeDataset:
    """Lengths like MUMU prompts: 0-4 images of 324 tokens plus ~20 text tokens."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.lengths = (rng.integers(0, 5, n) * 326 + rng.integers(8, 30, n)).tolist()
        self.epoch = 0

    def __len__(self):
        return len(self.lengths)

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        return _Sample(_Prompt(self.lengths[i]), i, self.epoch)


def _take(loader, start, n):
    it = loader.iterate(start)
    return [next(it) for _ in range(n)]


def test_length_grouping_cuts_padding_and_keeps_every_sample():
    ds = _FakeDataset(256)
    kw = dict(batch_size=4, group_size=16, world_size=1, rank=0, seed=3)
    grouped = GroupedLoader(ds, lambda p: p.n, group_by_length=True, **kw)
    plain = GroupedLoader(ds, lambda p: p.n, group_by_length=False, **kw)
    g, p = _take(grouped, 0, 64), _take(plain, 0, 64)
    pad_g = np.mean([padding_fraction(mb.lengths) for mb in g])
    pad_p = np.mean([padding_fraction(mb.lengths) for mb in p])
    assert pad_g < 0.5 * pad_p, (pad_g, pad_p)
    assert np.isclose(np.mean([padding_fraction(mb.ungrouped_lengths) for mb in g]), pad_p)
    assert sorted(s.index for mb in g for s in mb.samples) == sorted(s.index for mb in p for s in mb.samples)
    assert [mb.index for mb in g] == list(range(64))


def test_resuming_mid_megabatch_continues_the_exact_sequence():
    ds = _FakeDataset(40)
    loader = GroupedLoader(ds, lambda p: p.n, batch_size=2, group_size=4, world_size=1, rank=0, seed=0)
    straight = _take(loader, 0, 30)  # crosses an epoch boundary (5 megabatches = 20 micro-batches per epoch)
    resumed = _take(loader, 11, 19)
    key = lambda mbs: [(mb.index, mb.epoch, [s.index for s in mb.samples]) for mb in mbs]  # noqa: E731
    assert key(resumed) == key(straight[11:])
    assert {s.epoch for mb in straight for s in mb.samples} == {0, 1}


def test_padding_fraction():
    assert padding_fraction([10, 10]) == 0.0
    assert padding_fraction([10, 5]) == 0.25


def test_min_snr_weighting_only_downweights_low_noise_steps():
    from diffusers import DDPMScheduler

    from mumu_core.pipeline import SDXL_BASE_CONFIG
    from mumu_training.diffusion_loss import diffusion_loss

    sched = DDPMScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "scaled_linear"
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    plain = diffusion_loss(pred, target, t, sched, None)
    assert torch.isclose(plain, torch.nn.functional.mse_loss(pred, target))
    assert torch.isclose(diffusion_loss(pred, target, t, sched, 1e9), plain)  # gamma above every SNR: no change
    hi = diffusion_loss(pred, target, torch.tensor([900, 900]), sched, 5.0)  # SNR < 5 at t=900: weight 1
    assert torch.isclose(hi, plain)
    lo = diffusion_loss(pred, target, torch.tensor([10, 10]), sched, 5.0)  # SNR >> 5 at t=10: down-weighted
    assert lo < 0.1 * plain


def test_v_pred_like_loss_adds_a_v_prediction_term_for_epsilon_models():
    from diffusers import DDPMScheduler

    from mumu_core.pipeline import SDXL_BASE_CONFIG
    from mumu_training.diffusion_loss import diffusion_loss

    sched = DDPMScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler")
    torch.manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = torch.nn.functional.mse_loss(pred, target)
    for t in (10, 500, 999):
        a = sched.alphas_cumprod[t]
        got = diffusion_loss(pred, target, torch.tensor([t]), sched, None, v_pred_like=1.0)
        assert torch.isclose(got, plain * (1 + 1 / a), rtol=1e-4), t  # an ε error costs 1/ᾱ_t in v
    v_sched = DDPMScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler", prediction_type="v_prediction")
    assert torch.isclose(diffusion_loss(pred, target, torch.tensor([999]), v_sched, None, v_pred_like=1.0), plain)
    with pytest.raises(TrainConfigError, match="loss.v_pred_like_loss"):
        config_from_dict(_raw(loss={"v_pred_like_loss": -1}))


def test_timestep_bias_draws_the_chosen_steps_more_often():
    from diffusers import DDPMScheduler

    from mumu_core.pipeline import SDXL_BASE_CONFIG
    from mumu_training.diffusion_loss import add_training_noise, timestep_weights, timestep_weights_for

    assert timestep_weights(1000, "none", 0.3, 5.0) is None and timestep_weights(1000, "later", 0.3, 1.0) is None
    w = timestep_weights(1000, "later", 0.3, 5.0)
    assert w.sum().item() == pytest.approx(1.0) and w[700:].sum().item() == pytest.approx(1.5 / 2.2)
    assert timestep_weights(1000, "earlier", 0.1, 3.0)[:100].sum().item() == pytest.approx(0.3 / 1.2)
    r = timestep_weights(1000, "range", multiplier=9.0, begin=600, end=800)
    assert r[600:800].sum().item() == pytest.approx(1.8 / 2.6)
    sched = DDPMScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler")
    latents = torch.zeros(4000, 1, 1, 1)
    drawn = add_training_noise(latents, sched, torch.Generator().manual_seed(0), timestep_weights=w).timesteps
    assert 0.64 < (drawn >= 700).float().mean().item() < 0.72  # 68 % expected (30 % uniformly)
    uniform = add_training_noise(latents, sched, torch.Generator().manual_seed(0)).timesteps
    assert 0.27 < (uniform >= 700).float().mean().item() < 0.33
    cfg = config_from_dict(_raw(loss={"timestep_bias_strategy": "later", "timestep_bias_portion": 0.3,
                                      "timestep_bias_multiplier": 5.0}))
    assert torch.equal(timestep_weights_for(cfg.loss, 1000), w)
    with pytest.raises(TrainConfigError, match="loss.timestep_bias_strategy.*later"):
        config_from_dict(_raw(loss={"timestep_bias_strategy": "late"}))
    with pytest.raises(TrainConfigError, match="loss.timestep_bias_multiplier"):
        config_from_dict(_raw(loss={"timestep_bias_multiplier": 0}))
    with pytest.raises(TrainConfigError, match="loss.timestep_bias_begin/end"):
        config_from_dict(_raw(loss={"timestep_bias_strategy": "range", "timestep_bias_begin": 900,
                                    "timestep_bias_end": 800}))
