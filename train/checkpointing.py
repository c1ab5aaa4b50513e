"""The trainer's checkpoints: which one a run continues from, writing one (atomically, safetensors and JSON only,
never a pickle) and resuming from one exactly.

A checkpoint is `<run_dir>/checkpoints/step_<n>/` (see `runs`): the trained tensors, the EMA weights, the optimizer,
LR schedule, grad scaler and RNG states, and the data position (`train_state.json`). The functions here take the
`loop.Trainer` whose state they write or restore.
"""

import logging
import os
import shutil

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from . import runs
from .config import ConfigError, to_dict

log = logging.getLogger("train")

# torch.distributed.checkpoint (FSDP runs only; seconds to import) is imported where it is used


# --------------------------------------------------------------------------------------------------------------
# Before the run: which checkpoint, which run folder


def refuse_earlier_run(run_dir, resume, overwrite):
    """A run folder with checkpoints is continued (--resume) or started over (--overwrite), never mixed."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one (--resume continues the run, --overwrite starts over)")
    found = runs.list_checkpoints(run_dir)
    if found and not resume and not overwrite:
        raise ConfigError(
            f"run_dir {run_dir} already holds checkpoints (the latest is step {found[-1][0]}); continue "
            f"it with --resume latest, start it over with --overwrite (deletes its checkpoints, metrics and "
            f"logs), or give this run another run_dir"
        )


def find_resume(run_dir, resume):
    """The checkpoint that `resume` ("latest" or a checkpoint) names, or None (no resume, or none there yet)."""
    if not resume:
        return None
    if resume == "latest":
        found = runs.list_checkpoints(run_dir)
        if not found:
            log.info("--resume latest: no checkpoint in %s yet; starting fresh", run_dir)
            return None
        checkpoint = found[-1][1]
    else:
        try:
            checkpoint = runs.resolve_checkpoint(resume)
        except FileNotFoundError as e:
            raise ConfigError(f"--resume {e}") from None
    runs.refuse_pickles(checkpoint)  # before anything loads
    return checkpoint


def check_config_against_saved(run_dir, cfg):
    """Warn about the keys in which `cfg` differs from the run folder's config.yaml."""
    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved):
        return
    with open(saved) as f:
        old = yaml.safe_load(f) or {}
    new = to_dict(cfg)
    changed = [
        f"{s}.{k}"
        for s in new
        if isinstance(new[s], dict)
        for k in new[s]
        if isinstance(old.get(s), dict) and old[s].get(k) != new[s][k]
    ]
    if changed:
        log.warning("config differs from the one saved in this run folder: %s", ", ".join(changed))


def last_checkpoint_note(run_dir) -> str:
    """What an error says about the run's last checkpoint."""
    found = runs.list_checkpoints(run_dir)
    return f"the last checkpoint {found[-1][1]} is intact" if found else "there is no checkpoint yet"


# --------------------------------------------------------------------------------------------------------------
# The trained tensors


def trainable_keys(trainer):
    if trainer.cfg.train.mode == "full":
        return list(trainer.transformer.state_dict())
    return [n for n, _ in trainer.trainable]


