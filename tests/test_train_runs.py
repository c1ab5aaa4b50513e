"""End-to-end runs: a LoRA run through `python -m train` (with bad records in the data), a full run (bf16 autocast,
gradient checkpointing, accumulation, EMA, teacher, caches, validation, TensorBoard), exports that round-trip bit
for bit in fp32, and a next stage starting from a previous run."""

import os

import pytest
import torch
from safetensors import safe_open

import train_helpers as H
from tiny_models import GOLDEN
from train import runs
from train.__main__ import main as cli
from train.config import InitConfig, load_config
from train.init import load_start
from unialign_core import load_lora, load_model, lora_deltas


def outputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 16, 16, generator=g)
    ctx = torch.randn(2, 16, 32, generator=g)
    cond = torch.randn(2, 16, 16, 16, generator=g)
    with torch.no_grad():
        a = transformer(x, ctx, torch.tensor([999.0, 250.0]), conditions=[cond])
        b = transformer(x, ctx, torch.zeros(2))
    return a.velocity, a.text_logits, b.text_logits


def assert_identical(a, b):
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    data = H.make_dataset(tmp / "data", tasks=("t2i", "edit", "vqa"), per_task=8, bad=True)
    cfg = H.base_config(
        tmp, data, train={"max_steps": 6, "lr": 1e-3}, data={"ratios": {"t2i": 0.5, "edit": 0.25, "vqa": 0.25}}
    )
    path = H.write_config(tmp / "lora.yaml", cfg)
    proc = H.run_cli(path, "--set", "train.lora.rank=4", "--set", "checkpoint.keep=2")
    return tmp, cfg, proc


