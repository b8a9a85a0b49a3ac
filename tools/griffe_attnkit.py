"""A griffe extension for the API reference: attnkit's docstring habits, in Markdown.

* Sphinx roles (``:func:`attnkit.attention```, ``:class:`MaskMod```), which read well in
  ``help()``, become code spans: Markdown has no roles; an RST ``text::`` before an
  indented example becomes ``text:`` (the indented block is code in Markdown too).
* Grouped entries in ``Args:`` / ``Attributes:`` sections (``q_offset, kv_offset: where the
  queries and keys start``), one description for several names, become one entry per name
  with that description (also when the names go on over two lines), the form griffe's Google
  parser understands (it would otherwise
  warn that a parameter ``"q_offset, kv_offset"`` is not in the signature).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const|term|ref):"
                   r"`~?([^`]+)`")
_RST_LITERAL = re.compile(r"(\S)::$", re.M)  # "as follows::" before an indented example
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Attributes|Keyword Args|"
                      r"Keyword Arguments|Other Parameters):\s*$")
_NAMES_GO_ON = re.compile(r"^\s+\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*\s*,\s*$")
_GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(.*)$")


def split_grouped_entries(text: str) -> str:
    """Docstring ``text`` with each grouped ``a, b: description`` entry of an argument or
    attribute section written once per name (continuation lines repeated with it)."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None  # the section ended
        while (section_indent is not None and _NAMES_GO_ON.match(line) and i + 1 < len(lines)
               and lines[i + 1].strip()):
            i += 1  # "a, b, c," and the names go on on the next line: one header line
            line = f"{line.rstrip()} {lines[i].strip()}"
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if not grouped:
            out.append(line)
            i += 1
            continue
        entry_indent = len(grouped.group(1))
        body = [line]
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > entry_indent):
            if not lines[i].strip() and (i + 1 >= len(lines) or len(lines[i + 1]) - len(
                    lines[i + 1].lstrip()) <= entry_indent):
                break
            body.append(lines[i])
            i += 1
        names = [name.strip() for name in grouped.group(2).split(",")]
        for name in names:
            out.append(f"{grouped.group(1)}{name}{grouped.group(3) or ''}:{grouped.group(4)}")
            out.extend(body[1:])
    return "\n".join(out)


class AttnkitDocstrings(griffe.Extension):
    """Apply the two rewrites above to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            value = _RST_LITERAL.sub(r"\1:", _ROLE.sub(r"`\1`", obj.docstring.value))
            obj.docstring.value = split_grouped_entries(value)
