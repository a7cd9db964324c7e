"""`import torchvision` that also works next to a CPU-only torch.

PyPI's torchvision wheels are built against CUDA torch; next to a CPU torch build their C
extension (nms, roi_align, image decoding) cannot load, and torchvision >= 0.20 then fails at
import while registering a fake kernel for `torchvision::nms`. Defining the two op schemas it
needs first lets the pure-Python parts stepwise uses (datasets, transforms, models) import and
run; the missing C ops still raise if something calls them.
"""

from __future__ import annotations

import sys
from types import ModuleType

_LIBRARIES: list = []  # a torch.library.Library must stay alive for its definitions to last


def torchvision() -> ModuleType:
    try:
        import torchvision as tv

        return tv
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import's half-initialised modules
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)
    import torchvision as tv

    return tv
