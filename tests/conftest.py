"""Shared pytest fixtures.

Real-ComfyUI tests need COMFYUI_DIR: a ComfyUI folder, e.g. one made by `.ci/get_comfyui.sh DIR`
(`.ci/run` sets it). Without it those tests are skipped.
"""

import os
from pathlib import Path

import pytest

from comfy_server import ComfyServer

PACK_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def comfyui_dir():
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("COMFYUI_DIR is not set: provision ComfyUI with `.ci/get_comfyui.sh DIR`, then set COMFYUI_DIR=DIR")
    path = Path(value)
    if not (path / "main.py").is_file():
        pytest.skip(
            f"COMFYUI_DIR={value} is not a ComfyUI folder (no main.py): provision it with `.ci/get_comfyui.sh DIR`"
        )
    return path


@pytest.fixture(scope="session")
def start_comfy_server(comfyui_dir, tmp_path_factory):
    """Factory: `start_comfy_server(models_dir=None, extra_args=())` starts a ComfyServer with this pack
    installed and returns it once /object_info answers. Every server it started is stopped at session end.
    `models_dir` None means an empty models folder in the server's temporary base directory;
    `extra_args` are appended to the ComfyUI command line."""
    servers = []

    def start(models_dir=None, extra_args=()):
        server = ComfyServer(comfyui_dir, PACK_DIR, models_dir, tmp_path_factory.mktemp("comfy"), extra_args=extra_args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
