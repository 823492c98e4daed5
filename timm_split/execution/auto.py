"""``'auto'``: time the candidates once per (devices, per-sample input shape, mode) and keep one only if it beats
the loop.

The decision is a small, careful benchmark (see :class:`AutoExecution`): interleaved, paired trials of the loop and
the best candidate until the candidate is faster than the loop beyond noise (a sign test on the per-round ratios),
else the loop. A trial ratio below ``1/S`` of the loop is suspicious (on a quiet machine no strategy can have it; a
disturbed loop call can): such a round is held back and re-measured, and taken as evidence only if the low ratio
reproduces (a sign test on the rounds below ``1/S``, their spread within a factor 2), as it does when the loop's
multi-threaded calls are slowed by thread oversubscription or load. Decisions are remembered for the process and,
by default, on disk (:func:`cache_dir`), keyed by the members' architecture, the input, the mode, the thread count,
the machine and the torch version, so a second process with the same model and input pays no trial. A decision made
at batch ``B`` also serves every smaller batch of the same per-sample input and mode (an epoch's or an evaluation's
partial last batch, a data-parallel rank's share) without a trial; only a larger batch, another per-sample shape or
another mode is timed again.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..checks import atomic_write
from .base import Execution, Members, is_training, module_device, needs_graph, sync, tensors_of
from .registry import BASIC, make_named
from .threads import ThreadsExecution

_logger = logging.getLogger(__name__)

__all__ = ["AutoExecution", "AutoOptions", "Decision", "Key", "cache_dir", "needed_below", "trial_seconds",
           "CACHE_ENV"]

CACHE_ENV = "TIMM_SPLIT_CACHE_DIR"
# bump when the decision rule changes: decisions cached on disk by an older rule are not reused
# (sign-test-1 never trusted a ratio below the floor; its cached "loop" decisions are the stale choices of issue 37)
_RULE = "sign-test-2"
# rounds below the floor are accepted only if their ratios (the median's sign-test interval) span at most this factor
_SPREAD = 2.0

# decisions shared by every AutoExecution(cache=True) of this process: the cache fields (JSON) -> Decision
_DECISIONS: Dict[str, "Decision"] = {}
# the same decisions by their fields without the batch (JSON): batch -> Decision (a smaller batch reuses them)
_BATCHES: Dict[str, Dict[int, "Decision"]] = {}
# the trials' wall time of every decision timed in this process, by each AutoExecution's clock (trial_seconds())
_SPENT = [0.0]
_SPENT_LOCK = threading.Lock()


def trial_seconds() -> float:
    """The seconds every ``'auto'`` of this process has spent timing candidates so far (each decision's
    :attr:`Decision.seconds`, by the clock that ``'auto'`` was given): a one-off cost, which the trainer leaves out
    of its estimate of the time left."""
    with _SPENT_LOCK:
        return _SPENT[0]


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` (None elsewhere): hands freed heap pages of every malloc arena back to the OS."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _release_freed_memory() -> None:
    """After a trial: CPU tensors freed by one candidate (on its own threads' malloc arenas) stay in the process
    until trimmed, so without this the candidates' peaks add up (resnet18 S=2 at 64 px, the four candidates in a row:
    3.6x the loop's call, 2.4x with it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _digest(members: Members) -> str:
    """The members' architecture: every tensor's name, shape, dtype and strides, and every module's class."""
    h = hashlib.sha1(str(len(members)).encode())
    for m in members:
        for name, t in tensors_of(m).items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{t.stride()}{t.requires_grad};".encode())
        for name, sub in m.named_modules():
            h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}{sub.training};".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` or ``platform.machine()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _preserved(members: Members) -> Iterator[None]:
    """Restore buffers, ``.grad`` and RNG states after trial runs."""
    buffers = [(b, b.detach().clone()) for m in members for b in m.buffers()]
    params = [p for m in members for p in m.parameters()]
    grads = [p.grad for p in params]
    cuda = sorted({module_device(m).index or 0 for m in members if module_device(m).type == "cuda"})
    rng = torch.get_rng_state()
    cuda_rng = [torch.cuda.get_rng_state(i) for i in cuda]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g
        torch.set_rng_state(rng)
        for i, s in zip(cuda, cuda_rng):
            torch.cuda.set_rng_state(s, i)


def needed_below(n: int, confidence: float) -> Optional[int]:
    """How many of ``n`` paired ratios must lie below the threshold for the median ratio to be below it with
    ``confidence`` (a one-sided sign test).

    If the true median ratio were at or above the threshold, each round would fall below it with probability at
    most 1/2, so ``k`` or more of ``n`` below has probability ``P(Binomial(n, 1/2) >= k)``; this returns the
    smallest ``k`` for which that is at most ``1 - confidence``. Equivalently, the ``k``-th smallest ratio is the
    upper end of the median's one-sided confidence interval.

    Args:
        n: the number of valid rounds (>= 0).
        confidence: e.g. 0.95.

    Returns:
        ``k``, or None when even ``n`` of ``n`` is not enough (at 0.95: ``n < 5``).

    Raises:
        ValueError: ``n`` negative or ``confidence`` outside (0.5, 1).

    Example:
        ``needed_below(5, 0.95) == 5``, ``needed_below(8, 0.95) == 7``, ``needed_below(10, 0.95) == 9``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), e.g. 0.95, got {confidence!r}")
    best, tail = None, 0
    for k in range(n, 0, -1):  # tail: the outcomes with k or more below, out of 2**n
        tail += math.comb(n, k)
        if tail > (1 - confidence) * 2 ** n:
            break
        best = k
    return best


def cache_dir() -> str:
    """Where ``'auto'`` keeps its decisions on disk: ``$TIMM_SPLIT_CACHE_DIR/auto`` if that variable is set, else
    ``$XDG_CACHE_HOME/timm_split/auto``, else ``~/.cache/timm_split/auto``. One JSON file per decision; delete the
    folder (or call ``AutoExecution.forget(disk=True)``) to time again."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "timm_split")
    return os.path.join(root, "auto")


