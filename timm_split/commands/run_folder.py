"""The run folder of ``timm-split train``: one trainer at a time, never a finished run overwritten, no stale temps.

* :class:`RunLock`: ``train.lock`` in the folder, held with ``fcntl.flock`` for the whole run and holding the pid.
  The kernel drops the lock when its process dies, so the file a killed run leaves is taken over (with a
  warning); a second trainer on a live run's folder gets an error naming the pid. A process forked while the lock
  is held (a data-loader worker) closes its copy of the lock's descriptor at once, so a SIGKILL of the trainer frees
  the folder then, not when the orphaned workers notice (seconds later); ``timm-split train`` turns SIGTERM into
  an unwinding exception, so the file is removed too.
* :func:`holds_run`: the folder has a checkpoint or ``results.json``; a fresh run then goes to ``<name>-1``
  (timm's ``get_outdir(..., inc=True)``) instead.
* :func:`remove_stale_temp_files`: the temporary files our writes use (``args.json.<pid>.tmp``,
  ``<checkpoint>.<pid>.tmp``, ...) that a kill left behind, once the folder is locked.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

_logger = logging.getLogger(__name__)

__all__ = ["RunLock", "holds_run", "remove_stale_temp_files", "LOCK_FILE", "check_run_outputs"]

LOCK_FILE = "train.lock"
RUN_FILES = ("last.safetensors", "model_best.safetensors", "results.json")
# temp files of our writes: atomic_write's and save_checkpoint's "<name>.<pid>.tmp" (pid checked), the saver's
# "tmp.safetensors" and "<name>.safetensors.tmp" of earlier versions, and safetensors' own ".tmpXXXXXX"
_PID_TEMP = re.compile(r"^(?:args\.json|results\.json|.+\.safetensors)\.(\d+)\.tmp$")
_OTHER_TEMP = re.compile(r"^(?:tmp\.safetensors|.+\.safetensors\.tmp|\.tmp[A-Za-z0-9]{6})$")


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds a run a fresh run would overwrite: a checkpoint or ``results.json``.

    A ``summary.csv`` without a checkpoint (a run killed before its first checkpoint) does not count: rerunning
    the same command continues there, as a kill before the first save always allowed.

    Args:
        folder: the run folder.

    Returns:
        True if it has ``last``/``model_best``/``checkpoint-<n>.safetensors`` or ``results.json``.
    """
    return any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES) or bool(
        glob.glob(os.path.join(glob.escape(folder), "checkpoint-*.safetensors")))


# every file name a run writes in its folder (checkpoint-<n>.safetensors aside, which only the saver names)
WRITTEN = RUN_FILES + ("summary.csv", "args.json", LOCK_FILE)


def check_run_outputs(folder: str, inputs: Mapping[str, Union[None, str, Iterable[str]]],
                      resume: Optional[str] = None) -> None:
    """The output-path guard for a run folder: no file the run writes may be one of its inputs, and the folder
    may not lie inside a data folder (it would become a class folder there).

    Args:
        folder: the run folder (need not exist yet).
        inputs: flag -> the files and data folders the run reads (``--class-map``, ``--config``, the data...).
        resume: ``--resume``: the one input a run may replace, when it is this folder's own checkpoint (a resume
            in place continues the run).

    Raises:
        ValueError: one line naming the flag, the file and the fix.
    """
    from .common import check_output_paths

    real = os.path.realpath(folder)
    ins = dict(inputs)
    if resume and os.path.dirname(os.path.realpath(resume)) != real:
        ins["--resume"] = resume
    for name in WRITTEN:  # one at a time: the run's own files may be hard links of each other (the saver's)
        check_output_paths({f"the run's {name}": os.path.join(folder, name)}, ins, hard_links_into=False)
    for flag, value in ins.items():
        for path in ([value] if isinstance(value, str) else list(value or ())):
            if path and os.path.isdir(path) and (real + os.sep).startswith(os.path.realpath(path) + os.sep):
                raise ValueError(f"the run folder {folder} is inside {flag} {path}, which the run reads; pass an "
                                 "--output outside the data")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def remove_stale_temp_files(folder: str) -> List[str]:
    """Remove the temp files a killed run left in ``folder`` (call with the folder locked); return their names.

    A ``<name>.<pid>.tmp`` is removed only when that pid is not a live process; the pid-less names can only be
    a dead run's, since the caller holds the folder's lock.

    Args:
        folder: the run folder.

    Returns:
        The names removed.
    """
    removed = []
    for name in sorted(os.listdir(folder)):
        m = _PID_TEMP.match(name)
        if (m and not _alive(int(m.group(1)))) or (not m and _OTHER_TEMP.match(name)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    if removed:
        _logger.info("removed temp files a killed run left in %s: %s", folder, ", ".join(removed))
    return removed


# the descriptors of the locks this process holds (fd -> pid of the holder): a forked child closes its copies
_HELD: Dict[int, int] = {}


def _close_held_in_child() -> None:
    """After a fork: close the child's copies of the held locks' descriptors. An ``flock`` belongs to the open file
    description, which a fork shares: a loader worker holding a copy would keep the folder locked after a SIGKILL
    of the trainer, until the orphaned worker exits."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """``<folder>/train.lock``: held (``fcntl.flock``) by one process; the file holds that process's pid.

    Args:
        folder: the run folder (must exist).
        wait_dead: Seconds to wait, when the lock is held but the pid in the file has ended (a process it started
            still holds a copy), for that copy to be closed, before refusing.
        clock: Seconds, for the wait (``time.monotonic``).
        sleep: Waits, for the wait (``time.sleep``).
    """

    def __init__(self, folder: str, wait_dead: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.wait_dead = wait_dead
        self._clock, self._sleep = clock, sleep
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ``ValueError`` naming the pid that holds it; a dead run's file is taken over.

        A file whose pid has ended while the lock is still held (what a trainer's forked children kept) is waited
        for, up to ``wait_dead`` seconds, with a note.

        Returns:
            self.

        Raises:
            ValueError: a live trainer holds the folder (one line: the pid, the lock file, the fix).
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            _logger.warning("no run-folder lock on this platform: run one trainer per folder")
            return self
        deadline = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                if holder is None or _alive(holder):
                    raise ValueError(f"{self.folder} is in use by another trainer (pid {holder or 'unknown'}, "
                                     f"{self.path}); wait for it to end, or pass another --experiment or "
                                     "--output.") from None
                if deadline is None:
                    deadline = self._clock() + self.wait_dead
                    _logger.warning("%s: pid %d, which locked it, has ended; waiting up to %gs for the processes it "
                                    "started to let go of the lock", self.path, holder, self.wait_dead)
                if self._clock() >= deadline:
                    raise ValueError(f"{self.path} is still locked, though pid {holder} that took it has ended: a "
                                     f"process it started holds it (find it with: fuser {self.path}); end that "
                                     "process, or pass another --experiment or --output.") from None
                self._sleep(0.2)
                continue
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # the file is still the one at the path (its holder did not just remove it)
            os.close(fd)
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            _logger.warning("took over %s from pid %d, which is no longer training here (a killed run)",
                            self.path, previous)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk: name the file (os.write's error has no filename)
            os.close(fd)
            raise OSError(e.errno, e.strerror, self.path) from e
        self._fd = fd
        _HELD[fd] = os.getpid()
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held, and in a forked child)."""
        if self._fd is None:
            return
        if _HELD.get(self._fd) != os.getpid():  # a forked child: its copy is closed already, the file is not its
            self._fd = None
            return
        try:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        finally:
            _HELD.pop(self._fd, None)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
