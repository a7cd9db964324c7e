"""Where a run came from, as MLflow shows it: a name, the git commit, the command, the plan.

MLflow's own context tags (`mlflow.user`, `mlflow.source.*`, `mlflow.source.git.*`) are what
its fluent `start_run` would set; stepwise creates runs with the client, so it asks MLflow's
context registry for them. MLflow takes the git tags from the entry point's repository; the
project a user works in is the directory the command was started in (the entry point may be an
installed `stepwise`, a stepwise checkout, or a submitit job), so its repository wins.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

GIT_DIRTY = "stepwise.git.dirty"
COMMAND = "stepwise.command"
DESCRIPTION = "mlflow.note.content"  # the run's description in the MLflow UI


def run_name(experiment_name: str, overrides: Sequence[str], started: float) -> str:
    """The command's overrides (without `hydra.*` ones), else the experiment name and the
    start time: never one of MLflow's random names."""
    shown = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    if shown:
        return " ".join(shown)
    return f"{experiment_name} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"


def command_line(overrides: Sequence[str], argv0: str | None = None) -> str:
    """The command that runs this job again (a sweep's job included): its entry point and its
    own overrides."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    name = Path(argv0).name
    if name == "__main__.py" and Path(argv0).parent.name == "stepwise":
        prog = "python -m stepwise"
    elif name.endswith(".py") and "submitit" not in argv0:
        prog = f"python {argv0}"
    else:  # the console script, or a launcher's own entry point (submitit)
        prog = "stepwise"
    return " ".join([prog, *map(shlex.quote, overrides)])


def git_tags(start_dir: Path) -> dict[str, str]:
    """MLflow's context tags, with the git commit, branch, remote and dirty flag of the project
    the command was started in (`start_dir`'s repository), else of the entry point's."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    tags = resolve_tags()  # git tags of the entry point's repository (sys.argv[0]), if any
    where = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else start_dir
    commit = git_utils.get_git_commit(str(start_dir))
    if commit is not None:
        where = start_dir
        for key in (MLFLOW_GIT_COMMIT, MLFLOW_GIT_BRANCH, MLFLOW_GIT_REPO_URL):
            tags.pop(key, None)
        found = {MLFLOW_GIT_COMMIT: commit, MLFLOW_GIT_BRANCH: git_utils.get_git_branch(
                 str(start_dir)), MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(str(start_dir))}
        tags.update({key: value for key, value in found.items() if value})
    if MLFLOW_GIT_COMMIT in tags:
        dirty = _dirty(where)
        if dirty is not None:
            tags[GIT_DIRTY] = str(dirty).lower()
    return tags


def _dirty(path: Path) -> bool | None:
    """Whether the repository holding `path` has uncommitted changes to tracked files."""
    try:
        import git

        return git.Repo(path, search_parent_directories=True).is_dirty(untracked_files=False)
    except Exception as err:  # no git executable, a broken repository: the tag is left out
        log.debug("git dirty flag of %s: %s", path, err)
        return None


def run_tags(plan_summary: str, overrides: Sequence[str], start_dir: Path) -> dict[str, str]:
    """Every provenance tag of a new run."""
    from stepwise import __version__

    command = command_line(overrides)
    return {**git_tags(start_dir), COMMAND: command, "stepwise.version": __version__,
            DESCRIPTION: f"{plan_summary}\n\n`{command}`"}
