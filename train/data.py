"""Training data for UniAlignment: the dataset of records (images resized to their aspect bucket), the collated
micro-batch (`Batch`) and the DataLoader driven by the hybrid-task sampler.

Pipeline:
    records, skips = load_records(["t2i.jsonl", {"path": "depth.jsonl", "ti2i_task": "perception"}])  # records
    dataset = UniDataset(records, resolution=512, skips=skips)
    sampler = HybridBatchSampler(dataset.groups, batch_size=8, ratios={"t2i": 0.5, "edit": 0.5},     # sampler
                                 seed=0, rank=rank, world_size=world_size)
    loader = make_loader(dataset, sampler, num_workers=4)
    for batch in loader:           # a `Batch` from `collate` (`batch.empty`: nothing in it could be decoded)
        ...

The records and their conventions are in `records`, the buckets and image decoding in `buckets`, the sampler in
`sampler`, the encoders' disk cache in `feature_cache`.
"""

import logging
import signal
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import numpy as np
import torch

from .buckets import image_size, image_to_tensor, load_image, make_buckets, pick_bucket, resize_to_bucket
from .records import Record, SkipLog

log = logging.getLogger(__name__)


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


@dataclass
class Batch:
    """One collated micro-batch: samples of one (task, n_sources, bucket) group. No samples (`empty`) when none of
    them could be decoded: it still names its task and carries the skips, so that the trainer counts it."""

    task: str
    target: Optional[torch.Tensor] = None  # [B, 3, H, W] the images to generate; None for caption / vqa
    sources: List[torch.Tensor] = field(default_factory=list)  # one [B, 3, H, W] per source slot
    text: List[str] = field(default_factory=list)  # prompts / instructions / questions
    caption: List[str] = field(default_factory=list)  # captions / answers ("" for none)
    index: List[int] = field(default_factory=list)  # the dataset items
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (where, reason) for SkipLog.merge
    present: Optional[List[bool]] = None  # set by `batch.pad_batch`: False for the repeats that fill it up

    @property
    def empty(self) -> bool:
        return not self.index

    def pin_memory(self) -> "Batch":
        """The batch with its images in pinned memory (what a DataLoader with pin_memory=True calls)."""
        target = self.target.pin_memory() if self.target is not None else None
        return replace(self, target=target, sources=[s.pin_memory() for s in self.sources])


def collate(samples) -> Optional[Batch]:
    """Stack samples of one (task, n_sources, bucket) group into a `Batch`; None if there are no samples at all.
    Undecodable stubs only give their task and skips (an `empty` batch)."""
    given = [s for s in samples if s is not None]
    skipped_all = [x for s in given for x in s["skipped"]]
    samples = [s for s in given if not s.get("undecodable")]
    if not samples:
        return Batch(given[0]["task"], skipped=skipped_all) if given else None
    task, n_src = samples[0]["task"], len(samples[0]["sources"])
    if any(s["task"] != task or len(s["sources"]) != n_src for s in samples):
        raise ValueError("collate: samples mix tasks or source counts; use HybridBatchSampler")
    has_target = samples[0]["target"] is not None
    return Batch(
        task=task,
        target=torch.stack([s["target"] for s in samples]) if has_target else None,
        sources=[torch.stack([s["sources"][k] for s in samples]) for k in range(n_src)],
        text=[s["text"] for s in samples],
        caption=[s["caption"] for s in samples],
        index=[s["index"] for s in samples],
        skipped=skipped_all,
    )


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
