"""Training data for UniAlignment: JSONL records, image buckets, a hybrid-task batch sampler and a feature cache.

Pipeline:
    records, skips = load_records(["t2i.jsonl", {"path": "depth.jsonl", "ti2i_task": "perception"}])
    dataset = UniDataset(records, resolution=512, skips=skips)
    sampler = HybridBatchSampler(dataset.groups, batch_size=8, ratios={"t2i": 0.5, "edit": 0.5},
                                 seed=0, rank=rank, world_size=world_size)
    loader = make_loader(dataset, sampler, num_workers=4)
    for batch in loader:           # dict from `collate`, or None if nothing in it could be decoded
        ...

Record conventions: `sources` are the images the model sees (edit source, compose references, the image to
caption or question), `target` is the image the model generates. `text` is the prompt / instruction / question,
`caption` is the caption of the target (t2i, edit, ...), the caption to predict (caption task) or the answer (vqa).
"""

import hashlib
import json
import logging
import math
import os
import signal
import stat
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from unialign_core.images import on_white

log = logging.getLogger(__name__)

TASKS = ("t2i", "caption", "vqa", "edit", "perception", "compose")
MAX_COMPOSE_SOURCES = 3


# ----------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One training example, the same for both JSONL formats. Paths are absolute (or relative to the cwd)."""

    task: str
    text: str
    sources: list = field(default_factory=list)
    target: str | None = None
    caption: str | None = None
    origin: str = field(default="", compare=False)  # "file.jsonl:line", for log lines

    def paths(self):
        """All image paths of the record: sources first, then the target."""
        return list(self.sources) + ([self.target] if self.target is not None else [])


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is a short key for the skip summary."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipLog:
    """Counts skipped records per reason and logs one warning line per skipped record."""

    def __init__(self):
        self.counts = Counter()
        self._seen = set()

    def add(self, where, reason, detail=""):
        """Record a skip (once per (where, reason)); returns False if it was already counted."""
        if (where, reason) in self._seen:
            return False
        self._seen.add((where, reason))
        self.counts[reason] += 1
        log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        return True

    def merge(self, skipped):
        """Count (where, reason) pairs reported by DataLoader workers (batch["skipped"]); they were logged there."""
        for where, reason in skipped:
            if (where, reason) not in self._seen:
                self._seen.add((where, reason))
                self.counts[reason] += 1

    def summary(self):
        """Counts per reason, as a plain dict."""
        return dict(sorted(self.counts.items()))

    @property
    def total(self):
        return sum(self.counts.values())


def _path(value, base, what):
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("bad_field", f"{what} must be a non-empty path string")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _path_list(value, base, what):
    if not isinstance(value, list):
        raise BadRecord("bad_field", f"{what} must be a list of paths")
    return [_path(v, base, what) for v in value]


def _text(obj, keys, required):
    """First present key of `keys` as a stripped string; None if absent and not required."""
    for key in keys:
        if obj.get(key) is not None:
            value = obj[key]
            if not isinstance(value, str):
                raise BadRecord("bad_field", f"'{key}' must be a string")
            if not value.strip():
                if required:
                    raise BadRecord("empty_text", f"'{key}' is empty")
                return None
            return value.strip()
    if required:
        raise BadRecord("bad_field", "missing " + " or ".join(f"'{k}'" for k in keys))
    return None


def _check_shape(task, sources, target):
    """Enforce how many sources / targets each task takes."""
    want = {
        "t2i": (0, 0),
        "caption": (1, 1),
        "vqa": (1, 1),
        "edit": (1, 1),
        "perception": (1, 1),
        "compose": (1, MAX_COMPOSE_SOURCES),
    }[task]
    if not want[0] <= len(sources) <= want[1]:
        n = f"{want[0]}" if want[0] == want[1] else f"{want[0]}..{want[1]}"
        raise BadRecord("bad_source_count", f"{task} takes {n} sources, got {len(sources)}")
    needs_target = task in ("t2i", "edit", "perception", "compose")
    if needs_target and target is None:
        raise BadRecord("bad_field", f"{task} needs a 'target'")
    if not needs_target and target is not None:
        raise BadRecord("bad_field", f"{task} takes its image in 'sources', not 'target'")


