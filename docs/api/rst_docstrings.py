"""A Griffe extension (mkdocs.yml) that turns the reST bits of the Lightning-style docstrings into Markdown.

The docstrings follow Lightning's Google style, whose examples are reST literal blocks
(``Example::`` then an indented block) and whose cross-references are Sphinx roles
(``:class:`~tl_lightning.callbacks.Freeze```). mkdocstrings renders Markdown, so before a docstring is
parsed this extension rewrites

* a paragraph ending in ``::`` followed by an indented block into the paragraph ending in ``:`` and a
  fenced code block (YAML when the paragraph names a ``.yaml`` file, shell when the block starts with a
  command, Python after ``Example``, plain text otherwise: the formulas);
* a role ``:class:`X``` / ``:func:`` / ``:meth:`` / ``:mod:`` / ``:attr:`` / ``:data:`` into a link to
  ``X`` when ``X`` is rendered on the site, else into inline code (``~`` keeps the last name only).

The docstrings themselves stay as they are, for Sphinx, IDEs and ``help()``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)(?:\(\))?`")
ITEM_HEAD = re.compile(r"^\s*[\w*][\w*, ]*(\s*\([^)]*\))?: ")
SHELL_STARTS = ("python ", "make ", "pip ", "$ ", "tensorboard ", "mlflow ")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def literal_blocks(text: str) -> str:
    """Rewrite every reST literal block (``para::``, blank line, indented block) as a fenced block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        body_start = i + 1
        while body_start < len(lines) and not lines[body_start].strip():
            body_start += 1
        if not (
            line.rstrip().endswith("::")
            and body_start > i + 1
            and body_start < len(lines)
            and _indent(lines[body_start]) > _indent(line)
        ):
            out.append(line)
            i += 1
            continue
        para = line.rstrip()[:-2]
        # the block of an Args/Raises item ("name: text::") stays inside the item's description
        base = " " * (_indent(line) + (4 if ITEM_HEAD.match(line) else 0))
        end = body_start
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(line)):
            end += 1
        body = lines[body_start:end]
        while body and not body[-1].strip():
            body.pop()
        depth = min(_indent(b) for b in body if b.strip())
        if ".yaml" in para:
            lang = "yaml"
        elif body[0].strip().startswith(SHELL_STARTS):
            lang = "bash"
        elif para.lstrip().startswith("Example"):
            lang = "python"
        else:  # a formula
            lang = "text"
        if para.strip():
            out += [para.rstrip() + ("" if para.endswith(" ") else ":"), ""]
        out += [f"{base}```{lang}", *(base + b[depth:] if b.strip() else "" for b in body), f"{base}```"]
        out += [""] if end < len(lines) else []
        i = end
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrite literal blocks when an object is loaded, and roles as cross-references."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is None:
            return

        def link(match: re.Match) -> str:
            short, name = match.group(1), match.group(2)
            title = name.rsplit(".", 1)[-1] if short else name
            head, _, rest = name.partition(".")
            try:
                target = obj.resolve(head) + (f".{rest}" if rest else "")
            except (griffe.NameResolutionError, ValueError):
                target = name
            return f'<autoref identifier="{target}" optional>`{title}`</autoref>'

        obj.docstring.value = ROLE.sub(link, literal_blocks(obj.docstring.value))
