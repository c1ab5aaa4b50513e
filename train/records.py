"""Training records: the two JSONL formats (native and upstream) parsed into `Record`s, with bad lines skipped
and counted (`SkipLog`).

    records, skips = load_records(["t2i.jsonl", {"path": "depth.jsonl", "ti2i_task": "perception"}])

Record conventions: `sources` are the images the model sees (edit source, compose references, the image to
caption or question), `target` is the image the model generates. `text` is the prompt / instruction / question,
`caption` is the caption of the target (t2i, edit, ...), the caption to predict (caption task) or the answer (vqa).
"""

import json
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("train.data")  # the data pipeline's one logger (records, dataset, sampler)

TASKS = ("t2i", "caption", "vqa", "edit", "perception", "compose")
MAX_COMPOSE_SOURCES = 3


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
        """Count (where, reason) pairs reported by DataLoader workers (`Batch.skipped`); they were logged there."""
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
