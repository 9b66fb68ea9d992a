"""Importance estimators and the budgeted per-layer policy choice (``docs/pruning.md``).

* :func:`taylor_importance`: first-order Taylor saliency ``|w * dL/dw|`` per weight, :func:`layer_scores` per layer.
* :func:`measure_sensitivity`: the loss increase of each :class:`Candidate` when only that layer is pruned.
* :class:`LatencyTable`: per-(layer, candidate) latency; :class:`TorchLatencyTable` times the pruned BGEMM step with
  torch ops, :class:`NativeLatencyTable` times the whole pruned layer on the native kernels, and
  :class:`DictLatencyTable` holds numbers measured elsewhere (the extension point).
* :func:`choose_under_budget`: one candidate per layer, least total loss increase within a latency budget.
"""

from lightning_winoprune.importance._budget import choose_under_budget
from lightning_winoprune.importance._latency import (
    DictLatencyTable,
    LatencyTable,
    NativeLatencyTable,
    TorchLatencyTable,
)
from lightning_winoprune.importance._sensitivity import DENSE, Candidate, measure_sensitivity
from lightning_winoprune.importance._taylor import layer_scores, taylor_importance

__all__ = [
    "DENSE",
    "Candidate",
    "DictLatencyTable",
    "LatencyTable",
    "NativeLatencyTable",
    "TorchLatencyTable",
    "choose_under_budget",
    "layer_scores",
    "measure_sensitivity",
    "taylor_importance",
]
