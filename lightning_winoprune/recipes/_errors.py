"""The one-line errors of ``winoprune``: what :func:`~lightning_winoprune.recipes._cli.main` prints for a bad value.

An exception's type says what happened wherever it can: :data:`_FORMATTERS` maps a type to the function that words
it, and :func:`shortened_while_running` decides by type which errors of a running command are the user's.
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lightning_winoprune._io import CheckpointError
from lightning_winoprune.callbacks import LatencyValidation, PruningCallback

__all__ = ["CLIError", "short_error", "shortened_while_running"]


class CLIError(Exception):
    """A bad command line: :func:`main` prints its message as one short error and exits with status 2."""


#: The CLI group of an object whose constructor refused a value.
_GROUPS: tuple[tuple[type, str], ...] = (
    (PruningCallback, "pruning"), (LatencyValidation, "latency"), (LightningDataModule, "data"),
    (LightningModule, "model"), (Trainer, "trainer"),
)

#: Errors that are a bad value even when the command is already running (a schedule the trainer cannot complete, a
#: checkpoint the trainer refuses to read); any other error of a running command is a bug and keeps its traceback.
_USER_ERRORS_WHILE_RUNNING: tuple[type[BaseException], ...] = (MisconfigurationException, CheckpointError)


def shortened_while_running(err: BaseException) -> bool:
    """Whether ``err``, raised after the trainer was built, is a bad value that gets a one-line error."""
    return isinstance(err, _USER_ERRORS_WHILE_RUNNING)


def short_error(err: BaseException) -> str:
    """The one-line message :func:`main` prints for ``err``: the formatter of the first type of its MRO found."""
    for kind in type(err).__mro__:
        if kind in _FORMATTERS:
            return _FORMATTERS[kind](err)
    return _from_constructor(err)  # not reached: BaseException is in the table


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s ``__cause__`` / ``__context__`` chain (jsonargparse wraps errors)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _group_of(err: BaseException) -> tuple[object, str] | None:
    """The innermost constructor (``__init__``/``__post_init__``) in ``err``'s traceback of a CLI group's object."""
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
        obj = frame.f_locals.get("self")
        if obj is None or frame.f_code.co_name not in ("__init__", "__post_init__"):
            continue
        for cls, group in _GROUPS:
            if isinstance(obj, cls):
                return obj, group
    return None


def _init_parameters(obj: Any) -> list[str]:
    """The names the constructor of ``obj``'s class takes (empty when it has no signature)."""
    try:
        return list(inspect.signature(type(obj).__init__).parameters)
    except (TypeError, ValueError):
        return []


def _from_constructor(err: BaseException) -> str:
    """``--group.param: message`` for the innermost error of ``err``'s chain (a value a constructor refused).

    The group is found by type (the object whose constructor raised); the parameter is the message's first word
    when the constructor takes one of that name (the messages start with it: ``amount must be ...``).
    """
    root = _root_cause(err)
    message = " ".join(str(root).split()) or type(root).__name__
    found, word = _group_of(root), _FIRST_WORD.match(message)
    if found is None or word is None:
        return message
    obj, group = found
    argument = f"--{group}.{word.group()}" if word.group() in _init_parameters(obj) else f"--{group}"
    return f"{argument}: {message}"


# Regular expressions only from here on, and only where the text is all there is: jsonargparse's ArgumentError
# carries no argument (``argument_name`` is None) and its key, value, class path and expected types exist only in
# its message; a constructor's parameter exists only as the first word of the message it raised.
_FIRST_WORD = re.compile(r"[A-Za-z_]\w*")
_KEY = re.compile(r'(?:Parser key|key) "([^"]+)"')
_NESTED = re.compile(r"NestedArg\(key='([^']*)', val=(.*)\)")
_UNKNOWN = re.compile(r"class_path '([\w.]+)':\s*Option '([^']+)' is not accepted")
_GIVEN = re.compile(r"Given value: (.*)")
_EXPECTED = re.compile(r"Expected a <class '(?:[\w.]*\.)?(\w+)'>")


def _from_parser(err: BaseException) -> str:
    """One line from a jsonargparse error: the key, the value given and the types, values or options expected."""
    message = str(err)
    key = _KEY.search(message)
    if key is None:
        return message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    if isinstance(_root_cause(err), KeyError):  # jsonargparse's NSKeyError: an option the class does not take
        unknown = _unknown_option(key.group(1), message)
        if unknown is not None:
            return unknown
    return _bad_value(key.group(1), message)


def _unknown_option(name: str, message: str) -> str | None:
    """``--group.typo: Class has no option 'typo'; valid options are ...`` (``None`` if the message says less)."""
    unknown = _UNKNOWN.search(message)
    if _NESTED.search(message) is None or unknown is None:
        return None
    class_path, option = unknown.groups()
    options = _init_options(class_path)
    listed = f"; valid options are {', '.join(options)}" if options else ""
    return f"--{name}.{option}: {class_path.rsplit('.', 1)[-1]} has no option {option!r}{listed}"


def _bad_value(name: str, message: str) -> str:
    """``--key value is not valid`` with the types expected, or jsonargparse's first problem."""
    nested, given = _NESTED.search(message), _GIVEN.search(message)
    value = given.group(1).strip() if given is not None else None
    if nested is not None:  # --group.key value
        name, value = f"{name}.{nested.group(1)}", nested.group(2).strip()
    text = f"--{name}" + (f" {value}" if value is not None else "") + " is not valid"
    expected = _EXPECTED.findall(message)
    problems = [ln.strip()[2:] for ln in message.splitlines() if ln.strip().startswith("- ")
                and "Expected a <class 'NoneType'>" not in ln]
    if expected and len(problems) == len([t for t in expected if t != "NoneType"]):
        return f"{text}; expected {' or '.join(dict.fromkeys('None' if t == 'NoneType' else t for t in expected))}"
    if problems:
        detail = " ".join(problems[0].split())
        follow = [ln.strip() for ln in message.splitlines() if ln.startswith("        ")]
        return f"{text}: {detail}" + (f" {follow[0]}" if follow and detail.endswith(":") else "")
    return text


def _init_options(class_path: str) -> list[str]:
    """The constructor parameters of the class at ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                          inspect.Parameter.VAR_KEYWORD)]


#: How :func:`short_error` words an exception, by type (the first class of its MRO found here wins).
_FORMATTERS: dict[type[BaseException], Callable[[BaseException], str]] = {
    CLIError: str,  # already one line naming the --config value and the recipes
    CheckpointError: str,  # already one line naming the file and what is wrong (UntrustedCheckpointError too)
    ArgumentError: _from_parser,  # jsonargparse refused a value while parsing: read its message
    MisconfigurationException: _from_constructor,  # Lightning's and the callbacks' errors, worded for the user
    BaseException: _from_constructor,  # anything else while parsing or building the objects: a refused value
}
