"""A ``str`` Enum whose ``parse`` names the bad value and lists the valid ones."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

_E = TypeVar("_E", bound="ParsableEnum")


class ParsableEnum(str, Enum):
    """Base for the package's string choices (``Backend``, ``Route``, ...)."""

    @classmethod
    def parse(cls: type[_E], value: object, arg: str | None = None) -> _E:
        """Return ``value`` as a member of this enum.

        Args:
            value: A member or its string value.
            arg: The argument name used in the error message (defaults to the enum's name in lower case).

        Raises:
            ValueError: If ``value`` is not one of the members' values.

        """
        try:
            return cls(value)
        except ValueError:
            name = arg or cls.__name__.lower()
            raise ValueError(f"{name}={value!r} is not valid; valid values are {[m.value for m in cls]}") from None
