"""MLflow: the tracker (the run's owner) and the outbox that sends for it, provenance tags,
system metrics, the tracking server's answer to credentials, models in MLflow's format, replay
of what a job could not send, and sweeps (parent run, report, best child).

Layer 8 of 9: may import `contract`, `config`, `parallel`, `data`, `models`, `loop`, `callbacks`.
"""
