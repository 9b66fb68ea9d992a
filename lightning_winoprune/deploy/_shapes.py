"""The input shapes a deployed model takes: ``deploy(..., dynamic=...)``, the smallest H / W and its checks.

Routes are chosen (and timed) at the example input's shape only. With a dynamic H / W, :func:`resolve_shapes` finds
the smallest input height and width the deployed model runs at (by probing: a binary search with one-image forward
passes, assuming that a model that runs at some size runs at every larger one, as convs and pools do) and checks
the deployed model's output against the model's at that smallest size and at a larger, odd one. The kernels behind
every route compute the same function at any size, so two more sizes catch what differs: a layer that only runs at
one size (a conv that covers its whole input, then a ``Linear``) or a route that does not generalize.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lightning_winoprune.deploy._timing import rel_error

__all__ = ["DYNAMIC_CHOICES", "MAX_SIZE", "DeployShapes", "check_dynamic", "probe_min_hw", "resolve_shapes"]

#: The values of ``deploy(..., dynamic=...)``: which input dims an exported deployed model leaves free.
DYNAMIC_CHOICES = ("batch", "none", "batch+hw", "hw")
#: The largest batch size, height and width of a dynamic dim (a generous bound; export needs one).
MAX_SIZE = 4096


@dataclass(frozen=True)
class DeployShapes:
    """The input shapes a deployed model is exported for (``deployed.deploy_shapes``).

    Attributes:
        dynamic: One of ``"batch"`` (any batch size, the example's H x W), ``"none"``
            (the example's shape only), ``"batch+hw"`` (any batch size and any H, W in range) or ``"hw"`` (the
            example's batch size, any H, W in range).
        example_shape: ``(N, C, H, W)`` of the example input the routes were tuned at.
        min_hw: The smallest ``(H, W)`` (the example's when H / W are static).
        max_hw: The largest ``(H, W)`` (the example's when H / W are static).
        max_batch: The largest batch size (the example's when the batch is static).

    """

    dynamic: str
    example_shape: tuple[int, int, int, int]
    min_hw: tuple[int, int]
    max_hw: tuple[int, int]
    max_batch: int

    @property
    def dynamic_batch(self) -> bool:
        """Whether the batch size is free."""
        return self.dynamic in ("batch", "batch+hw")

    @property
    def dynamic_hw(self) -> bool:
        """Whether H and W are free (within ``min_hw`` .. ``max_hw``)."""
        return self.dynamic in ("batch+hw", "hw")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeployShapes:
        """The inverse of ``to_dict``.

        Raises:
            ValueError: If a field is missing or has the wrong type or value.

        """
        try:
            shapes = cls(check_dynamic(data["dynamic"]), _ints(data["example_shape"], 4),  # type: ignore[arg-type]
                         _ints(data["min_hw"], 2), _ints(data["max_hw"], 2),  # type: ignore[arg-type]
                         int(data["max_batch"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"bad deploy shapes {data!r}: {type(err).__name__}: {err}") from None
        if not all(1 <= lo <= hi for lo, hi in zip(shapes.min_hw, shapes.max_hw, strict=True)):
            raise ValueError(f"bad deploy shapes {data!r}: min_hw must be >= 1 and <= max_hw")
        return shapes


def _ints(value: Any, n: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(isinstance(v, int) for v in value):
        raise TypeError(f"expected {n} ints, got {value!r}")
    return tuple(int(v) for v in value)


def check_dynamic(dynamic: object) -> str:
    """``dynamic`` itself if it is one of :data:`DYNAMIC_CHOICES`.

    Raises:
        ValueError: Naming the bad value and the valid choices.

    """
    if not isinstance(dynamic, str) or dynamic not in DYNAMIC_CHOICES:
        raise ValueError(f"dynamic must be one of {', '.join(map(repr, DYNAMIC_CHOICES))}, got {dynamic!r}")
    return dynamic


def _runs(model: nn.Module, channels: int, h: int, w: int) -> bool:
    try:
        model(torch.zeros(1, channels, h, w))
    except (RuntimeError, ValueError, IndexError):  # a layer's output would be empty, or a shape does not fit
        return False
    return True


def probe_min_hw(model: nn.Module, example_shape: tuple[int, ...]) -> tuple[int, int]:
    """The smallest ``(H, W)`` ``model`` runs at: a binary search on each dim with the other at the example's.

    It assumes that a size the model runs at implies every larger size runs too (true of convs and pools, whose
    output sizes grow with the input's); the caller checks the result.
    """
    c, h, w = int(example_shape[1]), int(example_shape[2]), int(example_shape[3])
    found = []
    for dim, size in ((2, h), (3, w)):
        lo, hi = 1, size  # the example's size runs
        while lo < hi:
            mid = (lo + hi) // 2
            if _runs(model, c, mid, w) if dim == 2 else _runs(model, c, h, mid):
                hi = mid
            else:
                lo = mid + 1
        found.append(lo)
    return found[0], found[1]


def _larger(size: int) -> int:
    """A larger, odd size than ``size`` (within :data:`MAX_SIZE`)."""
    return min(MAX_SIZE, (size + max(1, size // 2)) | 1)


def resolve_shapes(dynamic: str, x: torch.Tensor, deployed: nn.Module,
                   model: nn.Module) -> tuple[DeployShapes, list[tuple[tuple[int, int], float]]]:
    """The :class:`DeployShapes` of a deployed model, and its output error at each extra size it was checked at.

    Args:
        dynamic: One of :data:`DYNAMIC_CHOICES`.
        x: The example input (CPU float32).
        deployed: The deployed model.
        model: The model as given (the reference; copied to the CPU in float32 when H / W are dynamic).

    Returns:
        ``(shapes, [((H, W), relative max error), ...])``; the list is empty unless H / W are dynamic.

    Raises:
        ValueError: If H / W are dynamic but the deployed model or the model fails at a size inside the range.

    """
    n, c, h, w = (int(s) for s in x.shape)
    batch = MAX_SIZE if dynamic in ("batch", "batch+hw") else n
    if dynamic not in ("batch+hw", "hw"):
        return DeployShapes(dynamic, (n, c, h, w), (h, w), (h, w), batch), []
    min_hw = probe_min_hw(deployed, (n, c, h, w))
    reference = copy.deepcopy(model).to("cpu").float().eval()
    checks = []
    for size in (min_hw, (_larger(h), _larger(w))):
        xi = torch.randn(1, c, *size, generator=torch.Generator().manual_seed(size[0] * 7919 + size[1]))
        try:
            out, ref = deployed(xi), reference(xi)
        except (RuntimeError, ValueError, IndexError) as err:
            text = " ".join(str(err).split())[:200]
            raise ValueError(f"dynamic={dynamic!r} needs a model that runs at every H x W from {min_hw[0]}x"
                             f"{min_hw[1]} up, but it fails at {size[0]}x{size[1]} ({type(err).__name__}: {text}); "
                             "deploy with dynamic='batch' (this size only) instead") from None
        if out.shape != ref.shape:
            raise ValueError(f"dynamic={dynamic!r}: at {size[0]}x{size[1]} the deployed model's output has shape "
                             f"{tuple(out.shape)}, the model's {tuple(ref.shape)}; deploy with dynamic='batch'")
        checks.append((size, rel_error(out, ref)))
    return DeployShapes(dynamic, (n, c, h, w), min_hw, (MAX_SIZE, MAX_SIZE), batch), checks
