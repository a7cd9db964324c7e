"""A tracking server with basic authentication (`mlflow server --app-name basic-auth`).

One real server on loopback for the module, with an admin, a user with EDIT permission on an
experiment and a user with the default READ permission. Right credentials log a run; none, a
wrong password or too few permissions stop the job before any work with one line and exit 2,
and no password appears in what the job prints or leaves behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, serve_mlflow

pytestmark = [pytest.mark.cli, pytest.mark.slow]

ADMIN = ("admin", "Adm1n-pw-not-the-default")
WRITER = ("writer", "Wr1ter-pw-7c41")
READER = ("reader", "Re4der-pw-92f0")
EXPERIMENT = "shared"  # the writer may write to it, the reader only read it
ARGS = ("trainer.max_epochs=1", "trainer.progress_bar=false", f"logger.experiment_name={EXPERIMENT}")


def credentials(user: tuple[str, str]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}


@contextlib.contextmanager
def signed_in(user: tuple[str, str]):
    """This process's MLflow clients send `user`'s credentials (they read the environment)."""
    saved = {key: os.environ.get(key) for key in credentials(user)}
    os.environ.update(credentials(user))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """The server's URI; its users and the experiment exist."""
    from mlflow.server import get_app_client

    root = tmp_path_factory.mktemp("auth_server")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    with serve_mlflow(root, "--app-name", "basic-auth", "--artifacts-destination",
                      str(root / "artifacts"), env=env) as uri:
        with signed_in(ADMIN):
            users = get_app_client("basic-auth", tracking_uri=uri)
            for name, password in (WRITER, READER):
                users.create_user(name, password)
            experiment_id = MlflowClient(uri).create_experiment(EXPERIMENT)
            users.grant_user_permission(WRITER[0], "experiment", experiment_id, "EDIT")
        yield uri


def assert_no_password(proc, workdir: Path, *passwords: str) -> None:
    """Neither the output nor any file the job left (run dirs, logs, configs) holds a password."""
    texts = [proc.stdout, proc.stderr] + [p.read_text(errors="replace")
                                          for p in workdir.rglob("*") if p.is_file()
                                          and p.suffix != ".pt" and p.name != "mlflow.db"]
    for password in passwords:
        assert not any(password in text for text in texts)


def assert_stopped_before_work(proc, workdir: Path, line: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [line]
    assert not [p for p in (workdir / "outputs").rglob("*") if p.is_file()]  # no run dir left
    assert not (workdir / "multirun").exists()


def test_right_credentials_log_a_run(server, workdir):
    proc = run_cli(*ARGS, f"logger.tracking_uri={server}", cwd=workdir, env=credentials(WRITER))
    assert proc.returncode == 0, proc.stderr
    with signed_in(WRITER):
        client = MlflowClient(server)
        [run] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["global_step"] == 45  # 1437 digits, batch 32: 45 optimizer steps
    assert run.data.params["logger.tracking_uri"] == server
    assert not any(WRITER[1] in value for value in run.data.params.values())
    assert_no_password(proc, workdir, WRITER[1])


@pytest.mark.parametrize("user,answer", [
    (None, "a request without credentials; fix: set MLFLOW_TRACKING_USERNAME and "
           "MLFLOW_TRACKING_PASSWORD in the environment"),
    ((WRITER[0], "not-the-password"),
     "user writer; fix: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the "
     "environment to a user of this server and that user's password"),
])
def test_missing_or_wrong_credentials_stop_before_any_work(server, workdir, user, answer):
    proc = run_cli(*ARGS, f"logger.tracking_uri={server}", cwd=workdir,
                   env=credentials(user) if user else {})
    assert_stopped_before_work(proc, workdir, f"error: logger.tracking_uri={server}: the server "
                               f"answered HTTP 401 (You are not authenticated) to {answer}")
    assert_no_password(proc, workdir, "not-the-password")


def test_a_read_only_user_is_told_to_use_one_who_may_write(server, workdir):
    with signed_in(ADMIN):
        client = MlflowClient(server)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs_before = len(client.search_runs([experiment.experiment_id]))
    proc = run_cli(*ARGS, f"logger.tracking_uri={server}", cwd=workdir, env=credentials(READER))
    assert_stopped_before_work(
        proc, workdir, f"error: logger.tracking_uri={server}: the server answered HTTP 403 "
        f"(Permission denied) to user reader writing to experiment {EXPERIMENT}; fix: use a user "
        f"with write (EDIT or MANAGE) permission on experiment {EXPERIMENT} (an admin grants it), "
        "or another logger.experiment_name")
    assert_no_password(proc, workdir, READER[1])
    with signed_in(ADMIN):  # the write probe wrote nothing
        assert client.get_experiment(experiment.experiment_id).tags == experiment.tags
        assert len(client.search_runs([experiment.experiment_id])) == runs_before


def test_a_sweep_without_credentials_stops_before_its_first_job(server, workdir):
    proc = run_cli("-m", *ARGS, "accum=1,2", f"logger.tracking_uri={server}", cwd=workdir)
    assert_stopped_before_work(
        proc, workdir, f"error: logger.tracking_uri={server}: the server answered HTTP 401 "
        "(You are not authenticated) to a request without credentials; fix: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")


@pytest.mark.parametrize("sweep", [False, True])
def test_a_password_in_the_uri_is_refused_and_not_shown(workdir, sweep):
    """Checked before any request: the URI would be written to the config, params and logs."""
    uri = f"http://{WRITER[0]}:{WRITER[1]}@127.0.0.1:9"
    proc = run_cli(*(["-m", "accum=1,2"] if sweep else []), *ARGS, f"logger.tracking_uri={uri}",
                   cwd=workdir)
    assert_stopped_before_work(
        proc, workdir, "error: logger.tracking_uri=http://writer:***@127.0.0.1:9: holds a "
        "password, which would be written to the run's config, MLflow params and logs; fix: "
        "remove user:password@ from the URI and set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD in the environment")
    assert_no_password(proc, workdir, WRITER[1])
