"""Look at every example workflow as a user does: in headless Chromium, on a real ComfyUI, on each frontend.

    COMFYUI_DIR=/path/to/ComfyUI-0.3.x VENV/bin/python tools/browser_check.py --out DIR \\
        [--frontend 1.27.10=/path/to/static] [--frontend 1.58.1=/path/to/static] [name ...]

VENV is the ComfyUI's environment (tools/setup_comfyui.sh makes one) with `selenium` installed; Chromium and
chromedriver come from the system (Debian: `apt install chromium chromium-driver`). A `--frontend LABEL=DIR` is a
`comfyui_frontend_package/static` folder (`pip download comfyui-frontend-package==VERSION` and unzip it); without
one, the frontend the ComfyUI's Python has installed is used.

For each frontend a server starts on the tiny test model (tests/nodes_support.py: the models and input pictures the
server tests use). For each workflow (`workflows/*.json`, as the template browser lists them) it:
0. (once) opens the template browser on the pack's category -> `DIR/<frontend>/templates.png`;
1. loads the file with `app.loadGraphData(json)`, exactly as saved, and records every alert, toast and dialog
   (the missing-models dialog included: the test model is not the released one) -> `DIR/<frontend>/<n>_load.png`;
2. closes the dialogs, points the widgets at the tiny model with small sizes and steps (the same settings as the
   server tests), queues it with `app.queuePrompt(0)`, waits until the queue is empty and records the run's
   status -> `DIR/<frontend>/<n>_ran.png`.
`DIR/report.json` holds what was seen: alerts, toasts, dialog texts, browser console warnings and errors, the run
status.
The screenshots are for a person to look at; the report is what a script can check.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from comfy_server import PACK_NAME, ComfyServer  # noqa: E402
from nodes_support import INPUT_IMAGES, SIDE, TINY_MODEL, make_input_images, make_models_dir  # noqa: E402
from tools.make_api import WORKFLOWS as WORKFLOW_TITLES  # noqa: E402

# Widget values that make a workflow run in seconds on the tiny model, by node type and widget name
# (tests/nodes_support.py `tiny_settings` does the same to the API twins).
TINY_WIDGETS = {
    "UniAlignLoader": {"model": TINY_MODEL, "text_encoder": "(from model)", "vae": "(from model)", "dtype": "auto"},
    "ImageScale": {"width": SIDE, "height": SIDE},
    "UniAlignTextToImage": {"width": SIDE, "height": SIDE, "steps": 4},
    "UniAlignCompose": {"width": SIDE, "height": SIDE, "steps": 4},
    "UniAlignEdit": {"steps": 4},
    "UniAlignPerceive": {"steps": 4},
    "UniAlignUnderstand": {"length": 32, "steps": 8},
    "KSampler": {"steps": 4},
    "UniAlignNativeSigmas": {"steps": 4},
    "EmptySD3LatentImage": {"width": SIDE, "height": SIDE},
}

# Runs in the page before anything else: keep every alert instead of blocking on it.
CATCH_ALERTS = "window.__alerts = []; window.alert = (m) => window.__alerts.push(String(m));"

SEEN = """
const text = (sel) => Array.from(document.querySelectorAll(sel)).map(e => e.innerText.trim()).filter(t => t);
return {
  alerts: window.__alerts || [],
  toasts: text('.p-toast-message, .comfy-toast'),
  dialogs: text('.p-dialog, [role="dialog"], .comfy-modal[style*="flex"], dialog[open]'),
};
"""

# Wait for a promise in the page; return only whether it failed (1.5x resolves to objects with cycles).
AWAIT = """const done = arguments[arguments.length - 1];
Promise.resolve({}).then(() => done(null), (e) => done(String(e)));"""

SET_TINY = """
const tiny = arguments[0], images = arguments[1];
let picture = 0;
for (const node of app.graph._nodes) {
  const values = tiny[node.type] || {};
  for (const w of node.widgets || []) {
    if (w.name in values) w.value = values[w.name];
    if (node.type === 'LoadImage' && w.name === 'image') w.value = images[picture++ % images.length];
  }
}
"""


def close_dialogs(driver):
    from selenium.webdriver.common.keys import Keys

    for _ in range(2):  # Escape closes 1.5x's dialogs (its first-start template browser among them)
        driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
        time.sleep(0.3)
    driver.execute_script(
        "document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close, .comfy-modal-close')"
        ".forEach(b => b.click());"
        "document.querySelectorAll('.comfy-modal').forEach(m => m.style.display = 'none');"
    )
    time.sleep(0.5)


def look_at_templates(driver, path):
    """Open the template browser on the pack's own category, screenshot it, and return the titles shown there."""
    driver.execute_async_script(AWAIT.format("app.extensionManager.command.execute('Comfy.BrowseTemplates')"))
    time.sleep(3)
    found = driver.execute_script(
        "const hits = Array.from(document.querySelectorAll('[role=\"dialog\"] *'))"
        "  .filter(e => e.children.length === 0 && e.textContent.trim() === arguments[0]);"
        "if (hits.length) { hits[0].scrollIntoView(); hits[0].click(); }"
        "return hits.length > 0;",
        PACK_NAME,
    )
    time.sleep(3)
    driver.save_screenshot(str(path))
    titles = driver.execute_script(
        "return Array.from(document.querySelectorAll('[role=dialog] *'))"
        "  .filter(e => e.children.length === 0 && /^[0-9] [A-Z]/.test(e.textContent.trim()))"
        "  .map(e => e.textContent.trim());"
    )
    return {"category_found": found, "titles_in_order": titles}


