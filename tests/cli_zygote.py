"""A fork server for `run_cli`: `python train.py <args>` as a forked child of a process that has
already imported torch, MLflow and Hydra.

Each CLI test used to pay 3-5 s of imports (torch, MLflow with its SQLAlchemy store, Hydra) before
its job did anything. This process imports those third-party packages once, then for each
request forks a child that becomes `python train.py <args>`: its own process, pid, process group,
working directory, environment, stdin, stdout and stderr, exit status, atexit handlers and
threads, with `train.py` run as `__main__` (so DDP workers, which are spawned fresh, import it as
they would). stepwise itself is imported fresh in every child, so its own import order is
exercised as in a real process. What a child cannot get this way (a different interpreter flag,
LD_PRELOAD, thread or ISA settings read when torch loads) is run as a real subprocess by
`tests.conftest.run_cli`; so is every test about start-up itself (tests/integration/test_startup.py).

Protocol (one request at a time): a JSON line on stdin,
`{"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path}`; the server answers
on the file descriptor its argument names, with `{"pid": N}` once the child runs, then
`{"status": <exit status>}` (negative: the signal that ended it, as Popen.returncode says it).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import threading

# The third-party packages a training run imports (never stepwise: see above). Importing them
# starts no thread, which keeps fork safe; the check below holds it to that.
# torchvision is left out: stepwise imports it its own way beside a CPU torch (vision.py), and so
# is torchmetrics, which imports it. About 5 s of imports on a busy 2-core machine.
PRELOAD = ("numpy", "torch", "torch.distributed", "torch._dynamo", "mlflow", "mlflow.tracking",
           "mlflow.pytorch", "mlflow.store.tracking.sqlalchemy_store", "hydra", "omegaconf", "yaml")


def _child(request: dict, base_path: list[str], answer_fd: int) -> None:
    """Become `python train.py <argv>` and exit with the status a real process would have."""
    os.setsid()  # its own process group, as the test may kill it with everything it started
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.dup2(devnull, answer_fd)  # the server's answers are not the job's
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][0]
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(script), *extra, *base_path]
    sys.argv[:] = request["argv"]
    gc.enable()
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    # What the interpreter does at exit, without tearing down the modules: that teardown writes
    # to every inherited object, copying the server's whole heap page by page (0.8-2 s a child).
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _exit_status(code) -> int:
    """The exit status `sys.exit(code)` gives an interpreter."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def serve(answer_fd: int) -> None:
    """Answer requests until stdin closes."""
    for name in PRELOAD:
        __import__(name)
    if threading.active_count() != 1:
        raise SystemExit(f"cli_zygote: preloading started threads {threading.enumerate()}; "
                         "forking would be unsafe")
    # Objects the children inherit are not scanned by their collector (nor copied by it).
    gc.disable()
    gc.freeze()
    base_path = sys.path[1:]  # sys.path[0] is this file's directory, not train.py's
    answer = os.fdopen(answer_fd, "w", buffering=1)
    answer.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, base_path, answer_fd)
        answer.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answer.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]))
