"""The torch / torchvision pair, checked once at import: one clear error where they do not load together.

A CPU-only torch beside PyPI's torchvision (a ``pip install torch torchvision --index-url .../whl/cpu`` that could
not reach that index, so pip took another torch and PyPI's torchvision) imports torch fine and then fails inside
timm's ``import torchvision`` with ``RuntimeError: operator torchvision::nms does not exist``: torchvision's
compiled operators were built for another torch. :func:`check_torchvision` turns that into
:class:`TorchvisionMismatchError`, one line naming both versions and the fix; the ``timm-split`` command prints
that line alone (no traceback) and exits 1.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional

__all__ = ["TorchvisionMismatchError", "check_torchvision", "torchvision_mismatch", "FIX"]

# what to do about it (README.md, Quick start)
FIX = ("fix: in a new virtual environment either install both from one index (pip install torch torchvision "
       "--index-url https://download.pytorch.org/whl/cpu, then pip install -e .) or, where that index cannot be "
       "reached, skip that line: pip install -e . alone takes PyPI's matching pair (CUDA build, runs on a CPU, "
       "~5.6 GB); check with: python -c \"import torchvision\"")

_OPERATOR_ERROR = re.compile(r"torchvision::\w+.*does not exist")


class TorchvisionMismatchError(ImportError):
    """torchvision's compiled operators do not load with the installed torch (wheels of two different builds)."""


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001 - a version we cannot read is named as such, never a second error
        return "?"


def _torchvision_version() -> str:
    """torchvision's version with its build tag (``0.28.0+cpu``), read from its ``version.py``: importing it is what
    fails."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
        with open(os.path.join(folder, "version.py")) as f:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
        if found:
            return found.group(1)
    except Exception:  # noqa: BLE001 - fall back to the installed distribution's version
        pass
    return _version("torchvision")


def torchvision_mismatch(error: BaseException) -> Optional[str]:
    """The one-line message for torchvision's operator error, or None for any other error.

    Args:
        error: an exception; its ``__cause__`` / ``__context__`` chain is searched for a ``RuntimeError`` like
            ``operator torchvision::nms does not exist``.

    Returns:
        ``torchvision X does not load with torch Y (...): <the fix>``, or None.
    """
    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TorchvisionMismatchError):
            return str(e)
        if isinstance(e, RuntimeError) and _OPERATOR_ERROR.search(str(e)):
            torch = sys.modules.get("torch")
            torch_version = getattr(torch, "__version__", None) or _version("torch")
            cause = " ".join(str(e).split())
            return (f"torchvision {_torchvision_version()} does not load with torch {torch_version} "
                    f"({cause}): the two come from different builds (e.g. a CPU-only torch beside PyPI's "
                    f"torchvision); {FIX}")
        e = e.__cause__ or e.__context__
    return None


def _import_torchvision() -> None:
    import torchvision  # noqa: F401 - the import is the check


def _is_cli() -> bool:
    """Whether this process is the ``timm-split`` command (its script, or ``python -m timm_split.commands...``)."""
    if os.path.basename(sys.argv[0] if sys.argv else "").split(".")[0] == "timm-split":
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and i + 1 < len(argv) and argv[i + 1].startswith("timm_split.commands")
               for i, a in enumerate(argv))


def check_torchvision() -> None:
    """Import torchvision (timm imports it first thing); where its operators do not load with this torch, fail with
    one line naming both versions and the fix.

    A missing torchvision is left to timm's own import error.

    Raises:
        TorchvisionMismatchError: the pair does not load together. In the ``timm-split`` command the line is
            printed alone (``timm-split <cmd>: error: ...``, as every CLI error) and the process exits 1.
    """
    import torch  # noqa: F401 - torchvision imports it anyway; imported first, the message names its build

    try:
        _import_torchvision()
    except ImportError:
        return
    except RuntimeError as e:
        message = torchvision_mismatch(e)
        if message is None:
            raise
        if _is_cli() and os.environ.get("TIMM_SPLIT_DEBUG", "") in ("", "0"):
            cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
            print(f"timm-split{' ' + cmd if cmd else ''}: error: {message}", file=sys.stderr)
            raise SystemExit(1) from None
        raise TorchvisionMismatchError(message) from None
