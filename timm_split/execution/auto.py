"""``'auto'``: time the candidates once per (devices, input shape, mode) and keep the fastest.

The decision costs a bounded number of calls (see :class:`AutoExecution`) and is remembered for the process:
rebuilding the same architecture (same members' tensors and modules) with the same input does not time again.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import statistics
import time
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .base import Execution, Members, is_training, module_device, needs_graph, sync, tensors_of
from .registry import BASIC, make_named
from .threads import ThreadsExecution

_logger = logging.getLogger(__name__)

__all__ = ["AutoExecution", "Key"]

# decisions shared by every AutoExecution(cache=True) of this process: (architecture digest, key, options) -> name
_DECISIONS: Dict[Tuple, str] = {}


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


class Key(NamedTuple):
    """What a decision is kept for: the members' devices, the view's shape and dtype, whether one batch is shared,
    train mode, grad, autocast (on, dtype) and a channels-last input."""

    devices: Tuple[str, ...]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    shared: bool
    training: bool
    grad: bool
    autocast: Tuple[bool, Optional[torch.dtype]]
    channels_last: bool


class AutoExecution(Execution):
    """Time the candidates on the first call for each (devices, input, mode) and keep the winner.

    A trial is one call: forward, plus ``backward`` of the outputs' sum when a graph is needed (so no graph
    outlives its trial); buffers, ``.grad`` and RNG states are restored afterwards, so the real call that follows
    gives what the loop gives. A candidate that cannot run the members (``packed`` across devices,
    ``threads+packed`` on CUDA...) is skipped, and so is one that would repeat another's work: ``'threads'`` or
    ``'threads+packed'`` with one worker (one intra-op thread, or S=1), or any candidate for a single member.

    The cost of a decision, in trial calls: one warm-up call of each runnable candidate (it builds caches:
    packed programs, oneDNN primitives; not timed), then one timed round (each once, the order rotating).
    That round decides when its best is faster than the runner-up by ``CLOSE`` (10%): N candidates cost 2N
    calls (8 with the default four), then the real call. Otherwise the loop and the two best get up to
    ``repeats - 1`` more rounds, stopping as soon as one is decisive: at most ``2N + 3 (repeats - 1)`` calls
    (14 by default; before issue 28 it was up to ``N + 5N + 15``, 39). A candidate slower than the loop by
    ``PRUNE`` in a round is dropped at once. Freed memory is handed back to the OS after every trial (glibc's
    ``malloc_trim``) and the losers' caches are dropped, so the peak is the most demanding single candidate's
    call, not the sum of all of them. The decision is remembered per instance and, with ``cache=True``, for the
    whole process, keyed by the members' architecture (every tensor's name, shape, dtype; every module's class and
    mode), the key below and the options: a model rebuilt the same way decides without a trial.

    Args:
        candidates: strategy names to try; default :attr:`DEFAULT` (``'compile'`` only if named: compiling takes
            about a minute per model). A mapping ``name -> Execution`` tries strategies of your own (not
            shared through the process-wide cache).
        repeats: at most this many timed rounds. A candidate's score is the median over rounds of its time over
            the loop's in the same round (paired, so drifts in the machine's load cancel); the lowest wins.
        margin: another strategy replaces ``'loop'`` only if it is faster by this fraction (timings on a busy
            machine are noisy; the loop is the safe default).
        clock: the timer, in seconds (default ``time.perf_counter``).
        cache: share decisions with every other ``AutoExecution(cache=True)`` of this process.
    """

    name = "auto"
    _transient = ("_executions", "choices", "trials")
    DEFAULT = ("loop", "threads", "packed", "threads+packed")
    PRUNE = 1.3
    CLOSE = 0.1

    def __init__(self, candidates: Union[Sequence[str], Mapping[str, Execution], None] = None, repeats: int = 3,
                 margin: float = 0.03, clock: Callable[[], float] = time.perf_counter, cache: bool = True) -> None:
        self._given = dict(candidates) if isinstance(candidates, Mapping) else {}
        candidates = tuple(candidates or self.DEFAULT)
        known = BASIC
        if not candidates or any(c not in known and c not in self._given for c in candidates):
            raise ValueError(f"auto candidates must be among {known}, got {list(candidates)}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), e.g. 0.03, got {margin!r}")
        if not isinstance(cache, bool):
            raise ValueError(f"cache must be True or False, got {cache!r}")
        self.candidates, self.repeats, self.margin, self.cache = candidates, repeats, margin, cache
        self._clock = clock
        self._executions: Optional[Dict[str, Execution]] = None
        self.choices: Optional[Dict[Tuple, str]] = None
        self.trials: Optional[Dict[Tuple, Dict[str, int]]] = None  # per key: each candidate's trial calls

    @staticmethod
    def forget() -> None:
        """Forget the decisions shared across this process (``cache=True``), e.g. after the machine's load changed."""
        _DECISIONS.clear()

    def _get(self, name: str) -> Execution:
        if self._executions is None:
            self._executions, self.choices, self.trials = {}, {}, {}
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

    def choose(self, members: Members, views: List[torch.Tensor]) -> str:
        """The winner for this call's key: remembered, decided earlier in this process, or timed now."""
        self._get("loop")
        key = self.key(members, views)
        if key in self.choices:
            return self.choices[key]
        shared = (_digest(members), key, self.candidates, self.repeats, self.margin, torch.get_num_threads()) \
            if self.cache and not self._given else None
        if shared in _DECISIONS:
            winner = self.choices[key] = _DECISIONS[shared]
            self.trials[key] = {}
            _logger.info("auto: '%s' for devices %s, input %s (decided earlier in this process for these members; "
                         "no trials)", winner, key.devices, list(key.shape))
            return winner
        winner = self.choices[key] = self._decide(members, views, key)
        if shared is not None:
            _DECISIONS[shared] = winner
        return winner

    def _decide(self, members: Members, views: List[torch.Tensor], key: Tuple) -> str:
        """Time the candidates for ``key`` and log the decision."""
        if module_device(members[0]).type == "meta" or len(members) == 1:
            self.trials[key] = {}
            return "loop"
        start = self._clock()
        with _preserved(members):
            times, calls = self._time(members, views, graph=key.grad)
        self.trials[key] = calls
        score = self._score(times) if "loop" in times else {}
        winner = min(score, key=score.get) if score else "loop"
        if "loop" in score and score[winner] > 1 - self.margin:
            winner = "loop"
        for name in list(self._executions or {}):
            if name not in (winner, "loop"):
                self._drop(name)
        _release_freed_memory()
        _logger.info("auto: '%s' for devices %s, input %s %s, training=%s, grad=%s (loop %.1f ms; time / loop: %s; "
                     "%d trial calls in %.1f s)", winner, key.devices, list(key.shape),
                     "shared" if key.shared else "per-member views", key.training, key.grad,
                     1e3 * statistics.median(times.get("loop") or [0]), {n: round(v, 3) for n, v in score.items()},
                     sum(calls.values()), self._clock() - start)
        return winner

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

    def _time(self, members: Members, views: List[torch.Tensor],
              graph: bool) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
        """The finalists' times over the rounds, and every candidate's number of trial calls (class docstring)."""
        dev = module_device(members[0])
        calls: Dict[str, int] = {}

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

        times: Dict[str, List[float]] = {}
        for name in self._runnable(members):  # warm-up: one untimed call each
            try:
                self._get(name).check(members)
                trial(name)
            except Exception as e:  # noqa: BLE001 - any candidate that cannot run is skipped
                _logger.info("auto: skipping '%s' (%s: %.100s)", name, type(e).__name__, str(e))
                self._drop(name)
                continue
            times[name] = []
        finalists = list(times) if "loop" in times else []  # no loop: the real call raises the error
        for r in range(self.repeats if len(finalists) > 1 else 0):
            for name in finalists[r % len(finalists):] + finalists[:r % len(finalists)]:
                times[name].append(trial(name))
            score = self._score({n: times[n] for n in finalists})
            ranked = sorted(score, key=score.get)
            ranked = [n for n in ranked if score[n] <= self.PRUNE] or ranked[:1]  # drop the clearly slower
            decisive = len(ranked) < 2 or score[ranked[1]] >= (1 + self.CLOSE) * score[ranked[0]]
            # the loop (the reference) and the rest, or on a close call the two best
            finalists = list(dict.fromkeys(["loop"] + (ranked if decisive else ranked[:2])))
            if decisive:
                break
        return {n: times[n] for n in finalists}, calls

    def _score(self, times: Dict[str, List[float]]) -> Dict[str, float]:
        """Per candidate, the median over rounds of its time over the loop's in the same round (paired, which
        cancels slow drifts of the machine's load)."""
        return {n: statistics.median(t / ref for t, ref in zip(ts, times["loop"])) for n, ts in times.items()
                if n in self.candidates and ts}

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        return self._get(self.choose(members, views)).run(members, views)

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
