"""Training configuration: nested dataclasses, loaded from YAML, with `--set section.key=value` overrides.

    cfg = load_config("train/configs/lora.yaml", ["train.lr=1e-4", "data.ratios={t2i: 1.0}"])

Values given with `--set` are parsed as YAML (numbers, true/false, null, [lists], {maps}) and type-checked
against the field, then against its allowed range (`RANGES`; every number must be finite); every error names the
key, the value and what is allowed. Relative paths are relative to the working directory.
"""

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import yaml

from unialign_core.model import PROMPT_PADDING

from .losses import CROSS_NEGATIVES, TERMS


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class InitConfig:
    path: str = ""  # upstream folder, our single file, a previous run (dir or checkpoint), or plain SD3-medium
    text_encoder: Optional[str] = None  # T5 folder or single file (overrides the one found with `path`)
    vae: Optional[str] = None
    tokenizer: Optional[str] = None
    mask_embedding: Optional[str] = None  # the official mask_token_emb .pth
    fp16_time_projection: Optional[bool] = None  # None: keep the source's (False when starting from SD3)


@dataclass
class DataConfig:
    files: List[Union[str, Dict[str, str]]] = field(default_factory=list)  # JSONL paths or {path, root, ti2i_task}
    resolution: int = 512
    bucket_step: int = 64
    max_aspect: float = 2.0
    random_crop: bool = False
    ratios: Optional[Dict[str, float]] = None  # task -> share of batches; None: in proportion to the data
    t2i_as_caption: bool = False  # also use t2i records as caption items
    text_length: int = 256  # T5 tokens of prompts and captions
    # how prompts are padded to text_length: "training" (end-of-text, as the official training pads; for the
    # released model) or "inference" (<pad>, as the official pipeline and our nodes sample; for a model of your own
    # whose training should see what its sampling sees, such as the shapes world's)
    prompt_padding: str = "training"
    num_workers: int = 2
    cache_dir: Optional[str] = None  # cache VAE moments and T5 prompt states here (content-keyed)
    # image paths of records must lie in the data folder (the JSONL's folder, or the entry's root) once symlinks
    # and ../ are resolved; true allows any path (absolute ones, symlinks to a shared image store)
    allow_outside: bool = False


@dataclass
class TeacherConfig:
    path: Optional[str] = None  # local Hugging Face folder (CLIP, SigLIP or Qwen2.5-VL); None: no L_align
    block: int = 8  # transformer block whose states are aligned (1-based)
    cache: bool = True  # cache teacher features under data.cache_dir (or <run_dir>/cache)
    image_size: Optional[int] = None  # override the teacher processor's image size


IMAGE_TARGETS = ("x0", "velocity")
GRAD_ACCUM_REDUCE = ("sum", "mean")

# the loss terms' weights, one per term of `losses.TERMS` (image 1, text 0.2, cross 0.05, align 0.1), in its order
LossWeights = dataclasses.make_dataclass("LossWeights", [(t.key, float, field(default=t.weight)) for t in TERMS])


@dataclass
class LossConfig(LossWeights):
    """The loss section: the terms' weights (`LossWeights`), then the terms' settings."""

    temperature: float = 0.07
    text_dropout: float = 0.1  # share of prompts replaced by the T5 states of " "
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ignore_padding: bool = False  # L_text: False counts padding positions, as upstream
    image_target: str = "x0"  # L_image: "x0" (MSE on x0 = sigma^2-weighted velocity error, as upstream) or "velocity"
    # L_cross negatives: "global" (the micro-batches of all processes together; N processes train like one) or
    # "local" (each process's own micro-batch, as the official training contrasts them)
    cross_negatives: str = "global"


# The attention projections of both streams: the modules a LoRA adapts unless the config names others.
DEFAULT_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class TrainConfig:
    mode: str = "lora"  # lora | full
    batch_size: int = 4  # per process, per micro-step
    grad_accum: int = 1
    # how the grad_accum micro-batches' gradients add up before clipping: "sum" (as the official training does) or
    # "mean" (accelerate's average; the same update direction, but clipping and the logged grad_norm see 1/grad_accum)
    grad_accum_reduce: str = "sum"
    max_steps: int = 1000  # optimizer steps
    lr: float = 3e-5
    warmup_steps: int = 2000
    schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 2.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    frozen_dtype: str = "auto"  # T5/VAE/teacher and (LoRA with mixed precision) the frozen transformer weights: auto (bf16 on GPU with bf16, else fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    train_projectors: bool = True  # the alignment projectors train in LoRA mode too
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0: only at the end
    keep: int = 3  # keep the last K