def load_trainable(trainer, state, where, names=None):
    keys = set(trainable_keys(trainer))
    names = set(state) if names is None else set(names)
    if names != keys:
        raise ValueError(
            f"{where}: trained tensors do not match this run's model "
            f"(missing {sorted(keys - names)[:3]}, extra {sorted(names - keys)[:3]})"
        )
    if trainer.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # rank 0 holds the full tensors and broadcasts them; every rank keeps its shard
        set_model_state_dict(
            trainer.transformer,
            state if trainer.main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )
        return
    own = trainer.transformer.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def full_model_state(trainer):
    """FSDP: the transformer's full state dict on rank 0, on the CPU (a collective; None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.transformer, options=options)
    return state if trainer.main else None


def trainable_state(trainer):
    if trainer.fsdp:
        state = full_model_state(trainer)
        return None if state is None else {k: state[k] for k in trainable_keys(trainer)}
    state = trainer.accelerator.get_state_dict(trainer.module)  # collective under FSDP / ZeRO-3
    if state is None:
        return None
    state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    return {k: state[k] for k in trainable_keys(trainer)}


# --------------------------------------------------------------------------------------------------------------
# Saving


def save_resume_state(trainer, tmp):
    """Optimizer, LR schedule, grad scaler and RNG states, as safetensors and JSON (never a pickle).
    Sharded runs (FSDP, DeepSpeed) keep no optimizer state: their engines only write pickles."""
    acc = trainer.accelerator
    runs.save_rng(tmp, acc.process_index)
    optimizer = None
    if trainer.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # the full (gathered) state on rank 0, keyed by parameter name; a collective
        optimizer = get_optimizer_state_dict(
            trainer.transformer,
            trainer.optimizer.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
    if trainer.main:
        if trainer.fsdp:
            runs.save_optimizer_state(os.path.join(tmp, runs.OPTIMIZER), optimizer)
        elif not trainer.sharded:
            runs.save_optimizer(os.path.join(tmp, runs.OPTIMIZER), trainer.optimizer)
        scaler = getattr(acc, "scaler", None)
        runs.write_json(
            os.path.join(tmp, runs.RESUME),
            {
                "scheduler": runs.jsonable(trainer.scheduler.state_dict()),
                "scaler": runs.jsonable(scaler.state_dict()) if scaler is not None else None,
                "optimizer": None if trainer.sharded else runs.OPTIMIZER,
            },
        )


def write_checkpoint(trainer, tmp, state, ema):
    if trainer.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    trainer.accelerator.wait_for_everyone()
    save_resume_state(trainer, tmp)
    if trainer.main:
        lora, step = trainer.cfg.train.lora, trainer.step
        meta = {
            "mode": trainer.cfg.train.mode,
            "step": str(step),
            "lora_rank": str(lora.rank),
            "lora_alpha": str(lora.alpha),
            "format": "unialign-train",
        }
        runs.save_tensors(os.path.join(tmp, runs.TRAINABLE), state, meta)
        if ema is not None:
            runs.save_tensors(os.path.join(tmp, runs.EMA), ema, meta)
        runs.write_json(
            os.path.join(tmp, runs.STATE),
            {
                "step": step,
                "batch_no": trainer.batch_no,
                "sampler": trainer.sampler.state_dict(step=trainer.batch_no),
                "world_size": trainer.accelerator.num_processes,
                "global_batch": trainer.global_batch,
                "skipped": trainer.skips.summary(),
                "empty_batches": dict(sorted(trainer.empty_batches.items())),
                "resumable": not trainer.sharded,
            },
        )


def save_checkpoint(trainer):
    """The checkpoint of the trainer's current step (a collective: every process calls it)."""
    acc, step = trainer.accelerator, trainer.step
    tmp, final = runs.temporary_dir(trainer.run_dir, step), runs.checkpoint_dir(trainer.run_dir, step)
    state = trainable_state(trainer)  # collective under FSDP / ZeRO-3
    ema = trainer.ema.state_dict() if trainer.ema is not None else None  # collective under FSDP
    failed = None
    try:
        write_checkpoint(trainer, tmp, state, ema)
    except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError or as the writer's own error
        if not runs.is_no_space(e):
            raise
        failed = e
    # every process has written its part (RNG states); all learn whether one of them ran out of space
    flag = torch.tensor([1.0 if failed else 0.0], device=trainer.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, "sum")
    if float(flag) > 0:
        if trainer.main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = runs.list_checkpoints(trainer.run_dir)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint"
        raise runs.TrainingError(
            f"no space left on {os.path.dirname(tmp)} while writing the checkpoint of "
            f"step {step}; {kept}. Free some space and continue with --resume latest"
        )
    if trainer.main:
        runs.commit(tmp, final)
        runs.prune(trainer.run_dir, trainer.cfg.checkpoint.keep)
        log.info("checkpoint %s", final)
    acc.wait_for_everyone()
    trainer.saved_step = step


# --------------------------------------------------------------------------------------------------------------
# Resuming