def _parse_native(obj, base):
    task = obj["task"]
    if not isinstance(task, str):
        raise BadRecord("bad_field", "'task' must be a string")
    if task not in TASKS:
        raise BadRecord("unknown_task", repr(task))
    text = _text(obj, ("prompt", "instruction"), required=task != "caption") or ""
    caption = _text(obj, ("caption",), required=task in ("caption", "vqa"))
    sources = _path_list(obj.get("sources", []), base, "'sources'")
    target = obj.get("target")
    target = None if target is None else _path(target, base, "'target'")
    _check_shape(task, sources, target)
    if task == "t2i" and caption is None:
        caption = text
    return Record(task, text, sources, target, caption)


def _parse_upstream(obj, base, ti2i_task):
    """Upstream T2I {"image": [img], "conversations": [...]} or TI2I {"image": [src, tgt], "instruction": ...}."""
    images = _path_list(obj["image"], base, "'image'")
    if len(images) not in (1, 2):
        raise BadRecord("bad_field", f"'image' must hold 1 (t2i) or 2 (edit) paths, got {len(images)}")
    conv = obj.get("conversations")
    caption = None
    if conv is not None:  # upstream reads the caption from the first turn (the human one)
        if not (isinstance(conv, list) and conv and isinstance(conv[0], dict)):
            raise BadRecord("bad_field", "'conversations' must be a list of {'from', 'value'} turns")
        caption = _text(conv[0], ("value",), required=len(images) == 1)
    if len(images) == 1:
        if caption is None:
            raise BadRecord("bad_field", "t2i record needs 'conversations' with the caption")
        return Record("t2i", caption, [], images[0], caption)
    instruction = _text(obj, ("instruction",), required=True)
    return Record(ti2i_task, instruction, [images[0]], images[1], caption)


def _parse_upstream_compose(obj, base):
    """Upstream compose: {"original_images": [...], "generated_images": [tgt], "edit_prompt": ..., "caption": ...}."""
    sources = _path_list(obj["original_images"], base, "'original_images'")
    generated = _path_list(obj.get("generated_images"), base, "'generated_images'")
    if not generated:
        raise BadRecord("bad_field", "'generated_images' is empty")
    prompt = obj.get("edit_prompt")
    if isinstance(prompt, str):  # upstream strips stray quotes and backslashes
        obj = dict(obj, edit_prompt=prompt.strip(' \\"'))
    text = _text(obj, ("edit_prompt",), required=True)
    caption = _text(obj, ("caption",), required=False)
    _check_shape("compose", sources, generated[0])
    return Record("compose", text, sources, generated[0], caption)


def parse_record(obj, base_dir, ti2i_task="edit"):
    """Normalise one decoded JSON object (native or upstream format) into a Record; raises BadRecord.

    Relative paths are joined to `base_dir`. Upstream TI2I records become `ti2i_task` ("edit" or "perception":
    upstream keeps perception data, e.g. depth maps, in the same TI2I format). Extra fields are ignored.
    """
    if not isinstance(obj, dict):
        raise BadRecord("bad_field", "record is not a JSON object")
    if "task" in obj:
        return _parse_native(obj, base_dir)
    if "original_images" in obj:
        return _parse_upstream_compose(obj, base_dir)
    if "image" in obj:
        return _parse_upstream(obj, base_dir, ti2i_task)
    raise BadRecord("bad_field", "no 'task', 'image' or 'original_images' field")


def _image_problem(paths, folder, allow_outside):
    """(reason, detail) for the first image path of a record that cannot be used, or None.

    Each path is resolved (symlinks, ../) and must lie in `folder` unless `allow_outside`; it must then be a regular
    file (not a folder, FIFO or device, which would hang or feed endless bytes to the decoder)."""
    for p in paths:
        real = os.path.realpath(p)
        if not allow_outside and os.path.commonpath([real, folder]) != folder:
            shown = p if real == os.path.abspath(p) else f"{p} -> {real}"
            return "outside_data_folder", (
                f"{shown} is outside the data folder {folder}; set data.allow_outside: true to allow it"
            )
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            return "missing_image", p
        except OSError as e:
            return "missing_image", f"{p}: {e}"
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            return "not_a_regular_file", f"{p} is {kind}, not a regular file"
    return None