def queue_empty(url):
    with urllib.request.urlopen(url + "/queue", timeout=10) as r:
        q = json.load(r)
    return not q["queue_running"] and not q["queue_pending"]


def last_status(url):
    with urllib.request.urlopen(url + "/history?max_items=1", timeout=10) as r:
        history = json.load(r)
    if not history:
        return None
    entry = next(iter(history.values()))
    status = entry.get("status", {})
    errors = [m[1].get("exception_message") for m in status.get("messages", []) if m[0] == "execution_error"]
    return {"status": status.get("status_str"), "errors": errors}


def check_frontend(label, static_dir, names, out, comfyui_dir, driver_factory):
    shots = out / label
    shots.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = make_models_dir(tmp / "models")
        make_input_images(tmp / "base" / "input")
        extra = ["--front-end-root", static_dir] if static_dir else []
        with ComfyServer(comfyui_dir, REPO, models, tmp / "base", startup_timeout=300, extra_args=extra) as server:
            driver = driver_factory()
            driver.set_script_timeout(120)
            try:
                driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ALERTS})
                driver.get(server.url)
                for _ in range(120):
                    if driver.execute_script("return !!(window.app && window.app.graph)"):
                        break
                    time.sleep(1)
                time.sleep(3)
                close_dialogs(driver)
                results["(template browser)"] = look_at_templates(driver, shots / "templates.png")
                close_dialogs(driver)
                driver.get_log("browser")  # drop the start-up messages
                for name in names:
                    ui_file = REPO / "workflows" / f"{WORKFLOW_TITLES[name]}.json"
                    graph = json.loads(ui_file.read_text(encoding="utf-8"))
                    driver.execute_script("window.__alerts = [];")
                    load_error = driver.execute_async_script(AWAIT.format("app.loadGraphData(arguments[0])"), graph)
                    time.sleep(3)
                    seen = driver.execute_script(SEEN)
                    driver.save_screenshot(str(shots / f"{name}_load.png"))
                    close_dialogs(driver)
                    driver.execute_script(SET_TINY, TINY_WIDGETS, list(INPUT_IMAGES))
                    queue_error = driver.execute_async_script(AWAIT.format("app.queuePrompt(0)"))
                    started = time.monotonic()
                    time.sleep(2)
                    while not queue_empty(server.url) and time.monotonic() - started < 300:
                        time.sleep(1)
                    time.sleep(2)
                    ran = driver.execute_script(SEEN)
                    driver.save_screenshot(str(shots / f"{name}_ran.png"))
                    console = [
                        f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] != "INFO"
                    ]
                    results[name] = {
                        "load_error": load_error,
                        "queue_error": queue_error,
                        "on_load": seen,
                        "after_run": ran,
                        "run": last_status(server.url),
                        "run_seconds": round(time.monotonic() - started, 1),
                        "console": console,
                    }
                    close_dialogs(driver)
                    print(f"[{label}] {name}: {json.dumps(results[name])[:400]}", flush=True)
            finally:
                driver.quit()
    return results


def make_driver():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tools/browser_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows by short name (default all: {', '.join(WORKFLOW_TITLES)})")
    parser.add_argument("--out", required=True, help="folder for the screenshots and report.json")
    parser.add_argument("--frontend", action="append", default=[], metavar="LABEL=STATIC_DIR")
    args = parser.parse_args(argv)
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if not comfyui_dir or not (Path(comfyui_dir) / "main.py").is_file():
        parser.error("set COMFYUI_DIR to a ComfyUI folder (one with main.py)")
    unknown = [n for n in args.names if n not in WORKFLOW_TITLES]
    if unknown:
        parser.error(f"unknown workflow(s) {unknown}; choose from {list(WORKFLOW_TITLES)}")
    frontends = [tuple(f.split("=", 1)) for f in args.frontend] or [("installed", None)]
    out = Path(args.out)
    report = {
        label: check_frontend(label, static, args.names or list(WORKFLOW_TITLES), out, comfyui_dir, make_driver)
        for label, static in frontends
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"report: {out / 'report.json'}; screenshots under {out}/<frontend>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
