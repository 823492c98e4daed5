"""``'threads'``: the members concurrently on a thread pool, forward and (CPU) backward on the workers."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import Execution, Members, module_device, needs_graph
from .packed import PackedExecution

__all__ = ["ThreadsExecution"]


class _ThreadState:
    """Thread-local autograd/autocast state of the calling thread, to re-enter in a worker."""

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode() if self.inference else torch.set_grad_enabled(self.grad))
            for dev, on, dtype in self.autocast:
                if on:
                    stack.enter_context(torch.autocast(dev, dtype=dtype))
            yield


class ThreadsExecution(Execution):
    """Members concurrently: ``workers`` threads, member ``i`` on worker ``i % workers``.

    Intra-op (OpenMP) threads are per thread in PyTorch, so each worker sets its own count; by default the
    calling thread's count is divided among the workers (2 cores, S=2: one thread per member). With ``cores``
    each worker is pinned (``os.sched_setaffinity`` of the worker thread) to its own cores and runs one intra-op
    thread per core: the "one device per member" set-up on a CPU. On CUDA each member runs on its own stream.

    Backward: autograd runs CPU work on the thread that calls ``backward``, so for CPU members that need a
    graph the call is wrapped in one autograd node whose backward runs each worker's members' own graphs
    (``torch.autograd.grad``) on that worker, concurrently, and hands the gradients back to the outer graph:
    ``.grad``, ``torch.autograd.grad`` and parameter hooks see what the loop gives. The members' graphs are
    freed by that backward, so a second backward through the same call (``retain_graph``) or a double
    backward (``create_graph``) raises; use ``'loop'`` for those. ``parallel_backward=False`` leaves backward
    to autograd (on one thread). On CUDA autograd already runs each device's backward on its own thread.

    Args:
        workers: number of worker threads; default ``min(S, intra-op threads)`` (``len(cores)`` with cores).
        threads_per_worker: intra-op threads per worker; default intra-op threads // workers (at least 1).
        cores: per worker, the CPU ids to pin it to, e.g. ``[[0], [1]]``.
        parallel_backward: run CPU members' backward on the workers too (see above).
        pack: each worker runs its members as one ``'packed'`` network (CPU members of packable architectures
            only): fewer, wider ops per worker. ``auto`` tries it as ``'threads+packed'``.
    """

    _transient = ("_pools", "_streams", "_packers")

    def __init__(self, workers: Optional[int] = None, threads_per_worker: Optional[int] = None,
                 cores: Optional[Sequence[Sequence[int]]] = None, parallel_backward: bool = True,
                 pack: bool = False):
        for arg, val in (("parallel_backward", parallel_backward), ("pack", pack)):
            if not isinstance(val, bool):
                raise ValueError(f"{arg} must be True or False, got {val!r}")
        for arg, val in (("workers", workers), ("threads_per_worker", threads_per_worker)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{arg} must be an int >= 1 or None (automatic), got {val!r}")
        if cores is not None:
            ok = isinstance(cores, (list, tuple)) and all(
                isinstance(cs, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in cs)
                for cs in cores)
            if not ok:
                raise ValueError(f"cores must be a list of CPU id lists, one per worker, e.g. [[0], [1]]; got "
                                 f"{cores!r}")
            cores = [sorted(cs) for cs in cores]
            allowed = os.sched_getaffinity(0)
            if not cores or any(not cs or not set(cs) <= allowed for cs in cores):
                raise ValueError(f"cores must be a non-empty list of non-empty CPU id lists within "
                                 f"{sorted(allowed)}, e.g. [[0], [1]]; got {cores!r}")
            if workers is not None and workers != len(cores):
                raise ValueError(f"workers={workers} but {len(cores)} core sets given; give one per worker")
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.cores = cores
        self.parallel_backward = parallel_backward
        self.pack = pack
        self._pools: Optional[Dict[int, ThreadPoolExecutor]] = None  # per worker count (threads' counts differ)
        self._streams: Optional[Dict[int, Any]] = None
        self._packers: Optional[Dict[int, PackedExecution]] = None

    @property
    def name(self) -> str:  # the name make_execution knows it by
        return "threads+packed" if self.pack else "threads"

    def check(self, members: Members) -> None:
        if self.pack:
            if any(module_device(m).type != "cpu" for m in members):
                raise ValueError("threads with pack=True packs CPU members per worker; on CUDA use 'packed' or "
                                 "'threads'")
            PackedExecution().check(members)  # names the module that cannot be packed

    def _run_members(self, w: int, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        """Worker ``w``'s members on their views, one after another or packed: ``[k, B, ...]``."""
        if self.pack:
            with self.lock:  # one packer per worker slot, shared by the calls (it locks its own kept tensors)
                if self._packers is None:
                    self._packers = {}
                packer = self._packers.setdefault(w, PackedExecution())
            return packer.run(members, views)
        return torch.stack([m(v) for m, v in zip(members, views)])

    def reset(self) -> None:
        with self.lock:
            for pool in (self._pools or {}).values():
                pool.shutdown(wait=False)
            super().reset()

    def workers_for(self, members: Members) -> int:
        """How many workers would run ``members`` now (1: the loop's work on one other thread)."""
        return self._layout(len(members), any(module_device(m).type == "cuda" for m in members))[0]

    def _layout(self, num_members: int, cuda: bool) -> Tuple[int, List[int]]:
        total = torch.get_num_threads()
        default = num_members if cuda else max(1, min(num_members, total))  # GPU members: a thread each
        n = len(self.cores) if self.cores else (self.workers or default)
        n = min(n, num_members)
        if self.threads_per_worker:
            threads = [self.threads_per_worker] * n
        elif self.cores:
            threads = [len(cs) for cs in self.cores[:n]]
        else:
            threads = [max(1, total // n)] * n
        return n, threads

    def _enter_worker(self, w: int, threads: int) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if self.cores:
            os.sched_setaffinity(0, self.cores[w])

    def _worker(self, w: int, threads: int, jobs: List[Tuple[int, nn.Module, torch.Tensor]], state: _ThreadState,
                main_streams: Dict[torch.device, Any]) -> List[Tuple[int, torch.Tensor]]:
        self._enter_worker(w, threads)
        outs = []
        with state.enter():
            if self.pack:
                y = self._run_members(w, [m for _, m, _ in jobs], [v for _, _, v in jobs])
                return [(i, y[j]) for j, (i, _, _) in enumerate(jobs)]
            for i, m, v in jobs:
                dev = module_device(m)
                if dev.type != "cuda":
                    outs.append((i, m(v.to(dev))))
                    continue
                with self.lock:
                    stream = self._streams.get(i)
                    if stream is None:
                        stream = self._streams[i] = torch.cuda.Stream(dev)
                stream.wait_stream(main_streams[dev])
                with torch.cuda.device(dev), torch.cuda.stream(stream):
                    x = v.to(dev, non_blocking=True)
                    if x is v:
                        v.record_stream(stream)
                    outs.append((i, m(x)))
        return outs

    def _pool_for(self, n: int) -> ThreadPoolExecutor:
        """The pool of ``n`` workers (kept; calls from threads with other thread counts get their own)."""
        with self.lock:
            if self._pools is None:
                self._pools, self._streams = {}, {}
            if n not in self._pools:
                self._pools[n] = ThreadPoolExecutor(n, thread_name_prefix="timm_split")
            return self._pools[n]

    def _on_workers(self, n: int, fn: Callable[[int], Any]) -> List[Any]:
        """``fn(w)`` on each of ``n`` workers concurrently; the results in worker order."""
        pool, calling_threads = self._pool_for(n), torch.get_num_threads()
        try:
            return [f.result() for f in [pool.submit(fn, w) for w in range(n)]]
        finally:
            # set_num_threads in a worker also sets the default that new threads start with: restore it
            torch.set_num_threads(calling_threads)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        devices = [module_device(m) for m in members]
        cuda_devs = {d for d in devices if d.type == "cuda"}
        n, threads = self._layout(len(members), bool(cuda_devs))
        if self.parallel_backward and n > 1 and not cuda_devs and needs_graph(members):
            params = [p for m in members for p in m.parameters() if p.requires_grad]
            return _ThreadedBackward.apply(self, members, n, threads, len(views), *views, *params)
        dev0 = devices[0]
        main_streams = {d: torch.cuda.current_stream(d) for d in cuda_devs}
        state = _ThreadState()
        jobs: List[List[Tuple[int, nn.Module, torch.Tensor]]] = [[] for _ in range(n)]
        for i, (m, v) in enumerate(zip(members, views)):
            jobs[i % n].append((i, m, v))
        done = dict(pair for out in self._on_workers(
            n, lambda w: self._worker(w, threads[w], jobs[w], state, main_streams)) for pair in out)
        with self.lock:
            streams = list((self._streams or {}).items())
        for i, stream in streams:
            if i in done:
                main = main_streams[done[i].device]
                main.wait_stream(stream)
                done[i].record_stream(main)
        return torch.stack([done[i].to(dev0) for i in range(len(members))])


class _ThreadedBackward(torch.autograd.Function):
    """CPU members forward and backward on the workers: one node in the caller's graph whose inputs are the views
    and every trainable parameter. Forward builds each worker's members' own graph on that worker; backward runs
    ``torch.autograd.grad`` of those graphs on the same workers, concurrently (autograd releases the GIL), and
    returns the gradients for the views and parameters, which autograd then accumulates as usual."""

    @staticmethod
    def forward(ctx, ex: ThreadsExecution, members: Members, n: int, threads: List[int], num_views: int,
                *tensors: torch.Tensor) -> torch.Tensor:
        views, state = tensors[:num_views], _ThreadState()
        state.grad = True  # Function.forward runs under no_grad; the members' own graphs are wanted

        def forward_worker(w: int) -> Tuple[List[int], Dict[int, torch.Tensor], torch.Tensor]:
            ex._enter_worker(w, threads[w])
            idx = list(range(w, len(members), n))
            # one leaf per distinct view (a shared batch stays shared), keyed by the first member slot it fills
            first = {id(views[i]): i for i in reversed(idx)}
            leaves = {i: views[i].detach().requires_grad_(views[i].requires_grad) for i in first.values()}
            with state.enter():
                y = ex._run_members(w, [members[i] for i in idx], [leaves[first[id(views[i])]] for i in idx])
            return idx, leaves, y

        done = ex._on_workers(n, forward_worker)
        ctx.graphs = (ex, members, threads, done)
        outs = {i: y[j] for idx, _, y in done for j, i in enumerate(idx)}
        return torch.stack([outs[i].detach() for i in range(len(members))])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if getattr(ctx, "graphs", None) is None:
            raise RuntimeError("the 'threads' execution frees the members' graphs in backward, so it cannot run "
                               "backward twice (retain_graph); use set_execution('loop') for that")
        ex, members, threads, done = ctx.graphs
        ctx.graphs = None
        params = [[p for p in m.parameters() if p.requires_grad] for m in members]

        def backward_worker(w: int) -> Dict[int, Optional[torch.Tensor]]:
            ex._enter_worker(w, threads[w])
            idx, leaves, y = done[w]
            if not y.requires_grad:
                return {}
            ins = [v for v in leaves.values() if v.requires_grad] + [p for i in idx for p in params[i]]
            return dict(zip(map(id, ins), torch.autograd.grad([y], ins, [grad[idx]], allow_unused=True)))

        grads: Dict[int, Optional[torch.Tensor]] = {}
        for worker_grads in ex._on_workers(len(done), backward_worker):
            grads.update(worker_grads)
        view_grads: List[Optional[torch.Tensor]] = [None] * len(members)
        for _, leaves, _ in done:  # a view shared by several members: its summed gradient goes to one slot
            for i, v in leaves.items():
                view_grads[i] = grads.get(id(v))
        return (None, None, None, None, None, *view_grads, *[grads.get(id(p)) for ps in params for p in ps])
