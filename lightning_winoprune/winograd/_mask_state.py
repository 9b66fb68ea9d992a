"""What a Winograd layer derives from its mask, in one object (:class:`MaskState`).

The mask as floats and as bits, the sparse plan and the measured route per input key; rebuilt when the mask changes,
never saved.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from lightning_winoprune.winograd._mask import keep_bits
from lightning_winoprune.winograd._sparse import SparsePlan, build_plan

if TYPE_CHECKING:
    from lightning_winoprune.winograd._autotune import Route

__all__ = ["MaskState"]


class MaskState:
    """What a layer derives from one mask (the sparse plan, the measured route per input key); never saved.

    Valid while the layer's mask is this very tensor at this version (an in-place edit bumps ``_version``). Holding
    the tensor keeps its ``id`` from being reused by a new mask.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.version = mask._version
        self.plan: SparsePlan | None = None
        self.routes: dict[tuple[Any, ...], Route] = {}
        self._bits: dict[torch.dtype, torch.Tensor] = {}
        self._values: dict[torch.dtype, torch.Tensor] = {}

    def bits(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask's bit pattern for floats of ``dtype`` (:func:`keep_bits`), in the mask's layout."""
        if dtype not in self._bits:
            self._bits[dtype] = keep_bits(self.mask, dtype)
        return self._bits[dtype]

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as floats of ``dtype`` (1 keeps, 0 prunes) for a gradient multiply (a bool multiply is slower)."""
        if dtype not in self._values:
            self._values[dtype] = self.mask.to(dtype)
        return self._values[dtype]

    def matches(self, mask: torch.Tensor) -> bool:
        return self.mask is mask and self.version == mask._version

    # A copied or unpickled tensor starts at version 0: a state that was current stays current for the copied mask
    # (so a copy keeps the measured routes and computes exactly what the original does), a stale one stays stale.
    def __deepcopy__(self, memo: dict[int, Any]) -> MaskState:
        new = MaskState.__new__(MaskState)
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        new.version = new.mask._version if self.matches(self.mask) else -1
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "version": "current" if self.matches(self.mask) else -1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if state["version"] == "current":
            self.version = self.mask._version

    def get_plan(self) -> SparsePlan:
        if self.plan is None:
            self.plan = build_plan(self.mask)
        return self.plan
