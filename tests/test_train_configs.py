"""The shipped trainer configs load: every train/configs/*.yaml goes through load_config (which checks keys, types
and values but not whether files exist), so a typo in a config fails here. The stages chain run to run."""

from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
FILES = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("shapes"))  # the released model's
STAGES = ["stage1_pretrain", "stage2_multitask", "stage3_sft"]


def test_the_expected_configs_are_there():
    assert {p.stem for p in FILES} >= {"lora", "full", *STAGES}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_config_loads(path):
    cfg = load_config(str(path))
    # the real model's settings
    assert cfg.data.resolution == 512 and cfg.data.text_length == 256
    assert (cfg.loss.image, cfg.loss.text, cfg.loss.cross, cfg.loss.align) == (1.0, 0.2, 0.05, 0.1)
    assert cfg.teacher.path and cfg.teacher.block == 8
    assert cfg.train.grad_clip == 2.0
    # every key written in the file is a key of the schema (load_config would have raised), and overrides apply
    assert load_config(str(path), ["train.max_steps=7"]).train.max_steps == 7


def test_the_shapes_lora_config_is_the_demo_fine_tune():
    cfg = load_config(str(CONFIGS / "shapes_lora.yaml"))
    assert cfg.init.path == "demo/shapes-demo.safetensors" and cfg.teacher.path == "demo/shapes-teacher"
    assert (cfg.data.resolution, cfg.data.text_length, cfg.data.prompt_padding) == (32, 24, "inference")
    assert cfg.train.mode == "lora" and min(cfg.loss.image, cfg.loss.text, cfg.loss.cross, cfg.loss.align) > 0
    assert "text_proj_out" in cfg.train.lora.targets


def test_modes():
    lora, full = load_config(str(CONFIGS / "lora.yaml")), load_config(str(CONFIGS / "full.yaml"))
    assert lora.train.mode == "lora" and lora.train.lora.rank > 0
    assert full.train.mode == "full" and full.train.mixed_precision == "bf16"
    assert full.train.gradient_checkpointing and full.train.grad_accum > 1 and full.train.ema


def test_stages_chain():
    cfgs = [load_config(str(CONFIGS / f"{name}.yaml")) for name in STAGES]
    assert all(c.train.mode == "full" for c in cfgs)
    assert Path(cfgs[0].run_dir).name == "stage1_pretrain"
    for previous, this in zip(cfgs, cfgs[1:]):
        assert Path(this.init.path) == Path(previous.run_dir)  # each stage starts from the previous run folder


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_parse(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_a_typo_fails(tmp_path):
    text = (CONFIGS / "lora.yaml").read_text().replace("grad_accum:", "grad_acum:", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="did you mean 'grad_accum'"):
        load_config(str(bad))
