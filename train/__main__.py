"""Command line.

python -m train CONFIG.yaml [--set key=value ...] [--resume latest|CHECKPOINT | --overwrite]
python -m train export RUN_OR_CHECKPOINT (--out model.safetensors | --lora lora.safetensors) [--ema]
python -m tools.bench_train [--size tiny|small|full] [--steps N]
accelerate launch [--config_file train/configs/accelerate/ddp.yaml] -m train CONFIG.yaml ...
"""

import logging
import os
import sys


def train_main(argv) -> int:
    from unialign_core.cli import ArgumentParser

    parser = ArgumentParser(
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that holds checkpoints (deletes its checkpoints, metrics and logs)",
    )
    args = parser.parse_args(argv)

    from unialign_core.files import NoSpaceError

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

    from . import runs
    from .loop import run

    try:
        metrics = run(cfg, args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except runs.Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except runs.TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C (or SIGTERM), or one before training started
        run_dir = os.path.abspath(cfg.run_dir)
        found = runs.list_checkpoints(run_dir)
        saved = f"the last checkpoint is {found[-1][1]}" if found else "no checkpoint was written"
        hint = f"; continue with: {runs.resume_command(run_dir)}" if found else ""
        print(f"stopped at once ({e or 'Ctrl-C'}); {saved}{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        if not runs.is_no_space(e):
            raise
        message = str(e) if isinstance(e, NoSpaceError) else f"no space left on the device ({e})"
        print(f"error: {message}; then run the command again", file=sys.stderr)
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
