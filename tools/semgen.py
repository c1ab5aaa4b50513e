"""SemGen-Bench, the paper's benchmark: generate the 600 images with the published protocol, and summarise scores.

    python -m tools.semgen --bench DIR --model MODEL --out RESULTS --name NAME
                           [--text-encoder F] [--vae F] [--tokenizer F] [--mask-embedding F]
                           [--lora F [--lora-strength S]] [--dtype auto|fp32|bf16|fp16] [--device D]
                           [--tasks t2i_long,...] [--rows 0-9,20] [--seed N]
                           [--multi-edit single|chain] [--keep-aspect]
    accelerate launch --config_file train/configs/accelerate/ddp.yaml --num_processes 8 -m tools.semgen ...
    python -m tools.semgen --summarize RESULTS/NAME [--json FILE]

`DIR` is the benchmark folder: `semgen_bench.jsonl` (150 rows) and `images/<image_id>.jpg`; the authors'
absolute `image_path` in each row is replaced by `DIR/images/<image_id>.jpg`.

The published protocol (the defaults): 512x512, 50 steps, guidance 7.0 for text-to-image and 9.0 for edits, the
published negative prompt, the source resized to 512x512 (PIL's default resampling, as the official script), and
`edit_multi` fed as one instruction. Results go exactly where the official scorer looks:

    RESULTS/NAME/fullset/<task>/<key>.png            every task (<key> = 0-based row number = image_id - 1)
    RESULTS/NAME/fullset/<task>/<key>_SRCIMG.png     edit tasks: the source as the model got it
    RESULTS/NAME/semgen_run.json                     settings and one entry per run (ours; the scorer ignores it)

Image `<key>` is generated with seed `--seed + key` (the same in every task), so the images do not depend on how
rows are split over processes. Each PNG is written to a temporary file and renamed into place, so a killed run
never leaves a truncated image; a rerun skips items whose files are all there and readable, and refuses to mix
images made with other settings (checked before the model is loaded; the model and the other weight files are
compared by name and content, not by path, so they may be moved). Under `accelerate launch` the work is split over the processes (each item is
made by exactly one process), with gloo on a CPU-only machine.

Our options beyond the protocol (off by default, recorded in `semgen_run.json`):
  * `--multi-edit chain`: `edit_multi` is split at its sentence boundaries (the published text has no separators,
    `...visibility.Make the...`) and the three edits are applied one after another; steps 1 and 2 are saved in
    `RESULTS/NAME/multi_edit_steps/<key>_step<i>.png`, the last step is the official `<key>.png`;
  * `--keep-aspect`: edits at the source's aspect ratio (sides multiples of 16, about --size squared pixels)
    instead of squashing it to a square.

`--summarize` reads the official scorer's CSV files (`RESULTS/NAME/qwen25vl/eval_results_AWQ/NAME_<task>_score.csv`,
columns `data_type, source_image, generated_image, instruction, sementics_score, quality_score`) and prints the
published summary: mean semantics, quality and overall per task (overall = the per-sample geometric mean
sqrt(semantics x quality), averaged), and their average over the tasks; it also writes them as JSON.
"""

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from unialign_core.errors import CheckpointError
from unialign_core.files import write_atomic, write_text_atomic

log = logging.getLogger("tools.semgen")

