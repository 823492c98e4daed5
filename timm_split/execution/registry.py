"""The strategies that run members directly, by name (``'auto'`` chooses among these)."""
from __future__ import annotations

from typing import Any, Callable, Dict

from .base import Execution
from .compile import CompileExecution
from .loop import LoopExecution
from .packed import PackedExecution
from .threads import ThreadsExecution

__all__ = ["BASIC", "make_basic"]

# name -> (class, the options the name implies)
_REGISTRY: Dict[str, tuple] = {
    "loop": (LoopExecution, {}),
    "threads": (ThreadsExecution, {}),
    "threads+packed": (ThreadsExecution, {"pack": True}),
    "compile": (CompileExecution, {}),
    "packed": (PackedExecution, {}),
}
BASIC = tuple(_REGISTRY)


def make_basic(strategy: str, make: Callable[..., Execution], implied: Dict[str, Any], **options: Any) -> Execution:
    """Build ``make(**implied, **options)``, refusing options that contradict what ``strategy`` implies.

    Raises:
        ValueError: a contradicting or unknown option.
    """
    clash = {k for k in implied if k in options and options[k] != implied[k]}
    if clash:
        raise ValueError(f"execution '{strategy}' implies {implied}; drop {sorted(clash)} or use "
                         f"'{strategy.split('+')[0]}'")
    import inspect

    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call say
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = sorted(k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"execution '{strategy}' has no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(known) or 'none'}")
    try:
        return make(**{**implied, **options})
    except TypeError as e:
        raise ValueError(f"bad option for execution '{strategy}': {e} (see timm_split.execution."
                         f"{getattr(make, '__name__', make)})") from None


def make_named(strategy: str, **options: Any) -> Execution:
    """One of :data:`BASIC` by name, with its options."""
    cls, implied = _REGISTRY[strategy]
    return make_basic(strategy, cls, implied, **options)
