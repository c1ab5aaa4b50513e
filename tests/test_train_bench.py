"""Smoke test of the throughput benchmark (python -m tools.bench_train): the tiny size, one timed step per batch kind."""

import pytest

from tools.bench_train import format_table, run


@pytest.mark.parametrize("task,mode", [("t2i", "full"), ("edit", "lora"), ("caption", "full")])
def test_bench_tiny_runs(task, mode):
    result = run("tiny", steps=1, warmup=0, batch=2, task=task, mode=mode)
    assert result["samples / s"] > 0 and result["peak memory"] > 0
    assert result["trainable"] < result["parameters"] if mode == "lora" else result["trainable"] == result["parameters"]
    assert result["loss (mean of timed steps)"] > 0
    assert "samples / s" in format_table(result)
