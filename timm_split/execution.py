"""How the S members of a :class:`~timm_split.ensemble.SplitEnsemble` run: one call picks a strategy.

``ens.set_execution(name, **options)`` with ``name`` one of:

* ``'loop'``: members one after another (the reference; what ``forward_members`` always did).
* ``'threads'``: members concurrently on a thread pool (inter-op parallelism), each worker with its share of
  the intra-op threads, optionally pinned to its own cores; on CUDA each member gets its own stream.
* ``'vmap'``: one ``torch.func.vmap`` over ``functional_call`` with the members' parameters and buffers
  stacked; updated buffers (BatchNorm running stats) are written back, so it matches the loop in training too.
* ``'compile'``: ``torch.compile`` of the loop, compiled lazily on the first call.
* ``'packed'``: the S members rewritten as one network of S-times wider grouped layers (conv ``groups*S``,
  BatchNorm/GroupNorm over ``S*C`` channels, linear and LayerNorm per member through batched matmuls),
  run with ``functional_call`` on tensors packed from the members' own (so gradients reach them). Only nets
  made of known per-channel modules (ResNet, EfficientNet/MobileNet, RegNet...) are accepted; anything else
  raises a ``ValueError`` naming the module.
* ``'auto'``: times the candidates once per (devices, input shape, training, grad) and keeps the fastest.

Every strategy returns the loop's result up to float tolerance (with dropout or drop-path active the random
draws differ), lets gradients reach every member's parameters, and leaves every member's buffers as the loop
would. Strategies only replace :meth:`SplitEnsemble.forward_members` (and so ``forward``);
``forward_features``/``forward_head`` always loop.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import logging
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

_logger = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "Execution", "LoopExecution", "ThreadsExecution", "VmapExecution", "CompileExecution",
           "PackedExecution", "AutoExecution", "make_execution"]

STRATEGIES = ("auto", "loop", "threads", "vmap", "compile", "packed")
Members = Sequence[nn.Module]


def _device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def _is_training(module: nn.Module) -> bool:
    return any(m.training for m in module.modules())


def _needs_graph(members: Members) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for m in members for p in m.parameters())


def _version_key(members: Members) -> Optional[Tuple]:
    """Changes whenever any member tensor is replaced, moved or updated in place (optimizer step, BN update);
    None for inference tensors, which have no version counter (then nothing is cached)."""
    ts = [t for m in members for t in _tensors(m).values()]
    if any(t.is_inference() for t in ts):
        return None
    return tuple((t.data_ptr(), t._version, t.device) for t in ts)


def _check_same_device(members: Members, name: str) -> torch.device:
    devices = {_device(m) for m in members}
    if len(devices) > 1:
        raise ValueError(f"execution '{name}' needs every member on one device, got {sorted(map(str, devices))}; "
                         "use 'threads' or 'loop' after to_devices()")
    return devices.pop()


def _check_same_structure(members: Members, name: str) -> None:
    ref = {k: (tuple(v.shape), v.dtype) for k, v in _tensors(members[0]).items()}
    for i, m in enumerate(members[1:], 1):
        if {k: (tuple(v.shape), v.dtype) for k, v in _tensors(m).items()} != ref:
            raise ValueError(f"execution '{name}' needs members of one architecture; member {i} differs from "
                             "member 0 in its parameter names, shapes or dtypes")


class Execution(abc.ABC):
    """A way to run the members: ``run(members, views) -> [S, B, ...]`` on the first member's device.

    Subclasses hold only caches besides their options; ``reset()`` drops the caches (called when the ensemble
    moves or changes device), and pickling/deep-copying drops them too.
    """

    name = "base"
    _transient: Tuple[str, ...] = ()

    def check(self, members: Members) -> None:
        """Raise ``ValueError`` (with a hint) if this strategy cannot run ``members``."""

    @abc.abstractmethod
    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        """Run every member on its view; returns their outputs stacked ``[S, B, ...]``."""

    def reset(self) -> None:
        """Drop caches (stacked/packed tensors, thread pools, compiled code)."""
        for k in self._transient:
            setattr(self, k, None)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update({k: None for k in self._transient})
        return state

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


# ---------------------------------------------------------------------------------------------------- loop
class LoopExecution(Execution):
    """Members one after another; each view goes to its member's device, outputs to the first member's."""

    name = "loop"

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        dev0 = _device(members[0])
        outs = []
        for m, v in zip(members, views):
            dev = _device(m)
            outs.append(m(v.to(dev, non_blocking=True)).to(dev0))
        return torch.stack(outs)


def _loop(members: Members, views: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack([m(v) for m, v in zip(members, views)])


# ---------------------------------------------------------------------------------------------------- threads
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

    name = "threads"
    _transient = ("_pool", "_streams", "_packers")

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
            cores = [sorted(int(c) for c in cs) for cs in cores]
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
        self._pool: Optional[ThreadPoolExecutor] = None
        self._streams: Optional[Dict[int, Any]] = None
        self._packers: Optional[Dict[int, PackedExecution]] = None

    def check(self, members: Members) -> None:
        if self.pack:
            if any(_device(m).type != "cpu" for m in members):
                raise ValueError("threads with pack=True packs CPU members per worker; on CUDA use 'packed' or "
                                 "'threads'")
            PackedExecution().check(members)  # names the module that cannot be packed

    def _run_members(self, w: int, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        """Worker ``w``'s members on their views, one after another or packed: ``[k, B, ...]``."""
        if self.pack:
            if self._packers is None:
                self._packers = {}
            return self._packers.setdefault(w, PackedExecution()).run(members, views)
        return torch.stack([m(v) for m, v in zip(members, views)])

    def reset(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        super().reset()

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
                dev = _device(m)
                if dev.type != "cuda":
                    outs.append((i, m(v.to(dev))))
                    continue
                if i not in self._streams:
                    self._streams[i] = torch.cuda.Stream(dev)
                stream = self._streams[i]
                stream.wait_stream(main_streams[dev])
                with torch.cuda.device(dev), torch.cuda.stream(stream):
                    x = v.to(dev, non_blocking=True)
                    if x is v:
                        v.record_stream(stream)
                    outs.append((i, m(x)))
        return outs

    def _pool_for(self, n: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool._max_workers != n:
            self.reset()
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="timm_split")
            self._streams = {}
        return self._pool

    def _on_workers(self, n: int, fn: Callable[[int], Any]) -> List[Any]:
        """``fn(w)`` on each of ``n`` workers concurrently; the results in worker order."""
        pool, calling_threads = self._pool_for(n), torch.get_num_threads()
        try:
            return [f.result() for f in [pool.submit(fn, w) for w in range(n)]]
        finally:
            # set_num_threads in a worker also sets the default that new threads start with: restore it
            torch.set_num_threads(calling_threads)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        devices = [_device(m) for m in members]
        cuda_devs = {d for d in devices if d.type == "cuda"}
        n, threads = self._layout(len(members), bool(cuda_devs))
        if self.parallel_backward and n > 1 and not cuda_devs and _needs_graph(members):
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
        for i, stream in (self._streams or {}).items():
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


# ---------------------------------------------------------------------------------------------------- vmap
class _Cache:
    """One cached value, valid while the members' tensors are unchanged and no autograd graph is needed."""

    def __init__(self) -> None:
        self.key: Optional[Tuple] = None
        self.value: Any = None

    def get(self, members: Members, build: Callable[[], Any]) -> Any:
        if _needs_graph(members):
            self.key = self.value = None
            return build()
        key = _version_key(members)
        if key is None or key != self.key:
            self.value, self.key = build(), key
        return self.value


Unpack = Callable[[str, torch.Tensor, int], torch.Tensor]


def _write_back(members: Members, packed: Dict[str, torch.Tensor], unpack: Unpack) -> None:
    """Copy updated (packed or stacked) buffers back into each member's own buffers."""
    with torch.no_grad():
        for i, m in enumerate(members):
            own = dict(m.named_buffers())
            for name, t in packed.items():
                if name in own:
                    own[name].copy_(unpack(name, t, i))


class VmapExecution(Execution):
    """``torch.func.vmap`` over ``functional_call(members[0], stacked params and buffers, view)``.

    Parameters are stacked with ``torch.stack`` when a graph is needed (so gradients reach each member) and
    cached otherwise; buffers are stacked too and, in training, written back after the call, so BatchNorm
    running stats match the loop's. Random ops draw independently per member (``randomness='different'``).
    On CPU, scaled-dot-product attention takes its math path (the fused CPU kernels have no batch rule).
    """

    name = "vmap"
    _transient = ("_params", "_buffers")

    def __init__(self) -> None:
        self._params: Optional[_Cache] = None
        self._buffers: Optional[_Cache] = None

    def check(self, members: Members) -> None:
        _check_same_device(members, self.name)
        _check_same_structure(members, self.name)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        if self._params is None:
            self._params, self._buffers = _Cache(), _Cache()
        base = members[0]
        names_p = [n for n, _ in base.named_parameters()]
        names_b = [n for n, _ in base.named_buffers()]

        def stack(names: List[str], getter: str) -> Dict[str, torch.Tensor]:
            per = [dict(getattr(m, getter)()) for m in members]
            return {n: torch.stack([d[n] for d in per]) for n in names}

        params = self._params.get(members, lambda: stack(names_p, "named_parameters"))
        training = _is_training(base)
        buffers = (stack(names_b, "named_buffers") if training else
                   self._buffers.get(members, lambda: stack(names_b, "named_buffers")))
        shared = all(v is views[0] for v in views)
        x = views[0] if shared else torch.stack(views)

        def call(p: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (xi,))

        # attention's math path under vmap: the fused CPU kernels have no batch rule, and on CUDA the
        # memory-efficient kernel's backward fails under vmap ("LSE is not correctly aligned (strideH)",
        # vit_small training on an H200, torch 2.11)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            out = vmap(call, in_dims=(0, 0, None if shared else 0), randomness="different")(params, buffers, x)
        if training and buffers:
            _write_back(members, buffers, lambda name, t, i: t[i])
        return out


# ---------------------------------------------------------------------------------------------------- compile
class CompileExecution(Execution):
    """``torch.compile`` of the loop, compiled on the first call (about a minute for a resnet50 on 2 cores).

    Args:
        **compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ``fullgraph``...).
    """

    name = "compile"
    _transient = ("_fn",)

    def __init__(self, **compile_kwargs: Any) -> None:
        self.compile_kwargs = compile_kwargs
        self._fn: Optional[Callable] = None

    def check(self, members: Members) -> None:
        _check_same_device(members, self.name)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        if self._fn is None:
            _logger.info("compiling the members' loop with torch.compile(%s)", self.compile_kwargs or "")
            self._fn = torch.compile(_loop, **self.compile_kwargs)
        return self._fn(members, views)


# ---------------------------------------------------------------------------------------------------- packed
class _PackedLinear(nn.Module):
    """S linears side by side on the last dim: ``[..., S*F] -> [..., S*K]`` (weight ``[S, K, F]``)."""

    def __init__(self, split: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.split, self.in_features, self.out_features = split, in_features, out_features
        self.weight = nn.Parameter(torch.empty(split, out_features, in_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(split, out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.split, self.in_features).transpose(0, 1)  # [S, N, F]
        if self.bias is None:
            y = torch.bmm(xs, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), xs, self.weight.transpose(1, 2))
        return y.transpose(0, 1).reshape(*lead, self.split * self.out_features)


class _PackedLayerNorm(nn.Module):
    """S LayerNorms over the last dim of ``[..., S*C]``, each over its own C (weight ``[S, C]``)."""

    def __init__(self, split: int, ln: nn.LayerNorm):
        super().__init__()
        self.split, self.dim, self.eps = split, ln.normalized_shape[0], ln.eps
        self.weight = nn.Parameter(torch.empty(split, self.dim, device="meta")) if ln.weight is not None else None
        self.bias = nn.Parameter(torch.empty(split, self.dim, device="meta")) if ln.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.unflatten(-1, (self.split, self.dim)), (self.dim,), eps=self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.flatten(-2)


# modules whose forward acts per channel (or per element), so they run unchanged on packed channels
_PER_CHANNEL = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.Upsample,
)
# timm modules known to act per channel/element (by qualified name, so no private import is needed), and
# containers whose own forward only chains children with per-channel ops (add, mul, mean over H, W)
_PER_CHANNEL_TIMM = {
    "timm.layers.activations." + n for n in
    ("GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish", "QuickGELU", "Sigmoid", "Swish", "Tanh")
} | {"timm.layers.activations_me." + n for n in ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")
     } | {
    "timm.layers.drop.DropPath", "timm.layers.drop.DropBlock2d",
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgPool", "timm.layers.adaptive_avgmax_pool.FastAdaptiveMaxPool",
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgMaxPool", "timm.layers.adaptive_avgmax_pool.AdaptiveAvgMaxPool2d",
    "timm.layers.blur_pool.BlurPool2d",
}
_CONTAINERS = {
    "torch.nn.modules.container.Sequential",
    "timm.models.resnet.ResNet", "timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck",
    "timm.models.efficientnet.EfficientNet", "timm.models.mobilenetv3.MobileNetV3",
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv", "timm.models._efficientnet_blocks.InvertedResidual",
    "timm.models._efficientnet_blocks.SqueezeExcite", "timm.models._efficientnet_blocks.ConvBnAct",
    "timm.models._efficientnet_blocks.EdgeResidual",
    "timm.models.regnet.RegNet", "timm.models.regnet.RegStage", "timm.models.regnet.Bottleneck",
    "timm.layers.squeeze_excite.SEModule", "timm.layers.squeeze_excite.EffectiveSEModule",
    "timm.layers.conv_bn_act.ConvNormAct", "timm.layers.classifier.ClassifierHead",
    "timm.layers.adaptive_avgmax_pool.SelectAdaptivePool2d",
}


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _pack_plan(member: nn.Module, split: int) -> Tuple[nn.Module, Dict[str, str]]:
    """A meta template of the packed network and, per tensor name, how to pack the members' tensors.

    Rules: ``'cat'`` concatenate on dim 0 (channels), ``'stack'`` a new leading member dim, ``'first'``
    member 0's value (a counter every member shares, e.g. ``num_batches_tracked``).

    Raises:
        ValueError: a module the packing does not know, named with its path and type.
    """
    template = copy.deepcopy(member).to("meta")
    rules: Dict[str, str] = {}
    supported = ("Conv1d/2d/3d, BatchNorm, GroupNorm, Linear, LayerNorm (last dim), per-channel activations, "
                 "pooling and dropout, in ResNet/EfficientNet/MobileNetV3/RegNet blocks or nn.Sequential")
    for path, mod in list(template.named_modules()):
        qual = _qualname(mod)
        own = [n for n, _ in mod.named_parameters(recurse=False)] + [n for n, _ in mod.named_buffers(recurse=False)]
        prefix = f"{path}." if path else ""
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            mod.in_channels, mod.out_channels, mod.groups = (mod.in_channels * split, mod.out_channels * split,
                                                             mod.groups * split)
            rules.update({prefix + n: "cat" for n in own})
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features *= split
            rules.update({prefix + n: "first" if n == "num_batches_tracked" else "cat" for n in own})
        elif isinstance(mod, nn.GroupNorm):
            mod.num_groups, mod.num_channels = mod.num_groups * split, mod.num_channels * split
            rules.update({prefix + n: "cat" for n in own})
        elif isinstance(mod, nn.Linear):
            _set_child(template, path, _PackedLinear(split, mod.in_features, mod.out_features, mod.bias is not None))
            rules.update({prefix + n: "stack" for n in own})
        elif qual in ("torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm") \
                and len(mod.normalized_shape) == 1:
            _set_child(template, path, _PackedLayerNorm(split, mod))
            rules.update({prefix + n: "stack" for n in own})
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 or isinstance(mod, _PER_CHANNEL) \
                or qual in _PER_CHANNEL_TIMM or qual in _CONTAINERS:
            if getattr(mod, "pool_type", "avg") not in ("", "avg", "max", "fast", "avgmax", "fastavg", "fastmax"):
                raise ValueError(f"execution 'packed' does not support module '{path}' ({qual}) with pool_type="
                                 f"{mod.pool_type!r}: it concatenates channels; use 'loop', 'threads' or 'vmap'")
            if own:
                raise ValueError(f"execution 'packed' does not support module '{path}' ({qual}): it holds tensors "
                                 f"{own} the packing has no rule for; use 'loop', 'threads' or 'vmap'")
        else:
            raise ValueError(f"execution 'packed' does not support module '{path or '<root>'}' ({qual}); it packs "
                             f"{supported}. Use 'loop', 'threads' or 'vmap' for this model")
    return template, rules


class PackedExecution(Execution):
    """The members as one network of S-times wider grouped layers (see the module docstring).

    Member ``i`` owns channel block ``i`` of every activation; views are packed ``[S, B, C, ...] -> [B, S*C,
    ...]`` and the output unpacked back to ``[S, B, ...]``. Packed tensors are rebuilt by ``torch.cat``/
    ``torch.stack`` of the members' tensors when a graph is needed (so gradients reach the members) and cached
    otherwise; BatchNorm running stats are written back to the members after a training call.

    Args:
        channels_last: run 4-d activations and conv weights channels-last (default: on CPU, where oneDNN's
            grouped convolutions are much faster in that layout).
    """

    name = "packed"
    _transient = ("_plan", "_cache")

    def __init__(self, channels_last: Optional[bool] = None) -> None:
        self.channels_last = channels_last
        self._plan: Optional[Tuple[nn.Module, Dict[str, str]]] = None
        self._cache: Optional[_Cache] = None

    def check(self, members: Members) -> None:
        _check_same_device(members, self.name)
        _check_same_structure(members, self.name)
        self._plan = _pack_plan(members[0], len(members))

    def _pack(self, members: Members, channels_last: bool) -> Dict[str, torch.Tensor]:
        rules = self._plan[1]
        per = [_tensors(m) for m in members]
        out = {}
        for name, rule in rules.items():
            ts = [d[name] for d in per]
            if rule == "cat":
                t = torch.cat(ts)
                if channels_last and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
            elif rule == "stack":
                t = torch.stack(ts)
            else:
                t = ts[0].clone()
            out[name] = t
        return out

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        if self._plan is None:  # after reset(): the members may have moved
            self.check(members)
        if self._cache is None:
            self._cache = _Cache()
        template, rules = self._plan
        dev = _device(members[0])
        cl = self.channels_last if self.channels_last is not None else dev.type == "cpu"
        training = _is_training(members[0])
        for a, b in zip(template.modules(), members[0].modules()):  # same order: children replaced in place
            a.training = b.training
        tensors = self._pack(members, cl) if training else self._cache.get(members, lambda: self._pack(members, cl))
        S = len(members)
        if all(v is views[0] for v in views):
            x = views[0].repeat(1, S, *([1] * (views[0].dim() - 2)))
        else:
            x = torch.stack(views, 1).flatten(1, 2)
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = functional_call(template, tensors, (x,))
        if training:
            own = dict(members[0].named_buffers())
            buffers = {n: t for n, t in tensors.items() if n in own}
            _write_back(members, buffers, lambda name, t, i: t if rules[name] == "first" else t.chunk(S)[i])
        return y.unflatten(1, (S, -1)).movedim(1, 0)


# ---------------------------------------------------------------------------------------------------- auto
@contextlib.contextmanager
def _preserved(members: Members) -> Iterator[None]:
    """Restore buffers, ``.grad`` and RNG states after trial runs."""
    buffers = [(b, b.detach().clone()) for m in members for b in m.buffers()]
    params = [p for m in members for p in m.parameters()]
    grads = [p.grad for p in params]
    cuda = sorted({_device(m).index or 0 for m in members if _device(m).type == "cuda"})
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
    candidate that cannot run the members (``packed`` on a transformer, ``vmap`` across devices...) is skipped.

    Args:
        candidates: strategies to try; default ``('loop', 'threads', 'vmap', 'packed', 'threads+packed')``
            (the last is ``'threads'`` with ``pack=True``; ``'compile'`` only if named: compiling takes about a
            minute per model).
        repeats: timed rounds, each running every candidate once (order rotating) after one warm-up call. A
            candidate's score is the median over rounds of its time over the loop's in the same round (paired,
            so drifts in the machine's load cancel); the lowest wins. A candidate more than 1.3x slower than
            the loop in the first round is not timed again. If the two best are within 10% of each other, they
            and the loop get ``repeats`` more rounds, and the scores are taken over all rounds.
        margin: another strategy replaces ``'loop'`` only if it is faster by this fraction (timings on a busy
            machine are noisy; the loop is the safe default).
    """

    name = "auto"
    _transient = ("_executions", "choices")
    DEFAULT = ("loop", "threads", "vmap", "packed", "threads+packed")
    VARIANTS = {"threads+packed": ("threads", {"pack": True})}  # candidate name -> strategy and options
    PRUNE = 1.3
    CLOSE = 0.1

    def __init__(self, candidates: Optional[Sequence[str]] = None, repeats: int = 5, margin: float = 0.03) -> None:
        candidates = tuple(candidates or self.DEFAULT)
        known = STRATEGIES[1:] + tuple(self.VARIANTS)
        if not candidates or any(c not in known for c in candidates):
            raise ValueError(f"auto candidates must be among {known}, got {list(candidates)}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), e.g. 0.03, got {margin!r}")
        self.candidates, self.repeats, self.margin = candidates, repeats, margin
        self._executions: Optional[Dict[str, Execution]] = None
        self.choices: Optional[Dict[Tuple, str]] = None

    def _get(self, name: str) -> Execution:
        if self._executions is None:
            self._executions, self.choices = {}, {}
        if name not in self._executions:
            strategy, options = self.VARIANTS.get(name, (name, {}))
            self._executions[name] = make_execution(strategy, **options)
        return self._executions[name]

    @staticmethod
    def key(members: Members, views: List[torch.Tensor]) -> Tuple:
        """The cache key: devices, view shapes/dtype (and whether one batch is shared), training, grad."""
        return (tuple(str(_device(m)) for m in members), tuple(views[0].shape), views[0].dtype,
                all(v is views[0] for v in views), _is_training(members[0]), _needs_graph(members))

    def choose(self, members: Members, views: List[torch.Tensor]) -> str:
        """The winner for this call's key, timing the candidates if the key is new."""
        self._get("loop")
        key = self.key(members, views)
        if key in self.choices:
            return self.choices[key]
        dev = _device(members[0])
        if dev.type == "meta":
            self.choices[key] = "loop"
            return "loop"
        graph = key[-1]

        def trial(ex: Execution) -> float:
            t = time.perf_counter()
            out = ex.run(members, views)
            if graph:
                out.float().sum().backward()
            _sync(dev)
            return time.perf_counter() - t

        def timed_round(names: List[str], r: int) -> None:  # each once, the order rotating with the round
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(trial(self._get(name)))

        runnable, times, score = [], {}, {}
        with _preserved(members):
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
                if r == 1:  # after one timed round, drop the clearly slower (vmap on CPU: 1.5-2.5x)
                    runnable = [n for n in runnable if n == "loop" or times[n][0] <= self.PRUNE * times["loop"][0]]
                timed_round(runnable, r)
            score = self._score(times) if "loop" in times else {}
            best = sorted(score, key=score.get)[:2]
            if len(best) == 2 and score[best[1]] < (1 + self.CLOSE) * score[best[0]]:
                # a close call: the two best (and the loop, the reference) get as many rounds again
                finalists = list(dict.fromkeys(["loop"] + best))
                for r in range(self.repeats):
                    timed_round(finalists, r)
                score = self._score({n: times[n] for n in finalists})
        winner = min(score, key=score.get) if score else "loop"
        if "loop" in score and score[winner] > 1 - self.margin:
            winner = "loop"
        self.choices[key] = winner
        _logger.info("auto: '%s' for devices %s, input %s %s, training=%s, grad=%s (loop %.1f ms; time / loop: %s)",
                     winner, key[0], list(key[1]), "shared" if key[3] else "per-member views", key[4], key[5],
                     1e3 * statistics.median(times.get("loop") or [0]), {n: round(v, 3) for n, v in score.items()})
        return winner

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


_CLASSES = {c.name: c for c in (LoopExecution, ThreadsExecution, VmapExecution, CompileExecution, PackedExecution,
                                AutoExecution)}


def make_execution(strategy: str, **options: Any) -> Execution:
    """Build the execution strategy ``strategy`` (one of :data:`STRATEGIES`) with its options.

    Raises:
        ValueError: unknown strategy or option.
    """
    if strategy not in _CLASSES:
        raise ValueError(f"execution must be one of {STRATEGIES}, got {strategy!r}")
    try:
        return _CLASSES[strategy](**options)
    except TypeError as e:
        raise ValueError(f"bad option for execution '{strategy}': {e} (see timm_split.execution."
                         f"{_CLASSES[strategy].__name__})") from None