class Key(NamedTuple):
    """What a decision is kept for: the members' devices, the view's shape and dtype, whether one batch is shared,
    train mode, grad, autocast (on, dtype) and a channels-last input. ``shape[0]`` is the batch: a decision for a key
    also serves the same key at a smaller batch (:meth:`AutoExecution.choose`)."""

    devices: Tuple[str, ...]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    shared: bool
    training: bool
    grad: bool
    autocast: Tuple[bool, Optional[torch.dtype]]
    channels_last: bool


class Decision(NamedTuple):
    """What ``'auto'`` decided for one key, and the evidence (all ratios are a time over the loop's time in the same
    round).

    Attributes:
        winner: the strategy's name.
        source: ``'trials'`` (timed now), ``'process'`` (decided earlier in this process), ``'disk'`` (read from
            :func:`cache_dir`), ``'batch'`` (the decision for a larger batch of the same per-sample input and mode,
            ``reused_from``; no trial) or ``'trivial'`` (one member, the meta device, or nothing but the loop runs).
        best: the candidate that was confirmed against the loop (None if none was).
        median: the median of ``ratios`` (None without a valid round).
        interval: the median's two-sided interval from the sign test (the ``(n-k+1)``-th and ``k``-th smallest
            ratio, ``k = needed_below(n, confidence)``); ``(min, max)`` of the ratios when ``n`` is too small for
            the test; None without a valid round.
        ratios: ``best``'s ratio in each valid paired round (rounds below ``floor`` included once accepted).
        screen: each candidate's median ratio over the screening rounds (empty when there was one candidate).
        ignored: rounds not used because a ratio was below ``floor`` and did not reproduce (taken as a disturbed
            loop call): confirmation rounds not accepted, and screening rounds below ``floor`` when a repeated
            screening round was above it (when none is, the rounds below it rank the candidates and are not counted).
        floor: below this a ratio is suspicious and its round held back until it reproduces (``1/S`` unless
            :class:`AutoOptions` sets it).
        margin: ``best`` had to be faster than the loop by this fraction.
        confidence: the sign test's confidence.
        calls: trial calls per strategy (the real call that follows is not counted).
        seconds: the wall time of all trials (by the clock ``'auto'`` was given).
        loop_seconds: the median of the loop's timed calls (None if not timed).
        reason: one line on why ``winner`` won.
        accepted: confirmation rounds whose ratio was below ``floor`` and that were accepted because it reproduced
            (0: none; the class docstring's rule 4); they are in ``ratios``.
        accepted_of: the rounds (below the floor or not) that ``accepted`` was counted among when accepted.
        reused_from: with ``source='batch'``, the batch the reused decision was made at (the other fields are that
            decision's evidence; no trial was paid for this one); None otherwise.
    """

    winner: str
    source: str
    best: Optional[str] = None
    median: Optional[float] = None
    interval: Optional[Tuple[float, float]] = None
    ratios: Tuple[float, ...] = ()
    screen: Mapping[str, float] = {}
    ignored: int = 0
    floor: Optional[float] = None
    margin: float = 0.0
    confidence: float = 0.0
    calls: Mapping[str, int] = {}
    seconds: float = 0.0
    loop_seconds: Optional[float] = None
    reason: str = ""
    accepted: int = 0
    accepted_of: int = 0
    reused_from: Optional[int] = None

    @property
    def trial_calls(self) -> int:
        """All trial calls."""
        return sum(self.calls.values())

    @property
    def loop_calls(self) -> Optional[float]:
        """The trials' wall time in loop calls (None if the loop was not timed)."""
        return self.seconds / self.loop_seconds if self.loop_seconds else None

    def summary(self) -> str:
        """The decision's evidence and cost in words (its log line, after the key)."""
        parts = [self.reason]
        if self.best is not None:
            shown = "n/a" if self.interval is None else "[%.3f, %.3f]" % self.interval
            parts.append(f"confirmation of {self.best!r}: median time / loop "
                         f"{'n/a' if self.median is None else f'{self.median:.3f}'}, interval {shown} over "
                         f"{len(self.ratios)} paired rounds {[round(r, 3) for r in self.ratios]} (sign test at "
                         f"{100 * self.confidence:.0f}%; must be below {1 - self.margin:.3f} = 1 - margin "
                         f"{100 * self.margin:.0f}%)")
        if self.screen:
            parts.append(f"screening medians {dict((n, round(v, 3)) for n, v in self.screen.items())}")
        if self.accepted:
            parts.append(f"ratio below 1/S reproduced in {self.accepted} of {self.accepted_of} rounds: accepted (the "
                         f"loop is slowed by thread oversubscription or load; floor {self.floor:.3f}, 1/S unless set)")
        if self.ignored:
            parts.append(f"{self.ignored} round(s) ignored (a ratio below the floor {self.floor:.3f}, 1/S unless set, "
                         "that did not reproduce: taken as a disturbed loop call)")
        cost = self.loop_calls
        parts.append(f"First-call cost: {self.trial_calls} trial calls {dict(self.calls)} in {self.seconds:.2f} s"
                     + ("" if cost is None else f" = {cost:.1f} loop calls (loop {1e3 * self.loop_seconds:.1f} ms "
                                                "per call)"))
        return "; ".join(parts)

    def as_json(self) -> Dict[str, Any]:
        """A JSON-ready dict of the fields (what the disk cache stores; ``reused_from`` only when set, so the files
        are those an earlier version wrote and reads)."""
        out = self._asdict()
        if out["reused_from"] is None:
            del out["reused_from"]
        out.update(ratios=list(self.ratios), screen=dict(self.screen), calls=dict(self.calls),
                   interval=list(self.interval) if self.interval else None)
        return out


