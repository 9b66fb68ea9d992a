"""Files in and out: checkpoints loaded without running their pickle's code, files written atomically.

A Lightning checkpoint is a pickle. Unpickled with ``weights_only=False`` it can run any code its author put in it,
so every checkpoint this package reads goes through :func:`load_checkpoint`: torch's restricted unpickler
(``weights_only=True``) with exactly the globals our own checkpoints need allowed, and a one-line
:class:`CheckpointError` for a file that is missing, truncated, not a checkpoint, or asks for more. Reading a file
that needs more is an explicit opt-in (``trust=True``) for a file the user made.

Every file this package writes (checkpoints, ``.pt2`` artifacts, reports) goes through :func:`atomic_write`: the
bytes go to a temporary file in the target's folder, are flushed to disk, and replace the target in one rename, so a
process killed at any point leaves either the old file or the new one under the final name, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["SAFE_GLOBALS", "CheckpointError", "UntrustedCheckpointError", "atomic_save", "atomic_write",
           "load_checkpoint"]

#: Globals our checkpoints hold beyond torch's own ``weights_only`` allowlist (which already has tensors, storages,
#: ``OrderedDict``, ``Counter`` for ``MultiStepLR``'s milestones and ``torch.Size``). The Trainer's loops, optimizer
#: and scheduler states, the recipes' hyper-parameters and the pruning callbacks' states are plain containers,
#: strings and numbers, so nothing is needed today; a class added here must be a plain data holder.
SAFE_GLOBALS: tuple[Any, ...] = ()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message is one line naming the file and what is wrong."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint whose pickle needs globals outside the allowlist: loading it could run code its author chose."""


def _describe(path: Path, err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:150] + ("..." if len(text) > 150 else "") or type(err).__name__


def _refused_global(err: BaseException) -> str | None:
    """The global named by torch's weights-only refusal (``GLOBAL os.system was not an allowed global``), if any."""
    text = str(err)
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        at = text.find(marker)
        if at >= 0:
            return text[at + len(marker):].split()[0]
    return None


def load_checkpoint(path: str | Path, trust: bool = False, trust_hint: str = "trust=True") -> dict[str, Any]:
    """Read a checkpoint into a dict, on the CPU, without running code from the file.

    Args:
        path: The file.
        trust: Unpickle with ``weights_only=False`` (only for a file you made yourself: its pickle can run code).
        trust_hint: How the caller's user opts in, named in the error (``--trust-checkpoint`` in the CLI).

    Returns:
        The checkpoint's top-level dict.

    Raises:
        CheckpointError: If the file is missing, truncated, not a torch checkpoint, or not a dict.
        UntrustedCheckpointError: If it needs globals outside :data:`SAFE_GLOBALS` and torch's allowlist (the
            pickle's code never runs).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(file)!r}: no such file")
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"checkpoint {str(file)!r} is not a torch checkpoint (not a zip archive: truncated, or "
                              "another kind of file)")
    try:
        if trust:
            ckpt = torch.load(file, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is None:
            raise CheckpointError(f"checkpoint {str(file)!r} cannot be read: {_describe(file, err)}") from None
        raise UntrustedCheckpointError(
            f"checkpoint {str(file)!r} was refused: its pickle needs {name}, which our checkpoints never hold, and "
            f"loading it could run code; if you made the file yourself, pass {trust_hint}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(file)!r} cannot be read (truncated or damaged?): "
                              f"{_describe(file, err)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(file)!r} holds a {type(ckpt).__name__}, not a Lightning checkpoint "
                              "dict")
    return ckpt


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one rename.

    The data is flushed and fsynced before the rename and the folder after it. On an exception the temporary file
    is removed and ``path`` keeps what it held before.

    Args:
        path: The final file name (its folder is created if needed).
        mode: ``"wb"`` or ``"w"``.

    Yields:
        The open temporary file.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_save(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary binary file that then replaces ``path`` atomically; return ``path``."""
    with atomic_write(path, "wb") as f:
        write(f)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
