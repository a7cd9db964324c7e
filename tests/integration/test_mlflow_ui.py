"""A sweep in the real MLflow UI, rendered by headless Chromium: the parent run with its children.

Drives the functions of scripts/mlflow_screenshots.py (the README's screenshots come from the
same code) against a real `mlflow ui` started in the sweep's launch directory, as users do.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.cli, pytest.mark.slow]


def _load_script():
    spec = importlib.util.spec_from_file_location("mlflow_screenshots",
                                                  ROOT / "scripts" / "mlflow_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


shots = _load_script()


def require_browser() -> None:
    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "the playwright package (pip install -e '.[dev]')"
    elif shots.chromium_path() is None:
        missing = "Debian's chromium (apt-get install -y chromium)"
    if missing:  # .ci/run installs both: CI must run this test, not skip it
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
            f"the MLflow UI test needs {missing}")


def test_runs_page_shows_the_sweep_parent_with_its_children(workdir):
    require_browser()
    shots.run_sweep(workdir, "accum=1,2,4", "trainer.max_epochs=1")
    sweep = shots.read_sweep(workdir)
    assert sweep.parent_name == "sweep accum=1,2,4 trainer.max_epochs=1"
    assert list(sweep.children) == [f"accum={k} trainer.max_epochs=1" for k in (1, 2, 4)]

    with shots.mlflow_ui(workdir) as base, shots.browser_page() as page:
        shots.goto_runs(page, base, sweep)
        # Grouped: the children are inside the collapsed parent, not rows of their own.
        assert names(page) == [sweep.parent_name]
        shots.expand_parent(page, sweep)
        after = names(page)
        assert after[0] == sweep.parent_name
        assert sorted(after[1:]) == sorted(sweep.children)


def names(page) -> list[str]:
    """The run names in the table, top to bottom (each cell's link: the cell also holds the
    run's colour)."""
    return [text.strip() for text in shots.run_name_cells(page).locator("a").all_inner_texts()]
