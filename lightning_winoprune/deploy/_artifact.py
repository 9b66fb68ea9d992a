"""The deployed model as a file: ``export_deployed``, ``save_deployed`` (atomic ``.pt2``) and ``load_deployed``.

A saved model is a ``torch.export`` archive (``.pt2``) with a small JSON entry, ``extra/winoprune.json``: the
artifact format version, the package and torch versions that wrote it, the ``dynamic`` choice, the exported and the
tuned input shapes, the range of every input dim and the input dtype. :func:`load_deployed` checks the archive and
that entry before it hands the file to ``torch.export.load``, so a missing, truncated, damaged, foreign or outdated
file is refused with one line (a :class:`DeployArtifactError`) instead of a torch traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx.experimental import _config as fx_config

from lightning_winoprune._io import atomic_save
from lightning_winoprune.deploy._shapes import MAX_SIZE, DeployShapes

__all__ = ["ARTIFACT_FORMAT", "DeployArtifactError", "export_deployed", "load_deployed", "save_deployed"]

#: The version of the ``winoprune.json`` entry and of what it promises; a file of another version is refused.
ARTIFACT_FORMAT = 1
_META = "winoprune.json"
_GM_KEY = "winoprune"  # where export_deployed leaves the tuned shape on the program's graph module
_OP = re.compile(r'"target":\s*"torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?"')


class DeployArtifactError(ValueError):
    """A ``.pt2`` that :func:`load_deployed` cannot load: one line naming the file and what is wrong with it."""


def _package_version() -> str:
    try:
        return metadata.version("lightning_winoprune")
    except metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------------- export
def _shapes_of(deployed: object) -> DeployShapes:
    if not isinstance(deployed, nn.Module):
        raise TypeError(f"expected a deployed nn.Module or an ExportedProgram, got {type(deployed).__name__}")
    shapes = getattr(deployed, "deploy_shapes", None)
    if not isinstance(shapes, DeployShapes):
        raise ValueError(f"{type(deployed).__name__} has no deploy_shapes: export a model returned by "
                         "lightning_winoprune.deploy.deploy (or call torch.export.export yourself)")
    return shapes


def _example(shapes: DeployShapes, example_input: torch.Tensor | None) -> torch.Tensor:
    """The input to export at: ``example_input`` (or one of the tuned shape) with no dynamic dim of size 1."""
    if example_input is None:
        x = torch.randn(shapes.example_shape, generator=torch.Generator().manual_seed(0))
    elif not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError(f"example_input must be an (N, C, H, W) tensor, got "
                         f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    else:
        x = example_input.detach().to("cpu", torch.float32)
    n, c, h, w = x.shape
    if c != shapes.example_shape[1]:
        raise ValueError(f"example_input has {c} channels, the deployed model takes {shapes.example_shape[1]}")
    if shapes.dynamic_hw:
        (lo_h, lo_w), (hi_h, hi_w) = shapes.min_hw, shapes.max_hw
        if not (lo_h <= h <= hi_h and lo_w <= w <= hi_w):
            raise ValueError(f"example_input is {h}x{w}, outside the deployed model's range {lo_h}x{lo_w} to "
                             f"{hi_h}x{hi_w}")
        if (h == 1 or w == 1) and hi_h > 1 and hi_w > 1:  # export would specialize a dim of size 1
            x = torch.randn(n, c, max(h, 2), max(w, 2), generator=torch.Generator().manual_seed(0))
    if shapes.dynamic_batch and x.shape[0] == 1:
        x = x.expand(2, -1, -1, -1)  # a batch of 1 would be specialized to a constant
    return x.contiguous()


def export_deployed(deployed: nn.Module, example_input: torch.Tensor | None = None) -> ExportedProgram:
    """``torch.export`` a deployed model with the dims its ``dynamic`` choice leaves free.

    Args:
        deployed: A model returned by :func:`~lightning_winoprune.deploy.deploy` (its ``deploy_shapes`` say which
            dims are dynamic and their range).
        example_input: An ``(N, C, H, W)`` input to trace with (default: a random one of the tuned shape). A batch
            of 1 is expanded to 2 when the batch is dynamic (export would specialize it); with ``dynamic="none"``
            its shape is the one shape the program takes.

    Returns:
        The exported program: a dynamic batch of 1 to 4096 and / or a dynamic H and W from the model's smallest
        size to 4096, as chosen.

    Raises:
        TypeError: If ``deployed`` is not an ``nn.Module``.
        ValueError: If it has no ``deploy_shapes``, or ``example_input`` does not fit it.

    """
    shapes = _shapes_of(deployed)
    x = _example(shapes, example_input)
    dims: dict[int, Any] = {}
    if shapes.dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=shapes.max_batch)
    if shapes.dynamic_hw:
        dims[2] = torch.export.Dim("height", min=shapes.min_hw[0], max=shapes.max_hw[0])
        dims[3] = torch.export.Dim("width", min=shapes.min_hw[1], max=shapes.max_hw[1])
    # A backed size whose example value is not 1 would get a "!= 1" guard at every contiguity check (and so a
    # constraint error for a range that reaches 1 deep in the network): size-oblivious reasoning avoids that.
    oblivious = fx_config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
    with oblivious if shapes.dynamic_hw else contextlib.nullcontext():
        program = torch.export.export(deployed, (x,), dynamic_shapes=(dims,) if dims else None, strict=False)
    program.graph_module.meta[_GM_KEY] = {"tuned_shape": list(shapes.example_shape)}
    return program


# --------------------------------------------------------------------------------------------------------- save
def _bound(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # int_oo: unbounded
        return None


def _metadata(program: ExportedProgram) -> dict[str, Any]:
    """The ``winoprune.json`` entry of ``program``: read from its input placeholder and range constraints."""
    users = program.graph_signature.user_inputs
    if len(users) != 1:
        raise ValueError(f"save_deployed takes a program with one input (an image batch), got {len(users)}")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == users[0])
    val = node.meta["val"]
    if val.dim() != 4:
        raise ValueError(f"save_deployed takes a program of an (N, C, H, W) input, got shape {tuple(val.shape)}")
    ranges: list[list[int | None]] = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            r = program.range_constraints[d.node.expr]
            ranges.append([_bound(r.lower), _bound(r.upper)])
        else:
            ranges.append([int(d), int(d)])
    free = [lo != hi for lo, hi in ranges]
    if free[1] or free[2] != free[3]:
        raise ValueError("save_deployed takes a program whose channels are static and whose H and W are both "
                         "dynamic or both static")
    dynamic = {(True, True): "batch+hw", (True, False): "batch", (False, True): "hw", (False, False): "none"}[
        (free[0], free[2])]
    example = [int(s) for s in program.example_inputs[0][0].shape]
    tuned = program.graph_module.meta.get(_GM_KEY, {}).get("tuned_shape")
    return {"format_version": ARTIFACT_FORMAT, "producer": "lightning_winoprune", "version": _package_version(),
            "torch_version": torch.__version__, "dynamic": dynamic, "input_shape": example,
            "tuned_shape": tuned, "input_ranges": ranges, "dtype": str(val.dtype).removeprefix("torch.")}


def save_deployed(deployed_or_program: nn.Module | ExportedProgram, path: str | os.PathLike[str],
                  example_input: torch.Tensor | None = None) -> Path:
    """Save a deployed model (exported first with :func:`export_deployed`) or its program as a ``.pt2``, atomically.

    The file is written beside ``path`` under a temporary name, flushed to disk and renamed onto ``path``: a crash
    or an error mid-write leaves ``path`` as it was (absent, or the previous file) and no temporary file behind.

    Args:
        deployed_or_program: A model returned by :func:`~lightning_winoprune.deploy.deploy`, or an
            ``ExportedProgram`` of one (from :func:`export_deployed` or your own ``torch.export.export``).
        path: Where the ``.pt2`` goes (its folder is created).
        example_input: The input to export at (a module only; see :func:`export_deployed`).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: If ``deployed_or_program`` is neither.
        ValueError: If the module has no ``deploy_shapes``, ``example_input`` does not fit, or is given with a
            program, or the program does not take one ``(N, C, H, W)`` input.

    """
    if isinstance(deployed_or_program, ExportedProgram):
        if example_input is not None:
            raise ValueError("example_input is for a module: a program is saved as it was exported")
        program = deployed_or_program
    else:
        program = export_deployed(deployed_or_program, example_input)
    extra = {_META: json.dumps(_metadata(program), indent=1)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, lambda f: torch.export.save(program, f, extra_files=extra))
    return out


# --------------------------------------------------------------------------------------------------------- load
def _line(text: object, limit: int = 150) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _archive(z: zipfile.ZipFile, fail: Callable[[str], DeployArtifactError]) -> str:
    """The archive's root folder, once it is known to be an intact torch.export archive."""
    names = z.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    root = next(iter(roots)) if len(roots) == 1 else ""
    fmt = f"{root}/archive_format"
    if not root or fmt not in names or z.read(fmt).strip() != b"pt2":
        raise fail("a zip archive but not a torch.export program (no archive_format 'pt2' entry); was it written "
                   "by torch.export.save?")
    bad = z.testzip()
    if bad is not None:
        raise fail(f"the archive is damaged: entry {bad!r} fails its CRC check (the file was changed or cut)")
    try:
        from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE
    except ImportError:  # a torch without this constant: torch.export.load checks it
        return root
    version = z.read(f"{root}/archive_version").decode(errors="replace").strip() \
        if f"{root}/archive_version" in names else "none"
    if version != str(ARCHIVE_VERSION_VALUE):
        raise fail(f"its .pt2 archive version is {version!r}, torch {torch.__version__} reads version "
                   f"{ARCHIVE_VERSION_VALUE!r}: export and save it again with this torch")
    return root


