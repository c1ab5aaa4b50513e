"""Where training starts: the model bundle and a trainable transformer, with a report of what was mapped.

    bundle, transformer, report = load_start(cfg.init, align_dim=teacher.dim)

`init.path` may be
  * an upstream UniAlignment or DualDiffusion pipeline folder (`transformer/ vae/ text_encoder/ tokenizer/`);
  * our single-file export (`.safetensors` with format=unialignment);
  * a previous run of this trainer (its folder, or one checkpoint folder): the run's own start, plus its trained
    weights (LoRA merged) -- this is how a stage starts from the previous stage's output;
  * plain SD3-medium in the diffusers layout: a pipeline folder (`transformer/ text_encoder_3/ tokenizer_3/ vae/`)
    or a `transformer/` folder, with the T5, VAE and tokenizer given by `init.text_encoder/vae/tokenizer`.
    Mapping: `norm_out` -> `image_norm_out`, `proj_out` -> `image_proj_out`, the timestep embedder is kept, the
    pooled-text embedder (`time_text_embed.text_embedder.*`) is dropped, and the last block's new context path
    (its AdaLayerNormZero `norm1_context`, `attn.to_add_out`, `ff_context`), the text head and the null image
    tokens start fresh.
The alignment projectors (`align_dim` = the teacher's embedding size) are new unless a previous run of the same
teacher size supplies them.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch

from unialign_core import UniAlignTransformer, load_model
from unialign_core.checkpoint import read_safetensors_metadata
from unialign_core.errors import CheckpointError
from unialign_core.loader import load_sd3_medium_start
from unialign_core.transformer import ALIGN_PREFIXES

from . import runs

log = logging.getLogger(__name__)

SD3_ONLY = ("time_text_embed.text_embedder.",)
SD3_RENAMES = (("norm_out.", "image_norm_out."), ("proj_out.", "image_proj_out."))
# The parts `init` may give or override (paths; None: the start's own).
COMPONENTS = ("text_encoder", "vae", "tokenizer", "mask_embedding")


@dataclass
class InitReport:
    kind: str  # upstream | single | run | sd3
    source: str
    mapped: List[Tuple[str, str]] = field(default_factory=list)  # (source key, our key)
    new: List[str] = field(default_factory=list)  # our keys freshly initialised
    dropped: List[str] = field(default_factory=list)  # source keys not used ("key: why")
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        renamed = [f"{a} -> {b}" for a, b in self.mapped if a != b]
        lines = [
            f"init from {self.kind}: {self.source}",
            f"  mapped {len(self.mapped)} tensors ({len(renamed)} renamed)",
        ]
        lines += [f"    {r}" for r in renamed]
        lines.append(f"  new (fresh) {len(self.new)}")
        lines += [f"    {k}" for k in self.new]
        lines.append(f"  dropped {len(self.dropped)}")
        lines += [f"    {k}" for k in self.dropped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_kind(path: str) -> str:
    """upstream | single | run | sd3 (raises CheckpointError for anything else)."""
    if not os.path.exists(path):
        raise CheckpointError(path, "init.path not found")
    if os.path.isdir(path):
        if runs.is_run(path) or runs.is_checkpoint(path):
            return "run"
        config_path = os.path.join(path, "transformer", "config.json")
        if not os.path.isfile(config_path):
            config_path = os.path.join(path, "config.json")  # a bare transformer folder
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
            return "upstream" if "vocab_size" in config else "sd3"
        raise CheckpointError(path, "not a model folder (no transformer/config.json), run or checkpoint")
    meta = read_safetensors_metadata(path)
    if meta.get("format") == "unialignment":
        return "single"
    return "sd3"


def add_projectors(transformer: UniAlignTransformer, align_dim: Optional[int], hidden: int = 2048) -> List[str]:
    """Give a loaded transformer fresh alignment projectors of output size `align_dim`; returns their keys."""
    return [] if align_dim is None else transformer.add_projectors(align_dim, hidden)


def _components(init) -> dict:
    """The paths of `COMPONENTS` that `init` gives, as keyword arguments of the loaders."""
    return {name: getattr(init, name) for name in COMPONENTS}


def _finish(transformer):
    if transformer.dtype != torch.float32:
        transformer.to(torch.float32)
    return transformer.train().requires_grad_(True)


def _from_model(init, kind, align_dim):
    model = load_model(init.path, **_components(init), fp16_time_projection=init.fp16_time_projection)
    report = InitReport(kind, init.path)
    report.mapped = [(k, k) for k in model.transformer.state_dict()]
    report.new = add_projectors(model.transformer, align_dim)
    _finish(model.transformer)
    return model, model.transformer, report


def _from_run(init, align_dim):
    checkpoint = runs.resolve_checkpoint(init.path)
    previous = runs.read_run_config(runs.run_dir_of(checkpoint))
    base = previous.init
    for name in COMPONENTS + ("fp16_time_projection",):
        if getattr(init, name) is not None:  # this stage's overrides win
            setattr(base, name, getattr(init, name))
    model, transformer, inner = load_start(base, align_dim)
    loaded = runs.apply_checkpoint(transformer, checkpoint)
    report = InitReport(
        "run",
        checkpoint,
        inner.mapped,
        inner.new,
        inner.dropped,
        inner.notes
        + [
            f"previous stage started from {inner.kind}: {inner.source}",
            f"applied {loaded['mode']} weights of {checkpoint}",
        ],
    )
    took = {k for k in runs.read_trainable(checkpoint)[0] if k.startswith(ALIGN_PREFIXES)} - set(loaded["skipped"])
    report.new = [k for k in report.new if k not in took]
    if loaded["skipped"]:
        report.dropped += [f"{k}: projector of another teacher size" for k in loaded["skipped"]]
    return model, transformer, report


def map_sd3_state_dict(state: dict, transformer: UniAlignTransformer, source: str = "sd3") -> Tuple[dict, InitReport]:
    """SD3-medium keys -> ours. Returns (state to load, report); tensors of a different shape are dropped."""
    ours = transformer.state_dict()
    report = InitReport("sd3", source)
    mapped = {}
    for key in sorted(state):
        if key.startswith(SD3_ONLY):
            report.dropped.append(f"{key}: pooled-text embedder (UniAlignment embeds the timestep only)")
            continue
        target = key
        for old, new in SD3_RENAMES:
            if key.startswith(old):
                target = new + key[len(old) :]
        if target not in ours:
            report.dropped.append(f"{key}: no such tensor in UniAlignment")
        elif tuple(ours[target].shape) != tuple(state[key].shape):
            report.dropped.append(
                f"{key}: shape {tuple(state[key].shape)} != {tuple(ours[target].shape)} (re-initialised)"
            )
        else:
            mapped[target] = state[key]
            report.mapped.append((key, target))
    report.new = [k for k in ours if k not in mapped]
    return mapped, report


def _from_sd3(init, align_dim):
    fp16 = bool(init.fp16_time_projection)  # stock SD3 does not round the timestep projection
    model, state = load_sd3_medium_start(init.path, **_components(init), fp16_time_projection=fp16, align_dim=align_dim)
    transformer = model.transformer
    mapped, report = map_sd3_state_dict(state, transformer, init.path)
    transformer.load_state_dict(mapped, strict=False)
    report.notes.append("fp16_time_projection=%s (stock SD3 does not round the timestep projection)" % fp16)
    if not init.mask_embedding:
        report.notes.append("no init.mask_embedding: T5's own row for the mask token is used")
    return model, _finish(transformer), report


def load_start(init, align_dim: Optional[int] = None):
    """(UniAlignModel bundle on the CPU in fp32, its transformer ready to train, InitReport)."""
    kind = detect_kind(init.path)
    if kind == "run":
        model, transformer, report = _from_run(init, align_dim)
    elif kind == "sd3":
        model, transformer, report = _from_sd3(init, align_dim)
    else:
        model, transformer, report = _from_model(init, kind, align_dim)
    model.transformer = transformer
    return model, transformer, report
