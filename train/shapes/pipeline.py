"""``python -m train.shapes``: the whole system learning on the shapes world, on a CPU, with nothing downloaded.

Stages (each with a progress bar; outputs under ``--out``):
  1. data/       the world's records: train split, plus the held-out split for reference
  2. vae/        a small AutoencoderKL trained on the images
  3. tokenizer/, text_encoder/   a word-level tokenizer of the world's vocabulary, and a small T5 pretrained
                 on the world's texts (masked tokens), frozen from then on as T5-XXL is
  4. teacher/    a small CLIP trained on (image, caption) pairs: the alignment loss's teacher
  5. run/        UniAlignment trained by the bundled trainer (all four losses, all six tasks), from start/
  6. shapes.safetensors   the single-file export the ComfyUI Loader reads (T5, VAE and tokenizer bundled)
  7. sampler settings chosen on the validation split (tune.py), then every mode on the held-out test split,
     scored from pixels and text, and the measured diagnosis (diagnose.py, validation split)
  8. contact_sheet.png, report.md, report.json
With ``--ablation``, stages 5-7 run a second time on the same budget without L_cross and
L_align (run_ablation/), and the report puts both side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm
from transformers import T5EncoderModel

from unialign_core import load_model
from unialign_core.files import write_text_atomic

from .. import runs
from ..config import load_config
from ..export import export_single_file
from ..loop import run
from . import autoencoder, diagnose, report, scorecard, start, teacher, text_encoder, tune, vocab, world

log = logging.getLogger("train.shapes")


@dataclass(frozen=True)
class Profile:
    records: int  # training records (all six tasks round-robin)
    vae_steps: int
    t5_steps: int
    teacher_steps: int
    train_steps: int
    batch_size: int
    eval_per_task: int
    tune_per_setting: int = 50  # validation records per mode for each sampler setting tried (tune.py)
    width: int = 128  # transformer width (4 heads) and depth
    layers: int = 4
    lr: float = 2e-3
    vae_blocks: int = 2  # VAE blocks: 2 is x2 (64 image tokens at 32 px), 3 is x4 (16 tokens)
    latent_channels: int = 16
    vocab: str = "full"  # what the transformer's training data may use: "full", or "base" (no NEW_COLOUR/NEW_KIND)
    frozen_records: int = 0  # >0: the VAE, T5 and teacher learn from this many records of the FULL world instead
    curve_every: int = 0  # >0: score the validation split every N steps (the learning curve, curve.jsonl)
    curve_per_task: int = 24  # validation records per mode at each point of the curve
    tasks: tuple = world.TASKS  # the transformer's training tasks (round-robin)
    export_dtype: str = "fp32"  # the exported single file's weights (the shipped demo base: bf16)


TEXT_LENGTH = 24  # T5 tokens: the longest text of the world is 21
FROZEN_SEED_OFFSET = 5000  # the frozen parts' records use seed + this: other random streams than the transformer's
PROFILES = {
    # 922 s on 2 idle CPU cores (measured; over the 15-minute budget by 22 s); the trainer sees 22.4k samples; vocab
    # "base": the world as it was before the held-out concepts, so that the figures below stay comparable
    "full": Profile(records=8000, vae_steps=1200, t5_steps=400, teacher_steps=400, train_steps=1400, batch_size=16,
                    eval_per_task=200, vocab="base"),
    # the demo base (python -m train.shapes base): trained once, shipped in the repository; the frozen parts learn
    # the whole world, the transformer never sees NEW_COLOUR or NEW_KIND
    "base": Profile(records=40000, vae_steps=2000, t5_steps=600, teacher_steps=600, train_steps=24000, batch_size=16,
                    eval_per_task=200, width=192, lr=1.5e-3, latent_channels=4, vocab="base", frozen_records=12000,
                    curve_every=1000, export_dtype="bf16"),
    # the CI variant: under 3 minutes, checked against QUICK_FLOORS; sampler settings fixed (no tuning stage); the
    # x4 VAE (16 image tokens) keeps it in budget: at 64 tokens 3 minutes teach the text stream nothing (VQA 0.0-0.2)
    "quick": Profile(records=3000, vae_steps=400, t5_steps=200, teacher_steps=100, train_steps=500, batch_size=32,
                     eval_per_task=40, tune_per_setting=0, width=96, lr=3e-3, vae_blocks=3, vocab="base"),
}  # fmt: skip


def _bar(total: int, desc: str):
    # in a log file (not a terminal) one line every 10 s is enough
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True, mininterval=0.1 if sys.stderr.isatty() else 10)


def _stepper(total: int, desc: str):
    """(bar, progress): ``progress(step, parts)`` shows the numbers in ``parts`` and advances the bar."""
    bar = _bar(total, desc)

    def progress(step, parts):
        bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()}, refresh=False)
        bar.update(1)

    return bar, progress


class Stages:
    """The stages, each reusing its output when it is already complete (a rerun continues where it stopped)."""

    def __init__(self, out: str, profile: Profile, seed: int, resume: bool = True):
        self.out, self.profile, self.seed = os.path.abspath(out), profile, seed
        # the colours and kinds of the transformer's training data, and so of the scenes it is scored on
        self.vocab = world.BASE if profile.vocab == "base" else world.FULL
        self.timings: dict[str, float] = {}
        os.makedirs(self.out, exist_ok=True)
        settings = json.loads(json.dumps({"profile": dataclasses.asdict(profile), "seed": seed}))  # tuples as lists
        marker = self.path("settings.json")
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                saved = json.load(f)
            if not resume:
                raise SystemExit(
                    f"--out {self.out} already holds a run: add --resume to continue it, or give another --out"
                )
            if saved != settings:
                raise SystemExit(
                    f"--out {self.out} holds a run with other settings ({saved}); "
                    "give another --out, or delete that folder to start over"
                )
        else:
            write_text_atomic(marker, json.dumps(settings))

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def build(self, name: str, write) -> str:
        """Write folder ``name`` through ``write(tmp_folder)`` and move it into place whole (an interrupted
        stage leaves no half-written folder that a rerun would take for finished)."""
        final, tmp = self.path(name), self.path(f".{name}.partial")
        if not os.path.isdir(final):
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            os.replace(tmp, final)
        return final

    def timed(self, name, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - started, 1)
        return result

    # 1
    def data(self) -> tuple[str, str]:
        """(the transformer's training records, the frozen parts' records: the same file unless
        ``frozen_records``, then records of the FULL world)."""

        def write(tmp):
            world.make_dataset(
                tmp, self.profile.records, seed=self.seed, split="train", vocab=self.vocab, tasks=self.profile.tasks
            )
            if self.profile.frozen_records:
                world.make_dataset(tmp, self.profile.frozen_records, seed=self.seed + FROZEN_SEED_OFFSET, name="frozen")

        folder = self.build("data", write)
        jsonl = os.path.join(folder, "train.jsonl")
        return jsonl, (os.path.join(folder, "frozen.jsonl") if self.profile.frozen_records else jsonl)

    # 2
    def vae(self, jsonl: str):
        def write(tmp):
            images = autoencoder.dataset_images([jsonl])
            bar, progress = _stepper(self.profile.vae_steps, "2/8 vae")

            blocks = self.profile.vae_blocks
            vae, stats = autoencoder.train_vae(
                images,
                steps=self.profile.vae_steps,
                seed=self.seed,
                progress=progress,
                config=dict(
                    down_block_types=["DownEncoderBlock2D"] * blocks,
                    up_block_types=["UpDecoderBlock2D"] * blocks,
                    block_out_channels=[32] * blocks,
                    latent_channels=self.profile.latent_channels,
                ),
            )
            bar.close()
            vae.save_pretrained(tmp)
            log.info("vae: %s", stats)

        return AutoencoderKL.from_pretrained(self.build("vae", write)).eval()

    # 4
    def teacher(self, jsonl: str, tokenizer) -> str:
        def write(tmp):
            images, captions = teacher_pairs(jsonl)
            bar, progress = _stepper(self.profile.teacher_steps, "4/8 teacher (CLIP)")

            model, stats = teacher.train_clip(
                images, captions, tokenizer, steps=self.profile.teacher_steps, seed=self.seed, progress=progress
            )
            bar.close()
            log.info("teacher: %s", stats)
            teacher.save_teacher(model, tokenizer, tmp)

        return self.build("teacher", write)

    # 3
    def tokenizer(self):
        folder = self.path("tokenizer")
        tok = vocab.build_tokenizer()
        vocab.save_tokenizer(tok, folder)
        return tok

    # 3b
    def t5(self, jsonl: str, tokenizer):
        def write(tmp):
            texts = []
            with open(jsonl, encoding="utf-8") as f:
                for line in f:
                    texts += text_encoder.record_texts(json.loads(line))
            bar, progress = _stepper(self.profile.t5_steps, "3/8 text encoder (T5)")

            model, stats = text_encoder.pretrain_t5(
                tokenizer, texts, length=TEXT_LENGTH, steps=self.profile.t5_steps, seed=self.seed, progress=progress
            )
            bar.close()
            log.info("text encoder: %s", stats)
            model.save_pretrained(tmp)

        return T5EncoderModel.from_pretrained(self.build("text_encoder", write)).eval()

    # 5
    def train(self, name: str, tokenizer, vae, t5, jsonl: str, teacher_dir: str, ablation: bool) -> str:
        start_dir = self.build(
            "start",
            lambda tmp: start.write_start(
                tmp,
                tokenizer,
                vae,
                t5,
                seed=self.seed,
                transformer_overrides=dict(
                    in_channels=self.profile.latent_channels,
                    out_channels=self.profile.latent_channels,
                    sample_size=32 // 2 ** (self.profile.vae_blocks - 1),
                    num_layers=self.profile.layers,
                    attention_head_dim=self.profile.width // 4,
                    caption_projection_dim=self.profile.width,
                ),
            ),
        )
        run_dir = self.path(name)
        cfg = load_config(
            None,
            training_overrides(
                self.profile, self.seed, start_dir, jsonl, teacher_dir, run_dir, self.path("cache"), ablation
            ),
        )
        total, every = self.profile.train_steps, self.profile.curve_every or self.profile.train_steps
        done = [s for s, _ in runs.list_checkpoints(run_dir)]
        while not done or done[-1] < total:
            stop = min(total, ((done[-1] if done else 0) // every + 1) * every)
            started = time.perf_counter()
            run(cfg, "latest", stop_at=stop)
            self.timings["train_segments"] = self.timings.get("train_segments", 0.0) + time.perf_counter() - started
            if self.profile.curve_every:
                self.curve_point(run_dir, name, stop)
            done = [s for s, _ in runs.list_checkpoints(run_dir)]
        return run_dir

    def curve_point(self, run_dir: str, name: str, step: int) -> dict:
        """Score the latest checkpoint on the validation split (``curve_per_task`` records per mode) and add a
        line to ``<name>_curve.jsonl``: the learning curve, per task, against samples seen."""
        tmp = self.path(f".{name}_curve.safetensors")
        export_single_file(run_dir, tmp, bundle_parts=True)
        started = time.perf_counter()
        card = scorecard.run_scorecard(
            load_model(tmp),
            self.profile.curve_per_task,
            self.seed,
            split="val",
            examples=0,
            ceiling=False,
            tasks=self.profile.tasks,
            vocab=self.vocab,
        )
        os.remove(tmp)
        point = {
            "step": step,
            "samples": step * self.profile.batch_size,
            "train_s": round(self.timings.get("train_segments", 0.0), 1),
            "eval_s": round(time.perf_counter() - started, 1),
            "n": self.profile.curve_per_task,
            "figures": {k: round(v, 3) for k, v in card.figures.items()},
        }
        with open(self.path(f"{name}_curve.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")
        log.info("curve %s", point)
        return point

    # 6
    def export(self, run_dir: str, name: str) -> str:
        out = self.path(name)
        export_single_file(run_dir, out, dtype=self.profile.export_dtype, bundle_parts=True)
        return out

    # 7
    def score(self, model_file: str, desc: str):
        model = load_model(model_file)
        if self.profile.tune_per_setting:
            grid = len(tune.IMAGE_GRID) + len(tune.TEXT_GRID)
            bar = _bar(grid, f"{desc}: sampler settings on the validation split")
            chosen = tune.choose(
                model, self.profile.tune_per_setting, self.seed, progress=lambda row: bar.update(1), vocab=self.vocab
            )
            bar.close()
        else:  # the quick variant: the defaults (chosen on the full job's validation split, seed 0)
            chosen = {"split": "none (defaults)", "n": 0, "image": scorecard.SAMPLING, "text": scorecard.TEXT}
        n = self.profile.eval_per_task
        bar = _bar(6 * n, desc)
        card = scorecard.run_scorecard(
            model,
            n,
            self.seed,
            sampling=chosen["image"],
            text=chosen["text"],
            progress=lambda task, i, total: (bar.set_postfix(mode=task, refresh=False), bar.update(1)),
            vocab=self.vocab,
        )
        bar.close()
        card.settings = chosen
        return card

    def diagnose(self, model_file: str) -> dict:
        print("7/8 diagnosis (validation split)", flush=True)
        return diagnose.diagnose(
            load_model(model_file), n=min(50, self.profile.eval_per_task), seed=self.seed, vocab=self.vocab
        )


def teacher_pairs(jsonl: str):
    """(uint8 images [N, 3, H, W], captions) of the records whose caption describes a whole image."""
    base = os.path.dirname(jsonl)
    arrays, captions = [], []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            image = (
                rec.get("target")
                if rec["task"] in ("t2i", "edit", "compose")
                else (rec["sources"][0] if rec["task"] == "caption" else None)
            )
            if image is None:
                continue
            with Image.open(os.path.join(base, image)) as img:
                arrays.append(np.asarray(img.convert("RGB")))
            captions.append(rec["caption"])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), captions


def mixed_precision() -> str:
    """bf16 autocast where the CPU computes bf16 natively (AMX or AVX512-BF16: about 1.4x faster than fp32 on the
    Xeon these figures were first measured on), else "no": without those units bf16 is emulated, and a 1024^2
    matrix product took 3.2 s in bf16 against 0.035 s in fp32 on an AVX2-only AMD EPYC (measured)."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # an older torch without these probes: the safe choice
        native = False
    return "bf16" if native else "no"


