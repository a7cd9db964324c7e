"""Screenshots of a sweep in the MLflow UI, taken in headless Chromium against a real `mlflow ui`.

Runs `python train.py -m accum=1,2,4 trainer.max_epochs=3` in a temporary launch directory,
starts `mlflow ui` there (as the README tells users to), and writes to docs/images/:
sweep_runs.png (the parent with its children), sweep_charts.png (train/loss and val/loss against
train/samples_seen) and run_overview.png (one child's params). Re-run after any change to what a
run logs:

    .venv/bin/python scripts/mlflow_screenshots.py

Needs Debian's `chromium` (`apt-get install -y chromium`) and Playwright (`pip install
playwright`; its own browser download is not used). tests/integration/test_mlflow_ui.py drives the
same functions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ("accum=1,2,4", "trainer.max_epochs=3")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}
# Two chart sections, one under the other, need a taller page.
CHARTS_VIEWPORT = {"width": 1400, "height": 1150}
# The UI on 2 busy cores takes tens of seconds to load its bundle; the waits are for elements.
UI_TIMEOUT_MS = 180_000
# MLflow 3 opens on its GenAI pages; this URL parameter is the sidebar's "Model training" switch.
MODEL_TRAINING = "workflowType=machine_learning"
# A first visit opens MLflow's assistant panel over the page; mark it as already seen and closed.
QUIET_ASSISTANT = """
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""


@dataclass(frozen=True)
class Sweep:
    """A finished sweep as MLflow stores it."""

    experiment_id: str
    parent_id: str
    parent_name: str
    children: dict[str, str]  # run name -> run id, in job order


def tool_env() -> dict[str, str]:
    """This environment without MLflow/Hydra settings that would redirect the store, and
    without telemetry (nothing outside can be reached)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def run_sweep(launch_dir: Path, *overrides: str) -> None:
    """`python train.py -m <overrides>` started from `launch_dir` (its store: ./mlflow.db)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides]
    proc = subprocess.run(cmd, cwd=launch_dir, env=tool_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")


def read_sweep(launch_dir: Path) -> Sweep:
    """The newest sweep parent in `launch_dir`/mlflow.db and its children."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{launch_dir / 'mlflow.db'}")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(experiment_ids, "tags.`stepwise.role` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    children.sort(key=lambda r: int(r.data.tags["stepwise.job_num"]))
    return Sweep(parent.info.experiment_id, parent.info.run_id, parent.info.run_name,
                 {r.info.run_name: r.info.run_id for r in children})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(launch_dir: Path, timeout: float = 300) -> Iterator[str]:
    """`mlflow ui` started in `launch_dir` on a free local port; yields its base URL once
    /health answers, and stops it on exit."""
    port = free_port()
    log = open(launch_dir / "mlflow_ui.log", "wb")
    # One worker: uvicorn's default 4 take minutes to start on 2 busy cores, and some die.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # Its background job runner (GenAI scorers, trace archival) is not used here: 6 processes less.
    env = {**tool_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=launch_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, timeout)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for_health(base: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `base`/health until it answers 200; fail early if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)  # a poll interval, not a wait for an event we could observe
    raise TimeoutError(f"mlflow ui at {base} did not answer /health within {timeout:.0f} s")


def chromium_path() -> str | None:
    """Debian's chromium, or the one $STEPWISE_CHROMIUM names."""
    return os.environ.get("STEPWISE_CHROMIUM") or shutil.which("chromium")


@contextmanager
def browser_page() -> Iterator:
    """A fresh page in headless Chromium (a first-time visitor: no stored UI state)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.add_init_script(QUIET_ASSISTANT)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_runs_table(page, base: str, sweep: Sweep) -> None:
    """The experiment's runs table (Model training) with the sweep's parent expanded."""
    goto_runs(page, base, sweep)
    expand_parent(page, sweep)


def goto_runs(page, base: str, sweep: Sweep) -> None:
    """Load the experiment's runs table in the Model training view; wait for the parent's row."""
    page.goto(f"{base}/#/experiments/{sweep.experiment_id}/runs?{MODEL_TRAINING}",
              wait_until="domcontentloaded")
    run_name_cells(page).filter(has_text=sweep.parent_name).wait_for()


def expand_parent(page, sweep: Sweep) -> None:
    """Click the parent's expand (+) button; wait for its first child's row."""
    run_name_cells(page).filter(has_text=sweep.parent_name).locator("button").click()
    run_name_cells(page).filter(has_text=next(iter(sweep.children))).wait_for()


def run_name_cells(page):
    """The Run Name cells of the runs table, top to bottom."""
    return page.locator('[role="gridcell"][col-id="attributes.`Run Name`"]')


def show_columns(page, titles: list[str]) -> None:
    """Toggle table columns (attributes, metrics, params) by their titles in "Columns"."""
    page.get_by_test_id("column-selection-dropdown").first.click()
    for title in titles:
        node = page.locator(f'.du-bois-light-tree-treenode:has(span[title="{title}"])').first
        node.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")


def fit_run_names(page) -> None:
    """Widen the Run Name column to its content (a double click on its resize handle)."""
    header = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]')
    header.locator(".ag-header-cell-resize").dblclick()


def set_x_axis(page, chart: str, metric: str) -> None:
    """In chart `chart`'s config dialog, choose X-axis type Metric = `metric`, and save."""
    menu = page.get_by_test_id("experiment-view-compare-runs-card-menu")
    header = page.locator("div", has=page.locator(f'h4[title="{chart}"]')).filter(has=menu).last
    header.get_by_test_id("experiment-view-compare-runs-card-menu").click()
    page.get_by_role("menuitem", name="Configure").click()
    dialog = page.get_by_role("dialog")
    dialog.locator('input[name="runs-charts-field-group-x-axis"][value="metric"]').check()
    dialog.get_by_role("combobox").first.click()
    page.keyboard.type(metric)  # the list is virtual: with many metrics, the option must be searched
    page.locator(f'.du-bois-light-select-item-option[title="{metric}"]').click()
    dialog.get_by_role("button", name="Save changes").click()
    dialog.wait_for(state="hidden")


def shoot_runs(page, base: str, sweep: Sweep, path: Path) -> None:
    """The runs table: the parent expanded, the batch params, the final val metrics and the test
    split's accuracy as columns (the parent's: its best child's)."""
    open_runs_table(page, base, sweep)
    show_columns(page, ["Dataset", "Source", "Models", "effective_batch_size", "accum", "lr",
                        "val/loss", "val/accuracy", "test/accuracy"])
    fit_run_names(page)
    page.locator('.ag-header-cell[col-id="params.`effective_batch_size`"]').wait_for()
    page.screenshot(path=path)


def shoot_charts(page, sweep: Sweep, path: Path) -> None:
    """The chart view of the (already open) runs page: the loss charts against samples seen."""
    page.locator('label:has(input[value="CHART"])').click()
    # The parent has no loss of its own, but would take a line in every legend.
    parent_row = page.locator('[role="row"]', has=page.get_by_text(sweep.parent_name, exact=True))
    parent_row.locator("label", has_text="Hide run").first.click()
    page.get_by_placeholder("Search metric charts").fill("loss")
    collapse_section(page, "test")  # test/loss: one point per run, in the first section
    for chart in ("train/loss", "val/loss"):
        set_x_axis(page, chart, "train/samples_seen")
        grow_chart(page, chart, dx=560, dy=80)
    # Plotly draws the axis title once the chart re-rendered with the new x-axis.
    page.locator("text.xtitle", has_text="train/samples_seen").nth(1).wait_for()
    page.set_viewport_size(CHARTS_VIEWPORT)
    page.screenshot(path=path)
    page.set_viewport_size(VIEWPORT)


def collapse_section(page, name: str) -> None:
    """Fold the chart section `name` (the metrics' prefix) away."""
    header = page.locator(".du-bois-light-collapse-header").filter(
        has=page.get_by_text(name, exact=True))
    header.click()
    page.locator(".du-bois-light-collapse-header[aria-expanded='false']").filter(
        has=page.get_by_text(name, exact=True)).wait_for()


def grow_chart(page, chart: str, dx: int, dy: int) -> None:
    """Drag chart `chart`'s resize handle by (dx, dy) pixels (it snaps to the grid's columns);
    a larger card also shows every run in its legend."""
    handle = page.get_by_test_id("draggable-card-resize-handle")
    card = page.locator("div", has=page.locator(f'h4[title="{chart}"]')).filter(has=handle).last
    card.hover()
    box = card.get_by_test_id("draggable-card-resize-handle").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y + dy, steps=10)
    page.mouse.up()


