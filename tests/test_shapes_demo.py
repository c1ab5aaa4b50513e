"""The bundled demo base (demo/shapes-demo.safetensors): its card, its sha256, its figures on a sample of held-out
scenes, and a short LoRA fine-tune through README command 1's code that lifts the concept the base never saw.

The base is trained once by `python -m train.shapes base` and committed once; until it is, these tests skip."""

import hashlib
import json
import math
import os

import pytest

from train.shapes import world as w
from train.shapes.scorecard import TARGETS, run_scorecard
from unialign_core.demo import DEMO_CARD, DEMO_MODEL, bundled_models

pytestmark = pytest.mark.skipif(not os.path.isfile(DEMO_MODEL), reason="the demo base is not in this checkout yet")

N = 40  # held-out records per mode


def margin(target: float, n: int = N) -> float:
    """Three binomial standard errors at the target: a base that meets the target on the full 200-record test
    falls below target - margin on a sample of n with probability about 0.1 %."""
    return 3 * math.sqrt(target * (1 - target) / n)


def card() -> dict:
    with open(DEMO_CARD, encoding="utf-8") as f:
        return json.load(f)


def test_the_demo_base_is_the_file_its_card_names():
    with open(DEMO_MODEL, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == card()["sha256"]
    assert os.path.getsize(DEMO_MODEL) <= 30 * 2**20
    assert card()["held_out"] == {"colour": w.NEW_COLOUR, "kind": w.NEW_KIND}
    assert "shapes-demo (bundled)" in bundled_models()


@pytest.mark.slow
def test_the_demo_base_meets_its_targets_on_a_sample():
    from unialign_core import load_model

    settings = card()["sampler_settings"]
    model = load_model(DEMO_MODEL)
    sample = run_scorecard(
        model, N, seed=11, examples=0, vocab=w.BASE, sampling=settings["image"], text=settings["text"]
    )
    low = {
        k: (round(sample.figures[k], 3), round(t - margin(t, sample.counts[k]), 3))
        for k, t in TARGETS.items()
        if sample.figures[k] < t - margin(t, sample.counts[k])
    }
    assert not low, low


@pytest.mark.slow
def test_a_short_lora_fine_tune_lifts_the_new_colour(tmp_path):
    from train.shapes.finetune import finetune_job

    result = finetune_job(str(tmp_path / "ft"), "colour", seed=0, budget_name="test")
    before, after = result["new_before"]["t2i_colour"], result["new_after"]["t2i_colour"]
    assert after >= before + 0.3, (before, after)
    assert os.path.isfile(result["weights"]) and os.path.isfile(result["contact_sheet"])
    assert (tmp_path / "ft" / "report.md").is_file() and (tmp_path / "ft" / "loss_curve.png").is_file()
