"""How a Winograd layer computes its output (:class:`Route`), and how ``auto`` chooses.

By rule, or in training by timing the candidates once per input key (:func:`choose_route`, :func:`measure_routes`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from lightning_winoprune._enum import ParsableEnum
from lightning_winoprune._utils import device_sync, median_ms
from lightning_winoprune.winograd._tiles import capturing

if TYPE_CHECKING:
    from collections.abc import Callable

    from lightning_winoprune.winograd._layer import WinogradConv2d

__all__ = ["MASKING_ROUTES", "SPARSE_WORK_FRACTION", "TIMING_REPS", "Route", "choose_route", "measure_routes"]


class Route(ParsableEnum):
    """How a :class:`WinogradConv2d` computes its output. All routes are exact reformulations of the same map.

    * ``auto``: without a mask, ``unrolled`` when the whole output fits in one tile and that is cheaper, else
      ``bgemm``. With a mask, in training (module in train mode, autograd enabled) the layer *measures*: on the first
      forward pass for an input shape and mask version it times forward + backward of ``bgemm``, ``sparse`` and
      (where the rule above picks it) ``unrolled`` on detached copies of that input (median of a few repetitions)
      and keeps the fastest for that key (:attr:`WinogradConv2d.last_route` says which one ran). In eval mode,
      without autograd, or under ``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``:
      timed choices could differ between runs, and routes agree only up to float rounding) it chooses without
      timing: the rule above when it picks ``unrolled``, else ``sparse`` when the sparse GEMMs do at most 60% of
      the dense multiply-adds (``Rmax * Cmax <= 0.6 * K * C``), else ``bgemm``.
    * ``bgemm``: input transform -> one GEMM per Winograd position -> output transform (an explicit autograd
      function whose tile transforms run in the native extension when available).
    * ``sparse``: ``bgemm`` restricted to the rows and columns of every ``U[xi]`` that the mask keeps (gathered,
      padded to the largest position, scattered back); pruned weights receive an exactly zero gradient by
      construction. Without a mask it is ``bgemm``.
    * ``unrolled``: for single-tile geometries (small feature maps), the layer as one dense matrix product over the
      Winograd positions that reach the output; like ``sparse`` it always applies the mask itself, so pruned
      entries (and the positions it leaves out) get an exactly zero gradient by construction.
    * ``phase``: ``pixel_shuffle(conv2d(pad(x), E(U), stride=m))``; runs on any conv backend and exports to ONNX.
    """

    AUTO = "auto"
    BGEMM = "bgemm"
    SPARSE = "sparse"
    UNROLLED = "unrolled"
    PHASE = "phase"



#: Routes that apply the mask themselves whatever ``mask_in_forward`` says (pruned entries get exactly zero grad).
MASKING_ROUTES = (Route.SPARSE, Route.UNROLLED)
#: ``auto`` outside training takes the ``sparse`` route when its GEMMs do at most this share of the dense multiply-adds.
SPARSE_WORK_FRACTION = 0.6
#: Timed repetitions (after one warm-up) per candidate when ``auto`` measures the routes of a masked layer.
TIMING_REPS = 3


def _median_time(fn: Callable[[], None], device: torch.device, reps: int = TIMING_REPS) -> float:
    """Median wall time in seconds of ``fn()`` over ``reps`` calls after one warm-up call."""
    return median_ms({"fn": fn}, reps, 1, sync=device_sync(device))["fn"] / 1e3


def choose_route(layer: WinogradConv2d, x: torch.Tensor) -> Route:
    """The route of this forward pass (see :class:`Route`); may time the candidates once per key in training."""
    base = layer.resolve_route(x.shape[-2], x.shape[-1], x.shape[0])
    if layer.route is not Route.AUTO or layer.mask is None or x.shape[0] == 0 or capturing():
        return base
    state = layer._mask_state()
    plan = state.get_plan()
    if plan.work_fraction >= 1.0:  # nothing to skip: sparse would be bgemm with extra copies
        return base
    if not (layer.training and torch.is_grad_enabled()) or torch.are_deterministic_algorithms_enabled():
        if base is Route.UNROLLED:
            return base
        return Route.SPARSE if plan.work_fraction <= SPARSE_WORK_FRACTION else Route.BGEMM
    key = (tuple(x.shape), x.dtype, x.device, x.requires_grad, layer.mask_in_forward, layer.backend)
    route = state.routes.get(key)
    if route is None:
        candidates = [Route.BGEMM, Route.SPARSE] + ([Route.UNROLLED] if base is Route.UNROLLED else [])
        route = state.routes[key] = measure_routes(layer, x, candidates)
    return route

def measure_routes(layer: WinogradConv2d, x: torch.Tensor, candidates: list[Route]) -> Route:
    """The candidate whose forward + backward on (detached copies of) ``x`` and the parameters is fastest.

    With ``mask_in_forward`` off, a route other than ``sparse`` and ``unrolled`` leaves the weight's gradient to be
    masked by whoever turned the masking off (a pruning callback, once per step); that multiply is part of its
    cost here.
    """
    xd = x.detach().requires_grad_(x.requires_grad)
    wd = layer.weight.detach().requires_grad_(layer.weight.requires_grad)
    bd = None if layer.bias is None else layer.bias.detach().requires_grad_(layer.bias.requires_grad)
    inputs = [t for t in (xd, wd, bd) if t is not None and t.requires_grad]
    grad_mask = layer.mask_value() if wd.requires_grad and not layer.mask_in_forward else None
    w_at = next((i for i, t in enumerate(inputs) if t is wd), -1)

    def step(route: Route) -> None:
        y = layer._run(route, xd, wd, bd)
        if inputs:
            grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
            if grad_mask is not None and route not in MASKING_ROUTES:
                grads[w_at].mul_(grad_mask)

    with torch.enable_grad():
        times = {route: _median_time(functools.partial(step, route), x.device) for route in candidates}
    return min(candidates, key=times.__getitem__)
