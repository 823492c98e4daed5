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

__all__ = ["resolve_models", "compare_rows", "error_row", "compare_models", "format_rows", "plot_rows", "check_plot_path",
           "by_module_table"]

PARAMS_TOL, MACS_TOL = 0.02, 0.04  # the split's default tolerances (timm_split.split's params_tol, macs_tol)
COLUMNS = ("model", "split", "img_size", "params_M", "gmacs", "params_ratio", "gmacs_ratio", "width_factor",
           "member_params_M", "member_gmacs", "status")


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


def error_row(name: str, S: int, img_size: Optional[int], error: BaseException) -> Dict:
    """The row of a count that failed: ``status`` is ``'<ErrorType>: <message>'``, the numbers are None.

    Args:
        name: the timm model name.
        S: the split factor (1: the original).
        img_size: the input size asked for (None: the model's).
        error: what was raised.

    Returns:
        A row with every key of a counted row.
    """
    message = " ".join(str(error).split())[:300]
    return {"model": name, "split": S, "img_size": img_size, "params": None, "gmacs": None, "gmacs_mac_only": None,
            "params_ratio": None, "gmacs_ratio": None, "width_factor": None, "members": [], "counter_check": None,
            "meta": None, "status": f"{type(error).__name__}: {message}"}


def compare_rows(name: str, split_factors: Iterable[int], img_size: Optional[int] = None, *, reparam: bool = False,
                 check: bool = True, seed: int = 0, keep_going: bool = False) -> List[Dict]:
    """Count a model and its splits (all on the meta device: no memory, no real compute).

    Args:
        name: a timm model name.
        split_factors: the S values; 1 (the original) is always included first.
        img_size: square input size; default the model's own.
        reparam: count the deployed (re-parameterized) form, as timm publishes repvgg/fastvit/mobileone/levit.
        check: cross-check MAC-only counts against FlopCounterMode and record it in ``counter_check``.
        seed: passed to :func:`timm_split.split`.
        keep_going: a model or split that fails gives an :func:`error_row` (status ``'<Error>: ...'``) and the
            other rows are still counted; else the error is raised.

    Returns:
        One row per split factor, the original first.
    """
    splits = sorted({int(s) for s in split_factors} - {1})
    try:
        model = _build(name, img_size)
        size = img_size or model.pretrained_cfg["input_size"][-1]
        base = count(model, size, check=check, reparam=reparam)
    except Exception as e:  # noqa: BLE001 - with keep_going, any failure of this model is its rows' status
        if not keep_going or isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        _logger.debug("compare %s failed", name, exc_info=True)
        return [error_row(name, S, img_size, e) for S in [1] + splits]
    rows = [_row(name, 1, size, base, base, base, 1.0)]
    for S in splits:
        try:
            ens = split(model, S, img_size=size, seed=seed)
            member = count(ens.members[0], size, check=check, reparam=reparam)  # members share one architecture
        except Exception as e:  # noqa: BLE001
            if not keep_going:
                raise
            _logger.debug("compare %s S=%d failed", name, S, exc_info=True)
            rows.append(error_row(name, S, size, e))
            continue
        rows.append(_row(name, S, size, ensemble_cost(member, ens.members), member, base,
                         ens.split_plan.width_factor))
    return rows


