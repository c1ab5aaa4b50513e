"""README command 1's stages, wired end to end on the golden tiny model as the base (the real demo base is checked by
tests/test_shapes_demo.py): the before scores, the fine-tuning set with the concept, the trainer with the shipped
config, the LoRA export loaded through the library calls the nodes use, the after scores and every report file."""

import json

import pytest

from tiny_models import GOLDEN
from train.shapes import finetune as ft
from train.shapes import world as w
from train_helpers import make_teacher

SMOKE = ft.Budget(concept_records=100, ordinary_records=96, steps=2, n_before=2, n_after=2, n_old=1)  # >= 16 per task


@pytest.mark.slow  # about a minute: two trainer steps and a few samples of every mode
def test_the_fine_tune_command_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.setitem(ft.BUDGETS, "smoke", SMOKE)
    teacher = make_teacher(tmp_path / "teacher")
    out = tmp_path / "ft"
    result = ft.finetune_job(str(out), "kind", seed=3, budget_name="smoke", base=str(GOLDEN), teacher=teacher)
    for name in ("lora.safetensors", "before_after.png", "loss_curve.png", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0, name
    assert set(ft.concept_targets("kind")) <= set(result["new_after"]) and "t2i_shape" in result["targets"]
    assert result["new_counts_after"]["t2i_shape"] == SMOKE.n_after
    assert set(result["old_after"]) >= set(ft.OLD_KEYS) - {"perception_edge_f1"}
    # the fine-tuning set is the concept's records and ordinary ones of the base's world
    concept = [json.loads(line) for line in (out / "data" / "concept.jsonl").read_text().splitlines()]
    assert len(concept) == SMOKE.concept_records and {r["task"] for r in concept} == set(ft.CONCEPT_TASKS)
    assert all(w.NEW_KIND in json.dumps(r["meta"]) for r in concept)
    ordinary = (out / "data" / "ordinary.jsonl").read_text()
    assert w.NEW_KIND not in ordinary and w.NEW_COLOUR not in ordinary
    # all four losses trained, through the shipped config
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == SMOKE.steps and all(steps[-1][k] is not None for k in ("image", "text", "cross", "align"))
    assert "| t2i_shape |" in (out / "report.md").read_text()


def test_a_missing_demo_base_says_how_to_make_it(tmp_path):
    with pytest.raises(ft.MissingBase, match="python -m train.shapes base"):
        ft.finetune_job(str(tmp_path / "ft"), base=str(tmp_path / "absent.safetensors"))
