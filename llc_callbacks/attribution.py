"""Where the library's warnings point: at the user's code, never at a trainer's internals.

Python attributes a warning to a frame ``stacklevel`` calls up. Inside a trainer's hook the
first frame outside this package is the trainer's own (``lightning/.../call.py``), which
tells a user nothing; there a warning points at the line that built the callback instead.
In a hand-written loop it points at the loop's call of the monitor.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import NamedTuple

# Modules whose frames and files are the library's own.
OWN = ("llc_callbacks", "llc_callbacks.integrations", "contextlib")
# Packages that call the library from their hooks: their frames are skipped for the
# construction site.
TRAINERS = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "accelerate",
    "trl",
)


class Site(NamedTuple):
    """A line of the user's code.

    Attributes:
        filename: The file.
        lineno: The line.
        module: The module's ``__name__``.
    """

    filename: str
    lineno: int
    module: str


def construction_site() -> Site | None:
    """The first frame of the calling stack outside this package and the trainers.

    Returns:
        Where the caller's caller was called from, or ``None`` if every frame is internal.
    """
    frame = _first_frame(sys._getframe(1), OWN + TRAINERS)
    if frame is None:
        return None
    return Site(frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", ""))


def warn(message: str, origin: Site | None, category: type[Warning] = UserWarning) -> None:
    """Warn, attributed to the user's code.

    Args:
        message: The warning.
        origin: Where the callback (or monitor) was built: the warning points there when the
            first frame outside this package is a trainer's.
        category: The warning's class.
    """
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn's caller
    while frame is not None and _is_in(frame.f_code.co_filename, OWN):
        frame, level = frame.f_back, level + 1
    if frame is not None and origin is not None and _is_in(frame.f_code.co_filename, TRAINERS):
        warnings.warn_explicit(message, category, origin.filename, origin.lineno, origin.module)
        return
    warnings.warn(message, category, stacklevel=level)


def reattributed(warning: warnings.WarningMessage, origin: Site | None) -> tuple[str, int]:
    """Where to show a warning caught inside an estimate: its own line, or ``origin``.

    A warning that points into this package or a trainer is moved to ``origin``.

    Returns:
        The file name and line number.
    """
    if origin is not None and _is_in(warning.filename, OWN + TRAINERS):
        return origin.filename, origin.lineno
    return warning.filename, warning.lineno


def _first_frame(frame: FrameType | None, skipped: tuple[str, ...]) -> FrameType | None:
    while frame is not None and _is_in(frame.f_code.co_filename, skipped):
        frame = frame.f_back
    return frame


def _is_in(filename: str, modules: tuple[str, ...]) -> bool:
    """Whether ``filename`` belongs to one of the (imported) ``modules``."""
    return any(filename == root or filename.startswith(root + os.sep) for root in _roots(modules))


def _roots(modules: tuple[str, ...]) -> list[str]:
    """The files (a package's folder, a module's file) of the imported ``modules``."""
    roots = []
    for name in modules:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file is None:
            continue
        is_package = os.path.basename(file) == "__init__.py"
        roots.append(os.path.dirname(file) if is_package else file)
    return roots
