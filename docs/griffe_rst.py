"""Griffe extension of the docs build: render the reST bits of the package's Google-style docstrings as Markdown.

The docstrings use Sphinx roles (``:class:`~lightning_winoprune.WinogradConv2d```) and ``::`` before literal blocks.
This extension (loaded by ``mkdocs.yml``, never imported by the package) turns each role into an optional
mkdocs-autorefs cross-reference (a link when the target is documented on the site, plain code otherwise, never a
warning) and ``text::`` into ``text:``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, NameResolutionError, Object

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`<>]+)`")
_LITERAL = re.compile(r"(?<=\S)::$", flags=re.M)


def _resolve(obj: Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj`` (a dotted name resolves its first part)."""
    head, _, rest = target.partition(".")
    try:
        path = obj.resolve(head)
    except (NameResolutionError, KeyError, AttributeError):
        return target
    return f"{path}.{rest}" if rest else path


def _markdown(obj: Object, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        title = target.rsplit(".", 1)[-1] if tilde else target
        return f'<autoref identifier="{_resolve(obj, target)}" optional><code>{title}</code></autoref>'

    return _LITERAL.sub(":", _ROLE.sub(role, text))


class RestToMarkdown(Extension):
    """Rewrite the docstrings of a loaded package (roles -> optional cross-references, ``::`` -> ``:``)."""

    def on_package(self, *, pkg: Object, **kwargs: Any) -> None:  # noqa: D102
        stack, seen = [pkg], set()
        while stack:
            obj = stack.pop()
            if obj.path in seen:
                continue
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj, obj.docstring.value)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
