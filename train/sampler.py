"""The hybrid-task batch sampler: batches of one (task, n_sources, bucket) group each, tasks interleaved at fixed
ratios, a pure function of (seed, global batch number) so that a run resumes exactly."""

import hashlib
import logging
import math
import zlib

import numpy as np

from .records import TASKS

log = logging.getLogger("train.data")


def _rng(*parts):
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def _task_id(task):
    return zlib.crc32(task.encode())


class HybridBatchSampler:
    """Batches of indices, each from one group (task, n_sources, bucket), tasks interleaved at fixed ratios.

    The stream is a pure function of (seed, global batch number `step`), so `state_dict()` is just the step:
    - each task has its own endless list of global batches: per pass ("cycle") over the task's data, every group
      is shuffled with (seed, task, cycle) and cut into global batches of batch_size * world_size (the remainder
      is left out of that cycle), and the batches are shuffled;
    - an epoch is `len(self)` steps (default: the number of full global batches of all used tasks); task t gets
      n_t = ratio_t * len steps per epoch, spread evenly by smooth weighted round robin;
    - rank r takes the slice [r * batch_size, (r + 1) * batch_size) of each global batch.
    ratios=None uses each task in proportion to its data; tasks missing from `ratios` are not used.
    Iterating yields the rest of the current epoch. A DataLoader pulls batches ahead of the training loop
    (prefetch), so save `state_dict(step=batches_consumed)` when training from a DataLoader.
    """

    def __init__(self, groups, batch_size, ratios=None, *, seed=0, rank=0, world_size=1, epoch_batches=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.groups = {k: list(v) for k, v in sorted(groups.items())}
        tasks = sorted({k[0] for k in self.groups})
        if ratios is not None:
            unknown = set(ratios) - set(TASKS)
            if unknown:
                raise ValueError(f"ratios name unknown tasks {sorted(unknown)}; tasks are {TASKS}")
        # batches per cycle of each task
        self.task_len = {
            t: sum(len(v) // self.global_batch for k, v in self.groups.items() if k[0] == t) for t in tasks
        }
        weights = {t: float(ratios.get(t, 0)) for t in tasks} if ratios is not None else dict(self.task_len)
        for t, w in list(weights.items()):
            if w > 0 and self.task_len[t] == 0:
                log.warning(
                    "sampler: task %s has no full global batch of %d in any bucket; not used", t, self.global_batch
                )
            if w <= 0 or self.task_len[t] == 0:
                del weights[t]
        for t in set(ratios or ()) - set(tasks):
            if ratios[t] > 0:
                log.warning("sampler: ratio given for task %s but there is no data for it", t)
        if not weights:
            raise ValueError(f"no task has data for a global batch of {self.global_batch} at a ratio > 0")
        self.epoch_batches = epoch_batches or sum(self.task_len[t] for t in weights)
        self.per_epoch = _split(weights, self.epoch_batches)
        self.schedule = _interleave(self.per_epoch, self.epoch_batches)  # [(task, j-th batch of task this epoch)]
        self.step = 0
        self._cache = {}
        self.fingerprint = self._fingerprint(ratios)

    def _fingerprint(self, ratios):
        h = hashlib.sha256(
            repr(
                (
                    self.seed,
                    self.global_batch,
                    self.epoch_batches,
                    sorted((ratios or {}).items()),
                    list(self.groups.items()),
                )
            ).encode()
        )
        return h.hexdigest()[:16]

    def __len__(self):
        return self.epoch_batches

    @property
    def epoch(self):
        return self.step // self.epoch_batches

    def _task_batches(self, task, cycle):
        """Global batches of one pass over a task's data; cached for the current cycle."""
        if self._cache.get(task, (None,))[0] != cycle:
            rng = _rng(self.seed, _task_id(task), cycle)
            batches = []
            for key, idx in self.groups.items():
                if key[0] != task:
                    continue
                perm = rng.permutation(idx)
                batches += [
                    perm[s : s + self.global_batch].tolist()
                    for s in range(0, len(perm) - self.global_batch + 1, self.global_batch)
                ]
            order = rng.permutation(len(batches))
            self._cache[task] = (cycle, [batches[o] for o in order])
        return self._cache[task][1]

    def global_batch_at(self, step):
        """All ranks' indices of global batch number `step` (rank r's share is a contiguous slice)."""
        epoch, i = divmod(step, self.epoch_batches)
        task, j = self.schedule[i]
        cycle, pos = divmod(epoch * self.per_epoch[task] + j, self.task_len[task])
        return self._task_batches(task, cycle)[pos]

    def task_at(self, step):
        """The task of global batch number `step`."""
        return self.schedule[step % self.epoch_batches][0]

    def batch_at(self, step):
        """This rank's indices of global batch number `step`."""
        b = self.global_batch_at(step)
        return b[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self):
        end = (self.epoch + 1) * self.epoch_batches
        while self.step < end:
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def state_dict(self, step=None):
        """Position to resume from: `step` (default: batches handed out so far) and a config fingerprint."""
        return {"step": self.step if step is None else int(step), "fingerprint": self.fingerprint}

    def load_state_dict(self, state, strict=True):
        """Continue exactly after the saved position; with `strict`, refuse a state from other data/settings."""
        if strict and state.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                "sampler state was saved with other data, seed, ratios or global batch size "
                f"(fingerprint {state.get('fingerprint')} != {self.fingerprint})"
            )
        self.step = int(state["step"])


def _split(weights, total):
    """Integer counts proportional to `weights` summing to `total` (largest remainder)."""
    s = sum(weights.values())
    raw = {t: w / s * total for t, w in weights.items()}
    counts = {t: int(math.floor(v)) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: (counts[t] - raw[t], t))[: total - sum(counts.values())]:
        counts[t] += 1
    return {t: c for t, c in counts.items() if c > 0}


def _interleave(counts, total):
    """Smooth weighted round robin: a sequence of (task, occurrence) with each task spread evenly."""
    credit = dict.fromkeys(counts, 0)
    seen = dict.fromkeys(counts, 0)
    out = []
    for _ in range(total):
        for t in counts:
            credit[t] += counts[t]
        t = max(sorted(counts), key=lambda t: credit[t])
        credit[t] -= total
        out.append((t, seen[t]))
        seen[t] += 1
    return out
