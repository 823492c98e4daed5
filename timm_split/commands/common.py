"""What every command shares: the device, autocast, one-line user errors and argparse types."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Mapping, NoReturn, Optional, Sequence, Tuple, Union

import torch

from ..checks import check_split_factor
from ..environment import torchvision_mismatch

__all__ = ["resolve_device", "autocast_factory", "user_error", "int_at_least", "split_factor_arg", "OneLineParser",
           "check_output_paths", "inert_flags", "flag_defaults", "one_line", "DEBUG_ENV", "run_command", "USER_ERRORS",
           "KeyValueArgs"]

_logger = logging.getLogger(__name__)

# set to 1 to get the traceback of an error the CLI would report in one line
DEBUG_ENV = "TIMM_SPLIT_DEBUG"


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


def one_line(e: BaseException) -> str:
    """An error's message on one line (its type's name where the message is empty)."""
    return " ".join(str(e).split()) or type(e).__name__


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (``<prog>: error: <message>; see
    <prog> --help``) and exit status 2, as every other user error of the CLI (its subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the fix and exit 2 (argparse prints the usage first).

        Args:
            message: argparse's message.
        """
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def _parse_kwargs_base() -> type:
    from timm.utils import ParseKwargs
    return ParseKwargs


class KeyValueArgs(_parse_kwargs_base()):  # type: ignore[misc]
    """timm's ``ParseKwargs`` (``key=value`` pairs, values read as Python literals, else as text) whose every pair
    must have an ``=`` and a keyword name: ``x`` alone was a ``ValueError`` traceback from inside argparse."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        for value in values or ():
            key, eq, _ = (value or "").partition("=")
            if value and not (eq and key.isidentifier()):
                parser.error(f"{option_string} takes key=value pairs with a keyword name (e.g. drop_rate=0.1); "
                             f"got {value!r}")
        super().__call__(parser, namespace, values, option_string)


PathInputs = Mapping[str, Union[None, str, Iterable[str]]]


def _identity(path: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """``path`` resolved (symlinks followed) and, where it exists, its ``(device, inode)`` (hard links)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def _paths(value: Union[None, str, Iterable[str]]) -> List[str]:
    if not value:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else [os.fspath(v) for v in value if v]


def _linked_into(path: str, ino: Tuple[int, int], folder: str) -> bool:
    """Whether ``path`` (outside ``folder``) is a hard link of a file inside it (only looked for when the file has
    several links, so the folder is walked only then)."""
    try:
        if os.stat(path).st_nlink < 2:
            return False
    except OSError:
        return False
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) == ino:
                    return True
    return False


def check_output_paths(outputs: Mapping[str, Optional[str]], inputs: PathInputs, hard_links_into: bool = True
                       ) -> None:
    """The output-path guard of every command: no output may be an input, nor another output.

    Paths are compared resolved (``os.path.realpath``: symlinks, ``..``) and, where both exist, by device and
    inode (hard links). An input that is a folder (a dataset's split folder) holds its files: an output may not
    be the folder, nor an existing file inside it. An output that does not exist yet can only clash with
    another output.

    Args:
        outputs: flag (as the message names it, e.g. ``'--results-file'``) -> the path the command writes
            (``None``/``''``: not written).
        inputs: flag -> a path, or several (``None``/``''``: none), that the command reads.
        hard_links_into: also look for an output (with several links) hard-linked to a file inside an input
            folder, which walks that folder; off where outputs are routinely hard-linked (the trainer's
            checkpoints) and the data can be millions of files.

    Raises:
        ValueError: one line naming both flags and both paths, and the fix.
    """
    seen: Dict[Tuple[str, Optional[Tuple[int, int]]], Tuple[str, str]] = {}
    ins = [(flag, p, _identity(p), os.path.isdir(p)) for flag, v in inputs.items() for p in _paths(v)]
    for flag, value in outputs.items():
        for path in _paths(value):
            real, ino = _identity(path)
            for (k_real, k_ino), (o_flag, o_path) in seen.items():
                if real == k_real or (ino is not None and ino == k_ino):
                    raise ValueError(f"{flag} {path!r} and {o_flag} {o_path!r} are the same file: one output would "
                                     "overwrite the other; pass two different paths.")
            seen[(real, ino)] = (flag, path)
            for in_flag, in_path, (in_real, in_ino), is_dir in ins:
                same = real == in_real or (ino is not None and ino == in_ino)
                inside = is_dir and ino is not None and not os.path.isdir(real) and (
                    real.startswith(in_real.rstrip(os.sep) + os.sep)
                    or (hard_links_into and _linked_into(real, ino, in_real)))
                if same or inside:
                    what = "is" if same else "is a file inside"
                    raise ValueError(f"{flag} {path!r} {what} {in_flag} {in_path!r}, which this command reads: "
                                     f"writing {flag} would replace it; pass another {flag}.")


