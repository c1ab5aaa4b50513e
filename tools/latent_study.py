"""Does a smaller latent make the shapes world's diffusion problem easier for a small transformer?

    OMP_NUM_THREADS=1 python tools/latent_study.py --channels 16 --out runs/latent/c16
    OMP_NUM_THREADS=1 python tools/latent_study.py --channels 4 --out runs/latent/c4

One arm of the measurement behind the demo base's latent (issue: the generated latents of the 16-channel world were
structurally off the data manifold): the base recipe (VAE x2, width 192, batch 16, all four losses) trained on
text-to-image alone for ``--steps`` steps, with the validation split scored every ``--every`` steps
(``<out>/run_curve.jsonl``). Only the latent channels differ between arms.
"""

import argparse
import logging

from train.shapes import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--n", type=int, default=100, help="validation records at each point")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    # the base recipe as first planned, pinned here so that both arms match
    profile = pipeline.Profile(vae_steps=2000, t5_steps=600, teacher_steps=600, batch_size=16, eval_per_task=0,
                               width=192, lr=1.5e-3, vocab="base", records=6000, frozen_records=6000,
                               train_steps=args.steps, curve_every=args.every, curve_per_task=args.n,
                               latent_channels=args.channels, tasks=("t2i",))  # fmt: skip
    st = pipeline.Stages(args.out, profile, 0)
    jsonl, frozen = st.data()
    st.vocab = pipeline.world.FULL  # both arms: trained on BASE scenes, scored on validation scenes of the FULL world
    vae = st.vae(frozen)
    tok = st.tokenizer()
    t5 = st.t5(frozen, tok)
    teacher_dir = st.teacher(frozen, tok)
    st.train("run", tok, vae, t5, jsonl, teacher_dir, False)


if __name__ == "__main__":
    main()
