"""Command line.

python -m train CONFIG.yaml [--set key=value ...] [--resume latest|CHECKPOINT]
python -m train export RUN_OR_CHECKPOINT (--out model.safetensors | --lora lora.safetensors) [--ema]
python -m train.bench [--size tiny|small|full] [--steps N]
accelerate launch [--config_file train/configs/accelerate/ddp.yaml] -m train CONFIG.yaml ...
"""

import argparse
import logging
import os
import sys


def train_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="UniAlignment LoRA / full fine-tuning.",
        epilog="Export: python -m train export RUN --out FILE | --lora FILE",
    )
    parser.add_argument("config", help="YAML config (see train/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="latest|CHECKPOINT",
        help="continue from the run folder's latest checkpoint, or from a given one",
    )
    args = parser.parse_args(argv)

    from .config import ConfigError, load_config

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "PIL", "urllib3", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from unialign_core.errors import CheckpointError

    from .loop import run
    from .runs import TrainingError

    try:
        metrics = run(cfg, args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.getLogger("train").info("done: %s", {k: v for k, v in metrics.items() if k != "micro"})
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from .export import main as export_main

        return export_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
