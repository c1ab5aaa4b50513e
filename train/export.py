"""Export a run or checkpoint to what the Loader and LoRA nodes read.

    python -m train export runs/my-lora --out unialign-mine.safetensors [--ema] [--dtype bf16] [--bundle]
    python -m train export runs/my-lora --lora my-lora.safetensors [--ema]

`--out` writes our single file (unialign_core.save_single_file): the run's start weights plus the trained ones
(LoRA merged with unialign_core.lora_deltas), never the teacher or the alignment projectors. `--lora` writes the
LoRA alone in diffusers' SD3 key format with alpha keys (unialign_core.save_lora). A run folder means its latest
checkpoint.
"""

import argparse
import logging
import sys

from unialign_core import DTYPES, save_lora
from unialign_core.cli import ArgumentParser
from unialign_core.errors import CheckpointError
from unialign_core.files import NoSpaceError
from unialign_core.single_file import save_model

from . import runs
from .init import load_start

log = logging.getLogger("train.export")


def export_lora(source: str, out: str, ema: bool = False) -> str:
    checkpoint = runs.resolve_checkpoint(source)
    tensors, meta = runs.read_trainable(checkpoint, ema)
    if meta.get("mode") != "lora":
        raise ValueError(f"{checkpoint} is a full fine-tuning checkpoint; export it with --out (a single file)")
    layers, _ = runs.split_lora(tensors, float(meta["lora_alpha"]))
    config = runs.read_run_config(runs.run_dir_of(checkpoint))
    metadata = {
        "format": "unialignment-lora",
        "rank": meta["lora_rank"],
        "alpha": meta["lora_alpha"],
        "step": meta.get("step", ""),
        "base_model": config.init.path,
    }
    return save_lora(out, layers, metadata)


def merged_transformer(source: str, ema: bool = False):
    """(bundle, transformer with the trained weights applied, checkpoint) -- no projectors."""
    checkpoint = runs.resolve_checkpoint(source)
    config = runs.read_run_config(runs.run_dir_of(checkpoint))
    bundle, transformer, _ = load_start(config.init, align_dim=None)
    runs.apply_checkpoint(transformer, checkpoint, ema)
    return bundle, transformer.eval().requires_grad_(False), checkpoint


def export_single_file(source: str, out: str, ema: bool = False, dtype: str = "fp32", bundle_parts: bool = False):
    bundle, transformer, checkpoint = merged_transformer(source, ema)
    meta = runs.read_trainable(checkpoint)[1]
    text_length = runs.read_run_config(runs.run_dir_of(checkpoint)).data.text_length
    return save_model(
        out,
        bundle,
        transformer,
        bundle=bundle_parts,
        dtype=DTYPES[dtype],
        extra_metadata={
            "trained_from": checkpoint,
            "training_mode": meta.get("mode", ""),
            "text_length": str(text_length),
        },  # the prompt length the modes then default to
    )


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m train export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a run folder (its latest checkpoint) or a checkpoint folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="write our single-file model (.safetensors)")
    what.add_argument("--lora", help="write the LoRA (.safetensors, diffusers SD3 keys with alpha)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of --out")
    parser.add_argument("--bundle", action="store_true", help="--out: also store the T5 and VAE (small models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.lora:
            path = export_lora(args.source, args.lora, args.ema)
        else:
            path = export_single_file(args.source, args.out, args.ema, args.dtype, args.bundle)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoSpaceError as e:  # the writer removed its temporary; the previous file is as it was
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