@dataclasses.dataclass(frozen=True)
class AutoOptions:
    """How ``'auto'`` decides (see :class:`AutoExecution`).

    Args:
        repeats: at most this many paired rounds (loop and the best candidate, order alternating), plus one more per
            round below ``floor`` (re-measured), at most ``repeats // 2`` more. A candidate wins after at least
            ``needed_below(n, confidence)`` rounds (5 at 0.95), so ``repeats`` must allow that.
        screen: rounds of every candidate (one call each, order rotating) that pick the best one to confirm, when
            there is more than one besides the loop; their ratios are not reused in the confirmation (that would
            favour the candidate that was lucky in screening).
        margin: the best candidate replaces the loop only if its median ratio is below ``1 - margin`` beyond noise.
        confidence: of the sign test that separates the best candidate from ``1 - margin``.
        floor: a ratio below this is suspicious: its round is held back and re-measured, and accepted only if the
            low ratio reproduces (:class:`AutoExecution`, rule 4); None: ``1/S`` (on a quiet machine no strategy runs
            S members in less time than the loop runs one of them).
        cache: share decisions with every ``AutoExecution(cache=True)`` of this process (False: time every time,
            and no disk cache either).
        disk: with ``cache``, also read and write decisions in :func:`cache_dir`, so another process with the same
            model, input, mode, threads, machine and torch pays no trial.

    Raises:
        ValueError: an option out of range, with the accepted range.
    """

    repeats: int = 8
    screen: int = 2
    margin: float = 0.03
    confidence: float = 0.95
    floor: Optional[float] = None
    cache: bool = True
    disk: bool = True

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), e.g. 0.95, got {self.confidence!r}")
        first = next((n for n in range(1, 64) if needed_below(n, self.confidence) is not None), 64)
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < first:
            raise ValueError(f"repeats must be an int >= {first} (the fewest rounds that can separate a candidate "
                             f"from the loop at confidence {self.confidence}), got {self.repeats!r}; e.g. 8")
        if isinstance(self.screen, bool) or not isinstance(self.screen, int) or self.screen < 1:
            raise ValueError(f"screen must be an int >= 1, e.g. 2, got {self.screen!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), e.g. 0.03, got {self.margin!r}")
        if self.floor is not None and (isinstance(self.floor, bool) or not isinstance(self.floor, (int, float))
                                       or not 0 < self.floor <= 1):
            raise ValueError(f"floor must be None (1/S) or in (0, 1], e.g. 0.25, got {self.floor!r}")
        for name in ("cache", "disk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def fields(self) -> Dict[str, Any]:
        """The options that change a decision (for the cache keys)."""
        return dict(repeats=self.repeats, screen=self.screen, margin=self.margin, confidence=self.confidence,
                    floor=self.floor)


class AutoExecution(Execution):
    """Time the candidates on the first call for each (devices, per-sample input, mode); keep one only if it beats
    the loop.

    A trial is one call: forward, plus ``backward`` of the outputs' sum when a graph is needed (so no graph
    outlives its trial); buffers, ``.grad`` and RNG states are restored afterwards, so the real call that follows
    gives what the loop gives. A candidate that cannot run the members (``packed`` across devices,
    ``threads+packed`` on CUDA...) is skipped, and so is one that would repeat another's work: ``'threads'`` or
    ``'threads+packed'`` with one worker (one intra-op thread, or S=1), or any candidate for a single member.

    The rule (``ratio``: a candidate's time over the loop's in the same round, so slow drifts of the machine's load
    cancel):

    1. Warm-up: one untimed call of each of the N runnable strategies, the loop included (it builds caches: packed
       programs, oneDNN primitives).
    2. Screening, only with two or more candidates besides the loop: ``screen`` rounds (2) of every strategy, the
       order rotating; the candidate with the lowest median ratio is the one confirmed. If even it is not below 1,
       the loop wins here.
    3. Confirmation: paired rounds of the loop and that candidate, the order alternating, fresh (the screening
       rounds are not reused). After each, with ``n`` valid rounds of which ``b`` have a ratio below
       ``1 - margin`` (0.97): the candidate wins when ``b >= needed_below(n, confidence)`` (a sign test: the upper
       end of the median ratio's 95% interval is below ``1 - margin``; at least 5 rounds, all below; 7 of 8). The
       loop wins as soon as that can no longer happen within ``repeats`` rounds (8; more with rounds below the
       floor, rule 4), neither with the valid rounds nor by the rounds below the floor reproducing, so a candidate
       within noise of the loop loses after a few rounds.
    4. A round with a ratio below ``floor`` (``1/S``: on a quiet machine no strategy runs S members in less time
       than the loop runs one) is suspicious, not impossible: it is either a measurement error (the loop's call
       disturbed, e.g. by a data loader starting up) or real (on an oversubscribed CPU a loop of multi-threaded
       OpenMP calls is that slow against members on their own threads with one OpenMP thread each: 0.09-0.11
       measured at load 11 on 2 cores, round after round). So such a confirmation round is held back (not in the
       sign test of rule 3) and re-measured: it adds one round to ``repeats``, at most ``repeats // 2`` (4) such
       rounds. The held rounds are accepted, all of them, as soon as the low ratio *reproduces*: with ``n`` rounds
       so far (held or not), the median ratio's sign-test interval (:func:`needed_below`; its upper end is the
       ``k``-th smallest ratio) lies wholly below ``floor``, i.e. ``k = needed_below(n, confidence)`` or more of the
       ``n`` rounds are below it (5 of 5, 6 of 6, 7 of 7, 7 of 8, 8 of 9, 9 of 10...), and that interval spans at
       most a factor 2 (its upper end over its lower end; a steady slowdown of the loop gives steady ratios, 1.7
       between the extremes measured above, where disturbances have any length). From then on the rounds below
       the floor count like any other in rule 3 (and the log line says "ratio below 1/S reproduced in k of n
       rounds: accepted"). Held rounds never accepted are ignored, as is a screening round below ``floor``, which
       is repeated once; only when no screening round is above the floor do the rounds below it rank the
       candidates (the ranking within a round does not depend on the loop's time), and the confirmation decides.

       Why this rule: if the low ratios came from disturbances of at most half the loop's calls (the loop's median
       call undisturbed, so the true median ratio at or above ``floor``), each round would be below the floor with
       probability at most 1/2 and ``k`` of ``n`` with probability at most ``P(Binomial(n, 1/2) >= k) <= 5%`` (the
       sign test of rule 3, with ``floor`` for ``1 - margin``); looked at after every round, up to 12 rounds,
       at most 6.3%, and far less for rarer disturbances: 0.3% if one loop call in 3 is disturbed, 0.04% at one in
       5. A one-off low ratio is never accepted, nor is an alternating pattern (half the rounds below the floor).
       A loop slowed in 9 rounds of 10 is accepted 83% of the time within 8 rounds, 93% within 12 (ratios within
       the spread); what is not accepted keeps the loop, never worse than the loop.

    If a candidate is truly no faster than ``1 - margin`` (each round below it with probability 1/2 at most), it
    wins with probability at most 5.1% (the sign test at 95%, looked at after every round, ``repeats=8``; rounds
    taken as independent), far less the slower it truly is (0.3% at 3 rounds in 10 below); on average such a
    candidate is dropped after 3.8 rounds. A candidate below ``1 - margin`` in 9 rounds of 10 wins 83% of the time.

    First-call cost, in trial calls (the real call follows): ``N`` warm-up, ``screen * N`` screening (plus ``N``
    per repeated screening round, at most one), then 2 per confirmation round: with the default four candidates
    12 calls when screening keeps the loop, 4 + 8 + 10 = 22 for the fastest win (4 + 12 + 10 = 26 when every
    round is below the floor: screening repeated, 5 of 5 accepted), 28 at most without a round below the floor.
    The re-measurement of rounds below the floor adds at most ``2 * (repeats // 2)`` = 8 calls (4 paired rounds):
    36 at most, 40 with a repeated screening round (``N + (screen + 1) * N + 2 * (repeats + repeats // 2)``);
    with one candidate besides the loop 2 + 2 * (2..12) = 6..26. In seconds that is about that many loop calls
    (slower candidates cost more); the decision's log line states both. With a cached decision (the process, or the
    disk) the cost is 0 trial calls, and so it is for a batch no larger than one already decided for the same
    per-sample input and mode (an epoch's or an evaluation's partial last batch, a data-parallel rank's share): that
    decision is reused (``source='batch'``, logged once at DEBUG); a larger batch, another per-sample shape or
    another mode (training with a graph, evaluation) pays the cost again. Freed memory is handed back to the OS
    after every trial (glibc's ``malloc_trim``) and the losers' caches are dropped, so the peak is the most
    demanding single candidate's call, not the sum.

    Decisions are remembered per instance and, with ``cache=True``, for the whole process and (``disk=True``) in
    :func:`cache_dir` (``$TIMM_SPLIT_CACHE_DIR``, default ``~/.cache/timm_split``), keyed by the members'
    architecture (every tensor's name, shape, dtype, strides; every module's class and mode), the :class:`Key`,
    the candidates and options, ``torch.get_num_threads()``, the cores this process may use, the CPU or GPU model
    and the torch version; a smaller batch of the same key finds them in all three places. A cache file that cannot
    be read or parsed is ignored with a warning (and rewritten). :func:`trial_seconds` is the time this process has
    spent on trials.

    Args:
        candidates: strategy names to try; default :attr:`DEFAULT` (``'compile'`` only if named: compiling takes
            about a minute per model). A mapping ``name -> Execution`` tries strategies of your own (not shared
            through the process or disk caches).
        repeats, margin, cache, disk, screen, confidence, floor: see :class:`AutoOptions`.
        clock: the timer, in seconds (default ``time.perf_counter``).

    Raises:
        ValueError: unknown candidates or an option out of range.
    """

    name = "auto"
    _transient = ("_executions", "choices", "trials", "decisions")
    DEFAULT = ("loop", "threads", "packed", "threads+packed")

    def __init__(self, candidates: Union[Sequence[str], Mapping[str, Execution], None] = None, repeats: int = 8,
                 margin: float = 0.03, clock: Callable[[], float] = time.perf_counter, cache: bool = True,
                 disk: bool = True, screen: int = 2, confidence: float = 0.95, floor: Optional[float] = None) -> None:
        self._given = dict(candidates) if isinstance(candidates, Mapping) else {}
        candidates = tuple(candidates or self.DEFAULT)
        known = BASIC
        if not candidates or any(c not in known and c not in self._given for c in candidates):
            raise ValueError(f"auto candidates must be among {known}, got {list(candidates)}")
        self.candidates = candidates
        self.options = AutoOptions(repeats=repeats, screen=screen, margin=margin, confidence=confidence,
                                   floor=floor, cache=cache, disk=disk)
        self._clock = clock
        self._executions: Optional[Dict[str, Execution]] = None
        self.choices: Optional[Dict[Key, str]] = None
        self.trials: Optional[Dict[Key, Dict[str, int]]] = None  # per key: each candidate's trial calls
        self.decisions: Optional[Dict[Key, Decision]] = None

    def __setstate__(self, state: Dict[str, Any]) -> None:
        if "options" not in state:  # pickled before AutoOptions: repeats/margin/cache attributes
            state["options"] = AutoOptions(margin=state.pop("margin", 0.03), cache=state.pop("cache", True))
            state.pop("repeats", None)
        state.setdefault("decisions", None)
        self.__dict__.update(state)

    @property
    def repeats(self) -> int:
        """:attr:`AutoOptions.repeats`."""
        return self.options.repeats

    @property
    def margin(self) -> float:
        """:attr:`AutoOptions.margin`."""
        return self.options.margin

    @staticmethod
    def forget(disk: bool = False) -> None:
        """Forget the decisions shared across this process (``cache=True``), e.g. after the machine's load changed.

        Args:
            disk: also delete the decisions cached in :func:`cache_dir` (every model's).
        """
        _DECISIONS.clear()
        _BATCHES.clear()
        if disk:
            for path in glob.glob(os.path.join(cache_dir(), "*.json")):
                with contextlib.suppress(OSError):
                    os.remove(path)

    def _get(self, name: str) -> Execution:
        if self._executions is None:
            self._executions, self.choices, self.trials, self.decisions = {}, {}, {}, {}
        if name not in self._executions:
            self._executions[name] = self._given.get(name) or make_named(name)
        return self._executions[name]

    def _drop(self, name: str) -> None:
        """Free a candidate's caches (packed programs, thread pools) once it is out of the running."""
        ex = (self._executions or {}).pop(name, None)
        if ex is not None:
            ex.reset()

    @staticmethod
    def key(members: Members, views: List[torch.Tensor]) -> Key:
        """The cache key: devices, view shape and dtype, whether one batch is shared, training, grad, autocast
        (on, dtype) on the first member's device type, and whether the input is channels-last."""
        dev = module_device(members[0]).type
        autocast = torch.is_autocast_enabled(dev) if dev in ("cpu", "cuda") else False
        x = views[0]
        return Key(tuple(str(module_device(m)) for m in members), tuple(x.shape), x.dtype,
                   all(v is x for v in views), is_training(members[0]), needs_graph(members),
                   (autocast, torch.get_autocast_dtype(dev) if autocast else None),
                   x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))

    def cache_fields(self, members: Members, key: Key) -> Dict[str, Any]:
        """Everything a shared (process or disk) decision is keyed by.

        Args:
            members: the members the decision is for.
            key: this call's :class:`Key`.

        Returns:
            A JSON-ready dict: the rule's version, the members' architecture digest (every tensor's name, shape,
            dtype, strides; every module's class and mode), ``key``'s fields, the candidates and options, intra-op
            and inter-op threads, the cores this process may use, the CPU model, the GPUs' names and the torch
            version.
        """
        cuda = sorted({d for d in key.devices if d.startswith("cuda")})
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 0
        return dict(rule=_RULE, digest=_digest(members), devices=list(key.devices), shape=list(key.shape),
                    dtype=str(key.dtype), shared=key.shared, training=key.training, grad=key.grad,
                    autocast=[key.autocast[0], str(key.autocast[1])], channels_last=key.channels_last,
                    candidates=list(self.candidates), options=self.options.fields(),
                    threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(), cpus=cpus,
                    cpu=_cpu_model(), gpus=[torch.cuda.get_device_name(torch.device(d)) for d in cuda],
                    torch=torch.__version__)

    def choose(self, members: Members, views: List[torch.Tensor]) -> str:
        """The winner for this call's key: remembered, decided earlier in this process or on disk, reused from a
        larger batch of the same per-sample input and mode, or timed now.

        Args:
            members: the members to run.
            views: their inputs (one per member; the same tensor when the batch is shared).

        Returns:
            The strategy's name; :attr:`decisions` holds the evidence (a :class:`Decision`) per key.
        """
        self._get("loop")
        key = self.key(members, views)
        if key in self.choices:
            return self.choices[key]
        shared = self.options.cache and not self._given and module_device(members[0]).type != "meta"
        fields = self.cache_fields(members, key) if shared else None
        text = json.dumps(fields, sort_keys=True) if shared else ""
        decision = _DECISIONS.get(text) if shared else None
        if decision is not None:
            decision = decision._replace(source="process")
        elif shared and self.options.disk:
            decision = _read_disk(fields, self.candidates)
            if decision is not None:
                _DECISIONS[text] = decision
                if key.shape:
                    _BATCHES.setdefault(_family_text(fields), {})[key.shape[0]] = decision
        if decision is not None:
            _logger.info("auto: '%s' for devices %s, input %s (%s; no trials)", decision.winner, key.devices,
                         list(key.shape), _describe_source(decision, fields))
            return self._remember(key, decision, {})
        decision = self._larger_batch(key, fields if shared else None)
        if decision is not None:
            _logger.debug("auto: '%s' for devices %s, input %s, training=%s, grad=%s: the decision for batch %d of "
                          "the same per-sample input and mode, reused (no trials; only a larger batch is timed "
                          "again)", decision.winner, key.devices, list(key.shape), key.training, key.grad,
                          decision.reused_from)
            return self._remember(key, decision, {})
        decision = self._decide(members, views, key)
        if shared and decision.source == "trials":
            _DECISIONS[text] = decision
            if key.shape:
                _BATCHES.setdefault(_family_text(fields), {})[key.shape[0]] = decision
            if self.options.disk:
                _write_disk(fields, decision)
        return self._remember(key, decision, dict(decision.calls))

    def _remember(self, key: Key, decision: Decision, trials: Dict[str, int]) -> str:
        """Keep ``decision`` for ``key`` in this instance; its winner."""
        self.decisions[key], self.trials[key], self.choices[key] = decision, trials, decision.winner
        return decision.winner

    def _larger_batch(self, key: Key, fields: Optional[Dict[str, Any]]) -> Optional[Decision]:
        """The decision for the smallest batch larger than ``key``'s of the same per-sample input and mode, as a
        ``source='batch'`` decision: one of this instance's, else (``fields``: shared) this process's, else
        (``disk``) one on disk; None when no larger batch was decided."""
        if not key.shape:
            return None
        batch, rest = key.shape[0], key.shape[1:]
        found: Dict[int, Decision] = {}
        for k, d in (self.decisions or {}).items():
            if k.shape and k.shape[0] > batch and k._replace(shape=k.shape[1:]) == key._replace(shape=rest):
                found.setdefault(d.reused_from or k.shape[0], d)
        if fields is not None:
            found.update((b, d) for b, d in _BATCHES.get(_family_text(fields), {}).items()
                         if b > batch and b not in found)
        if not found and fields is not None and self.options.disk:
            for b in _disk_batches(fields):
                if b > batch:
                    d = _read_disk(dict(fields, shape=[b] + list(fields["shape"][1:])), self.candidates)
                    if d is not None:
                        found[b] = d
                        break
        if not found:
            return None
        b = min(found)
        return found[b]._replace(source="batch", reused_from=b)

    def _decide(self, members: Members, views: List[torch.Tensor], key: Key) -> Decision:
        """Time the candidates for ``key`` (the class docstring's rule) and log the decision."""
        if module_device(members[0]).type == "meta" or len(members) == 1:
            return Decision("loop", "trivial", reason="one member or the meta device: nothing to time")
        start = self._clock()
        with _preserved(members):
            decision = self._measure(members, views, graph=key.grad)
        decision = decision._replace(seconds=self._clock() - start)
        with _SPENT_LOCK:
            _SPENT[0] += decision.seconds
        for name in list(self._executions or {}):
            if name not in (decision.winner, "loop"):
                self._drop(name)
        _release_freed_memory()
        _logger.info("auto: '%s' for devices %s, input %s %s, training=%s, grad=%s: %s", decision.winner,
                     key.devices, list(key.shape), "shared" if key.shared else "per-member views", key.training,
                     key.grad, decision.summary())
        return decision

    def _runnable(self, members: Members) -> List[str]:
        """The candidates worth a trial: the loop first; none that would repeat another's work."""
        names = []
        for name in dict.fromkeys(("loop",) + self.candidates):  # the loop is always the reference
            ex = self._get(name)
            if isinstance(ex, ThreadsExecution) and ex.workers_for(members) == 1:
                _logger.info("auto: skipping '%s' (one worker: %s's work on another thread)", name,
                             "packed" if ex.pack else "the loop")
                self._drop(name)
                continue
            names.append(name)
        return names

    def _measure(self, members: Members, views: List[torch.Tensor], graph: bool) -> Decision:
        """Warm-up, screening and confirmation (the class docstring's rule)."""
        opts, dev = self.options, module_device(members[0])
        floor = opts.floor if opts.floor is not None else 1 / len(members)
        floor_name = "1/S" if opts.floor is None else "the floor"
        threshold = 1 - opts.margin
        calls: Dict[str, int] = {}
        loop_times: List[float] = []
        valid_loop_times: List[float] = []
        ignored = 0
        base = dict(floor=floor, margin=opts.margin, confidence=opts.confidence, calls=calls)

        def trial(name: str) -> float:
            calls[name] = calls.get(name, 0) + 1
            t = self._clock()
            out = self._get(name).run(members, views)
            if graph:
                out.float().sum().backward()
            sync(dev)
            elapsed = self._clock() - t
            del out
            _release_freed_memory()
            return elapsed

        def timed_round(names: Sequence[str], what: str, trusted: bool = False
                        ) -> Optional[Tuple[Dict[str, float], bool, float]]:
            """One call of each of ``names`` in that order: the ratios to the loop, whether one is below the floor
            (never with ``trusted``: the low ratio reproduced) and the loop's time; None if the loop took no time."""
            times = {n: trial(n) for n in names}
            loop_times.append(times["loop"])
            if times["loop"] <= 0:
                _logger.info("auto: ignoring a %s round: the loop's call took %g s on this clock", what,
                             times["loop"])
                return None
            ratios = {n: t / times["loop"] for n, t in times.items() if n != "loop"}
            low = {n: round(r, 3) for n, r in ratios.items() if r < floor}
            if low and not trusted:
                _logger.info("auto: ignoring a %s round unless it reproduces: time / loop %s is below %.3f (%s), "
                             "a measurement error (the loop's call, %.1f ms, disturbed?) unless the loop is really "
                             "that slow (thread oversubscription, load); re-measuring", what, low, floor, floor_name,
                             1e3 * times["loop"])
                return ratios, True, times["loop"]
            valid_loop_times.append(times["loop"])
            return ratios, False, times["loop"]

        def loop_seconds() -> Optional[float]:
            """The median of the loop's timed calls, of valid rounds where there are any."""
            kept = valid_loop_times or loop_times
            return statistics.median(kept) if kept else None

        def can_pass(n: int, below: int, rounds: Callable[[int], bool]) -> bool:
            """Whether ``below`` of ``n`` plus ``j`` of ``j`` more can still pass the sign test, for some ``j`` that
            ``rounds(j)`` allows."""
            j = 0
            while rounds(j):
                if (needed_below(n + j, opts.confidence) or n + j + 1) <= below + j:
                    return True
                j += 1
            return False

        runnable = []
        for name in self._runnable(members):  # warm-up: one untimed call each
            try:
                self._get(name).check(members)
                trial(name)
            except Exception as e:  # noqa: BLE001 - any candidate that cannot run is skipped
                _logger.info("auto: skipping '%s' (%s: %.100s)", name, type(e).__name__, str(e))
                self._drop(name)
                continue
            runnable.append(name)
        rivals = [n for n in runnable if n != "loop"]
        if "loop" not in runnable:  # the real call raises the loop's error
            return Decision("loop", "trivial", reason="the loop failed in warm-up", **base)
        if not rivals:
            return Decision("loop", "trivial", reason="no candidate besides the loop can run", **base)

        screen: Dict[str, float] = {}
        if len(rivals) > 1:
            order, attempts = ["loop"] + rivals, 0
            kept: Dict[str, List[float]] = {n: [] for n in rivals}
            low_kept: Dict[str, List[float]] = {n: [] for n in rivals}  # screening rounds below the floor
            while len(kept[rivals[0]]) < opts.screen and attempts < opts.screen + 1:
                result = timed_round(order[attempts % len(order):] + order[:attempts % len(order)], "screening")
                attempts += 1
                if result is None:
                    ignored += 1
                    continue
                ratios, low, _ = result
                for n, r in ratios.items():
                    (low_kept if low else kept)[n].append(r)
            if not kept[rivals[0]] and low_kept[rivals[0]]:
                # every screening round below the floor: the signature of an oversubscribed loop, or of a loop
                # disturbed every time. Within a round the ranking does not depend on the loop's time; whether the
                # low ratio is real is the confirmation's question (rule 4)
                _logger.info("auto: every screening round had a ratio below %.3f (%s): ranking the candidates on "
                             "them; the confirmation tests whether the low ratio reproduces", floor, floor_name)
                kept = low_kept
            else:
                ignored += len(low_kept[rivals[0]])
            if not kept[rivals[0]]:
                return Decision("loop", "trials", ignored=ignored, loop_seconds=loop_seconds(),
                                reason="no screening round could be timed", **base)
            screen = {n: statistics.median(rs) for n, rs in kept.items()}
            best = min(screen, key=screen.get)
            for n in rivals:
                if n != best:
                    self._drop(n)
            _release_freed_memory()
            if screen[best] >= 1:
                return Decision("loop", "trials", screen=screen, ignored=ignored, loop_seconds=loop_seconds(),
                                reason=f"no candidate was faster than the loop in screening (best {best!r})",
                                **base)
        else:
            best = rivals[0]

        confirm: List[float] = []  # best's ratio in the rounds the sign test counts
        every: List[float] = []  # best's ratio in every timed round, held back or not (the reproduction test)
        held: List[float] = []  # the loop's time in the rounds held back (below the floor, not yet accepted)
        extra = opts.repeats // 2  # rounds below the floor are re-measured: at most this many more rounds
        accepted = accepted_of = held_ever = 0  # held_ever: rounds held back, accepted later or not
        outcome, r = None, 0
        while r < opts.repeats + min(extra, held_ever):
            result = timed_round(("loop", best) if r % 2 == 0 else (best, "loop"), "confirmation",
                                 trusted=bool(accepted))
            r += 1
            if result is None:
                ignored += 1
            else:
                ratios, low, loop_time = result
                every.append(ratios[best])
                if low:
                    held.append(loop_time)
                    held_ever += 1
                else:
                    confirm.append(ratios[best])
                k = needed_below(len(every), opts.confidence)
                lo_hi = _interval(every, opts.confidence)
                if held and not accepted and k is not None and lo_hi[1] < floor and lo_hi[1] <= _SPREAD * lo_hi[0]:
                    accepted, accepted_of = len(held), len(every)
                    confirm = list(every)
                    valid_loop_times.extend(held)
                    held = []
                    _logger.info("auto: ratio below 1/S reproduced in %d of %d rounds: accepted (the loop is slowed "
                                 "by thread oversubscription or load; %s = %.3f; the median ratio of %r in "
                                 "[%.3f, %.3f])", accepted, accepted_of, floor_name, floor, best, *lo_hi)
            n, below = len(confirm), sum(x < threshold for x in confirm)
            k = needed_below(n, opts.confidence)
            if k is not None and below >= k:
                outcome = best
                break
            budget = opts.repeats + min(extra, held_ever)
            # the valid rounds (a round held back and re-measured costs no valid round), or the held ones reproducing
            if not (can_pass(n, below, lambda j: r + j <= budget)
                    or (held and can_pass(len(every), len(held),
                                          lambda j: r + j <= opts.repeats + min(extra, held_ever + j)))):
                outcome = "loop"
                break
        ignored += len(held)
        median = statistics.median(confirm) if confirm else None
        interval = _interval(confirm, opts.confidence)
        valid = (f"{sum(x < threshold for x in confirm)} of {len(confirm)} valid rounds below {threshold:.3f}"
                 + (f"; {len(held)} below {floor:.3f} not reproduced" if held else ""))
        if outcome == best:
            reason = f"{best!r} is separated from the loop (its interval is below {threshold:.3f})"
        elif outcome == "loop":
            more = f" and {r - opts.repeats} re-measured" if r > opts.repeats else ""
            reason = f"{best!r} cannot be separated from the loop within {opts.repeats} rounds{more} ({valid})"
        else:
            reason = f"{best!r} not separated from the loop in {r} rounds ({valid})"
        return Decision(outcome if outcome == best else "loop", "trials", best=best, median=median, interval=interval,
                        ratios=tuple(confirm), screen=screen, ignored=ignored, loop_seconds=loop_seconds(),
                        reason=reason, accepted=accepted, accepted_of=accepted_of, **base)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        with self.lock:  # one decision at a time: a thread asking while another decides waits for it
            ex = self._get(self.choose(members, views))
        return ex.run(members, views)

    def chosen(self, training: bool = True) -> Optional[str]:
        """The strategy decided for the first input seen in training (``training=True``: train mode with a graph)
        or evaluation mode; None before such a call."""
        for key, name in (self.choices or {}).items():
            if key.training == training and key.grad == training:
                return name
        return None

    def reset(self) -> None:
        for ex in (self._executions or {}).values():
            ex.reset()


