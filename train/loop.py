"""The training loop: accelerate + peft, hybrid batches, the four losses, checkpoints, resume, logs, validation.

    python -m train train/configs/lora.yaml --set train.max_steps=2000
    accelerate launch --config_file train/configs/accelerate/ddp.yaml -m train train/configs/full.yaml

One optimizer step = `train.grad_accum` micro-batches of `train.batch_size` per process. Micro-batch number n of
the run is global batch n of the HybridBatchSampler (rank r takes its slice), and all per-sample randomness is
keyed by n (see losses.SampleRNG): a resumed run sees the data and noise the uninterrupted run would have seen.

`Trainer.__init__` sets up, `Trainer.train` is the loop; the jobs around them live in modules named for them:
step (one micro-step: losses, backward, clipping, optimizer step), losses (the terms), batch (the frozen encoders
and batch preparation), data, records, buckets and sampler (the data pipeline), checkpointing (save and resume),
validation, signals (Ctrl-C and SIGTERM), optim (AdamW and the schedule), lora, fsdp (FSDP2 sharding), ema, frozen
(the frozen encoders' dtype and cache identity), attention (the kernel) and paths (absolute paths in the config).
"""

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter, defaultdict

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from unialign_core import DTYPES

from . import checkpointing, runs
from .attention import attention_backend
from .batch import Encoders, pad_batch, prepare_batch
from .buckets import make_buckets
from .config import Config, ConfigError, check_paths, dump_config
from .data import UniDataset, make_loader
from .ema import EMA
from .feature_cache import FeatureCache
from .fsdp import autocast_forward, fsdp_settings, is_dtensor, shard_transformer
from .init import load_start
from .lora import apply_lora, cast_frozen_base
from .losses import LOGGED, Reducer, SampleRNG, TrainModule
from .optim import make_optimizer_and_schedule
from .paths import absolute_paths
from .records import load_records
from .sampler import HybridBatchSampler
from .signals import StopSignals
from .step import TrainStep
from .teacher import CachedTeacher, Teacher
from .validation import validate

log = logging.getLogger("train")