def compare_models(names: Sequence[str], split_factors: Iterable[int], img_size: Optional[int] = None, *,
                   reparam: bool = False, check: bool = True, progress: Optional[bool] = None,
                   keep_going: bool = True) -> List[Dict]:
    """:func:`compare_rows` of every model in ``names``, one after another, showing progress over two or more.

    Args:
        names: timm model names.
        split_factors, img_size, reparam, check, keep_going: as in :func:`compare_rows` (here ``keep_going``
            defaults to True: one model that cannot be split does not lose the others' rows).
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
        rows.extend(compare_rows(name, split_factors, img_size, reparam=reparam, check=check, keep_going=keep_going))
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
        "counter_check": member.counter_check, "meta": member.meta, "status": "ok",
    }


def format_rows(rows: List[Dict], fmt: str = "table", per_member: bool = False) -> str:
    """Render rows as ``table`` (aligned), ``md``, ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = []
    for r in rows:
        if r.get("status", "ok") != "ok":
            flat.append(dict({c: "" for c in COLUMNS}, model=r["model"], split=r["split"],
                             img_size=r["img_size"] or "", status=r["status"]))
            continue
        m0 = r["members"][0]
        flat.append({
            "model": r["model"], "split": r["split"], "img_size": r["img_size"], "params_M": r["params"] / 1e6,
            "gmacs": r["gmacs"], "params_ratio": r["params_ratio"], "gmacs_ratio": r["gmacs_ratio"],
            "width_factor": r["width_factor"], "member_params_M": m0["params"] / 1e6, "member_gmacs": m0["gmacs"],
            "status": r.get("status", "ok"),
        })
        if per_member and r["split"] > 1:
            for i, m in enumerate(r["members"]):
                flat.append({"model": f"  member {i}", "split": "", "img_size": "", "params_M": m["params"] / 1e6,
                             "gmacs": m["gmacs"], "params_ratio": m["params"] / (r["params"] / r["params_ratio"]),
                             "gmacs_ratio": m["gmacs"] / (r["gmacs"] / r["gmacs_ratio"]), "width_factor": "",
                             "member_params_M": "", "member_gmacs": "", "status": ""})
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")  # "\n" rows, as the other formats
        w.writeheader()
        w.writerows(flat)
        return buf.getvalue().rstrip("\n")  # the caller's print ends the last row: no blank line after it
    cells = [[_fmt(v)[:100] for v in (row[c] for c in COLUMNS)] for row in flat]
    if fmt == "md":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    if fmt != "table":
        raise ValueError(f"format must be table, md, csv or json; got {fmt!r}")
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(COLUMNS)]
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
    """Write a PNG of the S members' params and GMACs against S, as ratios to the original (atomically).

    The axes are honest: parity (1.0) is drawn, with the tolerance band the split is held to (±2% params,
    ±4% MACs), and each y axis spans at least twice its band, so a 1% difference does not fill the plot."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("status", "ok") == "ok"]  # a failed count has no numbers to draw
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    models = list(dict.fromkeys(r["model"] for r in rows))
    splits = sorted({r["split"] for r in rows})
    for ax, key, tol, title in ((axes[0], "params_ratio", PARAMS_TOL, "params, all members / original"),
                                (axes[1], "gmacs_ratio", MACS_TOL, "GMACs, all members / original")):
        ax.axhspan(1 - tol, 1 + tol, color="tab:green", alpha=0.12, label=f"±{tol:.0%} (the split's tolerance)")
        ax.axhline(1.0, color="black", lw=1, label="parity (1.0)")
        values = [1.0]
        for name in models:
            rs = [r for r in rows if r["model"] == name and r.get(key) is not None]  # a failed count: no point
            ys = [r[key] for r in rs]
            values += [y for y in ys if y == y]  # not NaN
            ax.plot([r["split"] for r in rs], ys, "o-", label=name)
        lo, hi = min(values + [1 - 2 * tol]), max(values + [1 + 2 * tol])
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("split factor S (1 = the original)")
        ax.set_title(title)
        ax.set_xticks(splits)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=ext))
    finally:
        plt.close(fig)


def by_module_table(name: str, split_factor: int, depth: int, img_size: Optional[int] = None) -> str:
    """Params and GMACs per module (to ``depth``) of the original and of the S members together.

    The ``(total)`` row is :func:`timm_split.count.count` of the model and of its members (the same numbers as
    :func:`compare_rows`' table: ``gmacs`` in timm's convention, norms and pooling included). The module rows
    break down the MAC ops (conv, linear, matmul, attention), and one more row holds what they do not
    (norms, pooling, upsampling: fvcore counts them, the module breakdown does not), so every column adds up to
    its total.
    """
    model = _build(name, img_size)
    size = img_size or model.pretrained_cfg["input_size"][-1]
    ens = split(model, split_factor, img_size=size)
    S = split_factor
    base = count(model, size)
    total = ensemble_cost(count(ens.members[0], size), ens.members)
    orig = count_by_module(model, size, depth)
    member = count_by_module(ens.members[0], size, depth)
    lines = [f"{name} S={S} by module (depth {depth}); 'split' columns are all {S} members together; module rows "
             "count MAC ops, the last row the rest (train form)",
             f"{'module':<32} {'params_M':>10} {'split':>10} {'ratio':>7} {'gmacs':>9} {'split':>9} {'ratio':>7}"]

    def line(label: str, p: float, sp: float, g: float, sg: float) -> str:
        return (f"{label[:32]:<32} {p / 1e6:>10.3f} {sp / 1e6:>10.3f} {(sp / p if p else float('nan')):>7.3f} "
                f"{g:>9.4f} {sg:>9.4f} {(sg / g if g else float('nan')):>7.3f}")

    lines.append(line("(total)", base.params, total.params, base.gmacs, total.gmacs))
    for path, (p, g) in orig.items():
        if path:
            mp, mg = member.get(path, (0, 0.0))
            lines.append(line(path, p, S * mp, g, S * mg))
    mac_orig = sum(g for path, (_, g) in orig.items() if path)
    mac_split = S * sum(g for path, (_, g) in member.items() if path)
    lines.append(line("(rest: norms, pooling, ...)", 0, 0, base.gmacs - mac_orig, total.gmacs - mac_split))
    return "\n".join(lines)
