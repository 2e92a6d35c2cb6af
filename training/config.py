"""Training configuration: one YAML file with every knob, validated before anything heavy loads.

Sections (see training/configs/stage1.yaml for every key with its default and meaning):
  run         output dir, seed, steps, precision, accumulation, checkpoint/validation cadence
  model       VLM folder (+ expected family), SDXL (folder or single file), adapter shape, LoRA
              ranks/targets, gradient checkpointing, init_from (stage 2: a stage-1 bundle/checkpoint)
  optim       per-module learning rates (paper Table 1), AdamW betas/eps/decay, warmup, clipping
  loss        min-SNR gamma, noise offset
  data        annotation folder (bootstrap output), batch size, length grouping, sample builder
              (buckets, control maps, crop minimum), latent cache
  validation  fixed multimodal prompts rendered every `run.validate_every` steps
  tiny        when set, the tiny offline components and a generated, bootstrapped dataset are
              created under `tiny.root` on first use and `{tiny}` in any path expands to it

Errors are `TrainConfigError` (a MumuError): they name the key, what was found, what is expected
and how to fix it, and are raised before any model is loaded.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from mumu_core.errors import MumuError


class TrainConfigError(MumuError):
    """The training config does not fit (bad key, missing data, wrong model folder, ...)."""


@dataclass
class RunConfig:
    output_dir: str = "runs/stage1"
    seed: int = 0
    max_steps: int = 150_000
    mixed_precision: str = "bf16"         # "no" | "fp16" | "bf16" (accelerate); bf16 on H100
    gradient_accumulation_steps: int = 1
    checkpoint_every: int = 1000          # optimizer steps; 0 = only at the end
    checkpoints_total_limit: int = 3      # older checkpoint-* folders are deleted
    validate_every: int = 2000            # 0 = never
    log_every: int = 10
    export_at_end: bool = True            # write OUTPUT/mumu_bundle.safetensors + OUTPUT/unet_lora.safetensors
    progress: bool = True                 # tqdm on the main process


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Any = None                   # None: family default (VLM) / attention projections (UNet)


@dataclass
class ModelConfig:
    vlm: str = ""                         # local HF-layout folder (idefics2 / idefics3 / smolvlm)
    vlm_family: str | None = "idefics2"   # expected family; None = accept any supported family
    sdxl: str = ""                        # diffusers folder or single-file .safetensors
    sdxl_config: str | None = None        # diffusers config folder for non-SDXL-base single files
    hidden_layer: int = -1
    adapter: dict = field(default_factory=lambda: {"width": 1024, "depth": 16, "heads": 16, "mlp_ratio": 4.0})
    vlm_lora: LoraSpec = field(default_factory=LoraSpec)
    unet_lora: LoraSpec = field(default_factory=lambda: LoraSpec(targets=["to_q", "to_k", "to_v", "to_out.0"]))
    gradient_checkpointing: bool = True   # VLM LLM, adapter and UNet
    init_from: str | None = None          # stage 2: a stage-1 bundle (.safetensors) or checkpoint folder
    adapter_init: str | None = None       # adapter weights (.safetensors with its config) to start from


@dataclass
class OptimConfig:
    lr_vlm_lora: float = 3e-6             # paper Table 1 (LLM + modality projection LoRA)
    lr_adapter: float = 1e-5              # paper Table 1 (adapter, fully trained)
    lr_unet_lora: float = 5e-6            # paper Table 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 500
    lr_schedule: str = "constant"         # after warm-up: "constant" (paper) or "cosine" (to min_lr_ratio)
    min_lr_ratio: float = 0.1             # cosine: the final rate as a fraction of the base rate
    max_grad_norm: float = 1.0            # 0 = no clipping


@dataclass
class LossConfig:
    min_snr_gamma: float | None = None    # e.g. 5.0 (Hang et al. 2023); None = plain MSE
    noise_offset: float = 0.0
    v_pred_like_loss: float = 0.0         # ε-prediction models: add this x a v-prediction loss (kohya's knob)
    # timestep draws (diffusers' SDXL script's knobs): "none" (uniform, the paper), "later" (the noisiest
    # `portion` of timesteps `multiplier` x as often), "earlier", or "range" ([begin, end))
    timestep_bias_strategy: str = "none"
    timestep_bias_portion: float = 0.25
    timestep_bias_multiplier: float = 1.0
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    # not in the paper: + this x a TokenCompose-style loss keeping each crop's cross-attention inside
    # its box in the target (training/grounding_loss.py); 0 = off, nothing installed
    grounding_weight: float = 0.0


@dataclass
class DataConfig:
    annotations: str = ""                 # bootstrap output folder (manifest.json + shards/)
    image_root: str | None = None         # where the images are now, if they moved after bootstrapping
    batch_size: int = 4                   # micro-batch per process
    group_by_length: bool = True
    group_size: int = 16                  # micro-batches built, sorted by token length, then split
    num_workers: int = 4
    person_weight: float = 1.0            # >1 samples records with a person crop more often (paper: biased)
    overfit_one_batch: bool = False       # debugging: repeat the first micro-batch and its noise
    sample: dict = field(default_factory=dict)  # SampleBuilderConfig fields (stage, resolution, ...)
    latent_cache: dict = field(default_factory=dict)  # {enabled, dir, dtype}: training/latent_cache.py


@dataclass
class ValidationConfig:
    prompts: list = field(default_factory=list)  # [{text: "a <image> man", images: [path, ...], mask?: ...}]
    steps: int = 30
    cfg: float = 6.0
    seed: int = 0
    width: int | None = None              # a training bucket (both or neither); default: the square one
    height: int | None = None


@dataclass
class TinyConfig:
    root: str = "runs/tiny_assets"
    num_images: int = 8
    detector: str = "owlv2"


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tiny: TinyConfig | None = None
    source: str | None = None             # the YAML path it came from

    def to_dict(self) -> dict:
        return _to_dict(self)


def _to_dict(obj):
    if is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise TrainConfigError(f"config section '{where}' must be a mapping; got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TrainConfigError(
            f"unknown key(s) {unknown} in config section '{where}'. Valid keys: {sorted(known)}. "
            f"Check the spelling against training/configs/stage1.yaml."
        )
    kwargs = {}
    for name, value in data.items():
        sub = {"vlm_lora": LoraSpec, "unet_lora": LoraSpec}.get(name) if cls is ModelConfig else None
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_SECTIONS = {"run": RunConfig, "model": ModelConfig, "optim": OptimConfig, "loss": LossConfig,
             "data": DataConfig, "validation": ValidationConfig, "tiny": TinyConfig}


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config, apply dotted-key overrides ({"run.max_steps": 10}), validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist. Shipped configs: training/configs/"
                               f"{{stage1,stage2,tiny}}.yaml.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path} is not valid YAML: {exc}") from None
    return config_from_dict(raw, overrides, source=str(path))


def config_from_dict(raw: dict, overrides: dict | None = None, source: str | None = None) -> TrainConfig:
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise TrainConfigError(f"unknown config section(s) {unknown}; valid sections: {sorted(_SECTIONS)}.")
    cfg = TrainConfig(**{name: _build(cls, raw.get(name), name) for name, cls in _SECTIONS.items()
                         if name != "tiny"}, source=source)
    if "tiny" in raw and raw["tiny"] is not None:
        cfg.tiny = _build(TinyConfig, raw["tiny"], "tiny")
    if cfg.tiny is not None:
        _expand_tiny(cfg)
    validate(cfg)
    return cfg


def _expand_tiny(cfg: TrainConfig) -> None:
    root = cfg.tiny.root

    def expand(v):
        if isinstance(v, str):
            return v.replace("{tiny}", root)
        if isinstance(v, list):
            return [expand(x) for x in v]
        if isinstance(v, dict):
            return {k: expand(x) for k, x in v.items()}
        return v

    for section in (cfg.model, cfg.data, cfg.validation, cfg.run):
        for f in fields(section):
            value = getattr(section, f.name)
            if not is_dataclass(value):
                setattr(section, f.name, expand(value))


def _validate_timestep_bias(loss: LossConfig) -> None:
    from .diffusion_loss import TIMESTEP_BIAS_STRATEGIES

    if loss.timestep_bias_strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise TrainConfigError(f"loss.timestep_bias_strategy must be one of {list(TIMESTEP_BIAS_STRATEGIES)}; "
                               f"got {loss.timestep_bias_strategy!r}.")
    m, p = loss.timestep_bias_multiplier, loss.timestep_bias_portion
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not m > 0 or not math.isfinite(m):
        raise TrainConfigError(f"loss.timestep_bias_multiplier must be > 0 (1 = uniform, 5 = five times as often); "
                               f"got {m!r}.")
    if not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise TrainConfigError(f"loss.timestep_bias_portion is the fraction of timesteps biased, in (0, 1]; got {p!r}.")
    b, e = loss.timestep_bias_begin, loss.timestep_bias_end
    if not (isinstance(b, int) and isinstance(e, int) and 0 <= b < e):
        raise TrainConfigError(f"loss.timestep_bias_begin/end must be whole timesteps with 0 <= begin < end "
                               f"(e.g. 600 and 1000); got {b!r} and {e!r}.")


def validate(cfg: TrainConfig) -> None:
    """Checks that need no files; file checks happen in `check_paths` (after tiny data exists)."""
    from mumu_core.prompt import check_tokens_per_image

    r, o, d = cfg.run, cfg.optim, cfg.data
    if r.mixed_precision not in ("no", "fp16", "bf16"):
        raise TrainConfigError(f"run.mixed_precision must be 'no', 'fp16' or 'bf16'; got {r.mixed_precision!r}.")
    for key, value, lo in (("run.max_steps", r.max_steps, 1), ("run.gradient_accumulation_steps",
                           r.gradient_accumulation_steps, 1), ("data.batch_size", d.batch_size, 1),
                           ("data.group_size", d.group_size, 1), ("run.checkpoint_every", r.checkpoint_every, 0),
                           ("run.validate_every", r.validate_every, 0), ("run.log_every", r.log_every, 1),
                           ("run.checkpoints_total_limit", r.checkpoints_total_limit, 1),
                           ("data.num_workers", d.num_workers, 0), ("optim.warmup_steps", o.warmup_steps, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise TrainConfigError(f"{key} must be a whole number >= {lo}; got {value!r}.")
    for key in ("lr_vlm_lora", "lr_adapter", "lr_unet_lora"):
        v = getattr(o, key)
        if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
            raise TrainConfigError(f"optim.{key} must be a learning rate >= 0 (paper: 3e-6 / 1e-5 / 5e-6); got {v!r}.")
    from .lr_schedule import SCHEDULES

    if o.lr_schedule not in SCHEDULES:
        raise TrainConfigError(f"optim.lr_schedule must be one of {list(SCHEDULES)}; got {o.lr_schedule!r}.")
    if not isinstance(o.min_lr_ratio, (int, float)) or not 0.0 <= o.min_lr_ratio <= 1.0:
        raise TrainConfigError(f"optim.min_lr_ratio is a fraction of the base rate in [0, 1]; got {o.min_lr_ratio!r}.")
    for name in ("vlm_lora", "unet_lora"):
        spec = getattr(cfg.model, name)
        if not isinstance(spec.rank, int) or spec.rank < 1:
            raise TrainConfigError(f"model.{name}.rank must be a whole number >= 1 (paper: 8); got {spec.rank!r}.")
    if cfg.loss.min_snr_gamma is not None and not cfg.loss.min_snr_gamma > 0:
        raise TrainConfigError(f"loss.min_snr_gamma must be > 0 (typically 5) or null; got {cfg.loss.min_snr_gamma!r}.")
    vpl = cfg.loss.v_pred_like_loss
    if not isinstance(vpl, (int, float)) or isinstance(vpl, bool) or not 0 <= vpl < math.inf:
        raise TrainConfigError(f"loss.v_pred_like_loss must be a number >= 0 (0 = off, 1 = an equal v-prediction "
                               f"term); got {vpl!r}.")
    gw = cfg.loss.grounding_weight
    if not isinstance(gw, (int, float)) or isinstance(gw, bool) or not 0 <= gw < math.inf:
        raise TrainConfigError(f"loss.grounding_weight must be a number >= 0 (0 = off; the shapes world uses "
                               f"0.02); got {gw!r}.")
    _validate_timestep_bias(cfg.loss)
    builder = sample_builder_config(cfg)
    for key in ("stage1_tokens", "stage2_tokens"):
        check_tokens_per_image(getattr(builder, key), where=f"data.sample.{key}")
    if builder.resolution % 8:
        raise TrainConfigError(f"data.sample.resolution must be a multiple of 8 (the VAE downsamples by 8); "
                               f"got {builder.resolution}.")
    v = cfg.validation
    if (v.width is None) != (v.height is None):
        raise TrainConfigError(f"validation.width and validation.height pick a training bucket together; got "
                               f"width={v.width!r}, height={v.height!r}. Set both (e.g. 1216 and 832) or neither "
                               f"(the square {builder.resolution}x{builder.resolution} bucket).")
    if v.width is not None:
        names = [b.name for b in builder.bucket_list]
        if f"{v.width}x{v.height}" not in names:
            raise TrainConfigError(f"validation.width x height = {v.width}x{v.height} is not a training bucket; "
                                   f"validate where the model is trained: one of {names}.")
    from mumu_training.latent_cache import refuse_target_augmentation, resolve_config

    try:
        if resolve_config(d).enabled:
            refuse_target_augmentation(builder)
    except TrainConfigError:
        raise
    except MumuError as exc:
        raise TrainConfigError(str(exc)) from None
    if not cfg.model.vlm or not cfg.model.sdxl:
        raise TrainConfigError("model.vlm (a VLM folder in Hugging Face layout) and model.sdxl (an SDXL diffusers "
                               "folder or single .safetensors file) are both required.")
    if not d.annotations:
        raise TrainConfigError("data.annotations is required: the output folder of `mumu bootstrap` "
                               "(it holds manifest.json and shards/).")


def sample_builder_config(cfg: TrainConfig):
    from mumu_training.samples import SampleBuilderConfig

    try:
        return SampleBuilderConfig(**cfg.data.sample)
    except TypeError as exc:
        valid = sorted(f.name for f in fields(SampleBuilderConfig))
        raise TrainConfigError(f"data.sample: {exc}. Valid keys: {valid}.") from None
    except TrainConfigError:
        raise
    except MumuError as exc:
        raise TrainConfigError(f"data.sample: {exc}") from None


def check_paths(cfg: TrainConfig) -> None:
    """The files the config names exist and are what they should be (clear errors before loading)."""
    import json

    vlm = Path(cfg.model.vlm)
    if not (vlm / "config.json").is_file():
        raise TrainConfigError(f"model.vlm = {vlm}: no config.json there. Expected a VLM folder in Hugging Face "
                               f"layout (config.json, *.safetensors, tokenizer files), e.g. models/idefics2-8b.")
    model_type = json.loads((vlm / "config.json").read_text()).get("model_type")
    expected = cfg.model.vlm_family
    if expected is not None and model_type != expected:
        raise TrainConfigError(
            f"model.vlm = {vlm} holds a '{model_type}' model, but model.vlm_family is '{expected}'. Point model.vlm "
            f"at a {expected} checkpoint (e.g. HuggingFaceM4/idefics2-8b) or set model.vlm_family: {model_type} "
            f"if that family is intended (supported: idefics2, idefics3, smolvlm).")
    sdxl = Path(cfg.model.sdxl)
    if not sdxl.exists():
        raise TrainConfigError(f"model.sdxl = {sdxl} does not exist. Expected an SDXL diffusers folder "
                               f"(model_index.json, unet/, vae/, scheduler/) or a single-file .safetensors.")
    ann = Path(cfg.data.annotations)
    if not ann.is_dir() or not ((ann / "manifest.json").is_file() or any((ann / "shards").glob("*.jsonl.gz"))):
        raise TrainConfigError(
            f"data.annotations = {ann} holds no bootstrapped annotations (no manifest.json / shards/*.jsonl.gz). "
            f"Run `mumu bootstrap --input IMAGES --format folder --detector DETECTOR --out {ann}` first "
            f"(docs/bootstrap.md).")
    depth = (cfg.data.sample or {}).get("depth_model")
    if depth and not (Path(depth) / "config.json").is_file():
        raise TrainConfigError(f"data.sample.depth_model = {depth}: no config.json there. Expected a depth-estimation "
                               f"model folder in Hugging Face layout (DPT / Depth Anything), e.g. "
                               f"depth-anything/Depth-Anything-V2-Small-hf downloaded with huggingface-cli.")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise TrainConfigError(f"model.init_from = {cfg.model.init_from} does not exist. Expected a stage-1 bundle "
                               f"(.safetensors from training/export.py) or a checkpoint-* folder.")
    for i, p in enumerate(cfg.validation.prompts):
        for img in (p or {}).get("images", []) or []:
            if not Path(img).is_file():
                raise TrainConfigError(f"validation.prompts[{i}] names image {img}, which does not exist.")
