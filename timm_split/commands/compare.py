"""``timm-split compare``: params and GMACs of a model and of its splits, counted with :func:`timm_split.count.count`.

Each row is a dict with the keys documented in the README (the JSON schema): ``model``, ``split`` (1 is the
original), ``img_size``, ``params``, ``gmacs``, ``gmacs_mac_only``, ``params_ratio``, ``gmacs_ratio``,
``width_factor``, ``members`` (a list of per-member ``{params, gmacs}``), ``counter_check``, ``meta``.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..checks import atomic_write, check_writable
from ..core import split
from ..count import count, count_by_module, ensemble_cost

_logger = logging.getLogger(__name__)

__all__ = ["resolve_models", "compare_rows", "compare_models", "format_rows", "plot_rows", "check_plot_path",
           "by_module_table"]

COLUMNS = ("model", "split", "img_size", "params_M", "gmacs", "params_ratio", "gmacs_ratio", "width_factor",
           "member_params_M", "member_gmacs")


def resolve_models(patterns: Sequence[str]) -> List[str]:
    """Expand model names and wildcards with timm's registry.

    Raises:
        ValueError: a name matches nothing; the message suggests close names.
    """
    import timm

    out: List[str] = []
    for pat in patterns:
        found = timm.list_models(pat) if any(c in pat for c in "*?[") else ([pat] if timm.is_model(pat) else [])
        if not found:
            close = difflib.get_close_matches(pat, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}" if close else "; see timm.list_models('<pattern>')"
            raise ValueError(f"unknown model {pat!r}{hint}")
        out.extend(n for n in found if n not in out)
    return out


def _build(name: str, img_size: Optional[int]):
    import timm

    if img_size is not None:
        try:  # models with a fixed token grid take img_size; others ignore the input size
            with torch.device("meta"):
                return timm.create_model(name, img_size=img_size)
        except TypeError:
            pass
    with torch.device("meta"):
        return timm.create_model(name)


def compare_rows(name: str, split_factors: Iterable[int], img_size: Optional[int] = None, *, reparam: bool = False,
                 check: bool = True, seed: int = 0) -> List[Dict]:
    """Count a model and its splits (all on the meta device: no memory, no real compute).

    Args:
        name: a timm model name.
        split_factors: the S values; 1 (the original) is always included first.
        img_size: square input size; default the model's own.
        reparam: count the deployed (re-parameterized) form, as timm publishes repvgg/fastvit/mobileone/levit.
        check: cross-check MAC-only counts against FlopCounterMode and record it in ``counter_check``.
        seed: passed to :func:`timm_split.split`.

    Returns:
        One row per split factor, the original first.
    """
    model = _build(name, img_size)
    size = img_size or model.pretrained_cfg["input_size"][-1]
    base = count(model, size, check=check, reparam=reparam)
    rows = [_row(name, 1, size, base, base, base, 1.0)]
    for S in sorted({int(s) for s in split_factors} - {1}):
        ens = split(model, S, img_size=size, seed=seed)
        member = count(ens.members[0], size, check=check, reparam=reparam)  # members share one architecture
        rows.append(_row(name, S, size, ensemble_cost(member, ens.members), member, base,
                         ens.split_plan.width_factor))
    return rows


def compare_models(names: Sequence[str], split_factors: Iterable[int], img_size: Optional[int] = None, *,
                   reparam: bool = False, check: bool = True, progress: Optional[bool] = None) -> List[Dict]:
    """:func:`compare_rows` of every model in ``names``, one after another, showing progress over two or more.

    Args:
        names: timm model names.
        split_factors, img_size, reparam, check: as in :func:`compare_rows`.
        progress: a tqdm bar (default: when stderr is a terminal); else one INFO line per model done with
            done/total, elapsed and the time left.

    Returns:
        The rows of every model, in order.
    """
    from tqdm import tqdm

    from ..training.metrics import Throughput, format_seconds

    split_factors = list(split_factors)
    bar = sys.stderr.isatty() if progress is None else progress
    pace = Throughput(len(names))
    rows: List[Dict] = []
    for name in tqdm(names, desc="counting", disable=len(names) < 2 or not bar, file=sys.stderr):
        rows.extend(compare_rows(name, split_factors, img_size, reparam=reparam, check=check))
        pace.update(1)
        if len(names) > 1 and not bar:
            _logger.info("compare: %d/%d models (%s), elapsed %s, ETA %s", pace.steps, pace.total, name,
                         format_seconds(pace.elapsed()), format_seconds(pace.eta()))
    return rows


def _row(name, S, size, total, member, base, width) -> Dict:
    """One row: the S members' ``total`` cost (and one ``member``'s, for the per-member columns)."""
    return {
        "model": name, "split": S, "img_size": size, "params": total.params, "gmacs": total.gmacs,
        "gmacs_mac_only": total.gmacs_mac_only, "params_ratio": total.params / base.params,
        "gmacs_ratio": total.gmacs / base.gmacs if base.gmacs else float("nan"), "width_factor": width,
        "members": [{"params": member.params, "gmacs": member.gmacs} for _ in range(S)],
        "counter_check": member.counter_check, "meta": member.meta,
    }


def format_rows(rows: List[Dict], fmt: str = "table", per_member: bool = False) -> str:
    """Render rows as ``table`` (aligned), ``md``, ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = []
    for r in rows:
        m0 = r["members"][0]
        flat.append({
            "model": r["model"], "split": r["split"], "img_size": r["img_size"], "params_M": r["params"] / 1e6,
            "gmacs": r["gmacs"], "params_ratio": r["params_ratio"], "gmacs_ratio": r["gmacs_ratio"],
            "width_factor": r["width_factor"], "member_params_M": m0["params"] / 1e6, "member_gmacs": m0["gmacs"],
        })
        if per_member and r["split"] > 1:
            for i, m in enumerate(r["members"]):
                flat.append({"model": f"  member {i}", "split": "", "img_size": "", "params_M": m["params"] / 1e6,
                             "gmacs": m["gmacs"], "params_ratio": m["params"] / (r["params"] / r["params_ratio"]),
                             "gmacs_ratio": m["gmacs"] / (r["gmacs"] / r["gmacs_ratio"]), "width_factor": "",
                             "member_params_M": "", "member_gmacs": ""})
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(flat)
        return buf.getvalue()
    cells = [[_fmt(v) for v in (row[c] for c in COLUMNS)] for row in flat]
    if fmt == "md":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    if fmt != "table":
        raise ValueError(f"format must be table, md, csv or json; got {fmt!r}")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    out = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths))]
    out += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))) for c in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend; ValueError naming the extra to install when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("--plot needs matplotlib: pip install 'timm_split[plot]'") from e
    return plt


