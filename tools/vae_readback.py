"""The image modes' ceiling for a shapes-world VAE: how often encoding and decoding a held-out scene keeps every
attribute readable by the fixed evaluator.

    python tools/vae_readback.py runs/latent/c4/vae [--n 200] [--split val]
"""

import argparse

import torch
from diffusers import AutoencoderKL

from train.shapes import evaluate as ev
from train.shapes.autoencoder import reconstruct
from train.shapes.scorecard import _tensor, records
from train.shapes.world import FULL, Scene


def readback(vae, n: int, split: str, seed: int = 0) -> float:
    hits = []
    for rec, _, target in records("t2i", n, seed, split, FULL):
        out = reconstruct(vae, _tensor(target))[0]
        hits.append(all(ev.score_t2i(out, Scene.from_dict(rec["meta"]["scene"])).values()))
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", help="a diffusers AutoencoderKL folder (the shapes job's vae/)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--split", default="val", choices=("val", "test"))
    args = parser.parse_args()
    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(args.vae).eval()
        print(
            f"{args.vae}: {vae.config.latent_channels} channels, read back whole "
            f"{readback(vae, args.n, args.split):.3f} of {args.n} {args.split} scenes"
        )


if __name__ == "__main__":
    main()
