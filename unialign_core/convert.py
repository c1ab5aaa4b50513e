"""Convert an upstream pipeline folder to our single-file format.

    python -m unialign_core.convert path/to/UniAlignment out/unialignment.safetensors [--dtype bf16]

The file holds the transformer, its config, the scheduler config, the mask id, the mask-token
embedding (when the folder has one or `--mask-embedding` is given) and the tokenizer. The T5
encoder and VAE stay separate (ComfyUI users already have them) unless `--bundle` is given.
"""

import argparse
import sys

import torch

from .errors import CheckpointError
from .loader import load_model
from .single_file import save_single_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(source: str, output: str, dtype: str = "bf16", mask_embedding=None, bundle: bool = False) -> str:
    """Load `source` (any format load_model reads) and write it as one single file."""
    model = load_model(source, mask_embedding=mask_embedding)
    return save_single_file(
        output,
        model.transformer,
        scheduler_config=model.scheduler_config,
        mask_id=model.mask_id,
        mask_embedding=model.mask_embedding,
        tokenizer=model.tokenizer,
        text_encoder=model.text_encoder if bundle else None,
        vae=model.vae if bundle else None,
        dtype=DTYPES[dtype],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="upstream pipeline folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype in the file")
    parser.add_argument("--mask-embedding", help="the official mask_token_emb .pth, if the folder lacks it")
    parser.add_argument("--bundle", action="store_true", help="also store the T5 encoder and VAE (small models)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.output, args.dtype, args.mask_embedding, args.bundle)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
