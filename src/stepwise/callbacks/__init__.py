"""Callbacks: your own behaviour in the loop, by `_target_` in the `callbacks` group. `Callback`
is the base class to subclass (its hooks: stepwise/loop/callbacks.py); the built-ins are `EMA`,
`LRMonitor` and `SampleLogger`.

Configs name them by their short path, `stepwise.callbacks.<Name>`: attributes of this package,
imported from their module on first use (PEP 562), so that importing it imports no torch.

Layer 7 of 9: may import `contract`, `config`, `parallel`, `data`, `models`, `loop`.
"""

from __future__ import annotations

import importlib
from typing import Any

# short name -> the module that defines it (Callback and RunView are the loop's)
_EXPORTS = {
    "Callback": "stepwise.loop.callbacks", "RunView": "stepwise.loop.callbacks",
    "EMA": "stepwise.callbacks.ema", "LRMonitor": "stepwise.callbacks.lr_monitor",
    "SampleLogger": "stepwise.callbacks.samples",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
