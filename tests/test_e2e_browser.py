"""End to end in a real browser: JupyterLab on 127.0.0.1, each notebook opened in headless
Chromium (Debian's package, driven by Playwright), all cells run on the offline model,
then the panels used as a person would. Screenshots go to artifacts/e2e/.

Run with `make test-e2e` (CI does). Needs /usr/bin/chromium: `apt-get install -y chromium`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # JupyterLab's start and a notebook's cells

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "e2e"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "workbench-e2e"
# Short runs: the point here is what a person sees, the numbers are tested elsewhere.
KERNEL_ENV = {
    "WB_METHODS": "fp32,bnb-nf4",
    "WB_EVAL_TOKENS": "256",
    "WB_NEW_TOKENS": "8",
    "WB_STEPS": "4",
    "WB_DEPLOY": "rtn",
    "WB_MAP_TOKENS": "32",
    "WB_MAP_BLOCKS": "28,29",
    "WB_SWEEP": "rtn:bits=3,4",
    "WB_GGUF_TYPES": "Q4_K_M",
    "WB_ALSO": "bnb-nf4",
    "WB_TASKS": "wb_lastword:limit=20",
    "WB_DEPLOY_TASKS": "wb_heldout:limit=5",
}  # 05: a short map, a sweep of rows it measured
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a copy of the notebooks, news toast off, kernels on the offline model."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (.ci/run does).")
    root = tmp_path_factory.mktemp("lab")
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, root)
    settings = tmp_path_factory.mktemp("settings")
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port = _free_port()
    env = {**os.environ, **KERNEL_ENV, "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.disable_check_xsrf=True",
            "--allow-root",
            f"--LabApp.workspaces_dir={tmp_path_factory.mktemp('workspaces')}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"JupyterLab did not start; see {root / 'server.log'}")
    yield url
    server.terminate()
    server.wait(20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield chromium
        chromium.close()


def _open(browser, lab: str, name: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{lab}/lab/tree/{name}?reset&token={TOKEN}")  # reset: no tabs restored from an earlier page
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=180_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=180_000)
    return page, errors


def _run_all(page, timeout_s: float = 600) -> None:
    """Menu Run -> Run All Cells, retried until the first code cell has run (the first try
    sometimes does nothing), then wait until no cell is queued or running."""
    first_prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    for _ in range(5):
        page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile("^Run All Cells")).click()
        try:
            page.wait_for_function(
                "el => /\\[[0-9*]+\\]/.test(el.textContent)", arg=first_prompt.element_handle(), timeout=15_000
            )
            break
        except Exception:
            continue
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_text_contents()
        if prompts and all(re.search(r"\[\d+\]", p) for p in prompts):
            return
        time.sleep(2)
    raise AssertionError(f"cells still running after {timeout_s} s: {prompts}")


def _close(page, lab: str) -> None:
    """Close the page and shut its notebook's kernel down (four kernels holding models add up)."""
    page.close()
    request = urllib.request.Request(f"{lab}/api/kernels?token={TOKEN}")
    for kernel in json.loads(urllib.request.urlopen(request, timeout=10).read()):
        urllib.request.urlopen(
            urllib.request.Request(f"{lab}/api/kernels/{kernel['id']}?token={TOKEN}", method="DELETE"), timeout=30
        )


def _screenshot(page, name: str) -> None:
    """The whole notebook: a tall viewport, since JupyterLab scrolls inside its own panel."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 6000})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SHOTS / name))


def _assert_no_error_outputs(page) -> None:
    """No error output and no warning block (stderr, which JupyterLab draws red) in any cell."""
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, errors.first.inner_text()
    warnings = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert warnings.count() == 0, warnings.first.inner_text()[:500]


def _assert_every_chart_has_data(page) -> None:
    # a trace's values are an array, or (numpy data from plotly.py) a base64 {dtype, bdata} object; a diagram's are its shapes
    points = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(p => (p.data || []).reduce(
        (n, t) => n + ['x', 'y', 'z', 'values'].map(k => t[k]).filter(v => v && ((v.length || 0) > 0 || (v.bdata || '').length > 0)).length,
        ((p.layout || {}).shapes || []).length))""")
    assert points and all(n > 0 for n in points), points


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if not n.startswith("02_")])
def test_notebook_runs_quietly_with_charts_that_have_data(browser, lab, name):
    """Every notebook but 02 (its panels have their own test below): Run All, then what a
    learner sees: no error, no red warning block, every chart drawn with data."""
    page, page_errors = _open(browser, lab, name)
    _run_all(page, timeout_s=900)
    _assert_no_error_outputs(page)
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    _assert_every_chart_has_data(page)
    _screenshot(page, name.replace(".ipynb", ".png"))
    assert not page_errors, page_errors
    _close(page, lab)


def test_compare_notebook_panels_work_in_the_browser(browser, lab):
    page, page_errors = _open(browser, lab, "02_compare_methods.ipynb")
    _run_all(page)
    _assert_no_error_outputs(page)
    assert page.locator(".widget-button, .jupyter-button").count() >= 3  # Will it fit, Compare, Generate, ...
    assert page.locator(".widget-dropdown select, .widget-dropdown").count() >= 2
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    table = page.locator("table").filter(has_text="perplexity").first
    text = table.text_content()  # not inner_text: JupyterLab skips rendering cells out of view
    assert "fp32" in text and "bnb-nf4" in text

    # As a person: open the quanto family, tick quanto-int8, press Compare, wait for "done".
    page.locator(".widget-accordion").get_by_text("quanto", exact=True).first.click()
    page.get_by_label("quanto-int8").check()
    page.get_by_role("button", name="Compare").click()
    # The status still reads "done after" from Run All until the click reaches the kernel: wait for
    # what only the new run can produce, the comparison table with the third method, then its charts.
    page.wait_for_function(
        "() => [...document.querySelectorAll('table')].some(t => t.textContent.includes('perplexity')"
        " && t.textContent.includes('quanto-int8'))",
        timeout=300_000,
    )
    redrawn = (
        "() => [...document.querySelectorAll('.js-plotly-plot')].some(p => ((p.data || [])[0]?.x?.length || 0) >= 3)"
    )
    try:
        page.wait_for_function(redrawn, timeout=60_000)  # charts redrawn with the third method
    except Exception:
        panel = page.evaluate(
            "() => [...document.querySelectorAll('.widget-vbox')].filter(v => v.textContent.includes('Compare'))"
            ".map(v => v.innerText).pop()"
        )
        pytest.fail(f"the charts were not redrawn with quanto-int8; the panel reads:\n{panel}")
    _assert_no_error_outputs(page)
    _assert_every_chart_has_data(page)
    _screenshot(page, "02_compare_methods.png")
    assert not page_errors, page_errors
