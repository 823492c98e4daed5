"""How the S members of a :class:`~timm_split.ensemble.SplitEnsemble` run: one call picks a strategy.

``ens.set_execution(name, **options)`` with ``name`` one of :data:`STRATEGIES`:

* ``'loop'``: members one after another (the reference; what ``forward_members`` always did).
* ``'threads'``: members concurrently on a thread pool (inter-op parallelism), each worker with its share of
  the intra-op threads, optionally pinned to its own cores; CPU backward runs on the workers too; on CUDA each
  member gets its own stream.
* ``'threads+packed'``: ``'threads'`` with ``pack=True``: each worker runs its members as one packed network.
* ``'compile'``: ``torch.compile`` of the loop, compiled lazily on the first call.
* ``'packed'``: the S members rewritten as one network (:mod:`timm_split.packing`: the member's aten graph with
  grouped convs, batched linears, one SDPA over all members' heads); an op with no packing rule runs once per
  member inside the graph (``strict=True`` raises a ``ValueError`` naming it).
* ``'auto'``: times the candidates once per (devices, per-sample input shape, training, grad) and keeps the
  fastest; a smaller batch (an epoch's last) reuses the decision, a larger one is timed again.

Every strategy returns the loop's result up to float tolerance (with dropout or drop-path active the random
draws differ), lets gradients reach every member's parameters, and leaves every member's buffers as the loop
would. Strategies only replace :meth:`SplitEnsemble.forward_members` (and so ``forward``);
``forward_features``/``forward_head`` always loop.
"""
from __future__ import annotations

from typing import Any

from .auto import AutoExecution
from .base import Execution
from .compile import CompileExecution
from .loop import LoopExecution
from .packed import PackedExecution
from .registry import BASIC, make_basic, make_named
from .threads import ThreadsExecution

__all__ = ["STRATEGIES", "Execution", "LoopExecution", "ThreadsExecution", "CompileExecution", "PackedExecution",
           "AutoExecution", "make_execution"]

STRATEGIES = ("auto",) + BASIC


def make_execution(strategy: str, **options: Any) -> Execution:
    """Build the execution strategy ``strategy`` (one of :data:`STRATEGIES`) with its options.

    Raises:
        ValueError: unknown strategy or option.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"execution must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return make_basic(strategy, AutoExecution, {}, **options)
    return make_named(strategy, **options)
