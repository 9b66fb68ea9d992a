"""When pruning happens and how much: one-shot, or gradual with Zhu & Gupta's cubic ramp."""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["SCHEDULES", "PruningSchedule"]

SCHEDULES = ("one_shot", "gradual")


@dataclass(frozen=True)
class PruningSchedule:
    """Cumulative sparsity targets per epoch.

    ``one_shot`` prunes to ``amount`` at the start of ``start_epoch``. ``gradual`` prunes at the start of every
    ``frequency``-th epoch from ``start_epoch`` to ``end_epoch`` (inclusive), following Zhu & Gupta (2017):
    ``s_j = amount * (1 - (1 - j / n) ** 3)`` for steps ``j = 1..n``, so the last step reaches ``amount``. Every
    target is a cumulative sparsity: each step recomputes the masks for that total, never adds an increment.
    """

    kind: str = "one_shot"
    amount: float = 0.7
    start_epoch: int = 0
    end_epoch: int | None = None
    frequency: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise MisconfigurationException(f"schedule={self.kind!r} is not valid; valid values are {list(SCHEDULES)}")
        if isinstance(self.start_epoch, bool) or not isinstance(self.start_epoch, int) or self.start_epoch < 0:
            raise MisconfigurationException(f"start_epoch must be an int >= 0, got {self.start_epoch!r}")
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency < 1:
            raise MisconfigurationException(f"frequency must be an int >= 1, got {self.frequency!r}")
        end = self.end_epoch
        bad_end = end is not None and (isinstance(end, bool) or not isinstance(end, int))
        if bad_end or (self.kind == "gradual" and (self.end_epoch is None or self.end_epoch < self.start_epoch)):
            raise MisconfigurationException(
                f"schedule='gradual' needs end_epoch >= start_epoch={self.start_epoch}, got {self.end_epoch!r}"
            )

    def steps(self) -> list[tuple[int, float]]:
        """``(epoch, cumulative target)`` of every pruning step, in order."""
        if self.kind == "one_shot":
            return [(self.start_epoch, self.amount)]
        assert self.end_epoch is not None
        epochs = list(range(self.start_epoch, self.end_epoch + 1, self.frequency))
        if epochs[-1] != self.end_epoch:
            epochs.append(self.end_epoch)
        n = len(epochs)
        return [(e, self.amount * (1.0 - (1.0 - (j + 1) / n) ** 3)) for j, e in enumerate(epochs)]

    def target_at(self, epoch: int) -> float | None:
        """The cumulative target to apply at the start of ``epoch``, or ``None`` if no step falls on it."""
        return dict(self.steps()).get(epoch)