def _read_meta(z: zipfile.ZipFile, root: str, fail: Callable[[str], DeployArtifactError]) -> DeployShapes:
    """The input shapes our metadata entry describes, once its format version is the current one."""
    entry = f"{root}/extra/{_META}"
    if entry not in z.namelist():
        raise fail("a torch.export program without lightning_winoprune metadata (not written by save_deployed): "
                   "load it with torch.export.load(path).module(), or save it with save_deployed")
    try:
        meta = json.loads(z.read(entry))
    except (ValueError, UnicodeDecodeError) as err:
        raise fail(f"its lightning_winoprune metadata is not valid JSON ({_line(err, 80)})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise fail(f"its lightning_winoprune metadata has no format version ({_line(meta, 80)})")
    if version != ARTIFACT_FORMAT:
        age = "an older" if version < ARTIFACT_FORMAT else "a newer"
        fix = "deploy and save the model again" if version < ARTIFACT_FORMAT else "upgrade lightning_winoprune"
        raise fail(f"written in {age} artifact format ({version}, by lightning_winoprune {meta.get('version', '?')}) "
                   f"than the format {ARTIFACT_FORMAT} this lightning_winoprune {_package_version()} reads: {fix}")
    try:
        return _shapes_from_meta(meta)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise fail(f"its lightning_winoprune metadata is incomplete ({type(err).__name__}: {_line(err, 80)})") from None


def _check_ops(z: zipfile.ZipFile, root: str, fail: Callable[[str], DeployArtifactError]) -> None:
    """Every ``torch.ops`` target of the program's graphs resolves to a registered operator."""
    for name in z.namelist():
        if not (name.startswith(f"{root}/models/") and name.endswith(".json")):
            continue
        for ns, op, overload in sorted(set(_OP.findall(z.read(name).decode(errors="replace")))):
            try:
                packet = getattr(getattr(torch.ops, ns), op)
                if overload:
                    getattr(packet, overload)
            except (AttributeError, RuntimeError):
                hint = (f"this lightning_winoprune ({_package_version()}) does not define it: deploy and save the "
                        "model again with this version") if ns == "winoprune" else \
                    "it is not registered in this process: import the library that defines it first"
                raise fail(f"it uses the operator {ns}::{op}, but {hint}") from None


class _Capture(logging.Filter):
    """Keeps (and silences) the records torch.export.load logs with a traceback before raising a generic error."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
            return False
        return True


@contextlib.contextmanager
def _captured_torch_logs() -> Iterator[_Capture]:
    logger, capture = logging.getLogger("torch.export"), _Capture()
    logger.addFilter(capture)
    try:
        yield capture
    finally:
        logger.removeFilter(capture)


def load_deployed(path: str | os.PathLike[str]) -> nn.Module:
    """Load a ``.pt2`` written by :func:`save_deployed`, checked first, as a callable module.

    The archive must be intact (every entry's CRC), a torch.export archive this torch reads, carry
    lightning_winoprune metadata of the current format and use only registered operators. The returned module
    (``ExportedProgram.module()``) has a ``deploy_shapes`` attribute (:class:`~lightning_winoprune.deploy.DeployShapes`)
    built from that metadata. Like ``torch.export.load``, loading unpickles parts of the file: load only files you
    trust.

    Args:
        path: The ``.pt2`` file.

    Returns:
        The deployed model as an ``nn.Module``; it raises ``AssertionError: Guard failed: ...`` (one line naming the
        dim and its size or bound) for an input outside the exported shapes.

    Raises:
        DeployArtifactError: With one line naming the file and what is wrong: missing, empty, truncated or not a
            zip archive, not a torch.export archive, damaged, of another archive or artifact format, without our
            metadata, using an unknown operator, or refused by ``torch.export.load`` (its cause appended).

    """
    p = Path(path)

    def fail(what: str) -> DeployArtifactError:
        return DeployArtifactError(f"cannot load deployed model {str(p)!r}: {what}")

    if not p.exists():
        raise fail("no such file")
    if not p.is_file():
        raise fail("not a file")
    if p.stat().st_size == 0:
        raise fail("the file is empty (an interrupted copy or save?)")
    with open(p, "rb") as f:  # a cut .pt2 can still open as a zip: the torch.save archive of its sample inputs
        f.seek(max(0, p.stat().st_size - 22))
        if not f.read(4) == b"PK\x05\x06":  # torch writes no zip comment: the end record ends the file
            raise fail("not a .pt2 archive: truncated, damaged or not a zip file (no zip end record at its end)")
    try:
        with zipfile.ZipFile(p) as z:
            root = _archive(z, fail)
            shapes = _read_meta(z, root, fail)
            _check_ops(z, root, fail)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise fail(f"not a .pt2 archive: truncated, damaged or not a zip file ({_line(err, 80)})") from None
    with _captured_torch_logs() as logs, open(p, "rb") as f:
        try:
            program = torch.export.load(f)
        except Exception as err:  # torch raises many types here; logs hold the real cause
            cause = logs.errors[0] if logs.errors else err
            raise fail(f"torch.export.load refused it: {type(cause).__name__}: {_line(cause)}") from None
    module = program.module()
    module.deploy_shapes = shapes  # type: ignore[assignment]
    return module


def _shapes_from_meta(meta: dict[str, Any]) -> DeployShapes:
    """The :class:`DeployShapes` the metadata describes (an unbounded dim reads as :data:`MAX_SIZE`).

    Raises:
        KeyError: If a field is missing; ``IndexError``, ``TypeError`` or ``ValueError`` if one is malformed.

    """
    ranges, shape = meta["input_ranges"], meta["tuned_shape"] or meta["input_shape"]
    return DeployShapes.from_dict({
        "dynamic": meta["dynamic"], "example_shape": shape,
        "min_hw": [ranges[2][0], ranges[3][0]],
        "max_hw": [ranges[2][1] or MAX_SIZE, ranges[3][1] or MAX_SIZE],
        "max_batch": ranges[0][1] or MAX_SIZE})