@dataclass
class LogConfig:
    every: int = 10  # TensorBoard scalars every N steps
    tensorboard: bool = True
    progress: bool = True  # tqdm bar


@dataclass
class ValidationConfig:
    every: int = 0  # steps; 0: never
    prompts: List[str] = field(default_factory=list)
    images: List[str] = field(default_factory=list)  # images to caption
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 5.0
    caption_length: int = 64
    seed: int = 0


@dataclass
class Config:
    run_dir: str = "runs/unialign"
    seed: int = 0
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


CHOICES = {
    "train.mode": ("lora", "full"),
    "data.prompt_padding": PROMPT_PADDING,
    "train.grad_accum_reduce": GRAD_ACCUM_REDUCE,
    "loss.cross_negatives": CROSS_NEGATIVES,
    "loss.image_target": IMAGE_TARGETS,
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.frozen_dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.schedule": ("constant", "cosine", "linear"),
}


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: low/high bounds (inclusive unless `*_open`), optionally a multiple of `step`;
    `why` is said with the error."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    step: Optional[int] = None
    why: str = ""

    def allows(self, v) -> bool:
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return self.step is None or v % self.step == 0

    def describe(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        text = "a finite number"
        if self.low is not None and self.high is not None:
            low, high = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text += f" in {low}{num(self.low)}, {num(self.high)}{high}"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {num(self.low)}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {num(self.high)}"
        if self.step:
            text += f" and a multiple of {self.step}"
        return text + (f" ({self.why})" if self.why else "")


STEPS = 10**9  # a bound on step counts: far beyond any run, short of nonsense such as 1e12
# Every number of the config and the values it may take (a key ending in [] means each element of a list or
# each value of a mapping). Numbers not listed need only be finite.
RANGES = {
    "seed": Range(0, 2**32 - 1, why="NumPy's seeds"),
    "data.resolution": Range(16, 4096, why="pixels per side of the square bucket; at least data.bucket_step"),
    "data.bucket_step": Range(16, 4096, step=16, why="the VAE and the patches need sides in multiples of 16"),
    "data.max_aspect": Range(1, 16, why="the widest bucket's width / height; 1: square buckets only"),
    "data.text_length": Range(1, 4096),
    "data.num_workers": Range(0, 256),
    "data.ratios[]": Range(0, why="the share of batches of that task; 0 leaves it out"),
    "teacher.block": Range(1),
    "teacher.image_size": Range(1, 8192),
    **{f"loss.{t.key}": Range(0) for t in TERMS if t.non_negative},
    "loss.temperature": Range(0, low_open=True),
    "loss.text_dropout": Range(0, 1),
    "loss.logit_std": Range(0, low_open=True),
    "train.batch_size": Range(1),
    "train.grad_accum": Range(1),
    "train.max_steps": Range(1, STEPS),
    "train.lr": Range(0, low_open=True),
    "train.warmup_steps": Range(0, STEPS),
    "train.weight_decay": Range(0),
    "train.betas[]": Range(0, 1, high_open=True, why="Adam's decay rates"),
    "train.grad_clip": Range(0, low_open=True, why="a large value such as 1e9 leaves the gradients unclipped"),
    "train.ema_decay": Range(0, 1, low_open=True, high_open=True),
    "train.lora.rank": Range(1, 1536, why="SD3-medium's width is 1536: a higher rank is no longer low-rank"),
    "train.lora.alpha": Range(0, low_open=True),
    "train.lora.dropout": Range(0, 1, high_open=True),
    "checkpoint.every": Range(0, STEPS, why="0: only at the end"),
    "checkpoint.keep": Range(1),
    "log.every": Range(1, STEPS),
    "validation.every": Range(0, STEPS, why="0: never"),
    "validation.width": Range(16, 4096),
    "validation.height": Range(16, 4096),
    "validation.steps": Range(1, 10000),
    "validation.caption_length": Range(1, 4096),
    "validation.seed": Range(0, 2**32 - 1, why="NumPy's seeds"),
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key):
    """Check `value` against the annotation `tp`; returns the value (ints widen to float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (a mapping), got {value!r}")
        return _build(tp, value, key)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _unknown(key, name, known):
    hint = difflib.get_close_matches(name, known, n=1)
    return ConfigError(
        f"unknown config key {key!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; known here: {', '.join(sorted(known))}"
    )


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in (values or {}).items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown(key, str(name), known)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _get(cfg, key):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _numbers(obj, prefix=""):
    """(key, value) of every number in a config section, lists and mappings included."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _numbers(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}.{k}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def _check_ranges(cfg: Config):
    for key, allowed in RANGES.items():
        value = _get(cfg, key.removesuffix("[]"))
        if key.endswith("[]"):
            items = value.items() if isinstance(value, dict) else enumerate(value or [])
            named = [(f"{key[:-2]}.{k}" if isinstance(value, dict) else f"{key[:-2]}[{k}]", v) for k, v in items]
        else:
            named = [(key, value)]
        for name, v in named:
            if v is not None and not allowed.allows(v):
                raise ConfigError(f"{name}: must be {allowed.describe()}, got {v!r}")
    for key, v in _numbers(cfg):
        if not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v!r}")