TASKS = ("t2i_long", "t2i_complex", "edit_multi", "edit_complex")  # the official order
T2I_TASKS = ("t2i_long", "t2i_complex")
EDIT_TASKS = ("edit_multi", "edit_complex")
NEGATIVE_PROMPT = (
    "low quality, blurry, low resolution, backlit, cartoon, animated, deformed, oversaturated, "
    "undersaturated, out of frame"
)
PUBLISHED = {
    "size": 512,
    "steps": 50,
    "guidance_t2i": 7.0,
    "guidance_edit": 9.0,
    "negative_prompt": NEGATIVE_PROMPT,
    "multi_edit": "single",
    "keep_aspect": False,
}
BENCH_FILE = "semgen_bench.jsonl"
METADATA = "semgen_run.json"
FULLSET = "fullset"
STEPS_DIR = "multi_edit_steps"
ASPECT_MULTIPLE = 16
SCORER_BACKBONE = "qwen25vl"
SCORE_COLUMNS = ("sementics_score", "quality_score")  # spelling as published
# Settings that change the images: a rerun into the same folder must keep them.
IMAGE_SETTINGS = (
    "model",
    "text_encoder",
    "vae",
    "tokenizer",
    "mask_embedding",
    "lora",
    "lora_strength",
    "dtype",
    "size",
    "steps",
    "guidance_t2i",
    "guidance_edit",
    "negative_prompt",
    "seed",
    "multi_edit",
    "keep_aspect",
    "text_length",
    "bench_sha256",
)
# Files and folders among them: compared by name and content (`file_identity`), not by where they are.
FILE_SETTINGS = ("model", "text_encoder", "vae", "tokenizer", "mask_embedding", "lora")
# Known only once the model is loaded: the others are checked before loading it.
MODEL_SETTINGS = ("text_length",)
FINGERPRINT_BYTES = 1 << 20


class SemGenError(ValueError):
    """Bad input: the message names the input and what to do."""


# ---- the benchmark file --------------------------------------------------------------------------------------


@dataclass
class Row:
    key: int  # 0-based line number: the file name the official scorer looks for
    image_id: int
    texts: Dict[str, str]
    image: Path  # DIR/images/<image_id>.jpg


