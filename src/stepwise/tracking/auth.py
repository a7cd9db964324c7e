"""A tracking server's answer to this job's credentials, asked before any work.

An MLflow server run with `--app-name basic-auth` answers HTTP 401 to missing or wrong
credentials and 403 to a user without write permission on the experiment; MLflow's client turns
either into a traceback once the run is opened, after the plan is printed and the run directory
written. `check_access` asks the same questions first, with the credentials MLflow's client will
send (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, ~/.mlflow/credentials, a token), and
reports a refusal as one ConfigError line. No password is ever part of what it says.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from stepwise.contract.errors import ConfigError
from stepwise.tracking.tracker import SERVER_TIMEOUT_S, check_reachable, default_tracking_uri

log = logging.getLogger(__name__)

KEY = "logger.tracking_uri"
# The server has answered /health within SERVER_TIMEOUT_S already; checking a password (a
# deliberately slow hash) on a busy server took longer than that in tests on 2 shared cores.
ACCESS_TIMEOUT_S = 6 * SERVER_TIMEOUT_S
API = "/api/2.0/mlflow/experiments"
CREDENTIALS_FIX = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"


def check_tracking(logger: Any, start_dir: Any, dry_run: bool) -> None:
    """The start-up checks of the job's tracking URI (`logger` is the config's LoggerConfig):
    no password in it, and, unless this is a dry run, a server that lets this job write."""
    if logger.backend != "mlflow":
        return
    uri = default_tracking_uri(logger.tracking_uri, start_dir)
    check_no_password(uri)
    if not dry_run:
        check_access(uri, logger.experiment_name)


def check_no_password(uri: str) -> None:
    """A URI of the form http://user:password@host would carry the password into the resolved
    config, the MLflow params and the logs, which all record the URI."""
    parts = urlsplit(uri)
    if parts.password is None:
        return
    host = parts.netloc.rsplit("@", 1)[1]
    shown = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    raise ConfigError(KEY, shown, "holds a password, which would be written to the run's config, "
                      "MLflow params and logs", f"remove user:password@ from the URI and "
                      f"{CREDENTIALS_FIX}")


def check_access(uri: str, experiment_name: str) -> None:
    """ConfigError unless an http(s) server answers, accepts this job's credentials and lets
    them write to `experiment_name` (or create it). Other stores are not asked anything.

    The write question is asked with a request the server authorises before it reads the body,
    and whose body it then refuses (a required field left out): 403 means no permission, 400
    means the write would be allowed, and nothing is written either way.
    """
    check_reachable(uri)
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    found = _ask(uri, creds, "GET", f"{API}/get-by-name",
                 params={"experiment_name": experiment_name})
    if found is None:
        return
    if found.status_code == 200:
        experiment_id = found.json()["experiment"]["experiment_id"]
        probe = _ask(uri, creds, "POST", f"{API}/set-experiment-tag",
                     json={"experiment_id": experiment_id})  # no key: refused after authorising
        doing = f"writing to experiment {experiment_name}"
        fix = (f"use a user with write (EDIT or MANAGE) permission on experiment "
               f"{experiment_name} (an admin grants it), or another logger.experiment_name")
    elif found.status_code == 404:  # the run will create it: the same probe, without a name
        probe = _ask(uri, creds, "POST", f"{API}/create", json={})
        doing = f"creating experiment {experiment_name}"
        fix = ("use a user who may create experiments, or set logger.experiment_name to one "
               "this user may write to (EDIT or MANAGE permission)")
    else:
        return  # not a question of access: the tracker reports what it finds
    if probe is not None and probe.status_code == 403:
        raise ConfigError(KEY, uri, f"the server answered {_answer(probe, creds)} to "
                          f"{_who(creds)} {doing}", fix)


def _ask(uri: str, creds: Any, method: str, endpoint: str, **kwargs: Any):
    """One request, no retries: its response, or None if none came in ACCESS_TIMEOUT_S (then
    the question stays open, and MLflow's client, which retries, meets whatever is wrong).
    401, and 403 to a read, end here."""
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(creds, endpoint, method, max_retries=0, backoff_factor=0,
                                timeout=ACCESS_TIMEOUT_S, raise_on_status=False, **kwargs)
    except Exception as err:  # MLflow wraps connection errors and timeouts in MlflowException
        log.warning("%s: could not ask whether this job may write there (%s); going on", uri,
                    _redacted(str(err), creds))
        return None
    if response.status_code == 401:
        raise ConfigError(KEY, uri, f"the server answered {_answer(response, creds)} to "
                          f"{_who(creds)}", _credentials_fix(creds))
    if response.status_code == 403 and method == "GET":
        raise ConfigError(KEY, uri, f"the server answered {_answer(response, creds)} to "
                          f"{_who(creds)} reading experiment {kwargs['params']['experiment_name']}",
                          "use a user with write (EDIT or MANAGE) permission on that experiment "
                          "(an admin grants it), or another logger.experiment_name")
    return response


def _who(creds: Any) -> str:
    """Whose request it was, by user name only: the password is never shown."""
    if creds.username and creds.password:
        return f"user {creds.username}"
    if creds.token:
        return "the token in MLFLOW_TRACKING_TOKEN"
    if creds.username:
        return f"user {creds.username} without a password (MLFLOW_TRACKING_PASSWORD is not set)"
    return "a request without credentials"


def _credentials_fix(creds: Any) -> str:
    if creds.username and creds.password:
        return f"{CREDENTIALS_FIX} to a user of this server and that user's password"
    return CREDENTIALS_FIX


def _answer(response: Any, creds: Any) -> str:
    """`HTTP 401 (You are not authenticated)`: the status and the first sentence the server
    gave (its JSON `message`, or its text)."""
    text = response.text.strip()
    try:
        text = str(response.json().get("message", text))
    except ValueError:
        pass
    sentence = text.split(". ")[0].strip().rstrip(".")[:120]
    status = f"HTTP {response.status_code}"
    return f"{status} ({_redacted(sentence, creds)})" if sentence else status


def _redacted(text: str, creds: Any) -> str:
    """`text` without the password or token, should a server or library ever echo them."""
    for secret in (creds.password, creds.token):
        if secret:
            text = text.replace(secret, "***")
    return text
