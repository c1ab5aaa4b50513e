"""The training loop: accelerate + peft, hybrid batches, the four losses, checkpoints, resume, logs, validation.

    python -m train train/configs/lora.yaml --set train.max_steps=2000
    accelerate launch --config_file train/configs/accelerate/ddp.yaml -m train train/configs/full.yaml

One optimizer step = `train.grad_accum` micro-batches of `train.batch_size` per process. Micro-batch number n of
the run is global batch n of the HybridBatchSampler (rank r takes its slice), and all per-sample randomness is
keyed by n (see losses.SampleRNG): a resumed run sees the data and noise the uninterrupted run would have seen.

`Trainer.train` is the loop; the jobs around it live in modules named for them: batch (the frozen encoders and
batch preparation), optim (AdamW and the schedule),
lora, fsdp (FSDP2 sharding), ema, frozen (the frozen encoders' dtype and cache identity), attention (the kernel)
and paths (absolute paths in the config).
"""

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file

from unialign_core import DTYPES, UniAlignModel
from unialign_core.images import to_pil

from . import data as D
from . import runs
from .attention import attention_backend
from .batch import Encoders, pad_batch, prepare_batch
from .config import Config, ConfigError, check_paths, dump_config, to_dict
from .ema import EMA
from .fsdp import autocast_forward, fsdp_settings, is_dtensor, shard_transformer
from .init import load_start
from .lora import apply_lora, cast_frozen_base
from .losses import Reducer, SampleRNG, TrainModule, compute_losses
from .optim import make_optimizer_and_schedule
from .paths import absolute_paths
from .teacher import CachedTeacher, Teacher

log = logging.getLogger("train")
TERMS = ("loss", "image", "text", "cross", "align")  # the loss section's names, in config, logs and metrics


# --------------------------------------------------------------------------------------------------------------
# The trainer


class StopSignals:
    """SIGINT and SIGTERM while training: the first asks the loop to stop after the current step, with a checkpoint;
    a second one stops at once (KeyboardInterrupt). Installed by `Trainer.train`, restored by `Trainer.close`."""

    def __init__(self):
        self.received = None  # the first signal's number
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        # os.write: a signal handler must not re-enter the buffered sys.stderr the loop may be writing to
        if self.received is None:
            self.received = signum
            os.write(
                2, f"\n{name}: finishing this step, then writing a checkpoint; {name} again stops at once\n".encode()
            )
        elif signum == signal.SIGTERM and self.received == signal.SIGINT:
            # a launcher (torchrun) relays the Ctrl-C its workers got themselves as SIGTERM: not a second request
            os.write(2, b"SIGTERM: already stopping after this step\n")
        else:
            self.restore()
            raise KeyboardInterrupt(f"a second {name}")

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}