def check_plot_path(path: str) -> None:
    """Raise ValueError now if :func:`plot_rows` could not write ``path`` (no matplotlib, a folder that is
    missing or read-only), so a long count does not end in that error."""
    _pyplot()
    check_writable(path, "--plot")


def plot_rows(rows: List[Dict], path: str) -> None:
    """Write a PNG of params and GMACs (ensemble totals) against S, one line per model (atomically)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for name in models:
        rs = [r for r in rows if r["model"] == name]
        S = [r["split"] for r in rs]
        axes[0].plot(S, [r["params"] / 1e6 for r in rs], "o-", label=name)
        axes[1].plot(S, [r["gmacs"] for r in rs], "o-", label=name)
    for ax, title in zip(axes, ("params (M), all members", "GMACs, all members")):
        ax.set_xlabel("split factor S")
        ax.set_title(title)
        ax.set_xticks(sorted({r["split"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=ext))
    finally:
        plt.close(fig)


def by_module_table(name: str, split_factor: int, depth: int, img_size: Optional[int] = None) -> str:
    """Params and MAC GMACs per module (to ``depth``) of the original and of the S members together."""
    model = _build(name, img_size)
    size = img_size or model.pretrained_cfg["input_size"][-1]
    ens = split(model, split_factor, img_size=size)
    orig = count_by_module(model, size, depth)
    member = count_by_module(ens.members[0], size, depth)
    S = split_factor
    lines = [f"{name} S={S} by module (depth {depth}); 'split' columns are all {S} members together",
             f"{'module':<32} {'params_M':>10} {'split':>10} {'ratio':>7} {'gmacs':>9} {'split':>9} {'ratio':>7}"]
    for path, (p, g) in orig.items():
        mp, mg = member.get(path, (0, 0.0))
        lines.append(f"{(path or '(total)')[:32]:<32} {p / 1e6:>10.3f} {S * mp / 1e6:>10.3f} "
                     f"{(S * mp / p if p else float('nan')):>7.3f} {g:>9.4f} {S * mg:>9.4f} "
                     f"{(S * mg / g if g else float('nan')):>7.3f}")
    return "\n".join(lines)