def training_overrides(
    profile: Profile,
    seed: int,
    start_dir: str,
    jsonl: str,
    teacher_dir: str,
    run_dir: str,
    cache_dir: str,
    ablation: bool,
) -> list:
    """The trainer's config for the shapes model (as `--set` pairs of ``python -m train``)."""
    pairs = [
        ("run_dir", run_dir),
        ("seed", seed),
        ("init.path", start_dir),
        ("data.files", [jsonl]),
        ("data.resolution", 32),
        ("data.bucket_step", 16),
        ("data.max_aspect", 1.0),
        ("data.text_length", TEXT_LENGTH),
        # our own model: train on prompts padded as the modes pad them when sampling (<pad>)
        ("data.prompt_padding", "inference"),
        ("data.num_workers", 0),
        ("data.cache_dir", cache_dir),
        ("teacher.path", teacher_dir),
        ("teacher.block", 2),
        ("loss.text", 0.5),
        ("loss.ignore_padding", True),
        ("train.mode", "full"),
        ("train.batch_size", profile.batch_size),
        ("train.max_steps", profile.train_steps),
        ("train.mixed_precision", mixed_precision()),
        # velocity loss: x0-MSE (sigma^2-weighted, as published) learned this world more slowly (see README)
        ("loss.image_target", "velocity"),
        ("train.lr", profile.lr),
        ("train.warmup_steps", min(100, profile.train_steps // 10)),
        ("train.schedule", "cosine"),
        ("train.weight_decay", 0.0),
        ("checkpoint.every", 250),
        ("checkpoint.keep", 2),
        ("log.every", 25),
    ]
    if ablation:
        pairs += [("loss.cross", 0.0), ("loss.align", 0.0), ("teacher.path", None)]
    return pairs


def main_job(out: str, profile_name: str, seed: int, ablation: bool = False, resume: bool = True) -> dict:
    """Run every stage (reusing finished ones in ``out``); returns the report dict (also in ``out/report.json``)."""
    profile = PROFILES[profile_name]
    st = Stages(out, profile, seed, resume)
    started = time.perf_counter()
    print(f"1/8 data: {profile.records} records", flush=True)
    jsonl, frozen_jsonl = st.timed("data", st.data)
    vae = st.timed("vae", st.vae, frozen_jsonl)
    tok = st.timed("tokenizer", st.tokenizer)
    t5 = st.timed("text_encoder", st.t5, frozen_jsonl, tok)
    teacher_dir = st.timed("teacher", st.teacher, frozen_jsonl, tok)
    print("5/8 train UniAlignment (all four losses)", flush=True)
    run_dir = st.timed("train", st.train, "run", tok, vae, t5, jsonl, teacher_dir, False)
    print("6/8 export", flush=True)
    model_file = st.timed("export", st.export, run_dir, "shapes.safetensors")
    card = st.timed("evaluate", st.score, model_file, "7/8 every mode on held-out scenes")
    diagnosis = st.timed("diagnose", st.diagnose, model_file)
    ablation_card = None
    if ablation:
        print("5/8 (ablation) train without L_cross and L_align", flush=True)
        abl_dir = st.timed("train_ablation", st.train, "run_ablation", tok, vae, t5, jsonl, teacher_dir, True)
        abl_file = st.timed("export_ablation", st.export, abl_dir, "shapes_ablation.safetensors")
        ablation_card = st.timed("evaluate_ablation", st.score, abl_file, "7/8 (ablation) every mode")
    print("8/8 contact sheet and report", flush=True)
    wall = time.perf_counter() - started
    result = report.write(
        st.out, profile_name, profile, seed, card, ablation_card, st.timings, wall, model_file, diagnosis
    )
    if profile_name == "base":
        result["demo"] = write_demo(st, model_file, teacher_dir, result)
    return result


def write_demo(st: Stages, model_file: str, teacher_dir: str, result: dict) -> str:
    """``<out>/demo/``: what the repository ships as ``demo/`` (the model, its card, the teacher of L_align)."""
    folder = st.path("demo")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(model_file, os.path.join(folder, "shapes-demo.safetensors"))
    shutil.rmtree(os.path.join(folder, "shapes-teacher"), ignore_errors=True)
    shutil.copytree(teacher_dir, os.path.join(folder, "shapes-teacher"))
    with open(model_file, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    card = {
        "command": "python -m train.shapes base",
        "commit": commit,
        "seed": st.seed,
        "sha256": sha256,
        "bytes": os.path.getsize(model_file),
        "held_out": {"colour": world.NEW_COLOUR, "kind": world.NEW_KIND},
        "stage_s": st.timings,
        "wall_s": result["wall_s"],
        "sampler_settings": result["sampler_settings"],
        "figures": result["figures"],
        "counts": result["counts"],
        "profile": result["settings"],
    }
    write_text_atomic(os.path.join(folder, "shapes-demo.json"), json.dumps(card, indent=1))
    return folder