@pytest.mark.slow
def test_lora_run_through_cli_skips_bad_records(lora_run):
    tmp, cfg, proc = lora_run
    run_dir = cfg["run_dir"]
    log = proc.stderr
    for reason in ("missing_image", "empty_text", "bad_field", "bad_json"):
        assert f": {reason}" in log, reason
    assert "skipped 4 {" in log  # the load summary; the corrupt PNG is met (or not) at decode time
    metrics = H.read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["text"] > 0 for m in metrics) and all(m["loss"] > 0 for m in metrics)
    assert {m["micro"][0]["task"] for m in metrics} == {"t2i", "edit", "vqa"}
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [4, 6]  # keep=2 pruned step 2
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".tmp")]
    with safe_open(os.path.join(run_dir, "checkpoints", "step_00000006", runs.TRAINABLE), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["mode"] == "lora"
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


@pytest.mark.slow
def test_lora_export_round_trip(lora_run, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tmp, cfg, _ = lora_run
    run_dir = cfg["run_dir"]
    lora_file, single = str(tmp_path / "lora.safetensors"), str(tmp_path / "merged.safetensors")
    assert cli(["export", run_dir, "--lora", lora_file]) == 0
    assert cli(["export", run_dir, "--out", single]) == 0

    # in memory: the base with peft's LoRA holding the trained matrices, merged by peft
    base = load_model(str(GOLDEN)).transformer
    peft_model = load_model(str(GOLDEN)).transformer
    lc = cfg["train"]["lora"]
    inject_adapter_in_model(
        LoraConfig(r=lc["rank"], lora_alpha=lc["alpha"], target_modules=H.DEFAULT_TARGETS), peft_model
    )
    trained, _ = runs.read_trainable(runs.resolve_checkpoint(run_dir))
    result = set_peft_model_state_dict(peft_model, {k.replace(".default", ""): v for k, v in trained.items()})
    assert not result.unexpected_keys
    for module in peft_model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}

    # the LoRA file has alpha keys and, applied with lora_deltas, gives the peft-merged weights bit for bit
    layers = load_lora(lora_file)
    with safe_open(lora_file, "pt") as f:
        assert sum(k.endswith(".alpha") for k in f.keys()) == len(layers) == 8 * 3
        assert all(k.startswith("transformer.") for k in f.keys())
    assert all(layer.alpha == lc["alpha"] and layer.down.shape[0] == lc["rank"] for layer in layers.values())
    deltas = lora_deltas(base, layers, 1.0)
    state = base.state_dict()
    for key, delta in deltas.items():
        state[key] = state[key] + delta
    for key, value in state.items():
        assert torch.equal(value, merged[key]), key
    assert any(not torch.equal(base.state_dict()[k], merged[k]) for k in deltas)

    # the single file loads through unialign_core and computes what the peft-merged model computes
    loaded = load_model(single, text_encoder=str(GOLDEN / "text_encoder"), vae=str(GOLDEN / "vae"))
    with safe_open(single, "pt") as f:
        assert not any(k.startswith("siglip_adapter") for k in f.keys())
    base.load_state_dict(merged)
    assert_identical(loaded.transformer, base)

    # the next stage starts from this run: the same merged weights
    _, start, report = load_start(InitConfig(path=run_dir))
    assert report.kind == "run" and not report.new
    assert all(torch.equal(v, merged[k]) for k, v in start.state_dict().items())


def test_full_run_exports_bit_identical(tmp_path):
    from train.loop import Trainer

    data = H.make_dataset(tmp_path / "data", tasks=("t2i", "edit", "caption"), per_task=4)
    teacher = H.make_teacher(tmp_path / "clip")
    cfg_dict = H.base_config(
        tmp_path,
        data,
        train={
            "mode": "full",
            "max_steps": 4,
            "grad_accum": 2,
            "batch_size": 2,
            "ema": True,
            "ema_decay": 0.5,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "lr": 1e-3,
            "warmup_steps": 2,
        },
        teacher={"path": teacher, "block": 2},
        loss={"align": 0.1},
        data={"cache_dir": str(tmp_path / "cache")},
        log={"progress": False, "tensorboard": True, "every": 1},
        validation={
            "every": 4,
            "prompts": ["a red square"],
            "images": [str(tmp_path / "data" / "p0.png")],
            "width": 32,
            "height": 32,
            "steps": 2,
            "caption_length": 8,
        },
    )
    cfg = load_config(H.write_config(tmp_path / "full.yaml", cfg_dict))
    trainer = Trainer(cfg)
    try:
        last = trainer.train()
    finally:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    run_dir = cfg.run_dir
    assert last["step"] == 4 and last["align"] > 0 and last["cross"] > 0
    metrics = H.read_metrics(run_dir)
    assert all(len(m["micro"]) == 2 for m in metrics)  # two micro-batches per step
    assert [m["micro"][0]["batch"] for m in metrics][:2] != [m["micro"][1]["batch"] for m in metrics][:2]
    assert os.path.isfile(os.path.join(run_dir, "validation", "step_00000004", "t2i_00.png"))
    assert os.path.getsize(os.path.join(run_dir, "validation", "step_00000004", "captions.txt")) > 0
    assert any(n.startswith("events.out.tfevents") for _, _, fs in os.walk(os.path.join(run_dir, "logs")) for n in fs)
    assert os.path.isfile(os.path.join(run_dir, "init_report.json"))

    out = str(tmp_path / "full.safetensors")
    assert cli(["export", run_dir, "--out", out, "--bundle"]) == 0
    loaded = load_model(out)  # T5 and VAE bundled
    trainer.transformer.eval()
    assert_identical(loaded.transformer, trainer.transformer)
    with safe_open(out, "pt") as f:
        assert not any(k.startswith("siglip_adapter") for k in f.keys())
        assert f.metadata()["format"] == "unialignment"

    ema_out = str(tmp_path / "ema.safetensors")
    assert cli(["export", run_dir, "--out", ema_out, "--ema"]) == 0
    ema = load_model(ema_out, text_encoder=str(GOLDEN / "text_encoder"), vae=str(GOLDEN / "vae")).transformer
    shadow = trainer.ema.state_dict()
    assert all(torch.equal(v, shadow[k]) for k, v in ema.state_dict().items() if k in shadow)
    assert not torch.equal(ema.image_proj_out.weight, trainer.transformer.image_proj_out.weight)
    assert cli(["export", run_dir, "--lora", str(tmp_path / "x.safetensors")]) == 2  # a full run has no LoRA


def test_lora_with_mixed_precision_keeps_the_frozen_base_in_the_frozen_dtype(tmp_path):
    """At full size an fp32 copy of the frozen base would double the transformer's memory (8.6 GB, not 4.3)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train.loop import Trainer

    data = H.make_dataset(tmp_path / "data", tasks=("t2i", "edit"), per_task=4)
    cfg = H.base_config(tmp_path, data, train={"mixed_precision": "bf16", "frozen_dtype": "bf16", "max_steps": 2})
    try:
        trainer = Trainer(load_config(H.write_config(tmp_path / "c.yaml", cfg)))
        frozen = {p.dtype for p in trainer.transformer.parameters() if not p.requires_grad}
        trained = {p.dtype for _, p in trainer.trainable}
        metrics = trainer.train()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    assert frozen == {torch.bfloat16}
    assert trained == {torch.float32}  # LoRA and projector weights keep fp32 for the optimizer
    assert metrics["step"] == 2 and torch.isfinite(torch.tensor(metrics["loss"]))