def read_bench(bench_dir) -> List[Row]:
    """The rows of DIR/semgen_bench.jsonl, each image path remapped to DIR/images/<image_id>.jpg."""
    bench_dir = Path(bench_dir)
    path = bench_dir / BENCH_FILE
    if not path.is_file():
        raise SemGenError(
            f"--bench {bench_dir}: no {BENCH_FILE} there; point --bench at the SemGen-Bench folder "
            f"(the one with {BENCH_FILE} and images/)"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for key, line in enumerate(f):
            if not line.strip():
                raise SemGenError(
                    f"{path}: line {key + 1} is empty; the keys are line numbers, so the file must "
                    "have one row per line and no blank lines"
                )
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SemGenError(
                    f"{path}: line {key + 1} is not JSON ({e}); use the benchmark's file unchanged"
                ) from e
            missing = [k for k in ("image_id",) + TASKS if k not in item]
            if missing:
                raise SemGenError(f"{path}: line {key + 1} lacks {missing}; use the benchmark's file unchanged")
            for task in TASKS:
                if not isinstance(item[task], str) or not item[task].strip():
                    raise SemGenError(f"{path}: line {key + 1}: {task} is empty")
            image_id = int(item["image_id"])
            rows.append(Row(key, image_id, {t: item[t] for t in TASKS}, bench_dir / "images" / f"{image_id}.jpg"))
    if not rows:
        raise SemGenError(f"{path} has no rows")
    return rows


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Sentence end: . ! or ? (optionally closed by a quote or bracket), optional spaces, then a capital letter.
_BOUNDARY = re.compile(r"(?<=[.!?])([\"')\]]*\s*)(?=[A-Z])")


def split_instructions(text: str) -> List[str]:
    """Split a multi-edit text at its sentence boundaries. The pieces are exact substrings: joined they give the
    text back (spaces stay at the end of a piece; strip them before use). The published rows give three each."""
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def parse_tasks(value: Optional[str]) -> List[str]:
    if not value:
        return list(TASKS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise SemGenError(f"--tasks {value!r}: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return [t for t in TASKS if t in names]


def parse_rows(value: Optional[str], count: int) -> List[int]:
    """`0-9,20,30-` style 0-based keys (ranges inclusive; an open end runs to the last row)."""
    if not value:
        return list(range(count))
    keys = set()
    for part in value.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d*))?", part)
        if not match:
            raise SemGenError(f"--rows {value!r}: {part!r} is not a row number or range (e.g. --rows 0-9,20)")
        first = int(match.group(1))
        last = first if match.group(2) is None else (int(match.group(2)) if match.group(2) else count - 1)
        if first > last or last >= count:
            raise SemGenError(f"--rows {value!r}: {part!r} is outside 0-{count - 1} (rows are 0-based keys)")
        keys.update(range(first, last + 1))
    return sorted(keys)


def compact_rows(keys: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, keys = [], sorted(keys)
    i = 0
    while i < len(keys):
        j = i
        while j + 1 < len(keys) and keys[j + 1] == keys[j] + 1:
            j += 1
        parts.append(str(keys[i]) if i == j else f"{keys[i]}-{keys[j]}")
        i = j + 1
    return ",".join(parts)


# ---- images and files ----------------------------------------------------------------------------------------


def aspect_size(width: int, height: int, side: int, multiple: int = ASPECT_MULTIPLE) -> Tuple[int, int]:
    """About side x side pixels at the aspect ratio of width x height, both sides multiples of `multiple`."""
    scale = (side * side / (width * height)) ** 0.5
    return (
        max(multiple, round(width * scale / multiple) * multiple),
        max(multiple, round(height * scale / multiple) * multiple),
    )


def prepare_source(path: Path, size: int = 512, keep_aspect: bool = False):
    """The source as the model gets it: RGB, resized to size x size (PIL's default resampling, as the official
    script), or with keep_aspect to about size^2 pixels at its own aspect ratio."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        raise SemGenError(
            f"source image {path} not found; the benchmark folder needs images/<image_id>.jpg for every row you run"
        ) from None
    except OSError as e:
        raise SemGenError(f"source image {path} cannot be read ({e}); replace it with the benchmark's file") from None
    target = aspect_size(*image.size, size) if keep_aspect else (size, size)
    return image.resize(target) if image.size != target else image


def png_ok(path: Path) -> bool:
    """The file exists and is a complete, readable PNG."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.verify()
        return True
    except Exception:
        return False


def write_png(image, path: Path) -> None:
    """Write via a temporary file in the same folder, flushed to disk, then renamed: never half a file
    (`files.write_atomic`; a killed run's temporaries go with `remove_stale_temp_files`)."""
    write_atomic(str(path), lambda tmp: image.save(tmp, format="PNG"), clean_stale=False)


def write_json_atomic(data, path: Path) -> None:
    write_text_atomic(str(path), json.dumps(data, indent=1) + "\n")


def remove_stale_temp_files(run_dir: Path) -> int:
    """Temporary files a killed run left behind (never picked up by the scorer: they do not end in .png)."""
    removed = 0
    for folder in [run_dir / FULLSET / t for t in TASKS] + [run_dir / STEPS_DIR]:
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


@dataclass(frozen=True)
class Item:
    task: str
    key: int


def item_files(run_dir: Path, item: Item, steps: int = 1) -> List[Path]:
    """Every file an item writes, the official result last. `steps` > 1: chained multi-edit steps."""
    folder = run_dir / FULLSET / item.task
    files = []
    if item.task in EDIT_TASKS:
        files.append(folder / f"{item.key}_SRCIMG.png")
        files += [run_dir / STEPS_DIR / f"{item.key}_step{i}.png" for i in range(1, steps)]
    files.append(folder / f"{item.key}.png")
    return files


# ---- processes -----------------------------------------------------------------------------------------------


class _OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True
    device = None

    def wait_for_everyone(self):
        pass


def process_state():
    """accelerate's PartialState under `accelerate launch`/torchrun (gloo on a CPU-only machine), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _OneProcess()
    import torch
    from accelerate import PartialState

    # Processes may finish their share minutes apart: a generous timeout for the final barrier.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


def gather_list(state, values: list) -> list:
    if state.num_processes == 1:
        return [values]
    from accelerate.utils import gather_object

    return gather_object([values])


# ---- generation ----------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    from unialign_core import DTYPES

    return DTYPES[name]


def resolve_device(name: Optional[str], state):
    import torch

    if name in (None, "", "auto"):
        if state.device is not None:
            device = torch.device(state.device)
            return torch.device("cpu") if device.type == "cpu" else device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SemGenError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SemGenError(f"--device {name}: this machine has no CUDA GPU torch can use; use --device cpu")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None and state.num_processes > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def load(args, device, dtype):
    """The model (any format load_model reads) with the LoRA merged into its weights."""

    from unialign_core import load_lora, load_model, merge_lora

    model = load_model(
        args.model,
        text_encoder=args.text_encoder,
        vae=args.vae,
        tokenizer=args.tokenizer,
        mask_embedding=args.mask_embedding,
        device=device,
        dtype=dtype,
    )
    if args.lora:
        merge_lora(model.transformer, load_lora(args.lora), args.lora_strength, args.lora)
    return model


def file_identity(path) -> Optional[dict]:
    """What identifies a model file or folder wherever it is moved: its name, its size in bytes and a cheap content
    fingerprint, the sha256 of each file's size and first and last MiB (of a folder: every file but hidden ones,
    with its path inside the folder; the folder's own name is left out, so a renamed copy still matches). `path`
    is recorded for people only; a path that does not exist gets its name alone."""
    if not path:
        return None
    p = Path(os.path.abspath(path))
    identity = {"name": p.name, "path": str(p)}
    if p.is_file():
        files = [("", p)]
    elif p.is_dir():
        files = []
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [
                (str(Path(root, n).relative_to(p)), Path(root, n)) for n in sorted(names) if not n.startswith(".")
            ]
    else:
        return identity
    digest, total = hashlib.sha256(), 0
    for rel, f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(fh.read())
    identity.update(size=total, fingerprint=digest.hexdigest())
    return identity


def same_file(old, new) -> bool:
    """Whether two `file_identity` records (or an older run's absolute path) name the same file or folder: the
    same content fingerprint and size when both have one, else the same name."""
    if old is None or new is None:
        return old is None and new is None
    if isinstance(old, str):  # semgen_run.json of an older version: an absolute path
        old = {"name": Path(old).name}
    if isinstance(new, str):
        new = {"name": Path(new).name}
    if old.get("fingerprint") and new.get("fingerprint"):
        return (old["fingerprint"], old.get("size")) == (new["fingerprint"], new.get("size"))
    return old.get("name") == new.get("name")


def describe_file(identity) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    if not identity.get("fingerprint"):
        return f"{identity.get('name')!r}"
    return f"{identity['name']!r} ({identity['size']} bytes, content {identity['fingerprint'][:12]})"


def settings_of(args, dtype, bench_sha: str, model=None) -> dict:
    """The run's settings. `dtype`: the torch dtype the model is loaded in. Without `model` (before loading it),
    the settings only the model knows (MODEL_SETTINGS) are None."""
    settings = {
        "model": file_identity(args.model),
        "text_encoder": file_identity(args.text_encoder),
        "vae": file_identity(args.vae),
        "tokenizer": file_identity(args.tokenizer),
        "mask_embedding": file_identity(args.mask_embedding),
        "lora": file_identity(args.lora),
        "lora_strength": args.lora_strength if args.lora else None,
        "dtype": str(model.dtype if model is not None else dtype).replace("torch.", ""),
        "size": args.size,
        "steps": args.steps,
        "guidance_t2i": args.guidance_t2i,
        "guidance_edit": args.guidance_edit,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "seed_rule": "seed + key",
        "multi_edit": args.multi_edit,
        "keep_aspect": args.keep_aspect,
        "text_length": model.text_length if model is not None else None,
        "bench_sha256": bench_sha,
    }
    settings["published_protocol"] = all(settings[k] == v for k, v in PUBLISHED.items())
    return settings


def check_settings(old: dict, new: dict, run_dir: Path, keys: Sequence[str] = IMAGE_SETTINGS) -> None:
    changed = []
    for k in keys:
        if k in FILE_SETTINGS:
            if not same_file(old.get(k), new.get(k)):
                changed.append(f"{k}: {describe_file(old.get(k))} -> {describe_file(new.get(k))}")
        elif old.get(k) != new.get(k):
            changed.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    if changed:
        raise SemGenError(
            f"{run_dir} holds images made with other settings ({'; '.join(changed)}); use another "
            "--name, or delete that folder to start over"
        )


def generate_item(model, row: Row, item: Item, args, files: List[Path], on_step=None) -> int:
    """Make one item's files; returns how many files were written."""
    from unialign_core import edit, text_to_image
    from unialign_core.images import to_pil

    seed = args.seed + row.key
    text = row.texts[item.task]
    if item.task in T2I_TASKS:
        out = text_to_image(
            model,
            text,
            negative_prompt=args.negative_prompt,
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance=args.guidance_t2i,
            seed=seed,
            callback=on_step,
        )
        write_png(to_pil(out.images)[0], files[-1])
        return 1
    source = prepare_source(row.image, args.size, args.keep_aspect)
    write_png(source, files[0])
    instructions = [text]
    if item.task == "edit_multi" and args.multi_edit == "chain":
        instructions = [p.strip() for p in split_instructions(text)]
    current = source
    for i, instruction in enumerate(instructions):
        out = edit(
            model,
            current,
            instruction,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance_edit,
            seed=seed,
            callback=on_step,
        )
        current = out.images
        write_png(to_pil(current)[0], files[1 + i])
    return 1 + len(instructions)


def chain_steps(row: Row, task: str, args) -> int:
    if task == "edit_multi" and args.multi_edit == "chain":
        return len(split_instructions(row.texts[task]))
    return 1


def run(args) -> dict:
    """Generate (this process's share of) the selected items. Returns this run's metadata entry."""
    state = process_state()
    rank, world = state.process_index, state.num_processes
    rows = read_bench(args.bench)
    tasks = parse_tasks(args.tasks)
    keys = parse_rows(args.rows, len(rows))
    if args.size <= 0 or args.steps <= 0:
        raise SemGenError("--size and --steps must be positive")
    if any(t in EDIT_TASKS for t in tasks):
        missing = [str(rows[k].image) for k in keys if not rows[k].image.is_file()]
        if missing:
            raise SemGenError(
                f"--bench {args.bench}: {len(missing)} source image(s) missing, e.g. {missing[0]}; "
                "the edit tasks need images/<image_id>.jpg (or choose --rows / --tasks t2i_long,"
                "t2i_complex)"
            )
    run_dir = Path(args.out) / args.name
    device = resolve_device(args.device, state)
    dtype = resolve_dtype(args.dtype, device)
    bench_sha = file_sha256(Path(args.bench) / BENCH_FILE)
    meta_path = run_dir / METADATA
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    if meta is not None:  # refused before minutes of loading; what only the model knows is checked after
        before = [k for k in IMAGE_SETTINGS if k not in MODEL_SETTINGS]
        check_settings(meta.get("settings", {}), settings_of(args, dtype, bench_sha), run_dir, before)
    model = load(args, device, dtype)
    if args.size % model.pixel_multiple:
        raise SemGenError(
            f"--size {args.size} is not a multiple of {model.pixel_multiple} (this model's VAE and patch size)"
        )
    settings = settings_of(args, dtype, bench_sha, model)
    if meta is not None:
        check_settings(meta.get("settings", {}), settings, run_dir)

    # Every process decides what is left before anyone writes (the barrier), so all see the same list.
    items = [Item(t, k) for k in keys for t in tasks]
    files = {it: item_files(run_dir, it, chain_steps(rows[it.key], it.task, args)) for it in items}
    if state.is_main_process:
        for task in tasks:
            (run_dir / FULLSET / task).mkdir(parents=True, exist_ok=True)
        if args.multi_edit == "chain" and "edit_multi" in tasks:
            (run_dir / STEPS_DIR).mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temp_files(run_dir)
        if stale:
            log.info("removed %d temporary file(s) of an interrupted run", stale)
        if meta is None:
            meta = {"format": "semgen-run/1", "settings": settings, "runs": []}
            write_json_atomic(meta, meta_path)
    state.wait_for_everyone()
    todo = [it for it in items if not all(png_ok(p) for p in files[it])]
    state.wait_for_everyone()
    mine = todo[rank::world]
    skipped = len(items) - len(todo)
    if state.is_main_process:
        log.info(
            "SemGen-Bench: %d item(s) selected, %d complete, %d to make on %d process(es) (%s, %s)",
            len(items),
            skipped,
            len(todo),
            world,
            device,
            settings["dtype"],
        )

    bar = None
    if state.is_main_process and args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(mine),
            desc=f"semgen {args.name}" + (f" (process 0 of {world})" if world > 1 else ""),
            unit="img",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10,
        )
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    written, made = [], 0
    for it in mine:
        on_step = None
        if bar is not None:

            def on_step(step, total, *_, it=it):
                bar.set_postfix_str(f"{it.task} {it.key} step {step}/{total}", refresh=False)

        generate_item(model, rows[it.key], it, args, files[it], on_step)
        written += [str(p.relative_to(run_dir)) for p in files[it]]
        made += 1
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()

    all_written = gather_list(state, written)
    all_seconds = gather_list(state, [seconds, made])
    state.wait_for_everyone()
    entry = {
        "started": started_at,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": tasks,
        "rows": compact_rows(keys),
        "seed": args.seed,
        "processes": world,
        "device": str(device),
        "items": len(items),
        "complete_before": skipped,
        "made": len(todo),
        "files_written_per_process": [len(w) for w in all_written],
        "items_per_process": [s[1] for s in all_seconds],
        "seconds_per_process": [round(s[0], 3) for s in all_seconds],
        # time of one process per item (generation only, model loading excluded)
        "seconds_per_item": round(sum(s[0] for s in all_seconds) / len(todo), 4) if todo else None,
    }
    if state.is_main_process:
        missing = [str(p) for it in items for p in files[it] if not png_ok(p)]
        if missing:
            raise RuntimeError(f"{len(missing)} file(s) missing after the run, e.g. {missing[0]}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["runs"].append(entry)
        write_json_atomic(meta, meta_path)
        log.info("done: %d item(s) made, %d skipped; results in %s", len(todo), skipped, run_dir / FULLSET)
    state.wait_for_everyone()
    return entry


# ---- summary of the official scorer's CSV files --------------------------------------------------------------


def _score(value, path, line, column) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = float("nan")
    if not math.isfinite(score) or score < 0:
        raise SemGenError(f"{path}: line {line}: {column} is {value!r}, not a score from 0 to 10")
    return score


def read_score_csv(path: Path, task: Optional[str] = None) -> List[Tuple[float, float]]:
    """(semantics, quality) per sample; with `task`, only rows whose data_type is that task."""
    return [(s, q) for _, s, q in read_score_rows(path, task)]


def read_score_rows(path: Path, task: Optional[str] = None) -> List[Tuple[str, float, float]]:
    """(generated_image, semantics, quality) per CSV row; with `task`, only rows whose data_type is that task."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in SCORE_COLUMNS if c not in (reader.fieldnames or [])]
        if lacking:
            raise SemGenError(
                f"{path}: no column(s) {lacking}; is this a SemGen-Bench scorer CSV "
                "(columns data_type, source_image, generated_image, instruction, "
                f"{', '.join(SCORE_COLUMNS)})?"
            )
        for line, row in enumerate(reader, start=2):
            if task is not None and row.get("data_type") != task:
                continue
            image = row.get("generated_image") or f"line {line}"
            rows.append((image, *(_score(row[c], path, line, c) for c in SCORE_COLUMNS)))
    return rows


def find_scores(folder: Path, backbone: str = SCORER_BACKBONE) -> Tuple[Path, str]:
    """The scorer's output folder and the method name, from RESULTS/NAME (or the eval_results_AWQ folder)."""
    folder = Path(folder)
    for candidate, name in (
        (folder / backbone / "eval_results_AWQ", folder.name),
        (folder, folder.parent.parent.name if folder.name == "eval_results_AWQ" else None),
    ):
        if candidate.is_dir() and any(candidate.glob("*_score.csv")):
            if name is None:
                combined = sorted(candidate.glob("*_combined_score.csv"))
                name = combined[0].name[: -len("_combined_score.csv")] if combined else ""
            return candidate, name
    raise SemGenError(
        f"--summarize {folder}: no scorer CSV files in {folder / backbone / 'eval_results_AWQ'}; run "
        "the official scorer first (see the README), or pass that folder"
    )


def summarize(folder, backbone: str = SCORER_BACKBONE, expected: int = 150) -> dict:
    scores_dir, name = find_scores(Path(folder), backbone)
    combined = scores_dir / f"{name}_combined_score.csv"
    tasks = {}
    for task in TASKS:
        path = scores_dir / f"{name}_{task}_score.csv"
        if not path.is_file():
            matches = sorted(scores_dir.glob(f"*_{task}_score.csv"))
            path = matches[0] if len(matches) == 1 else None
        if path is not None:
            rows = read_score_rows(path)
        elif combined.is_file():
            path, rows = combined, read_score_rows(combined, task)
        else:
            continue
        if not rows:
            continue
        pairs = [(s, q) for _, s, q in rows]
        n = len(pairs)
        images = len({image for image, _, _ in rows})
        tasks[task] = {
            "n": n,  # CSV rows: an image the scorer scored twice counts twice, in the means too
            "images": images,
            "duplicates": n - images,
            "semantics": sum(s for s, _ in pairs) / n,
            "quality": sum(q for _, q in pairs) / n,
            "overall": sum(math.sqrt(s * q) for s, q in pairs) / n,
            "csv": str(path),
        }
    if not tasks:
        raise SemGenError(f"--summarize {folder}: the CSV files in {scores_dir} hold no scores")
    average = {k: sum(t[k] for t in tasks.values()) / len(tasks) for k in ("semantics", "quality", "overall")}
    return {
        "scores": str(scores_dir),
        "method": name,
        "tasks": tasks,
        "average": average,
        "average_over": list(tasks),
        "complete": len(tasks) == len(TASKS)
        and all(t["images"] == expected and not t["duplicates"] for t in tasks.values()),
        "expected_per_task": expected,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"SemGen-Bench scores of {summary['method'] or '?'} ({summary['scores']})",
        f"{'task':<14}{'n':>5}{'semantics':>11}{'quality':>9}{'overall':>9}",
    ]
    for task, t in summary["tasks"].items():
        lines.append(f"{task:<14}{t['n']:>5}{t['semantics']:>11.3f}{t['quality']:>9.3f}{t['overall']:>9.3f}")
    a = summary["average"]
    lines.append(f"{'average':<14}{'':>5}{a['semantics']:>11.3f}{a['quality']:>9.3f}{a['overall']:>9.3f}")
    missing = [t for t in TASKS if t not in summary["tasks"]]
    expected = summary["expected_per_task"]
    images = {t: v.get("images", v["n"]) for t, v in summary["tasks"].items()}
    short = [f"{t} ({n})" for t, n in images.items() if n < expected]
    doubled = [
        f"{t} ({v['n']} rows for {images[t]} images)" for t, v in summary["tasks"].items() if v.get("duplicates")
    ]
    if missing:
        lines.append(f"note: no scores for {', '.join(missing)}; the average is over {len(summary['tasks'])} task(s)")
    if short:
        lines.append(f"note: fewer than {expected} samples in {', '.join(short)} (the scorer skips missing images)")
    if doubled:
        lines.append(
            f"note: images scored more than once in {', '.join(doubled)}, and every row is in the means: the "
            "scorer was rerun without deleting its CSV files; delete all five (the four *_<task>_score.csv and "
            "*_combined_score.csv) and run it again for a clean score"
        )
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.semgen",
        description=__doc__.split("\n\n")[0],
        epilog="Details: the module docstring (tools/semgen.py) and the README.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("generation")
    g.add_argument("--bench", help="the SemGen-Bench folder (semgen_bench.jsonl and images/)")
    g.add_argument("--model", help="model: our single .safetensors file or an upstream folder")
    g.add_argument("--out", help="results folder (the scorer's results root)")
    g.add_argument("--name", help="method name: the subfolder of --out the images go into")
    g.add_argument("--text-encoder", help="T5 encoder folder or file (e.g. t5xxl_fp16.safetensors)")
    g.add_argument("--vae", help="VAE folder or file (e.g. sd3_vae.safetensors)")
    g.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json")
    g.add_argument("--mask-embedding", help="the official mask_token_emb .pth file")
    g.add_argument("--lora", help="a LoRA .safetensors file, merged into the weights")
    g.add_argument("--lora-strength", type=float, default=1.0, help="LoRA strength (default 1.0)")
    g.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="weights dtype (auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU)",
    )
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: the process's GPU, else the CPU)")
    g.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    g.add_argument("--rows", help="0-based row keys, e.g. 0-9,20 (default: all 150)")
    g.add_argument("--seed", type=int, default=0, help="image <key> uses seed + key (default 0)")
    g.add_argument(
        "--multi-edit",
        choices=("single", "chain"),
        default="single",
        help="edit_multi as one instruction (published) or as a chain of its sentences (ours)",
    )
    g.add_argument(
        "--keep-aspect",
        action="store_true",
        help="edit at the source's aspect ratio (ours; published: squashed to a square)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    o = p.add_argument_group("protocol overrides (leave them for a comparable score; tests and quick looks)")
    o.add_argument("--size", type=int, default=PUBLISHED["size"], help="image side (published 512)")
    o.add_argument("--steps", type=int, default=PUBLISHED["steps"], help="sampling steps (published 50)")
    o.add_argument("--guidance-t2i", type=float, default=PUBLISHED["guidance_t2i"], help="published 7.0")
    o.add_argument("--guidance-edit", type=float, default=PUBLISHED["guidance_edit"], help="published 9.0")
    o.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="default: the published negative prompt")
    s = p.add_argument_group("scores")
    s.add_argument(
        "--summarize",
        metavar="RESULTS/NAME",
        help="summarise the official scorer's CSV files of this method folder (or its eval_results_AWQ)",
    )
    s.add_argument("--json", help="where --summarize writes its JSON (default RESULTS/NAME/semgen_summary.json)")
    s.add_argument("--backbone", default=SCORER_BACKBONE, help="the scorer's --backbone (default qwen25vl)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.summarize:
            summary = summarize(args.summarize, args.backbone)
            print(format_summary(summary))
            target = Path(args.json) if args.json else Path(args.summarize) / "semgen_summary.json"
            if not args.json and Path(args.summarize).name == "eval_results_AWQ":
                target = Path(summary["scores"]) / "semgen_summary.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(summary, target)
            print(f"wrote {target}")
            return 0
        missing = [f"--{k}" for k in ("bench", "model", "out", "name") if not getattr(args, k)]
        if missing:
            raise SemGenError(f"missing {', '.join(missing)} (or use --summarize RESULTS/NAME)")
        if "/" in args.name or args.name in (".", ".."):
            raise SemGenError(f"--name {args.name!r}: give a plain folder name (the scorer takes it as the method)")
        run(args)
        return 0
    except (SemGenError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