def flag_defaults(parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Every option's default by its ``dest`` (what a command line that does not name it gets).

    Args:
        parser: a command's parser.

    Returns:
        ``{dest: default}``.
    """
    defaults = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.dest != argparse.SUPPRESS and action.option_strings:
            defaults[action.dest] = action.default
    return defaults


InertRule = Tuple[Sequence[str], Callable[[argparse.Namespace], bool], str]


def inert_flags(args: argparse.Namespace, rules: Iterable[InertRule], defaults: Mapping[str, Any],
                refuse: bool = False) -> List[str]:
    """Warn (or refuse) where a flag that was given does nothing in this combination of flags.

    Args:
        args: the parsed flags.
        rules: ``(dests, inert(args), why)``: when ``inert(args)`` holds, the flags ``dests`` that differ from
            their default do nothing; ``why`` says why and what to do.
        defaults: ``{dest: default}`` (:func:`flag_defaults`).
        refuse: raise instead of warning.

    Returns:
        The messages (each logged as a warning).

    Raises:
        ValueError: ``refuse`` and a given flag does nothing.
    """
    out = []
    for dests, inert, why in rules:
        given = [d for d in dests if getattr(args, d, None) != defaults.get(d)]
        if given and inert(args):
            msg = f"{', '.join('--' + d.replace('_', '-') for d in given)} {'does' if len(given) == 1 else 'do'} " \
                  f"nothing here: {why}"
            if refuse:
                raise ValueError(msg)
            _logger.warning(msg)
            out.append(msg)
    return out


def _user_errors() -> Tuple[type, ...]:
    from ..errors import SplitError
    return (ValueError, SplitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# what a user's input causes (exit 2); any other error is exit 1
USER_ERRORS: Tuple[type, ...] = _user_errors()


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so Python's flush at exit does not raise again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _one_line_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                      line: Optional[str] = None) -> None:
    print(f"WARNING {category.__name__}: {' '.join(str(message).split())}", file=sys.stderr)


def _fail(cmd: str, message: str, code: int) -> NoReturn:
    print(f"timm-split {cmd}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_command(cmd: str, fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The CLI's one error funnel: run a command, turning every error it can meet into one line and an exit status.

    * user errors (:data:`USER_ERRORS`: ``ValueError``, ``SplitError``, a missing file or folder, no permission):
      ``timm-split <cmd>: error: <message>``, exit 2;
    * any other ``OSError`` (a full disk, a read-only filesystem): one line naming the file, exit 1;
    * torchvision's ``operator torchvision::nms does not exist`` (a torchvision built for another torch): one line
      naming both versions and the fix (:func:`timm_split.environment.torchvision_mismatch`), exit 1;
    * ``RuntimeError`` (torch refusing an input) and any other exception: one line with its type, exit 1;
    * ``KeyboardInterrupt`` (Ctrl-C): ``interrupted``, exit 130;
    * ``BrokenPipeError`` (output piped to ``head``): no message (as other shell tools), exit 141.

    With the environment variable :data:`DEBUG_ENV` (``TIMM_SPLIT_DEBUG=1``) every error but the broken pipe is
    raised with its traceback instead.

    Args:
        cmd: the command's name, for the message.
        fn: the command; returns its exit status.
        args: its parsed flags.

    Returns:
        ``fn``'s exit status.

    Raises:
        SystemExit: the exit status of an error, after its one line.
    """
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        with warnings.catch_warnings():  # a library's warning (torch, timm) in one line, as the logs
            if sys.stderr is sys.__stderr__:  # the CLI's own stderr, not a caller's capture (pytest's, say)
                warnings.showwarning = _one_line_warning
            return fn(args)
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(141) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _fail(cmd, "interrupted", 130)
    except USER_ERRORS as e:
        if debug:
            raise
        _fail(cmd, one_line(e), 2)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        _fail(cmd, f"{where}{one_line(e)}", 1)
    except Exception as e:  # noqa: BLE001 - the funnel: one line, never a traceback (TIMM_SPLIT_DEBUG=1 shows it)
        if debug:
            raise
        mismatch = torchvision_mismatch(e)  # a lazy `import torchvision` of a torch it was not built for
        if mismatch:
            _fail(cmd, mismatch, 1)
        _fail(cmd, f"{type(e).__name__}: {one_line(e)[:500]} (set {DEBUG_ENV}=1 for the traceback)", 1)
