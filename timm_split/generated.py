"""Generated sections of hand-written documents: a generator rewrites only what it wrote.

A document such as ``docs/zoo.md`` mixes text a person wrote with tables a command generates. Each generated
section sits between two marker lines::

    <!-- generated:tables begin (timm-split sweep --report ...) -->
    ...
    <!-- generated:tables end -->

:func:`write_generated` replaces what is between a section's markers and leaves every other line as it was. A
section the file does not have yet is appended at its end (with a warning), so a file that predates the markers,
or one a person wrote from scratch, loses nothing. A new file gets ``title`` and the sections in order.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Mapping

from .checks import atomic_write

_logger = logging.getLogger(__name__)

__all__ = ["write_generated", "generated_sections", "begin_marker", "END_MARKER"]

END_MARKER = "<!-- generated:{name} end -->"


def begin_marker(name: str, source: str = "") -> str:
    """The line that opens section ``name``; ``source`` (the command that writes it) is shown in it."""
    return f"<!-- generated:{name} begin" + (f" ({source})" if source else "") + " -->"


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"section name must be lower-case letters, digits, '_' or '-'; got {name!r}")


def _span(lines: List[str], name: str, path: str):
    """``(begin, end)`` line indices of section ``name`` in ``lines``, or None; ValueError for broken markers."""
    begin_re = re.compile(rf"^<!-- generated:{re.escape(name)} begin( \(.*\))? -->$")
    end = END_MARKER.format(name=name)
    begins = [i for i, line in enumerate(lines) if begin_re.match(line.rstrip())]
    ends = [i for i, line in enumerate(lines) if line.rstrip() == end]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"{path}: the markers of generated section {name!r} are broken ({len(begins)} begin, "
                         f"{len(ends)} end line(s)); fix them by hand: nothing was written")
    return begins[0], ends[0]


def generated_sections(path: str) -> Dict[str, str]:
    """The generated sections of the file at ``path``: name -> the text between its markers (no markers)."""
    with open(path) as f:
        lines = f.read().split("\n")
    names = {m.group(1) for line in lines for m in [re.match(r"^<!-- generated:([a-z0-9_-]+) begin", line)] if m}
    out = {}
    for name in sorted(names):
        b, e = _span(lines, name, path)
        out[name] = "\n".join(lines[b + 1:e])
    return out


def write_generated(path: str, sections: Mapping[str, str], *, title: str = "", source: str = "") -> None:
    """Write ``sections`` (name -> text) into ``path``, rewriting only those sections (atomically).

    Args:
        path: the document. A new one gets ``# title`` (if given) and the sections in order.
        sections: the generated text of each section, without markers.
        title: the heading of a new document.
        source: the command that generates the sections, shown in their begin markers.

    Raises:
        ValueError: a section's markers are broken (a begin without its end, two begins, an end first); the file
            is left as it was.
    """
    for name in sections:
        _check_name(name)
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().split("\n")
    else:
        lines = [f"# {title}", ""] if title else []
    if lines and lines[-1] == "":
        lines.pop()  # the final newline, put back on write
    for name, text in sections.items():
        block = [begin_marker(name, source)] + text.rstrip("\n").split("\n") + [END_MARKER.format(name=name)]
        span = _span(lines, name, path)
        if span is None:
            if os.path.exists(path):
                _logger.warning("%s has no generated section %r: appended at its end; move it where it belongs "
                                "(the markers move with it)", path, name)
            lines += ([""] if lines and lines[-1] != "" else []) + block
        else:
            lines[span[0]:span[1] + 1] = block

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")

    atomic_write(path, write)
