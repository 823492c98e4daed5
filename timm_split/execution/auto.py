"""``'auto'``: time the candidates once per (devices, input shape, training, grad) and keep the fastest."""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .base import Execution, Members, is_training, module_device, needs_graph, sync
from .registry import BASIC, make_named

_logger = logging.getLogger(__name__)

__all__ = ["AutoExecution"]


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


class AutoExecution(Execution):
    """Time the candidates on the first call for each (devices, input shape, training, grad) and keep the winner.

    A trial runs forward (plus ``backward`` of the outputs' sum when a graph is needed); buffers, ``.grad``
    and RNG states are restored afterwards, so the real call that follows gives what the loop gives. A
    candidate that cannot run the members (``packed`` across devices, ``threads+packed`` on CUDA...) is skipped.

    Args:
        candidates: strategy names to try; default :attr:`DEFAULT` (``'compile'`` only if named: compiling takes
            about a minute per model). A mapping ``name -> Execution`` tries strategies of your own.
        repeats: timed rounds, each running every candidate once (order rotating) after one warm-up call. A
            candidate's score is the median over rounds of its time over the loop's in the same round (paired,
            so drifts in the machine's load cancel); the lowest wins. A candidate more than ``PRUNE`` times slower
            than the loop in the first round is not timed again. If the two best are within ``CLOSE`` of each
            other, they and the loop get ``repeats`` more rounds, and the scores are taken over all rounds.
        margin: another strategy replaces ``'loop'`` only if it is faster by this fraction (timings on a busy
            machine are noisy; the loop is the safe default).
        clock: the timer, in seconds (default ``time.perf_counter``).
    """

    name = "auto"
    _transient = ("_executions", "choices")
    DEFAULT = ("loop", "threads", "packed", "threads+packed")
    PRUNE = 1.3
    CLOSE = 0.1

    def __init__(self, candidates: Union[Sequence[str], Mapping[str, Execution], None] = None, repeats: int = 5,
                 margin: float = 0.03, clock: Callable[[], float] = time.perf_counter) -> None:
        self._given = dict(candidates) if isinstance(candidates, Mapping) else {}
        candidates = tuple(candidates or self.DEFAULT)
        known = BASIC
        if not candidates or any(c not in known and c not in self._given for c in candidates):
            raise ValueError(f"auto candidates must be among {known}, got {list(candidates)}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), e.g. 0.03, got {margin!r}")
        self.candidates, self.repeats, self.margin = candidates, repeats, margin
        self._clock = clock
        self._executions: Optional[Dict[str, Execution]] = None
        self.choices: Optional[Dict[Tuple, str]] = None

    def _get(self, name: str) -> Execution:
        if self._executions is None:
            self._executions, self.choices = {}, {}
        if name not in self._executions:
            self._executions[name] = self._given.get(name) or make_named(name)
        return self._executions[name]

    @staticmethod
    def key(members: Members, views: List[torch.Tensor]) -> Tuple:
        """The cache key: devices, view shapes/dtype (and whether one batch is shared), training, grad."""
        return (tuple(str(module_device(m)) for m in members), tuple(views[0].shape), views[0].dtype,
                all(v is views[0] for v in views), is_training(members[0]), needs_graph(members))

    def choose(self, members: Members, views: List[torch.Tensor]) -> str:
        """The winner for this call's key, timing the candidates if the key is new."""
        self._get("loop")
        key = self.key(members, views)
        if key in self.choices:
            return self.choices[key]
        if module_device(members[0]).type == "meta":
            self.choices[key] = "loop"
            return "loop"
        with _preserved(members):
            times = self._time(members, views, graph=key[-1])
        score = self._score(times) if "loop" in times else {}
        winner = min(score, key=score.get) if score else "loop"
        if "loop" in score and score[winner] > 1 - self.margin:
            winner = "loop"
        self.choices[key] = winner
        _logger.info("auto: '%s' for devices %s, input %s %s, training=%s, grad=%s (loop %.1f ms; time / loop: %s)",
                     winner, key[0], list(key[1]), "shared" if key[3] else "per-member views", key[4], key[5],
                     1e3 * statistics.median(times.get("loop") or [0]), {n: round(v, 3) for n, v in score.items()})
        return winner

    def _time(self, members: Members, views: List[torch.Tensor], graph: bool) -> Dict[str, List[float]]:
        """Each runnable candidate's times over the rounds (see the class docstring)."""
        dev = module_device(members[0])

        def trial(ex: Execution) -> float:
            t = self._clock()
            out = ex.run(members, views)
            if graph:
                out.float().sum().backward()
            sync(dev)
            return self._clock() - t

        def timed_round(names: List[str], r: int) -> None:  # each once, the order rotating with the round
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(trial(self._get(name)))

        runnable: List[str] = []
        times: Dict[str, List[float]] = {}
        for name in dict.fromkeys(("loop",) + self.candidates):  # the loop is always the reference
            ex = self._get(name)
            try:
                ex.check(members)
                trial(ex)
            except Exception as e:  # noqa: BLE001 - any candidate that cannot run is skipped
                _logger.info("auto: skipping '%s' (%s: %.100s)", name, type(e).__name__, str(e))
                continue
            runnable.append(name)
            times[name] = []
        for r in range(self.repeats if "loop" in times else 0):  # no loop: the real call raises the error
            if r == 1:  # after one timed round, drop the clearly slower
                runnable = [n for n in runnable if n == "loop" or times[n][0] <= self.PRUNE * times["loop"][0]]
            timed_round(runnable, r)
        score = self._score(times) if "loop" in times else {}
        best = sorted(score, key=score.get)[:2]
        if len(best) == 2 and score[best[1]] < (1 + self.CLOSE) * score[best[0]]:
            # a close call: the two best (and the loop, the reference) get as many rounds again
            finalists = list(dict.fromkeys(["loop"] + best))
            for r in range(self.repeats):
                timed_round(finalists, r)
            return {n: times[n] for n in finalists}
        return times

    def _score(self, times: Dict[str, List[float]]) -> Dict[str, float]:
        """Per candidate, the median over rounds of its time over the loop's in the same round (paired, which
        cancels slow drifts of the machine's load)."""
        return {n: statistics.median(t / ref for t, ref in zip(ts, times["loop"])) for n, ts in times.items()
                if n in self.candidates and ts}

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        return self._get(self.choose(members, views)).run(members, views)

    def reset(self) -> None:
        for ex in (self._executions or {}).values():
            ex.reset()