def _interval(ratios: Sequence[float], confidence: float) -> Optional[Tuple[float, float]]:
    """The median's two-sided sign-test interval ``(x[n-k], x[k-1])`` of the sorted ratios, ``k`` from
    :func:`needed_below`; ``(min, max)`` when there are too few; None when there are none."""
    if not ratios:
        return None
    xs = sorted(ratios)
    k = needed_below(len(xs), confidence)
    if k is None:
        return xs[0], xs[-1]
    return xs[len(xs) - k], xs[k - 1]


def _describe_source(decision: Decision, fields: Dict[str, Any]) -> str:
    """The log's words for a decision taken from a cache."""
    evidence = ("median time / loop %.3f over %d rounds, margin %.0f%%" % (decision.median, len(decision.ratios),
                                                                             100 * decision.margin)
                if decision.median is not None else decision.reason)
    if decision.source == "disk":
        return (f"from the disk cache {_disk_path(fields)}: {evidence}; delete the file or call "
                "AutoExecution.forget(disk=True) to time again")
    return f"decided earlier in this process for these members: {evidence}"


def _family_text(fields: Dict[str, Any]) -> str:
    """``fields`` without the batch (the shape's first entry), as JSON: what a smaller batch finds a decision by."""
    return json.dumps(dict(fields, shape=["*"] + list(fields["shape"][1:])), sort_keys=True)