def read_jsonl(path, skips, root=None, ti2i_task="edit", allow_outside=False):
    """Records of one JSONL file; bad lines are logged and counted in `skips` (a SkipLog) and left out.

    Paths are relative to `root` (default: the JSONL file's folder) unless absolute. Every image path must lie in
    that folder once resolved (unless `allow_outside`) and be an existing regular file; images are not opened here.
    A missing JSONL file raises (that is a config error, not a bad record).
    """
    if ti2i_task not in ("edit", "perception"):
        raise ValueError(f"ti2i_task must be 'edit' or 'perception', got {ti2i_task!r}")
    base = root if root is not None else os.path.dirname(os.path.abspath(path))
    folder = os.path.realpath(base)
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                skips.add(where, "bad_json", str(e))
                continue
            try:
                rec = parse_record(obj, base, ti2i_task)
            except BadRecord as e:
                skips.add(where, e.reason, e.detail)
                continue
            problem = _image_problem(rec.paths(), folder, allow_outside)
            if problem:
                skips.add(where, *problem)
                continue
            rec.origin = where
            records.append(rec)
    return records


def load_records(files, skips=None, allow_outside=False):
    """Read several JSONL files; returns (records, skips) and logs one summary line.

    Each entry of `files` is a path, or a dict {"path": ..., "root": ..., "ti2i_task": "edit"|"perception"}.
    `allow_outside` (data.allow_outside) lets image paths point outside each file's data folder.
    """
    skips = skips if skips is not None else SkipLog()
    records = []
    for entry in files:
        if not isinstance(entry, dict):
            entry = {"path": entry}
        records += read_jsonl(
            entry["path"],
            skips,
            root=entry.get("root"),
            ti2i_task=entry.get("ti2i_task", "edit"),
            allow_outside=allow_outside,
        )
    per_task = dict(sorted(Counter(r.task for r in records).items()))
    log.info(
        "data: %d records from %d files %s; skipped %d %s",
        len(records),
        len(files),
        per_task,
        skips.total,
        skips.summary(),
    )
    return records, skips


# ----------------------------------------------------------------------------------------------------------------
# Images


def make_buckets(resolution=512, step=16, max_aspect=2.0):
    """(w, h) buckets of about resolution**2 pixels, sides multiples of `step` (itself a multiple of 16),
    aspect ratios up to `max_aspect` both ways; sorted from tallest to widest, the square one included."""
    if step % 16 or step <= 0:
        raise ValueError(f"step must be a positive multiple of 16, got {step}")
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}
    for h in range(step, resolution + 1, step):
        w = round(area / h / step) * step
        if w >= h and w / h <= max_aspect:
            buckets |= {(w, h), (h, w)}
    return sorted(buckets, key=lambda b: b[0] / b[1])


def pick_bucket(width, height, buckets):
    """The bucket whose aspect ratio is closest to width/height (in log space)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def to_rgb(img):
    """RGB copy of a PIL image: alpha composited on white, grayscale / palette / 16-bit converted (the core's
    rule, `unialign_core.images.on_white`, which the modes apply to their PIL inputs too)."""
    return on_white(img)


def load_image(path):
    """Decode an image file fully (raises on a missing or corrupt file), apply EXIF rotation, return RGB."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def image_size(path):
    """(width, height) from the file header only, after EXIF rotation (no pixel decode)."""
    with Image.open(path) as img:
        w, h = img.size
        if img.format == "PNG":  # PNG getexif() would decode the pixels; use an eXIf chunk seen before them
            exif = Image.Exif()
            if img.info.get("exif"):
                exif.load(img.info["exif"])
        else:
            exif = img.getexif()
        if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return w, h


def resize_to_bucket(img, bucket, crop=(0.5, 0.5)):
    """Resize to cover `bucket` (w, h) keeping the aspect ratio, then crop; crop=(fx, fy) in [0, 1] places the
    window (0.5, 0.5 = centre crop)."""
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    x, y = round(crop[0] * (nw - bw)), round(crop[1] * (nh - bh))
    return img.crop((x, y, x + bw, y + bh))