# --------------------------------------------------------------------------------------------------------------
# The trainer


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
        self.resume_from = checkpointing.find_resume(self.run_dir, resume)
        checkpointing.refuse_earlier_run(self.run_dir, resume, overwrite)
        self._prepare_run_dir(overwrite)
        set_seed(self.cfg.seed)  # identical fresh initialisation on every process
        self.device = self.accelerator.device
        self.frozen_dtype = self._frozen_dtype()
        self._model()  # the start weights, the frozen encoders, LoRA, sharding
        self._optimizer()  # AdamW, the schedule, accelerate's wrapping, EMA
        self._data()
        self.step, self.batch_no, self.saved_step = 0, 0, None
        self.empty_batches = Counter()  # micro-batches per task in which no image could be decoded
        if self.resume_from:
            checkpointing.resume(self, self.resume_from)
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

    def _prepare_run_dir(self, overwrite):
        """Rank 0: clean up after a killed run, delete the old outputs (--overwrite), write config.yaml."""
        cfg = self.cfg
        if self.main:
            runs.clean_temporaries(self.run_dir)
            if overwrite:
                removed = runs.remove_outputs(self.run_dir)
                if removed:
                    log.warning("--overwrite: deleted the earlier run's %s in %s", ", ".join(removed), self.run_dir)
            elif not self.resume_from:
                runs.truncate_metrics(self.run_dir, 0)  # lines of a killed start that never wrote a checkpoint
            if not overwrite:
                checkpointing.check_config_against_saved(self.run_dir, cfg)
            dump_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.accelerator.wait_for_everyone()

    def _frozen_dtype(self):
        frozen = self.cfg.train.frozen_dtype
        if frozen == "auto":
            frozen = "bf16" if self.cfg.train.mixed_precision == "bf16" and self.device.type == "cuda" else "fp32"
        return DTYPES[frozen]

    def _model(self):
        """The start weights (`init`), the frozen encoders with the teacher, LoRA and FSDP sharding."""
        cfg, acc = self.cfg, self.accelerator
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

    def _optimizer(self):
        """AdamW and the schedule; the module and optimizer as accelerate wraps them; the EMA of the weights."""
        cfg, acc, transformer = self.cfg, self.accelerator, self.transformer
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

    def _teacher(self):
        """The alignment teacher with its feature cache, or None (no teacher.path, or loss.align 0)."""
        cfg = self.cfg
        if not (cfg.teacher.path and cfg.loss.align > 0):
            return None
        raw = Teacher.load(cfg.teacher.path, self.device, self.frozen_dtype, cfg.teacher.image_size)
        cache_dir = cfg.data.cache_dir or os.path.join(self.run_dir, "cache")
        return CachedTeacher(raw, FeatureCache(cache_dir) if cfg.teacher.cache else None)

    def _shard(self, transformer):
        """FSDP2: shard the transformer over the processes (after a CPU twin for validation is kept on rank 0)."""
        acc = self.accelerator
        if acc.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision: fp16 is not supported under FSDP; use bf16 (or fp32)")
        if self.main and self.cfg.validation.every:
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

    def _data(self):
        cfg, acc = self.cfg, self.accelerator
        records, self.skips = load_records(cfg.data.files, allow_outside=cfg.data.allow_outside)
        if not records:
            raise ConfigError(f"data.files: no usable record ({self.skips.total} skipped: {self.skips.summary()})")
        buckets = make_buckets(cfg.data.resolution, cfg.data.bucket_step, cfg.data.max_aspect)
        self.dataset = UniDataset(
            records,
            cfg.data.resolution,
            buckets,
            random_crop=cfg.data.random_crop,
            seed=cfg.seed,
            t2i_as_caption=cfg.data.t2i_as_caption,
            skips=self.skips,
        )
        self.sampler = HybridBatchSampler(
            self.dataset.groups,
            cfg.train.batch_size,
            cfg.data.ratios,
            seed=cfg.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self.loader = make_loader(self.dataset, self.sampler, cfg.data.num_workers)
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

    def _micro_step(self):
        """One micro-step (`step.TrainStep`) as this run takes it: accelerate's backward and clipping."""
        cfg = self.cfg
        return TrainStep(
            self.module,
            self.optimizer,
            cfg.loss,
            self.encoders.encode_ids,
            self.bundle.mask_id,
            clip=self._clip_gradients,
            reducer=self._reducer(),
            block=cfg.teacher.block if self.encoders.teacher is not None else None,
            backward=self._backward,
        )

    def train(self, stop_at: int | None = None):
        """Train to ``train.max_steps`` (or only to step ``stop_at``, with a checkpoint there: a later run with
        ``resume="latest"`` continues exactly, on the same schedule)."""
        cfg, acc = self.cfg, self.accelerator
        end = min(cfg.train.max_steps, stop_at or cfg.train.max_steps)
        micro_step = self._micro_step()
        batches = self._batches()
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
                    logged, norm = micro_step(prepared, rng, sync=acc.sync_gradients)
                if norm is not None:
                    grad_norm = norm
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
                validate(self)
            every = cfg.checkpoint.every
            if (every and self.step % every == 0) or self.step == end:
                checkpointing.save_checkpoint(self)
            signum = self._stop_signal()
            if signum:
                self._stop_on_signal(bar, signum)
        self._finish(bar)
        return final

    def _check_finite(self, final):
        """Stop at the first step whose loss or gradient is NaN or infinite, before anything of it is written.
        (With fp16 the grad scaler skips steps with infinite gradients by design; there only the loss counts.)"""
        bad = {k: final[k] for k in LOGGED if final[k] is not None and not math.isfinite(final[k])}
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if final["grad_norm"] is not None and not math.isfinite(final["grad_norm"]) and not scaled:
            bad["grad_norm"] = final["grad_norm"]
        if bad:
            raise runs.TrainingError(
                f"step {self.step}: not finite: {', '.join(f'{k} {v}' for k, v in bad.items())}; stopped without "
                f"writing this step ({checkpointing.last_checkpoint_note(self.run_dir)}). Lower train.lr or the loss "
                f"weights, or check the data; then continue with --resume latest --set train.lr=<lower>, or start over"
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
            checkpointing.save_checkpoint(self)
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
        size = self.cfg.train.batch_size
        batch = next(batches)
        empty = batch is None or batch.empty
        if empty:
            last_good = self.last_good
            task = batch.task if batch is not None else self.sampler.task_at(self.batch_no)
            self.skips.merge(batch.skipped if batch is not None else [])
            self.empty_batches[task] += 1
            if last_good is None:
                raise runs.TrainingError(
                    f"data: no image of the first micro-batch ({task}) could be "
                    f"decoded ({self.skips.summary()}); check that task's image files"
                )
            log.warning("micro-batch %d (%s): no image could be decoded; skipped", self.batch_no, task)
            first = dataclasses.replace(
                last_good,
                target=last_good.target[:1] if last_good.target is not None else None,
                sources=[s[:1] for s in last_good.sources],
                text=last_good.text[:1],
                caption=last_good.caption[:1],
                index=last_good.index[:1],
                skipped=[],
            )
            batch = dataclasses.replace(pad_batch(first, size), present=[False] * size)
        else:
            self.skips.merge(batch.skipped)
            batch = pad_batch(batch, size)
            self.last_good = batch
        if self.main:
            seen.append(
                {
                    "task": task if empty else batch.task,
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
        values = torch.tensor([sums[k] for k in LOGGED] + [good], device=self.device)
        values = acc.reduce(values, "sum") if acc.num_processes > 1 else values
        values, good = values[:-1], int(values[-1])
        if good == acc.num_processes * cfg.train.grad_accum:
            values = values / acc.num_processes  # every micro-batch had data: the mean over processes
        elif good:
            values = values * cfg.train.grad_accum / good  # the mean over micro-batches that had data
        elapsed = time.perf_counter() - started
        rate = self.global_batch * cfg.train.grad_accum / max(elapsed, 1e-9)
        self.speed = rate if self.speed is None else 0.9 * self.speed + 0.1 * rate
        final = {k: float(v) if good else None for k, v in zip(LOGGED, values)}  # None: nothing decoded
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
                f"{checkpointing.last_checkpoint_note(self.run_dir)}. Free some space and continue with --resume latest"
            ) from None
        if bar is not None:
            bar.set_postfix(
                {k: f"{final[k]:.4f}" for k in LOGGED if final[k] is not None} | {"samples/s": f"{self.speed:.2f}"},
                refresh=False,
            )
            bar.update(1)
        if self.tb is not None and (self.step % cfg.log.every == 0 or self.step == 1):
            self.accelerator.log(
                {f"loss/{k}": final[k] for k in LOGGED if final[k] is not None}
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


def run(cfg: Config, resume: str = None, stop_at: int | None = None, overwrite: bool = False) -> dict:
    """Train with `cfg` (to step `stop_at` only, when given); returns the last step's metrics. `overwrite` starts
    over in a run folder that holds checkpoints (without it, and without `resume`, such a folder is refused)."""
    trainer = Trainer(cfg, resume, overwrite)
    try:
        return trainer.train(stop_at)
    finally:
        trainer.close()