def shoot_overview(page, base: str, sweep: Sweep, run_name: str, path: Path) -> None:
    """One child's Overview with its batch parameters filtered in."""
    run_id = sweep.children[run_name]
    page.goto(f"{base}/#/experiments/{sweep.experiment_id}/runs/{run_id}?{MODEL_TRAINING}",
              wait_until="domcontentloaded")
    page.get_by_placeholder("Search parameters").fill("batch")
    page.get_by_role("cell", name="effective_batch_size", exact=True).wait_for()
    page.get_by_role("link", name=sweep.parent_name).wait_for()  # "Parent run" loads last
    page.screenshot(path=path)


def take_screenshots(launch_dir: Path, out: Path) -> list[Path]:
    """The three screenshots of docs/tracking.md of the sweep stored in `launch_dir`, written to `out`."""
    sweep = read_sweep(launch_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep_runs.png", out / "sweep_charts.png", out / "run_overview.png"]
    with mlflow_ui(launch_dir) as base, browser_page() as page:
        shoot_runs(page, base, sweep, paths[0])
        shoot_charts(page, sweep, paths[1])
        shoot_overview(page, base, sweep, list(sweep.children)[-1], paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--launch-dir", type=Path,
                        help="reuse a directory where the sweep already ran (skips the sweep)")
    args = parser.parse_args(argv)
    if chromium_path() is None:
        print("error: chromium not found; fix: apt-get install -y chromium", file=sys.stderr)
        return 2
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stepwise-ui-") as tmp:
        launch_dir = args.launch_dir.resolve() if args.launch_dir else Path(tmp)
        if args.launch_dir is None:
            run_sweep(launch_dir, *SWEEP)
            print(f"sweep done in {time.monotonic() - start:.0f} s", flush=True)
        for path in take_screenshots(launch_dir, args.out.resolve()):
            print(path)
    print(f"total {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
