"""Smoke test of the real-ComfyUI harness: one server start with this pack installed."""

import pytest

from comfy_server import PACK_NAME, PromptError

pytestmark = pytest.mark.slow  # a real ComfyUI server


@pytest.fixture(scope="module")
def server(start_comfy_server):
    server = start_comfy_server()
    print(f"\nComfyUI answered /object_info {server.startup_seconds:.1f} s after start")
    return server


def test_server_starts_with_pack(server):
    assert "KSampler" in server.object_info()
    assert server.import_failed_lines() == []
    # The pack was found on the custom_nodes path and imported.
    assert f"custom_nodes/{PACK_NAME}" in server.log_text()


def test_prompt_round_trip(server):
    prompt_id = server.queue_prompt(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness"}},
        }
    )
    entry = server.wait(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["2"]["images"][0]["filename"].startswith("harness")


def test_invalid_prompt_raises_with_node_errors(server):
    with pytest.raises(PromptError) as excinfo:
        server.queue_prompt({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}})
    assert excinfo.value.status == 400
    assert "1" in excinfo.value.body["node_errors"]
