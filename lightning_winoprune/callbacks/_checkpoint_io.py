"""A Trainer checkpoint plugin: every checkpoint written atomically and read without running the file's code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_winoprune._io import atomic_save, load_checkpoint

__all__ = ["SafeCheckpointIO"]


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` for local files that is safe against crashes and against other people's files.

    * **Save**: the checkpoint is written to a temporary file in the checkpoint's folder, fsynced, then renamed over
      the final name. A run killed at any moment (``SIGKILL`` included) leaves the newest complete checkpoint under
      its name, never a truncated one. Lightning's own ``TorchCheckpointIO`` writes through a temporary file in the
      system's temp folder, which is a copy rather than a rename when that folder is on another file system.
    * **Load** (``--ckpt_path``, ``trainer.test(ckpt_path=...)``): ``torch.load(weights_only=True)`` with the
      package's allowlist, so a checkpoint someone else made cannot run code when a run resumes from it. A file that
      needs more is refused with one line naming it; ``trust=True`` lifts the restriction for files you made.

    The recipes' CLI installs it unless ``--trainer.plugins`` names another ``CheckpointIO``::

        trainer = Trainer(plugins=[SafeCheckpointIO()])

    Args:
        trust: Unpickle without restrictions (only for checkpoints you made yourself).
    """

    #: How a refused file's error tells the user to opt in (the CLI names its own flag).
    trust_hint = "SafeCheckpointIO(trust=True)"

    def __init__(self, trust: bool = False) -> None:
        super().__init__()
        self.trust = trust

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"SafeCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}")
        atomic_save(Path(path), lambda f: torch.save(checkpoint, f))

    @override
    def load_checkpoint(self, path: Any, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        trust = self.trust or weights_only is False  # an explicit weights_only=False from the caller is a trust opt-in
        return load_checkpoint(Path(path), trust=trust, trust_hint=self.trust_hint)