def validate(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {_get(cfg, key)!r}")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas: give two numbers, got {cfg.train.betas}")
    _check_ranges(cfg)
    if cfg.data.resolution < cfg.data.bucket_step:
        raise ConfigError(
            f"data.resolution: must be >= data.bucket_step ({cfg.data.bucket_step}), got {cfg.data.resolution}"
        )
    if not cfg.init.path:
        raise ConfigError("init.path: required (upstream folder, single file, previous run, or SD3-medium)")
    if not cfg.data.files:
        raise ConfigError("data.files: give at least one JSONL file")
    if cfg.data.ratios is not None:
        from .records import TASKS

        bad = sorted(set(cfg.data.ratios) - set(TASKS))
        if bad:
            raise ConfigError(f"data.ratios: unknown tasks {bad}; tasks are {', '.join(TASKS)}")
    if cfg.loss.align > 0 and not cfg.teacher.path:
        raise ConfigError(
            "loss.align > 0 needs teacher.path (a local CLIP, SigLIP or Qwen2.5-VL folder); or set loss.align=0"
        )
    return cfg


def check_paths(cfg: Config) -> Config:
    """Check that the files and folders a run reads exist (the trainer calls this before loading anything;
    `load_config` does not, so configs with placeholder paths still load)."""
    import os

    def need(key, path, what):
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: {path} does not exist ({what})")

    need(
        "init.path",
        cfg.init.path,
        "give an upstream folder, our single .safetensors file, a previous run or an SD3-medium folder",
    )
    for name in ("text_encoder", "vae", "tokenizer", "mask_embedding"):
        need(f"init.{name}", getattr(cfg.init, name), "fix the path or set it to null")
    for i, entry in enumerate(cfg.data.files):
        path = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(path, str) or not path:
            raise ConfigError(f"data.files[{i}]: give a JSONL path (or {{path: ..., root: ...}}), got {entry!r}")
        if not os.path.isfile(path):
            raise ConfigError(f"data.files[{i}]: {path} does not exist (a JSONL file, one record per line)")
        if isinstance(entry, dict) and entry.get("root"):
            need(f"data.files[{i}].root", entry["root"], "the folder relative image paths start from")
    if cfg.loss.align > 0:
        need("teacher.path", cfg.teacher.path, "a local CLIP, SigLIP or Qwen2.5-VL folder; or set loss.align=0")
    for i, path in enumerate(cfg.validation.images if cfg.validation.every else []):
        need(f"validation.images[{i}]", path, "an image to caption at each validation")
    return cfg


def parse_override(text: str):
    """'a.b=value' -> ('a.b', parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} ({e})") from None
    return key, value


def apply_override(raw: dict, key: str, value):
    """Set `key` (dotted) in a raw config dict, checking the key exists in the schema."""
    cls, node, parts = Config, raw, key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown(".".join(parts[: i + 1]), part, list(hints))
        if i == len(parts) - 1:
            node[part] = value
        else:
            cls = hints[part]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping in the file")
            node = child


def load_config(path: Optional[str], overrides=()) -> Config:
    """Read a YAML config, apply `key=value` overrides, check types and values."""
    raw = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level")
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        apply_override(raw, key, value)
    return validate(_build(Config, raw))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str):
    from unialign_core.files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
