"""What every command shares: the device, autocast, one-line user errors and argparse types."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from functools import partial
from typing import Any, Callable, Optional

import torch

from ..checks import check_split_factor

__all__ = ["resolve_device", "autocast_factory", "user_error", "int_at_least", "split_factor_arg"]


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` (default: cuda if available, else cpu); ``ValueError`` if it is a GPU that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device ({e}); pass cpu or cuda.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here; pass --device cpu.")
    return dev


def autocast_factory(device: torch.device, amp: bool, amp_dtype: Optional[str] = None) -> Callable[[], Any]:
    """A context factory: autocast to ``amp_dtype`` (default float16 on CUDA, bfloat16 elsewhere), or a no-op."""
    if not amp:
        return contextlib.nullcontext
    dtype = getattr(torch, amp_dtype or ("float16" if device.type == "cuda" else "bfloat16"))
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def cli_logging(logger: str) -> None:
    """A command's logging: warnings from everything (when the program set up no handler), ``logger`` at INFO.

    Args:
        logger: the logger whose progress lines the command shows, e.g. ``'timm_split'``.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(logger).setLevel(logging.INFO)


def user_error(cmd: str, e: BaseException) -> int:
    """Print ``timm-split <cmd>: error: <message>`` (one line, no traceback) and return exit status 2."""
    print(f"timm-split {cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``, with a message naming ``what``.

    Args:
        minimum: the smallest value allowed.
        what: how the message names the option, e.g. ``'--img-size (pixels)'``.

    Returns:
        The parsing function.
    """
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an int >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be an int >= {minimum}, got {v}")
        return v
    return parse


def split_factor_arg(text: str) -> int:
    """An argparse type: a split factor in ``[1, MAX_SPLIT_FACTOR]``, the check ``split()`` makes.

    Args:
        text: the option's text.

    Returns:
        S.
    """
    value = int_at_least(1, "split factor")(text)
    try:
        return check_split_factor(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