def resume(trainer, checkpoint):
    """Continue exactly where `checkpoint` stopped: weights, optimizer, schedule, scaler, RNG, EMA, data position."""
    acc = trainer.accelerator
    runs.refuse_pickles(checkpoint)
    state = runs.read_state(checkpoint)
    if state["global_batch"] != trainer.global_batch:
        raise ConfigError(
            f"--resume {checkpoint}: saved with a global batch of {state['global_batch']}, this run "
            f"has {trainer.global_batch} (train.batch_size x processes); keep it the same"
        )
    if not state.get("resumable", True) or trainer.sharded:
        raise ConfigError(
            f"--resume {checkpoint}: exact resume of sharded runs (FSDP, DeepSpeed) is not "
            f"supported (their optimizer state exists only as pickles); start a new run from "
            f"its weights with init.path={checkpoint}"
        )
    path = os.path.join(checkpoint, runs.TRAINABLE)
    if trainer.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        with safe_open(path, framework="pt") as f:
            names = list(f.keys())  # every rank checks the names (no rank waits on a failed one)
        load_trainable(trainer, load_file(path, device="cpu") if trainer.main else {}, checkpoint, names)
        full = runs.read_optimizer_state(os.path.join(checkpoint, runs.OPTIMIZER)) if trainer.main else {}
        # a parameter that never had a gradient (null_image_embd in a short run) has no Adam state in the
        # checkpoint, as in the uninterrupted run: strict=False, and the state torch's loader creates for it
        # with a zero-gradient step (step 1) is dropped again, or its first real step would count as the second
        optimizer = trainer.optimizer.optimizer
        set_optimizer_state_dict(
            trainer.transformer,
            optimizer,
            full,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )
        with safe_open(os.path.join(checkpoint, runs.OPTIMIZER), framework="pt") as f:
            saved = {k[len("state.") :].rsplit(".", 1)[0] for k in f.keys()}
        for name, param in trainer.trainable:
            if name not in saved:
                optimizer.state.pop(param, None)
    else:
        load_trainable(trainer, load_file(path, device="cpu"), checkpoint)
        runs.load_optimizer(os.path.join(checkpoint, runs.OPTIMIZER), trainer.optimizer)
    saved_resume = runs.read_json(os.path.join(checkpoint, runs.RESUME))
    trainer.scheduler.load_state_dict(saved_resume["scheduler"])
    optimizer_follows_config(trainer)
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and saved_resume.get("scaler"):
        scaler.load_state_dict(saved_resume["scaler"])
    if not runs.load_rng(checkpoint, acc.process_index):
        log.warning(
            "%s has no random state for process %d; it continues from the current one",
            checkpoint,
            acc.process_index,
        )
    trainer.empty_batches.update(state.get("empty_batches", {}))
    if trainer.ema is not None:
        path = os.path.join(checkpoint, runs.EMA)
        if os.path.isfile(path):
            trainer.ema.load_state_dict(load_file(path, device="cpu" if trainer.fsdp else str(trainer.device)))
        else:
            log.warning("%s has no EMA weights; EMA restarts from the current weights", checkpoint)
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.step, trainer.batch_no = state["step"], state["batch_no"]
    trainer.saved_step = trainer.step
    if trainer.main:
        runs.truncate_metrics(trainer.run_dir, trainer.step)
    log.info("resumed from %s at step %d (micro-batch %d)", checkpoint, trainer.step, trainer.batch_no)


def optimizer_follows_config(trainer):
    """--resume: the checkpoint's optimizer state brings the old lr, betas and weight decay; the config's win
    (the run folder's config.yaml says what trains), and the change is logged. The schedule goes on from the
    checkpoint's step, at the config's peak lr."""
    cfg, scheduler = trainer.cfg.train, trainer.scheduler
    groups = trainer.optimizer.param_groups
    want = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    had = {
        "lr": scheduler.base_lrs[0],
        "betas": tuple(groups[0]["betas"]),
        "weight_decay": groups[0]["weight_decay"],
    }
    changed = [k for k in want if had[k] != want[k]]
    if not changed:
        return
    for group, factor in zip(groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas)):
        group.update(betas=want["betas"], weight_decay=want["weight_decay"], initial_lr=cfg.lr, lr=cfg.lr * factor)
    scheduler.base_lrs = [cfg.lr] * len(groups)
    scheduler._last_lr = [group["lr"] for group in groups]
    log.warning(
        "--resume: %s from the config (the checkpoint had %s), from step %d on",
        ", ".join(f"train.{k} {want[k]}" for k in changed),
        ", ".join(f"{had[k]}" for k in changed),
        scheduler.last_epoch,
    )