def _disk_path(fields: Dict[str, Any]) -> str:
    """``<digest of the fields without the batch>-b<batch>.json`` in :func:`cache_dir`: the decisions for every
    batch of one per-sample input and mode are found by one ``glob``. The file holds what earlier versions wrote
    (``fields``, ``decision``, ``written``)."""
    family = hashlib.sha256(_family_text(fields).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), f"{family}-b{fields['shape'][0] if fields['shape'] else 0}.json")


def _legacy_path(fields: Dict[str, Any]) -> str:
    """Where versions before the batch reuse kept the decision for ``fields`` (read, never written)."""
    return os.path.join(cache_dir(), hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
                        + ".json")


def _disk_batches(fields: Dict[str, Any]) -> List[int]:
    """The batches decided on disk for ``fields``' per-sample input and mode, ascending."""
    stem = os.path.basename(_disk_path(fields)).rsplit("-b", 1)[0]
    found = (re.fullmatch(re.escape(stem) + r"-b(\d+)\.json", os.path.basename(p))
             for p in glob.glob(os.path.join(glob.escape(cache_dir()), stem + "-b*.json")))
    return sorted(int(m.group(1)) for m in found if m)


def _read_disk(fields: Dict[str, Any], candidates: Sequence[str]) -> Optional[Decision]:
    """The decision cached on disk for ``fields`` (in its file, else in the file an earlier version named); None
    when there is none, or (with a warning) when the file cannot be read, is not a decision of this rule or was
    written for other fields."""
    for path in (_disk_path(fields), _legacy_path(fields)):
        try:
            with open(path) as f:
                record = json.load(f)
            break
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, UnicodeDecodeError, ValueError) as e:
            _logger.warning("auto: ignoring the unreadable cache file %s (%s: %.100s); timing again", path,
                            type(e).__name__, e)
            return None
    else:
        return None
    try:
        if record["fields"] != fields:
            raise ValueError("written for other fields")
        d = dict(record["decision"])
        if d.get("winner") not in candidates and d.get("winner") != "loop":
            raise ValueError(f"winner {d.get('winner')!r} is not a candidate")
        d["interval"] = tuple(d["interval"]) if d.get("interval") else None
        d["ratios"] = tuple(float(x) for x in d.get("ratios", ()))
        decision = Decision(**d)._replace(source="disk", reused_from=None)
        if not isinstance(decision.winner, str):
            raise ValueError("no winner")
        return decision
    except (KeyError, TypeError, ValueError) as e:
        _logger.warning("auto: ignoring the cache file %s (%s: %.100s); timing again", path, type(e).__name__, e)
        return None


def _write_disk(fields: Dict[str, Any], decision: Decision) -> None:
    """Write ``decision`` for ``fields`` in :func:`cache_dir`, whole or not at all; a failure is a warning."""
    path = _disk_path(fields)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(dict(fields=fields, decision=decision.as_json(), written=time.time()), f, indent=1)

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, write)
    except OSError as e:
        _logger.warning("auto: could not cache the decision in %s (%s); it stays for this process", path, e)