def image_to_tensor(img):
    """PIL RGB image -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Dataset


class _ImageError(Exception):
    """An image of a record failed to load (wraps the original error, keeps the path)."""

    def __init__(self, path, error):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


class UniDataset(torch.utils.data.Dataset):
    """Records -> samples with images resized to the record's aspect bucket.

    `groups` maps (task, n_sources, (w, h)) to the item indices that can share a batch. With several buckets the
    image headers are read once here (cheap) to pick each record's bucket; pixels are decoded in __getitem__.
    A record that fails to decode is logged, counted and replaced by the next readable record of its group
    (deterministic). t2i records with a caption are also added as caption items when `t2i_as_caption`.
    """

    def __init__(
        self,
        records,
        resolution=512,
        buckets=None,
        *,
        random_crop=False,
        seed=0,
        t2i_as_caption=True,
        skips=None,
        max_tries=16,
    ):
        self.buckets = list(buckets) if buckets is not None else make_buckets(resolution)
        self.random_crop = random_crop
        self.seed = seed
        self.max_tries = max_tries
        self.skips = skips if skips is not None else SkipLog()
        items = []
        for r in records:
            items.append(r)
            if t2i_as_caption and r.task == "t2i" and r.caption:
                items.append(Record("caption", "", [r.target], None, r.caption, r.origin))
        sizes = {}
        self.records, self.bucket_of, self.groups, self._slot = [], [], {}, []
        for r in items:
            main = r.target if r.target is not None else r.sources[0]
            if len(self.buckets) == 1:
                bucket = self.buckets[0]
            else:
                try:
                    if main not in sizes:
                        sizes[main] = image_size(main)
                except Exception as e:  # unreadable header: not an image
                    self.skips.add(r.origin, "corrupt_image", f"{main}: {e}")
                    continue
                bucket = pick_bucket(*sizes[main], self.buckets)
            key = (r.task, len(r.sources), bucket)
            group = self.groups.setdefault(key, [])
            self._slot.append((key, len(group)))
            group.append(len(self.records))
            self.records.append(r)
            self.bucket_of.append(bucket)
        self._bad = set()  # indices known not to decode (per process; only a speed-up)
        log.info("data: %d items in %d (task, n_sources, bucket) groups", len(self.records), len(self.groups))

    def __len__(self):
        return len(self.records)

    def _crop(self, i):
        if not self.random_crop:
            return (0.5, 0.5)
        fx, fy = np.random.default_rng([self.seed, i]).random(2)  # same window for sources and target
        return (float(fx), float(fy))

    def _load(self, i):
        r, bucket, crop = self.records[i], self.bucket_of[i], self._crop(i)
        images = []
        for p in r.paths():
            try:
                images.append(image_to_tensor(resize_to_bucket(load_image(p), bucket, crop)))
            except Exception as e:
                raise _ImageError(p, e) from e
        return {
            "task": r.task,
            "text": r.text,
            "caption": r.caption or "",
            "index": i,
            "sources": images[: len(r.sources)],
            "target": images[-1] if r.target is not None else None,
        }

    def __getitem__(self, i):
        """Sample dict for item i, or for the next decodable item of its group. If none decodes nearby: a stub
        {"task", "index", "undecodable": True, "skipped"} that keeps the task and the skips for the batch."""
        key, pos = self._slot[i]
        group = self.groups[key]
        skipped = []
        for k in range(min(self.max_tries, len(group))):
            j = group[(pos + k) % len(group)]
            if j in self._bad:
                continue
            try:
                sample = self._load(j)
            except _ImageError as e:
                self._bad.add(j)
                reason = "missing_image" if isinstance(e.error, FileNotFoundError) else "corrupt_image"
                origin = self.records[j].origin
                self.skips.add(origin, reason, f"{e.path}: {type(e.error).__name__}: {e.error}")
                skipped.append((origin, reason))
                continue
            sample["skipped"] = skipped
            return sample
        log.warning("data: no decodable item among %d tried from item %d of group %s", self.max_tries, i, key)
        return {"task": key[0], "index": i, "undecodable": True, "skipped": skipped}


def collate(samples):
    """Stack samples of one (task, n_sources, bucket) group into a batch dict; None if all samples are None.

    Keys: task (str), target [B,3,H,W] or None, sources (list of [B,3,H,W], one per source slot), text and
    caption (list[str]), index (list[int]), skipped (list of (where, reason) for SkipLog.merge).
    If no sample decoded (only undecodable stubs): {"task", "empty": True, "skipped"}, so that the trainer counts
    the micro-batch as skipped under its own task.
    """
    given = [s for s in samples if s is not None]
    skipped_all = [x for s in given for x in s["skipped"]]
    samples = [s for s in given if not s.get("undecodable")]
    if not samples:
        return {"task": given[0]["task"], "empty": True, "skipped": skipped_all} if given else None
    task, n_src = samples[0]["task"], len(samples[0]["sources"])
    if any(s["task"] != task or len(s["sources"]) != n_src for s in samples):
        raise ValueError("collate: samples mix tasks or source counts; use HybridBatchSampler")
    has_target = samples[0]["target"] is not None
    return {
        "task": task,
        "target": torch.stack([s["target"] for s in samples]) if has_target else None,
        "sources": [torch.stack([s["sources"][k] for s in samples]) for k in range(n_src)],
        "text": [s["text"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "index": [s["index"] for s in samples],
        "skipped": skipped_all,
    }


# ----------------------------------------------------------------------------------------------------------------
# Sampler


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


def _ignore_interrupts(_worker_id):
    """DataLoader workers leave Ctrl-C to the trainer, which finishes its step (a worker that died of it would
    fail the next batch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, sampler, num_workers=4, pin_memory=False):
    """A torch DataLoader over `dataset` driven by `sampler`, batches built by `collate`."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_interrupts if num_workers > 0 else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Feature cache


def cached(count, cache, keys, compute):
    """`count` encoder outputs with an optional cache: each is read from `cache` (a FeatureCache, or None for
    none) under `keys[i]` (needed only with a cache); the missing ones are computed at once by `compute(indices)`
    (one tensor per index, in that order) and stored. Returns (the `count` tensors, how many were computed)."""
    found = [cache.get(k) for k in keys] if cache is not None else [None] * count
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        fresh = compute(todo)
        for j, i in enumerate(todo):
            found[i] = fresh[j]
            if cache is not None:
                cache.put(keys[i], fresh[j])
    return found, len(todo)


class FeatureCache:
    """Encoder outputs on disk, one safetensors file per content key, written atomically (temp file + os.replace).

    key = FeatureCache.key(pathlib.Path(image), (w, h), "sd3-vae")  or  FeatureCache.key(text, "t5-xxl", 256)
    """

    def __init__(self, directory):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)

    @staticmethod
    def key(*parts):
        """sha256 hex of the parts: os.PathLike -> the file's bytes, bytes as is, str as UTF-8 text, other
        values (ints, tuples, None) by repr. Each part is tagged with its kind and length."""
        h = hashlib.sha256()
        for p in parts:
            if isinstance(p, os.PathLike):
                fh = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                kind, data = b"F", fh.digest()
            elif isinstance(p, (bytes, bytearray)):
                kind, data = b"B", bytes(p)
            elif isinstance(p, str):
                kind, data = b"S", p.encode("utf-8")
            else:
                kind, data = b"R", repr(p).encode("utf-8")
            h.update(kind + len(data).to_bytes(8, "little") + data)
        return h.hexdigest()

    def path(self, key):
        """File that holds `key` (keys are 64 hex characters)."""
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a FeatureCache key: {key!r}")
        return os.path.join(self.dir, key[:2], key + ".safetensors")

    def __contains__(self, key):
        return os.path.isfile(self.path(key))

    def get(self, key):
        """The cached tensor, or None on a miss (an unreadable file counts as a miss and is logged)."""
        from safetensors.torch import load

        p = self.path(key)
        try:
            with open(p, "rb") as f:
                return load(f.read())["t"]
        except FileNotFoundError:
            return None
        except Exception as e:
            log.warning("cache: unreadable %s (%s); treated as a miss", p, e)
            return None

    def put(self, key, tensor):
        """Store `tensor` (moved to CPU); readers see either no file or the complete one."""
        from safetensors.torch import save

        from unialign_core.files import write_bytes_atomic

        data = save({"t": tensor.detach().to("cpu").contiguous()})
        write_bytes_atomic(self.path(key), data, clean_stale=False)  # thousands of files per folder
