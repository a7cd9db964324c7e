"""System metrics (CPU, memory, disk, network, and the GPU when there is one) of the job's host,
sampled by MLflow's own monitors and sent through the run's outbox.

MLflow's `SystemMetricsMonitor` logs synchronously and stops for good at its first failed
request (it asks the server for the run's status after each sample): a tracking server that
blinks would end the system metrics for the rest of the run. Its sampling is reused here; the
publishing goes through the outbox instead, which keeps and retries.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("stepwise.tracking")

PREFIX = "system/"


class SystemMetrics:
    """A daemon thread that samples every `interval_s` seconds and queues `system/*` metrics
    (step 0, 1, 2, ... as MLflow's monitor numbers them)."""

    def __init__(self, outbox, interval_s: float, first_step: int = 0) -> None:
        self.outbox, self.interval_s, self.first_step = outbox, interval_s, first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stepwise-system-metrics",
                                        daemon=True)
        self.monitors = []

    def start(self) -> None:
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

            self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        except ImportError as err:  # psutil is a dependency; a broken install only warns
            log.warning("no system metrics: %s", err)
            return
        self.monitors += _gpu_monitor()
        import psutil

        psutil.cpu_percent()  # its first answer is the CPU use since this call
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, after one last sample (a short run still gets one)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        step = self.first_step
        while True:
            stopping = self._stop.wait(self.interval_s)
            metrics = {}
            for monitor in self.monitors:
                try:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                finally:
                    monitor.clear_metrics()
            now = int(time.time() * 1000)
            self.outbox.put(("metrics", [[PREFIX + key, float(value), now, step]
                                         for key, value in metrics.items()]))
            step += 1
            if stopping:
                return


def _gpu_monitor() -> list:
    """MLflow's NVIDIA (pynvml) or AMD (pyrsmi) monitor when a GPU answers, else none."""
    import torch

    if not torch.cuda.is_available():
        return []
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    for monitor in (GPUMonitor, ROCMMonitor):
        try:
            return [monitor()]
        except Exception as err:
            reason = err
    log.warning("no GPU system metrics: %s (pip install nvidia-ml-py)", reason)
    return []
