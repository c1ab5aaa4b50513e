"""Helpers for the trainer tests: tiny PNG datasets, a tiny CLIP teacher, configs, running `python -m train`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tiny_models import GOLDEN, REPO
from train.config import DEFAULT_LORA_TARGETS

PY = sys.executable
COLORS = [
    (220, 40, 40),
    (40, 200, 60),
    (40, 60, 220),
    (230, 200, 40),
    (200, 40, 200),
    (40, 200, 200),
    (250, 250, 250),
    (20, 20, 20),
]
NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "white", "black"]


def png(path, color, size=32, square=None):
    """A flat colour image, optionally with a square of another colour in the middle."""
    arr = np.zeros((size, size, 3), np.uint8) + np.array(color, np.uint8)
    if square is not None:
        q = size // 4
        arr[q : 3 * q, q : 3 * q] = square
    Image.fromarray(arr).save(path)
    return str(path)


def make_dataset(root: Path, tasks=("t2i", "edit"), per_task=8, bad=False) -> str:
    """A JSONL in the native format with `per_task` records per task; `bad` adds broken records."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_task):
        c, name = COLORS[i % len(COLORS)], NAMES[i % len(NAMES)]
        o, other = COLORS[(i + 3) % len(COLORS)], NAMES[(i + 3) % len(NAMES)]
        plain = png(root / f"p{i}.png", c)
        boxed = png(root / f"b{i}.png", c, square=o)
        for task in tasks:
            if task == "t2i":
                rows.append({"task": "t2i", "prompt": f"a {name} square", "target": plain})
            elif task == "edit":
                rows.append(
                    {
                        "task": "edit",
                        "instruction": f"add a {other} box",
                        "sources": [plain],
                        "target": boxed,
                        "caption": f"a {name} square with a {other} box",
                    }
                )
            elif task == "perception":
                rows.append(
                    {
                        "task": "perception",
                        "instruction": "Provide a detailed depth map of the entire scene.",
                        "sources": [boxed],
                        "target": plain,
                    }
                )
            elif task == "compose":
                rows.append(
                    {
                        "task": "compose",
                        "prompt": f"{name} and {other} together",
                        "sources": [plain, png(root / f"o{i}.png", o)],
                        "target": boxed,
                        "caption": f"a {name} square with a {other} box",
                    }
                )
            elif task == "caption":
                rows.append({"task": "caption", "sources": [boxed], "caption": f"a {name} square with a {other} box"})
            elif task == "vqa":
                rows.append({"task": "vqa", "prompt": "what colour is it?", "sources": [plain], "caption": name})
    if bad:
        (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
        rows += [
            {"task": "t2i", "prompt": "missing file", "target": str(root / "nope.png")},
            {"task": "t2i", "prompt": "", "target": str(root / "p0.png")},
            {"task": "t2i", "prompt": "corrupt", "target": str(root / "corrupt.png")},
            {"task": "edit", "instruction": "wrong field", "sources": "p0.png", "target": str(root / "p0.png")},
            "{not json",
        ]
    path = root / "data.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def make_teacher(path: Path, projection_dim=24) -> str:
    """A tiny random CLIP saved as a local Hugging Face folder (the T5 tokenizer stands in for CLIP's)."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=32128,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    AutoTokenizer.from_pretrained(GOLDEN / "tokenizer").save_pretrained(path)
    return str(path)


def base_config(tmp: Path, data_file: str, **sections) -> dict:
    """A tiny, fast config as a dict; `sections` update it (e.g. train={"mode": "full"})."""
    cfg = {
        "run_dir": str(tmp / "run"),
        "seed": 0,
        "init": {"path": str(GOLDEN)},
        "data": {"files": [data_file], "resolution": 32, "bucket_step": 16, "text_length": 16, "num_workers": 0},
        "teacher": {"path": None, "block": 2},
        "loss": {"align": 0.0},
        "train": {
            "mode": "lora",
            "batch_size": 4,
            "max_steps": 4,
            "lr": 1e-3,
            "warmup_steps": 0,
            "lora": {"rank": 4, "alpha": 8},
        },
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def read_metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def env():
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return e


def run_cli(*args, timeout=120, check=True):
    """`python -m train ...` in a subprocess from the repository root."""
    proc = subprocess.run(
        [PY, "-m", "train", *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_in_process(cfg_dict: dict, tmp: Path, resume=None, name="config.yaml"):
    """Run the trainer in this process (faster than a subprocess); returns the last metrics."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train.config import load_config
    from train.loop import run

    path = write_config(tmp / name, cfg_dict)
    try:
        return run(load_config(path), resume)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


DEFAULT_TARGETS = list(DEFAULT_LORA_TARGETS)


def launch_args(accelerate_config: str, config_path: str, *args, processes=2, port=29517, extra=()):
    """`accelerate launch` of the running interpreter (its script need not be on PATH) with a shipped config."""
    return [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "train/configs/accelerate" / accelerate_config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port),
        *extra,
        "-m",
        "train",
        config_path,
        *args,
    ]


def launch(accelerate_config: str, config_path: str, *args, processes=2, port=29517, extra=(), timeout=900):
    """Run `accelerate launch ... -m train CONFIG` to the end; fails the test with its stderr if it fails."""
    proc = subprocess.run(
        launch_args(accelerate_config, config_path, *args, processes=processes, port=port, extra=extra),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