class Trainer:
    def __init__(self, cfg: Config, resume: str = None, overwrite: bool = False):
        """`resume`: "latest" or a checkpoint; `overwrite`: start over in a run folder that holds checkpoints."""
        self.cfg = cfg = check_paths(absolute_paths(cfg))
        self.accelerator = acc = self._accelerator()
        self.main = acc.is_main_process
        log.info(
            "%d process(es), %s, device %s, mixed precision %s",
            acc.num_processes,
            acc.distributed_type,
            acc.device,
            acc.mixed_precision,
        )
        self.run_dir = cfg.run_dir
        self.lock, self.signals = None, StopSignals()
        if self.main:
            os.makedirs(self.run_dir, exist_ok=True)
            self.lock = runs.RunLock(self.run_dir).acquire()  # one trainer per run folder
            if self.lock.stale:
                log.info("run_dir: took over the lock of a trainer that no longer runs (%s)", self.lock.stale)
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def close(self):
        """Release the run folder and the signal handlers (the end of `train`, or a failure)."""
        self.signals.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, resume, overwrite):
        cfg, acc = self.cfg, self.accelerator
        self.resume_from = self._find_resume(resume)
        self._refuse_earlier_run(resume, overwrite)
        if self.main:
            runs.clean_temporaries(self.run_dir)
            if overwrite:
                removed = runs.remove_outputs(self.run_dir)
                if removed:
                    log.warning("--overwrite: deleted the earlier run's %s in %s", ", ".join(removed), self.run_dir)
            elif not self.resume_from:
                runs.truncate_metrics(self.run_dir, 0)  # lines of a killed start that never wrote a checkpoint
            if not overwrite:
                self._check_config_against_saved()
            dump_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        acc.wait_for_everyone()
        set_seed(cfg.seed)  # identical fresh initialisation on every process
        self.device = acc.device
        frozen = cfg.train.frozen_dtype
        if frozen == "auto":
            frozen = "bf16" if cfg.train.mixed_precision == "bf16" and self.device.type == "cuda" else "fp32"
        self.frozen_dtype = DTYPES[frozen]

        teacher = self._teacher()
        bundle, transformer, report = load_start(cfg.init, teacher.dim if teacher else None)
        self.report = report
        if self.main:
            runs.write_json(os.path.join(self.run_dir, "init_report.json"), report.to_dict())
            log.info(report.summary())
        if teacher is not None and not 1 <= cfg.teacher.block <= transformer.config.num_layers:
            raise ConfigError(
                f"teacher.block: {cfg.teacher.block} is not a block of this "
                f"{transformer.config.num_layers}-block transformer"
            )
        self.bundle, self.transformer = bundle, transformer
        self.encoders = Encoders(bundle, self.device, self.frozen_dtype, torch.float32, cfg, teacher)

        if cfg.train.mode == "lora":
            apply_lora(transformer, cfg)
            if acc.mixed_precision != "no" and not self.fsdp and acc.distributed_type != DistributedType.DEEPSPEED:
                cast_frozen_base(transformer, self.frozen_dtype)
        if cfg.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.validation_copy = None
        if self.fsdp:
            self._shard(transformer)
        self.trainable = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for _, p in self.trainable)
        n_all = sum(p.numel() for p in transformer.parameters())
        log.info("mode %s: %s of %s transformer parameters train", cfg.train.mode, f"{n_train:,}", f"{n_all:,}")
        self.optimizer, self.scheduler = make_optimizer_and_schedule([p for _, p in self.trainable], cfg)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            self._configure_deepspeed()
        if self.fsdp:
            module = TrainModule(transformer)  # not prepared: accelerate would wrap it in DDP
            if acc.mixed_precision != "no":
                module.forward = autocast_forward(module.forward, acc.device.type, DTYPES[acc.mixed_precision])
            self.module, self.optimizer = module, acc.prepare(self.optimizer)
        else:
            self.module, self.optimizer = acc.prepare(TrainModule(transformer), self.optimizer)
        # DeepSpeed keeps its optimizer state only as pickles: no exact resume
        self.sharded = acc.distributed_type == DistributedType.DEEPSPEED
        self.params_sharded = (
            acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3
        )
        self.ema = None
        if cfg.train.ema:
            if self.params_sharded:
                raise ConfigError("train.ema: not supported with ZeRO-3; use FSDP, DDP or ZeRO-2")
            self.ema = EMA(self.trainable, cfg.train.ema_decay)

        self._data()
        self.step, self.batch_no, self.saved_step = 0, 0, None
        self.empty_batches = Counter()  # micro-batches per task in which no image could be decoded
        if self.resume_from:
            self._resume(self.resume_from)
        self._trackers()

    # -- setup --------------------------------------------------------------------------------------------------

    def _accelerator(self):
        cfg = self.cfg
        kwargs = dict(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            step_scheduler_with_optimizer=False,
        )
        self.fsdp = fsdp_settings()
        if self.fsdp:
            os.environ["ACCELERATE_USE_FSDP"] = "false"  # the trainer shards (shard_transformer), not accelerate
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
            # accelerate 1.15 on a CPU-only machine: with cpu=True it ignores DeepSpeed (the run would silently be
            # DDP); without, it starts DeepSpeed's process group but reports 1 process on every rank, and
            # deepspeed.initialize fails ("train_batch_size is not equal to micro_batch_per_gpu *
            # gradient_acc_step * world_size 2 != 2 * 1 * 2")
            raise ConfigError(
                "accelerate config: DeepSpeed (zero2 / zero3) runs only on GPUs with accelerate "
                "1.15; on CPUs use train/configs/accelerate/fsdp.yaml or ddp.yaml"
            )
        if not torch.cuda.is_available():
            # CPU-only machine: under torchrun / `accelerate launch --multi_gpu` this makes accelerate pick
            # MULTI_CPU with gloo instead of running each process alone
            kwargs["cpu"] = True
        if cfg.log.tensorboard:
            try:
                import tensorboard  # noqa: F401

                kwargs.update(log_with="tensorboard", project_dir=os.path.join(cfg.run_dir, "logs"))
            except ImportError:
                logging.getLogger("train").warning("tensorboard is not installed: no TensorBoard logs")
        return Accelerator(**kwargs)

    def _teacher(self):
        """The alignment teacher with its feature cache, or None (no teacher.path, or loss.align 0)."""
        cfg = self.cfg
        if not (cfg.teacher.path and cfg.loss.align > 0):
            return None
        raw = Teacher.load(cfg.teacher.path, self.device, self.frozen_dtype, cfg.teacher.image_size)
        cache_dir = cfg.data.cache_dir or os.path.join(self.run_dir, "cache")
        return CachedTeacher(raw, D.FeatureCache(cache_dir) if cfg.teacher.cache else None)

    def _shard(self, transformer):
        """FSDP2: shard the transformer over the processes (after a CPU twin for validation is kept on rank 0)."""
        acc = self.accelerator
        if acc.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision: fp16 is not supported under FSDP; use bf16 (or fp32)")
        if self.main and self.cfg.validation.every:
            import copy

            # an unsharded twin on the CPU: validation loads the gathered weights into it (rank 0)
            self.validation_copy = copy.deepcopy(transformer).requires_grad_(False)
        units = shard_transformer(transformer, self.fsdp)  # parameters become DTensor shards (on acc.device)
        log.info(
            "FSDP2: %d %s units + the transformer's other parameters, sharded over %d process(es)",
            units,
            self.fsdp["block"],
            acc.num_processes,
        )

    def _configure_deepspeed(self):
        """Fill DeepSpeed's batch sizes and clipping from the config."""
        cfg, acc = self.cfg, self.accelerator
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.train.grad_clip

    def _refuse_earlier_run(self, resume, overwrite):
        """A run folder with checkpoints is continued (--resume) or started over (--overwrite), never mixed."""
        if resume and overwrite:
            raise ConfigError(
                "--resume and --overwrite: give one (--resume continues the run, --overwrite starts over)"
            )
        found = runs.list_checkpoints(self.run_dir)
        if found and not resume and not overwrite:
            raise ConfigError(
                f"run_dir {self.run_dir} already holds checkpoints (the latest is step {found[-1][0]}); continue "
                f"it with --resume latest, start it over with --overwrite (deletes its checkpoints, metrics and "
                f"logs), or give this run another run_dir"
            )

    def _find_resume(self, resume):
        if not resume:
            return None
        if resume == "latest":
            found = runs.list_checkpoints(self.run_dir)
            if not found:
                log.info("--resume latest: no checkpoint in %s yet; starting fresh", self.run_dir)
                return None
            checkpoint = found[-1][1]
        else:
            try:
                checkpoint = runs.resolve_checkpoint(resume)
            except FileNotFoundError as e:
                raise ConfigError(f"--resume {e}") from None
        runs.refuse_pickles(checkpoint)  # before anything loads
        return checkpoint

    def _check_config_against_saved(self):
        saved = os.path.join(self.run_dir, "config.yaml")
        if not os.path.isfile(saved):
            return
        import yaml

        with open(saved) as f:
            old = yaml.safe_load(f) or {}
        new = to_dict(self.cfg)
        changed = [
            f"{s}.{k}"
            for s in new
            if isinstance(new[s], dict)
            for k in new[s]
            if isinstance(old.get(s), dict) and old[s].get(k) != new[s][k]
        ]
        if changed:
            log.warning("config differs from the one saved in this run folder: %s", ", ".join(changed))

    def _data(self):
        cfg, acc = self.cfg, self.accelerator
        records, self.skips = D.load_records(cfg.data.files, allow_outside=cfg.data.allow_outside)
        if not records:
            raise ConfigError(f"data.files: no usable record ({self.skips.total} skipped: {self.skips.summary()})")
        buckets = D.make_buckets(cfg.data.resolution, cfg.data.bucket_step, cfg.data.max_aspect)
        self.dataset = D.UniDataset(
            records,
            cfg.data.resolution,
            buckets,
            random_crop=cfg.data.random_crop,
            seed=cfg.seed,
            t2i_as_caption=cfg.data.t2i_as_caption,
            skips=self.skips,
        )
        self.sampler = D.HybridBatchSampler(
            self.dataset.groups,
            cfg.train.batch_size,
            cfg.data.ratios,
            seed=cfg.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self.loader = D.make_loader(self.dataset, self.sampler, cfg.data.num_workers)
        self.global_batch = cfg.train.batch_size * acc.num_processes
        self.positions = [acc.process_index * cfg.train.batch_size + i for i in range(cfg.train.batch_size)]

    def _trackers(self):
        acc = self.accelerator
        self.tb = None
        if acc.log_with:
            init = {"tensorboard": {"purge_step": self.step + 1}} if self.step else {}
            acc.init_trackers("unialign", init_kwargs=init)
            if self.main:
                self.tb = acc.get_tracker("tensorboard", unwrap=True)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def _trainable_keys(self):
        if self.cfg.train.mode == "full":
            return list(self.transformer.state_dict())
        return [n for n, _ in self.trainable]

    def _load_trainable(self, state, where, names=None):
        keys = set(self._trainable_keys())
        names = set(state) if names is None else set(names)
        if names != keys:
            raise ValueError(
                f"{where}: trained tensors do not match this run's model "
                f"(missing {sorted(keys - names)[:3]}, extra {sorted(names - keys)[:3]})"
            )
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # rank 0 holds the full tensors and broadcasts them; every rank keeps its shard
            set_model_state_dict(
                self.transformer,
                state if self.main else {},
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
            )
            return
        own = self.transformer.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def _full_model_state(self):
        """FSDP: the transformer's full state dict on rank 0, on the CPU (a collective; None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.main else None

    def _trainable_state(self):
        if self.fsdp:
            state = self._full_model_state()
            return None if state is None else {k: state[k] for k in self._trainable_keys()}
        state = self.accelerator.get_state_dict(self.module)  # collective under FSDP / ZeRO-3
        if state is None:
            return None
        state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
        return {k: state[k] for k in self._trainable_keys()}

    def _save_resume_state(self, tmp):
        """Optimizer, LR schedule, grad scaler and RNG states, as safetensors and JSON (never a pickle).
        Sharded runs (FSDP, DeepSpeed) keep no optimizer state: their engines only write pickles."""
        acc = self.accelerator
        runs.save_rng(tmp, acc.process_index)
        optimizer = None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            # the full (gathered) state on rank 0, keyed by parameter name; a collective
            optimizer = get_optimizer_state_dict(
                self.transformer,
                self.optimizer.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        if self.main:
            if self.fsdp:
                runs.save_optimizer_state(os.path.join(tmp, runs.OPTIMIZER), optimizer)
            elif not self.sharded:
                runs.save_optimizer(os.path.join(tmp, runs.OPTIMIZER), self.optimizer)
            scaler = getattr(acc, "scaler", None)
            runs.write_json(
                os.path.join(tmp, runs.RESUME),
                {
                    "scheduler": runs._jsonable(self.scheduler.state_dict()),
                    "scaler": runs._jsonable(scaler.state_dict()) if scaler is not None else None,
                    "optimizer": None if self.sharded else runs.OPTIMIZER,
                },
            )

    def _write_checkpoint(self, tmp, state, ema):
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.accelerator.wait_for_everyone()
        self._save_resume_state(tmp)
        if self.main:
            lora, step = self.cfg.train.lora, self.step
            meta = {
                "mode": self.cfg.train.mode,
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
                    "batch_no": self.batch_no,
                    "sampler": self.sampler.state_dict(step=self.batch_no),
                    "world_size": self.accelerator.num_processes,
                    "global_batch": self.global_batch,
                    "skipped": self.skips.summary(),
                    "empty_batches": dict(sorted(self.empty_batches.items())),
                    "resumable": not self.sharded,
                },
            )

    def save_checkpoint(self):
        acc, step = self.accelerator, self.step
        tmp, final = runs.temporary_dir(self.run_dir, step), runs.checkpoint_dir(self.run_dir, step)
        state = self._trainable_state()  # collective under FSDP / ZeRO-3
        ema = self.ema.state_dict() if self.ema is not None else None  # collective under FSDP
        failed = None
        try:
            self._write_checkpoint(tmp, state, ema)
        except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError or as the writer's own error
            if not runs.is_no_space(e):
                raise
            failed = e
        # every process has written its part (RNG states); all learn whether one of them ran out of space
        flag = torch.tensor([1.0 if failed else 0.0], device=self.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, "sum")
        if float(flag) > 0:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = runs.list_checkpoints(self.run_dir)
            kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint"
            raise runs.TrainingError(
                f"no space left on {os.path.dirname(tmp)} while writing the checkpoint of "
                f"step {step}; {kept}. Free some space and continue with --resume latest"
            )
        if self.main:
            runs.commit(tmp, final)
            runs.prune(self.run_dir, self.cfg.checkpoint.keep)
            log.info("checkpoint %s", final)
        acc.wait_for_everyone()
        self.saved_step = step

    def _resume(self, checkpoint):
        acc = self.accelerator
        runs.refuse_pickles(checkpoint)
        state = runs.read_state(checkpoint)
        if state["global_batch"] != self.global_batch:
            raise ConfigError(
                f"--resume {checkpoint}: saved with a global batch of {state['global_batch']}, this run "
                f"has {self.global_batch} (train.batch_size x processes); keep it the same"
            )
        if not state.get("resumable", True) or self.sharded:
            raise ConfigError(
                f"--resume {checkpoint}: exact resume of sharded runs (FSDP, DeepSpeed) is not "
                f"supported (their optimizer state exists only as pickles); start a new run from "
                f"its weights with init.path={checkpoint}"
            )
        path = os.path.join(checkpoint, runs.TRAINABLE)
        if self.fsdp:
            from safetensors import safe_open
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            with safe_open(path, framework="pt") as f:
                names = list(f.keys())  # every rank checks the names (no rank waits on a failed one)
            self._load_trainable(load_file(path, device="cpu") if self.main else {}, checkpoint, names)
            full = runs.read_optimizer_state(os.path.join(checkpoint, runs.OPTIMIZER)) if self.main else {}
            # a parameter that never had a gradient (null_image_embd in a short run) has no Adam state in the
            # checkpoint, as in the uninterrupted run: strict=False, and the state torch's loader creates for it
            # with a zero-gradient step (step 1) is dropped again, or its first real step would count as the second
            optimizer = self.optimizer.optimizer
            set_optimizer_state_dict(
                self.transformer,
                optimizer,
                full,
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
            )
            with safe_open(os.path.join(checkpoint, runs.OPTIMIZER), framework="pt") as f:
                saved = {k[len("state.") :].rsplit(".", 1)[0] for k in f.keys()}
            for name, param in self.trainable:
                if name not in saved:
                    optimizer.state.pop(param, None)
        else:
            self._load_trainable(load_file(path, device="cpu"), checkpoint)
            runs.load_optimizer(os.path.join(checkpoint, runs.OPTIMIZER), self.optimizer)
        resume = runs.read_json(os.path.join(checkpoint, runs.RESUME))
        self.scheduler.load_state_dict(resume["scheduler"])
        self._optimizer_follows_config()
        scaler = getattr(acc, "scaler", None)
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if not runs.load_rng(checkpoint, acc.process_index):
            log.warning(
                "%s has no random state for process %d; it continues from the current one",
                checkpoint,
                acc.process_index,
            )
        self.empty_batches.update(state.get("empty_batches", {}))
        if self.ema is not None:
            path = os.path.join(checkpoint, runs.EMA)
            if os.path.isfile(path):
                self.ema.load_state_dict(load_file(path, device="cpu" if self.fsdp else str(self.device)))
            else:
                log.warning("%s has no EMA weights; EMA restarts from the current weights", checkpoint)
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.batch_no = state["step"], state["batch_no"]
        self.saved_step = self.step
        if self.main:
            runs.truncate_metrics(self.run_dir, self.step)
        log.info("resumed from %s at step %d (micro-batch %d)", checkpoint, self.step, self.batch_no)

    def _optimizer_follows_config(self):
        """--resume: the checkpoint's optimizer state brings the old lr, betas and weight decay; the config's win
        (the run folder's config.yaml says what trains), and the change is logged. The schedule goes on from the
        checkpoint's step, at the config's peak lr."""
        cfg, scheduler = self.cfg.train, self.scheduler
        groups = self.optimizer.param_groups
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

    # -- the loop -------------------------------------------------------------------------------------------------

    def _batches(self):
        while True:
            yield from self.loader

    def _reducer(self):
        acc = self.accelerator
        if acc.num_processes == 1:
            return Reducer()
        return Reducer(
            all_sum=lambda x: acc.reduce(x.to(self.device), "sum"),
            gather=lambda x: acc.gather(x),
            rank=acc.process_index,
            world=acc.num_processes,
        )

    def train(self, stop_at: int | None = None):
        """Train to ``train.max_steps`` (or only to step ``stop_at``, with a checkpoint there: a later run with
        ``resume="latest"`` continues exactly, on the same schedule)."""
        cfg, acc = self.cfg, self.accelerator
        end = min(cfg.train.max_steps, stop_at or cfg.train.max_steps)
        reducer = self._reducer()
        batches = self._batches()
        block = cfg.teacher.block if self.encoders.teacher is not None else None
        need_teacher = cfg.loss.align > 0 and self.encoders.teacher is not None
        bar = self._progress_bar()
        self.last_good, self.speed, final = None, None, {}
        self.module.train()
        self.signals.install()  # Ctrl-C / SIGTERM: finish the step, write a checkpoint, stop
        while self.step < end:
            started = time.perf_counter()
            sums, seen, grad_norm, good = defaultdict(float), [], None, 0
            for _ in range(cfg.train.grad_accum):
                batch, empty = self._next_batch(batches, seen)
                rng = SampleRNG(cfg.seed, self.batch_no, self.positions, self.global_batch)
                prepared = prepare_batch(batch, self.encoders, rng, need_teacher)
                with acc.accumulate(self.module), attention_backend(self.device):
                    if self.fsdp:  # reduce-scatter the gradients only on the micro-batch that steps
                        self.transformer.set_requires_gradient_sync(acc.sync_gradients)
                    total, logged = compute_losses(
                        self.module,
                        prepared,
                        rng,
                        cfg.loss,
                        self.encoders.encode_ids,
                        self.bundle.mask_id,
                        reducer,
                        block,
                    )
                    self._backward(total)
                    if acc.sync_gradients:
                        grad_norm = self._clip_gradients()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not empty:
                    good += 1
                    for k, v in logged.items():
                        sums[k] += float(v) / cfg.train.grad_accum
                self.batch_no += 1
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self.step += 1

            final = self._step_metrics(sums, good, grad_norm, started)
            self._check_finite(final)
            self._log(final, seen, bar)
            if cfg.validation.every and self.step % cfg.validation.every == 0:
                self.validate()
            every = cfg.checkpoint.every
            if (every and self.step % every == 0) or self.step == end:
                self.save_checkpoint()
            signum = self._stop_signal()
            if signum:
                self._stop_on_signal(bar, signum)
        self._finish(bar)
        return final

    def _last_checkpoint(self) -> str:
        found = runs.list_checkpoints(self.run_dir)
        return f"the last checkpoint {found[-1][1]} is intact" if found else "there is no checkpoint yet"

    def _check_finite(self, final):
        """Stop at the first step whose loss or gradient is NaN or infinite, before anything of it is written.
        (With fp16 the grad scaler skips steps with infinite gradients by design; there only the loss counts.)"""
        bad = {k: final[k] for k in TERMS if final[k] is not None and not math.isfinite(final[k])}
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if final["grad_norm"] is not None and not math.isfinite(final["grad_norm"]) and not scaled:
            bad["grad_norm"] = final["grad_norm"]
        if bad:
            raise runs.TrainingError(
                f"step {self.step}: not finite: {', '.join(f'{k} {v}' for k, v in bad.items())}; stopped without "
                f"writing this step ({self._last_checkpoint()}). Lower train.lr or the loss weights, or check the data; "
                f"then continue with --resume latest --set train.lr=<lower>, or start over"
            )

    def _stop_signal(self):
        """The signal (SIGINT, SIGTERM) that asks this run to stop after this step, on any process; else None."""
        got = self.signals.received
        acc = self.accelerator
        if acc.num_processes > 1:  # every process must stop at the same step: the checkpoint is a collective
            flag = acc.reduce(torch.tensor([float(got or 0)], device=self.device), "sum")
            got = got or (signal.SIGTERM if float(flag) > 0 else None)
        return got

    def _stop_on_signal(self, bar, signum):
        if self.saved_step != self.step:
            self.save_checkpoint()
        self._finish(bar)
        raise runs.Interrupted(
            f"stopped by {signal.Signals(signum).name} after step {self.step}: checkpoint "
            f"{runs.checkpoint_dir(self.run_dir, self.step)}. Continue with: {runs.resume_command(self.run_dir)}",
            128 + signum,
        )

    def _progress_bar(self):
        cfg = self.cfg
        if not (self.main and cfg.log.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=cfg.train.max_steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 10,
        )  # a log file gets a line every 10 s

    def _next_batch(self, batches, seen):
        """The next micro-batch, padded to train.batch_size, and whether it is empty; notes it in `seen` (rank 0).
        An empty one (no image decoded) is counted as skipped under its own task; the step runs it with zero
        weight on the last good batch so that every process makes the same calls."""
        cfg = self.cfg
        batch = next(batches)
        empty = batch is None or batch.get("empty", False)
        if empty:
            last_good = self.last_good
            task = batch["task"] if batch is not None else self.sampler.task_at(self.batch_no)
            self.skips.merge(batch.get("skipped", []) if batch is not None else [])
            self.empty_batches[task] += 1
            if last_good is None:
                raise runs.TrainingError(
                    f"data: no image of the first micro-batch ({task}) could be "
                    f"decoded ({self.skips.summary()}); check that task's image files"
                )
            log.warning("micro-batch %d (%s): no image could be decoded; skipped", self.batch_no, task)
            batch = dict(
                last_good,
                index=last_good["index"][:1],
                text=last_good["text"][:1],
                caption=last_good["caption"][:1],
                skipped=[],
            )
            batch["target"] = batch["target"][:1] if batch["target"] is not None else None
            batch["sources"] = [s[:1] for s in batch["sources"]]
            batch = pad_batch(batch, cfg.train.batch_size)
            batch["present"] = [False] * cfg.train.batch_size
        else:
            self.skips.merge(batch.get("skipped", []))
            batch = pad_batch(batch, cfg.train.batch_size)
            self.last_good = batch
        if self.main:
            seen.append(
                {
                    "task": task if empty else batch["task"],
                    "batch": self.sampler.global_batch_at(self.batch_no),
                    **({"skipped": True} if empty else {}),
                }
            )
        return batch, empty

    def _backward(self, total):
        """Back-propagate one micro-batch's loss. accelerate divides it by train.grad_accum, which averages the
        micro-batches; with `train.grad_accum_reduce: sum` (the official training's rule) the factor is taken back,
        so the micro-batches' gradients add up and the clipping at train.grad_clip sees their sum."""
        cfg = self.cfg.train
        self.accelerator.backward(total * cfg.grad_accum if cfg.grad_accum_reduce == "sum" else total)

    def _clip_gradients(self):
        grad_norm = self.accelerator.clip_grad_norm_([p for _, p in self.trainable], self.cfg.train.grad_clip)
        return grad_norm.full_tensor() if is_dtensor(grad_norm) else grad_norm

    def _step_metrics(self, sums, good, grad_norm, started):
        """The step's loss terms (the mean over processes and over the micro-batches that had data), lr, speed."""
        cfg, acc = self.cfg, self.accelerator
        values = torch.tensor([sums[k] for k in TERMS] + [good], device=self.device)
        values = acc.reduce(values, "sum") if acc.num_processes > 1 else values
        values, good = values[:-1], int(values[-1])
        if good == acc.num_processes * cfg.train.grad_accum:
            values = values / acc.num_processes  # every micro-batch had data: the mean over processes
        elif good:
            values = values * cfg.train.grad_accum / good  # the mean over micro-batches that had data
        elapsed = time.perf_counter() - started
        rate = self.global_batch * cfg.train.grad_accum / max(elapsed, 1e-9)
        self.speed = rate if self.speed is None else 0.9 * self.speed + 0.1 * rate
        final = {k: float(v) if good else None for k, v in zip(TERMS, values)}  # None: nothing decoded
        final.update(
            step=self.step,
            lr=self.scheduler.get_last_lr()[0],
            samples_per_s=rate,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
        )
        return final

    def _log(self, final, seen, bar):
        """metrics.jsonl, the progress bar and TensorBoard (rank 0)."""
        if not self.main:
            return
        cfg = self.cfg
        try:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(final, micro=seen)) + "\n")
        except OSError as e:
            if not runs.is_no_space(e):
                raise
            raise runs.TrainingError(
                f"no space left on {self.run_dir} while writing metrics.jsonl at step {self.step}; "
                f"{self._last_checkpoint()}. Free some space and continue with --resume latest"
            ) from None
        if bar is not None:
            bar.set_postfix(
                {k: f"{final[k]:.4f}" for k in TERMS if final[k] is not None} | {"samples/s": f"{self.speed:.2f}"},
                refresh=False,
            )
            bar.update(1)
        if self.tb is not None and (self.step % cfg.log.every == 0 or self.step == 1):
            self.accelerator.log(
                {f"loss/{k}": final[k] for k in TERMS if final[k] is not None}
                | {"lr": final["lr"], "samples_per_s": final["samples_per_s"]}
                | ({"grad_norm": final["grad_norm"]} if final["grad_norm"] is not None else {}),
                step=self.step,
            )

    def _finish(self, bar):
        if bar is not None:
            bar.close()
        if self.skips.total:
            log.warning("data: skipped %d bad records in all: %s", self.skips.total, self.skips.summary())
        if self.empty_batches:
            log.warning(
                "data: %d micro-batches had no decodable image and were skipped: %s",
                sum(self.empty_batches.values()),
                dict(sorted(self.empty_batches.items())),
            )
        self.accelerator.end_training()
        self.close()

    # -- validation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self):
        from unialign_core import caption, text_to_image

        cfg, acc = self.cfg.validation, self.accelerator
        if self.params_sharded:
            log.warning(
                "validation: skipped with ZeRO-3 (sharded parameters); export a checkpoint and run the modes on it"
            )
            return
        full = self._full_model_state() if self.fsdp else None  # FSDP: gathered (a collective), rank 0 only
        if self.main:
            folder = os.path.join(self.run_dir, "validation", f"step_{self.step:08d}")
            os.makedirs(folder, exist_ok=True)
            transformer = self.transformer
            if self.fsdp:  # the unsharded twin with the gathered weights
                transformer = self.validation_copy
                transformer.load_state_dict(full)
                transformer.to(self.device)
                del full
            view = UniAlignModel(
                transformer,
                self.bundle.vae,
                self.bundle.text_encoder,
                self.bundle.tokenizer,
                self.bundle.scheduler_config,
                self.bundle.mask_id,
                "training",
            )
            transformer.eval()
            lines = []
            with acc.autocast():
                for i, prompt in enumerate(cfg.prompts):
                    res = text_to_image(
                        view,
                        prompt,
                        width=cfg.width,
                        height=cfg.height,
                        steps=cfg.steps,
                        guidance=cfg.guidance,
                        seed=cfg.seed,
                        text_length=self.cfg.data.text_length,
                    )
                    to_pil(res.images[:1])[0].save(os.path.join(folder, f"t2i_{i:02d}.png"))
                    if self.tb is not None:
                        self.tb.add_image(f"val/t2i_{i:02d}", res.images[0], self.step)
                for path in cfg.images:
                    pil = D.load_image(path)
                    m = self.bundle.pixel_multiple
                    pil = D.resize_to_bucket(pil, (max(m, pil.width // m * m), max(m, pil.height // m * m)))
                    text = caption(
                        view, D.image_to_tensor(pil)[None], answer_tokens=cfg.caption_length, steps=16, seed=cfg.seed
                    )[0]
                    lines.append(f"{os.path.basename(path)}\t{text}")
                    if self.tb is not None:
                        self.tb.add_text(f"val/caption/{os.path.basename(path)}", text, self.step)
            with open(os.path.join(folder, "captions.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + ("\n" if lines else ""))
            if self.fsdp:
                transformer.to("cpu")
            transformer.train()
            log.info("validation written to %s", folder)
        acc.wait_for_everyone()


def run(cfg: Config, resume: str = None, stop_at: int | None = None, overwrite: bool = False) -> dict:
    """Train with `cfg` (to step `stop_at` only, when given); returns the last step's metrics. `overwrite` starts
    over in a run folder that holds checkpoints (without it, and without `resume`, such a folder is refused)."""
    trainer = Trainer(cfg, resume, overwrite)
    try:
        return trainer.train(stop_at)
    finally:
        trainer.close()
