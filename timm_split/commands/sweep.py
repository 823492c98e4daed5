"""``timm-split sweep``: split every timm architecture and check shapes and params/FLOPs parity.

    timm-split sweep --split 2 4 --out docs/zoo.csv            # the whole zoo on meta
    timm-split sweep --filter 'vit_tiny*' 'vit_small*' --limit 20 --device cpu --out vit_cpu.csv  # + CPU fwd/bwd
    timm-split sweep --report docs/zoo.csv --markdown docs/zoo.md

For each architecture: build it on meta, count it (one meta forward gives its params, MACs and output shape),
split it, and count one member the same way. The members are built from one plan (their parameter shapes are
checked equal), so the ensemble's MACs are S times the member's and its params are counted over all members;
its output is the average of S member outputs, so the member's output shape is checked against the original's.
Running all S members would repeat the same meta forward S times; the ensemble's own forward (averaging,
execution strategies) is tested in tests/.

Each architecture runs in a worker process with a per-model timeout: a model that hangs is killed and
recorded as ``timeout``, and the sweep goes on. Rows are appended to the CSV as they finish, so a stopped
sweep resumes where it left off. Statuses: ``ok``, ``split_error`` (a ``SplitError`` or ``ValueError`` from the
engine), ``forward_error`` (a member does not run or gives the wrong shape), ``parity_miss`` (params
outside ±2% or FLOPs outside ±4%), ``timeout``, ``crash`` (any other exception: a bug to fix). With ``--device cpu``,
``cpu_checked`` is True where the real forward/backward ran; an ok row over ``--cpu-max-params`` says
``cpu check skipped: ...`` in its reason, and the last line counts the checks run and skipped (a warning follows
when none ran). The last line counts this invocation's (arch, S) rows only: rows of a resumed file that were
already there are "resumed", and rows of other models or splits are named as not counted.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

_logger = logging.getLogger(__name__)

__all__ = ["FIELDS", "sweep_one", "default_tier", "run_sweep", "write_markdown", "main", "cpu_skipped", "summary_line",
           "select", "check_patterns", "cpu_check_warning"]

FIELDS = ("arch", "module", "split", "status", "reason", "params_orig", "params_split", "gmacs_orig", "gmacs_split",
          "params_ratio", "gmacs_ratio", "cpu_checked", "seconds")
STATUSES = ("ok", "parity_miss", "split_error", "forward_error", "timeout", "crash")
PARAMS_TOL, MACS_TOL = 0.02, 0.04
CPU_SKIPPED = "cpu check skipped"  # the reason of an ok row that --device cpu did not check (over the size cap)
REFERENCE_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources",
                             "timm_benchmark_gmacs.csv")  # package data


def module_of(arch: str) -> str:
    """The timm module that registers ``arch`` (``''`` if none)."""
    import timm
    return timm.models._registry._model_to_module.get(arch, "")


def _failed(arch: str, splits: Sequence[int], status: str, reason: str, **extra) -> List[Dict]:
    """Rows for an architecture that gave no rows of its own (its base model fails, its worker died or ran
    out of time)."""
    return [dict(arch=arch, module=module_of(arch), split=S, status=status, reason=reason, **extra) for S in splits]


def _count_and_shape(model, img_size=None):
    """``count(model, img_size)`` at batch 2, and the shape of the output of that counted forward (no second
    forward). Members are counted at their base model's size: a member's own ``img_size`` attribute may have been
    planned as a width where its value equals one (samvit, maxvit_pico, qwen3_vit)."""
    from ..count import count

    shapes = []
    hook = model.register_forward_hook(
        lambda mod, args, out: shapes.append(tuple((out[0] if isinstance(out, (tuple, list)) else out).shape)))
    try:
        cost = count(model, img_size, batch_size=2)
    finally:
        hook.remove()
    return cost, shapes[-1]


def _ensemble_cost(ens, member):
    """The ensemble's cost from one member's (:func:`timm_split.count.ensemble_cost`)."""
    from ..count import ensemble_cost

    return ensemble_cost(member, ens.members)


def sweep_one(arch: str, splits: Sequence[int], device: str = "meta", cpu_max_params: float = 30e6,
              cpu_img_size: int = 64) -> List[Dict]:
    """Split one architecture at each S and check it. Never raises: failures become rows.

    Args:
        arch: a timm architecture name.
        splits: split factors to check.
        device: ``'meta'`` (shapes and counts only) or ``'cpu'`` (also a real forward and backward for models
            under ``cpu_max_params`` at ``cpu_img_size`` where the model takes it).
        cpu_max_params: size limit for the CPU check.
        cpu_img_size: input size of the CPU check.

    Returns:
        One row (a dict with :data:`FIELDS`) per split factor.
    """
    import timm
    import torch

    from ..core import split
    from ..errors import SplitError
    from ..trace import input_shape_for

    module = module_of(arch)
    rows = []
    t0 = time.perf_counter()
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
        kwargs = {"num_classes": 1000} if cfg is not None and not cfg.num_classes else {}  # headless models
        with torch.device("meta"):
            model = timm.create_model(arch, **kwargs)
        base, want = _count_and_shape(model)  # one meta forward gives both
    except Exception as e:  # noqa: BLE001 - the base model itself fails: not ours, but say so
        return _failed(arch, splits, "crash", f"base model: {type(e).__name__}: {str(e)[:200]}", seconds=0.0)
    for S in splits:
        t = time.perf_counter()
        row = dict(arch=arch, module=module, split=S, params_orig=base.params, gmacs_orig=round(base.gmacs, 6),
                   cpu_checked=False)
        try:
            ens = split(model, S).eval()
            member, got = _count_and_shape(ens.members[0], input_shape_for(model)[-2:])  # one member, counted
            total = _ensemble_cost(ens, member)
            if got != want:
                raise RuntimeError(f"output {got}, expected {want}")
        except (SplitError, ValueError) as e:
            row.update(status="split_error", reason=one_line(e))
        except RuntimeError as e:
            row.update(status="forward_error", reason=one_line(e))
        except Exception as e:  # noqa: BLE001
            row.update(status="crash", reason=f"{type(e).__name__}: {one_line(e)}")
        else:
            pr, mr = total.params / base.params, total.gmacs / base.gmacs if base.gmacs else 1.0
            row.update(params_split=total.params, gmacs_split=round(total.gmacs, 6),
                       params_ratio=round(pr, 5), gmacs_ratio=round(mr, 5))
            ok = abs(pr - 1) <= PARAMS_TOL and abs(mr - 1) <= MACS_TOL
            row.update(status="ok" if ok else "parity_miss",
                       reason="" if ok else f"params {pr:.3f}, MACs {mr:.3f}")
            if ok and device == "cpu" and base.params <= cpu_max_params:
                row.update(_cpu_check(arch, S, kwargs, cpu_img_size))
            elif ok and device == "cpu":  # said, not silent: an ok row whose CPU check was not run
                row.update(reason=f"{CPU_SKIPPED}: {base.params / 1e6:.1f}M params > --cpu-max-params "
                                  f"{cpu_max_params / 1e6:g}M")
        row["seconds"] = round(time.perf_counter() - t + (t - t0 if S == splits[0] else 0.0), 3)
        rows.append(row)
    return rows


def _cpu_check(arch, S, kwargs, img_size) -> Dict:
    import timm
    import torch

    from ..core import split

    try:
        try:
            model, size = timm.create_model(arch, img_size=img_size, **kwargs), img_size
        except TypeError:  # no img_size argument: CNNs run at any size, others at their own
            model = timm.create_model(arch, **kwargs)
            size = img_size if not model.pretrained_cfg.get("fixed_input_size") else None
        except Exception:  # noqa: BLE001 - img_size is accepted but this architecture cannot be built at it
            model, size = None, None
        if model is None or (size is not None and not runs_at(model, size)):  # too small: its own size
            model, size = timm.create_model(arch, **kwargs), None
        ens = split(model, S, img_size=size)
        c, h, w = ens.split_plan.input_size
        out = ens(torch.randn(2, c, h, w))
        out.float().square().mean().backward()
        missing = [n for n, p in ens.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            return dict(status="forward_error", reason=f"no grad for {len(missing)} params, e.g. {missing[0]}",
                        cpu_checked=True)
        return dict(cpu_checked=True)
    except Exception as e:  # noqa: BLE001
        return dict(status="forward_error", reason=f"cpu: {type(e).__name__}: {one_line(e)}", cpu_checked=True)


def runs_at(model: Any, size: int) -> bool:
    """Whether ``model`` runs at ``size`` x ``size`` (a meta copy, so no memory and no compute)."""
    import torch

    from ..trace import MetaRecurrent, input_shape_for, meta_copy

    try:
        with torch.no_grad(), MetaRecurrent():
            meta_copy(model).eval()(torch.empty(input_shape_for(model, size), device="meta"))
        return True
    except Exception:  # noqa: BLE001 - any failure means: not at this size
        return False


def cpu_skipped(row: Dict) -> bool:
    """Whether ``row`` is an ok row whose ``--device cpu`` check was skipped (the model is over the size cap)."""
    return row.get("status") == "ok" and str(row.get("reason") or "").startswith(CPU_SKIPPED)


def summary_line(rows: List[Dict], out: str, *, selected: Optional[Iterable] = None,
                 earlier: Optional[Iterable] = None) -> str:
    """The sweep's last line: rows per status, and where any were asked for, the CPU checks run and skipped.

    Args:
        rows: the CSV's rows after the sweep.
        out: the CSV, for the line.
        selected: the ``(arch, S)`` pairs this invocation asked for (None: all of ``rows``). Rows of other pairs
            in the file (earlier runs with other filters or splits) are not counted; the line says how many.
        earlier: the ``(arch, S)`` pairs the file held before this invocation: counted rows among them were
            resumed (not run again, whatever the device of the run that wrote them); the line says how many.

    Returns:
        ``N rows of this sweep in OUT: ok N, ...; CPU check: ...; K of them resumed ...; M rows from earlier runs
        in this file not counted``.
    """
    keep = None if selected is None else {(a, int(S)) for a, S in selected}
    mine = [r for r in rows if keep is None or (r["arch"], int(r["split"])) in keep]
    counts: Dict[str, int] = {}
    for r in mine:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    what = "rows" if keep is None else "rows of this sweep"
    line = f"{len(mine)} {what} in {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    checked, skipped = sum(str(r.get("cpu_checked")) == "True" for r in mine), sum(cpu_skipped(r) for r in mine)
    if checked or skipped:
        line += f"; CPU check: run on {checked}, skipped on {skipped} ok row(s) over --cpu-max-params"
    resumed = _resumed(mine, earlier)
    if resumed:
        line += (f"; {resumed} of them resumed from earlier runs in this file, not run again (pass another --out "
                 "to run them afresh)")
    if len(mine) < len(rows):
        line += f"; {len(rows) - len(mine)} rows from earlier runs in this file (other models or splits) not counted"
    return line


def _resumed(rows: List[Dict], earlier: Optional[Iterable]) -> int:
    before = {(a, int(S)) for a, S in (earlier or ())}
    return sum((r["arch"], int(r["split"])) in before for r in rows)


def cpu_check_warning(rows: List[Dict], *, selected: Optional[Iterable] = None, earlier: Optional[Iterable] = None,
                      cpu_max_params: float = 30e6) -> Optional[str]:
    """The warning of a ``--device cpu`` sweep whose real forward/backward ran on none of its rows, else None.

    Args:
        rows, selected, earlier: as :func:`summary_line`.
        cpu_max_params: the sweep's ``--cpu-max-params``, for the message.

    Returns:
        One line saying why (ok rows over ``--cpu-max-params``, rows resumed from an earlier run, rows not ok) and
        what to do, or None where a check ran (or there are no rows).
    """
    keep = None if selected is None else {(a, int(S)) for a, S in selected}
    mine = [r for r in rows if keep is None or (r["arch"], int(r["split"])) in keep]
    if not mine or any(str(r.get("cpu_checked")) == "True" for r in mine):
        return None
    over, resumed = sum(cpu_skipped(r) for r in mine), _resumed(mine, earlier)
    not_ok = sum(r["status"] != "ok" for r in mine)
    why = [f"{over} ok row(s) over --cpu-max-params {cpu_max_params / 1e6:g}M params"] if over else []
    why += [f"{resumed} row(s) resumed from an earlier run in this file"] if resumed else []
    why += [f"{not_ok} row(s) not ok"] if not_ok else []
    return (f"WARNING: --device cpu asked for a real CPU forward/backward, but it ran on 0 of the {len(mine)} rows "
            f"({', '.join(why)}): nothing was checked on the CPU; pick models under the cap (e.g. --filter "
            f"'vit_tiny*' 'vit_small*'), raise --cpu-max-params, or pass another --out")


def one_line(e: BaseException) -> str:
    """An error's message on one line, at most 300 characters (a sweep row's reason)."""
    return " ".join(str(e).split())[:300]


# ------------------------------------------------------------------------------------------ worker pool
def _worker(conn, splits, device, cpu_max_params, cpu_img_size):
    import torch
    torch.set_num_threads(1)
    logging.getLogger("timm_split").setLevel(logging.ERROR)
    import warnings
    warnings.filterwarnings("ignore")
    while True:
        arch = conn.recv()
        if arch is None:
            return
        conn.send(sweep_one(arch, splits, device, cpu_max_params, cpu_img_size))


class _Slot:
    def __init__(self, ctx, args):
        self.ctx, self.args = ctx, args
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,) + self.args, daemon=True)
        self.proc.start()
        self.arch, self.since = None, 0.0

    def kill(self):
        self.proc.kill()
        self.proc.join()
        self.start()


def run_sweep(archs: Sequence[str], splits: Sequence[int], out: str, *, device: str = "meta", timeout: float = 120,
              workers: int = 1, cpu_max_params: float = 30e6, cpu_img_size: int = 64,
              progress: bool = True) -> List[Dict]:
    """Sweep ``archs``, appending rows to the CSV ``out`` (resuming: pairs already there are skipped).

    ``progress``: a tqdm bar; else one INFO line per architecture done: done/total, elapsed, time left.

    Returns:
        All rows of the CSV after the sweep.
    """
    from tqdm import tqdm

    from ..training.metrics import Throughput, format_seconds

    done = {(r["arch"], int(r["split"])) for r in _read(out)}
    todo = [a for a in archs if any((a, S) not in done for S in splits)]
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    args = (tuple(splits), device, cpu_max_params, cpu_img_size)
    slots = [_Slot(ctx, args) for _ in range(max(1, workers))]
    queue = list(todo)
    bar = tqdm(total=len(todo), desc=f"sweep S={','.join(map(str, splits))}", disable=not progress, file=sys.stderr)
    pace = Throughput(len(todo))
    with _open_for_append(out) as f:
        try:
            while queue or any(s.arch for s in slots):
                for s in slots:
                    if s.arch is None and queue:
                        s.arch, s.since = queue.pop(0), time.monotonic()
                        s.conn.send(s.arch)
                for s in slots:
                    if s.arch is None:
                        continue
                    rows = None
                    if s.conn.poll(0.05):
                        try:
                            rows = s.conn.recv()
                        except EOFError:  # the worker died (out of memory, a segfault)
                            rows = _failed(s.arch, splits, "crash", "worker died")
                            s.kill()
                    elif time.monotonic() - s.since > timeout:
                        rows = _failed(s.arch, splits, "timeout", f"over {timeout:.0f}s", seconds=round(timeout, 1))
                        s.kill()
                    elif not s.proc.is_alive():
                        rows = _failed(s.arch, splits, "crash", "worker died")
                        s.start()
                    if rows is not None:
                        _append(f, [r for r in rows if (r["arch"], int(r["split"])) not in done])
                        bar.update(1)
                        pace.update(1)
                        if not progress:
                            _logger.info("sweep: %d/%d models (%s: %s), elapsed %s, ETA %s", pace.steps, pace.total,
                                         s.arch, ",".join(sorted({r["status"] for r in rows})),
                                         format_seconds(pace.elapsed()), format_seconds(pace.eta()))
                        s.arch = None
        finally:
            for s in slots:
                if s.proc.is_alive():
                    s.conn.send(None) if s.arch is None else None
                    s.proc.kill()
            bar.close()
    return _read(out)


def _csv_text(rows: List[Dict], header: bool = False) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _open_for_append(path: str):
    """``path`` opened to append rows: a new file gets the header; a file whose last row was cut mid-write gets
    a newline first, so the next row starts on a line of its own (the cut row is skipped on reading)."""
    ends_clean = True
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ends_clean = f.read(1) == b"\n"
        header = False
    else:
        header = True
    f = open(path, "a", newline="")
    f.write(("" if ends_clean else "\n") + (_csv_text([], header=True) if header else ""))
    f.flush()
    return f


def _append(f, rows: List[Dict]) -> None:
    """Append ``rows`` in one write and flush, so a stopped sweep leaves whole rows (at most one cut)."""
    f.write(_csv_text(rows))
    f.flush()


def _complete(row: Dict) -> bool:
    """Whether a CSV row is whole: every field there (no cut), no extra fields (no glued rows), known status."""
    if None in row or any(row.get(k) is None for k in FIELDS) or row["status"] not in STATUSES or not row["arch"]:
        return False
    try:
        int(row["split"])
    except ValueError:
        return False
    return True


def _read(path: str) -> List[Dict]:
    """The whole rows of a sweep CSV (none if it does not exist); rows cut mid-write are skipped with a warning.

    Raises:
        ValueError: the file is not a sweep CSV (its header lacks the sweep's columns).
    """
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in FIELDS if k not in (reader.fieldnames or FIELDS)]
        if missing:
            raise ValueError(f"{path} is not a timm-split sweep CSV (no {', '.join(missing[:3])} column); pass "
                             "another --out or --report")
        rows = list(reader)
    whole = [r for r in rows if _complete(r)]
    if len(whole) < len(rows):
        _logger.warning("%s: skipped %d row(s) that do not parse (cut mid-write); their architectures run again",
                        path, len(rows) - len(whole))
    return whole


def default_tier() -> List[str]:
    """One small architecture per timm module: the fewest params in timm's benchmark table, else the first."""
    import timm

    params: Dict[str, float] = {}
    with open(REFERENCE_CSV, newline="") as f:  # package data: a missing file is an install error, not a tier
        for r in csv.DictReader(f):
            params[r["model"]] = min(params.get(r["model"], float("inf")), float(r["param_count"]))
    by_module: Dict[str, List[str]] = {}
    for arch in timm.list_models():
        if arch.startswith("splitnet_"):
            continue
        by_module.setdefault(timm.models._registry._model_to_module.get(arch, ""), []).append(arch)
    return sorted(min(archs, key=lambda a: (params.get(a, float("inf")), a)) for archs in by_module.values())


def check_patterns(patterns: Iterable[str], names: Sequence[str], flag: str, among: str = "timm architecture"
                   ) -> None:
    """Every wildcard must match one of ``names``: a pattern that matches nothing (a typo) is an error, not an
    empty selection.

    Args:
        patterns: fnmatch wildcards (``'vit_*'``).
        names: what they select from.
        flag: the flag, for the message (``'--filter'``).
        among: what ``names`` are, for the message.

    Raises:
        ValueError: a pattern matches none of ``names``; the message suggests close names.
    """
    import difflib

    for pat in patterns:
        if not any(fnmatch.fnmatch(a, pat) for a in names):
            close = difflib.get_close_matches(pat.strip("*?"), list(names), n=3, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise ValueError(f"{flag} {pat!r} matches no {among}{hint}")


def select(filters: Iterable[str] = ("*",), excludes: Iterable[str] = (), limit: Optional[int] = None) -> List[str]:
    """timm architectures matching any filter and no exclude, in registry order.

    Raises:
        ValueError: a filter or exclude that matches no timm architecture (:func:`check_patterns`).
    """
    import timm

    every = [a for a in timm.list_models() if not a.startswith("splitnet_")]
    filters, excludes = list(filters), list(excludes)
    check_patterns(filters, every, "--filter")
    check_patterns(excludes, every, "--exclude")
    names = [a for a in every if any(fnmatch.fnmatch(a, f) for f in filters)]
    names = [a for a in names if not any(fnmatch.fnmatch(a, x) for x in excludes)]
    if not names:
        raise ValueError(f"--exclude {' '.join(excludes)} leaves none of the {len(every)} architectures --filter "
                         "selects; narrow --exclude")
    return names[:limit] if limit else names


def write_markdown(rows: List[Dict], path: str, command: str, source: str = "zoo.csv") -> None:
    """The generated sections of docs/zoo.md from sweep rows: a ``header`` line naming the command, and the
    ``tables`` (coverage by S and by module, parity statistics, every failure with its reason). Every other line of
    an existing file (the hand-written notes) is kept: only the text between a section's markers is rewritten
    (:func:`timm_split.generated.write_generated`); a file without the markers gets the sections appended."""
    from ..generated import write_generated

    by_split: Dict[int, List[Dict]] = {}
    for r in rows:
        by_split.setdefault(int(r["split"]), []).append(r)
    header = f"Generated by `{command}` from `{os.path.basename(source)}`."
    lines = ["| S | architectures | ok | parity_miss | split_error | forward_error | timeout | crash "
             "| params within ±2% | FLOPs within ±4% | params ratio median (worst) | FLOPs ratio median (worst) "
             "| CPU checked | median s |", "|" + "---|" * 14]
    for S, rs in sorted(by_split.items()):
        n = len(rs)
        st = {k: sum(r["status"] == k for r in rs) for k in
              ("ok", "parity_miss", "split_error", "forward_error", "timeout", "crash")}
        pr = [float(r["params_ratio"]) for r in rs if r.get("params_ratio")]
        mr = [float(r["gmacs_ratio"]) for r in rs if r.get("gmacs_ratio")]
        p_ok = sum(abs(x - 1) <= PARAMS_TOL for x in pr)
        m_ok = sum(abs(x - 1) <= MACS_TOL for x in mr)
        worst_p = max(pr, key=lambda x: abs(x - 1)) if pr else float("nan")
        worst_m = max(mr, key=lambda x: abs(x - 1)) if mr else float("nan")
        secs = [float(r["seconds"]) for r in rs if r.get("seconds")]
        cpu = sum(str(r.get("cpu_checked")) == "True" for r in rs)
        skipped = sum(cpu_skipped(r) for r in rs)
        cpu = f"{cpu} ({skipped} skipped: over the size cap)" if skipped else cpu
        lines.append(
            f"| {S} | {n} | {st['ok']} ({100 * st['ok'] / n:.1f}%) | {st['parity_miss']} | {st['split_error']} | "
            f"{st['forward_error']} | {st['timeout']} | {st['crash']} | {p_ok} ({100 * p_ok / n:.1f}%) | "
            f"{m_ok} ({100 * m_ok / n:.1f}%) | {statistics.median(pr) if pr else float('nan'):.4f} ({worst_p:.3f}) | "
            f"{statistics.median(mr) if mr else float('nan'):.4f} ({worst_m:.3f}) | {cpu} | "
            f"{statistics.median(secs) if secs else 0:.2f} |")
    lines += ["", "## By timm module", "", "| module | architectures | ok (all S) |", "|---|---|---|"]
    mods: Dict[str, List[Dict]] = {}
    for r in rows:
        mods.setdefault(r.get("module") or "?", []).append(r)
    for m, rs in sorted(mods.items()):
        archs = {r["arch"] for r in rs}
        ok = {a for a in archs if all(r["status"] == "ok" for r in rs if r["arch"] == a)}
        lines.append(f"| {m} | {len(archs)} | {len(ok)} |")
    fails = [r for r in rows if r["status"] != "ok"]
    lines += ["", f"## Not ok ({len(fails)} rows)", "", "| arch | S | status | reason |", "|---|---|---|---|"]
    for r in sorted(fails, key=lambda r: (r["status"], r["arch"], int(r["split"]))):
        lines.append(f"| {r['arch']} | {r['split']} | {r['status']} | {r.get('reason', '').replace('|', '/')} |")

    write_generated(path, {"header": header, "tables": "\n".join(lines)}, title="Zoo coverage", source=command)


def _positive(flag: str, what: str):
    """An argparse type: a finite number > 0 (``30e6``), named ``flag`` and ``what`` in its error."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not v > 0 or math.isinf(v):
            raise argparse.ArgumentTypeError(f"{flag} must be a number of {what} > 0, got {text!r}")
        return v
    return parse


_seconds = _positive("--timeout", "seconds")
_params = _positive("--cpu-max-params", "parameters")


def add_args(p: argparse.ArgumentParser) -> None:
    from .common import int_at_least, split_factor_arg

    p.add_argument("--filter", nargs="+", default=["*"], help="wildcards of timm names (default: all)")
    p.add_argument("--exclude", nargs="+", default=[], help="wildcards to leave out")
    p.add_argument("--tier", choices=["all", "default"], default="all",
                   help="'default': one small architecture per timm module")
    p.add_argument("--split", type=split_factor_arg, nargs="+", default=[2, 4])
    p.add_argument("--limit", type=int_at_least(1, "--limit"), default=None)
    p.add_argument("--device", choices=["meta", "cpu"], default="meta")
    p.add_argument("--timeout", type=_seconds, default=120.0, help="seconds per architecture")
    p.add_argument("--workers", type=int_at_least(1, "--workers"), default=1)
    p.add_argument("--cpu-max-params", type=_params, default=30e6,
                   help="with --device cpu: run the real forward/backward only for models up to this many params")
    p.add_argument("--out", default="sweep.csv", help="CSV to append to (default: sweep.csv in the current folder); "
                   "an existing file is resumed: its (arch, S) rows are kept and not run again, whatever the flags "
                   "that wrote them, so give each sweep its own --out")
    p.add_argument("--report", metavar="CSV", help="only write --markdown from an existing CSV")
    p.add_argument("--markdown", metavar="MD", help="write the coverage report here")


_DEFAULTS = {"filter": ["*"], "exclude": [], "tier": "all", "split": [2, 4], "limit": None, "device": "meta",
             "timeout": 120.0, "workers": 1, "cpu_max_params": 30e6, "out": "sweep.csv"}
_INERT = (
    (("filter", "exclude", "tier", "split", "limit", "device", "timeout", "workers", "cpu_max_params", "out"),
     lambda a: bool(a.report), "--report only writes --markdown from an existing CSV, sweeping nothing"),
    (("cpu_max_params",), lambda a: not a.report and a.device != "cpu",
     "it limits the real CPU check, which runs with --device cpu only"),
)


def _check_paths(args: argparse.Namespace) -> None:
    """Usage errors before any work: a --report that is not there or holds no rows, an unwritable --out or
    --markdown, an output that is an input or another output, a flag that does nothing."""
    from ..checks import check_writable
    from .common import check_output_paths, inert_flags

    if args.report:
        if not os.path.isfile(args.report):
            raise ValueError(f"--report {args.report!r}: no such file; pass the CSV a sweep wrote (its --out)")
        if not _read(args.report):
            raise ValueError(f"--report {args.report!r} has no sweep rows; run the sweep first (--out)")
        if not args.markdown:
            raise ValueError("--report only writes --markdown from an existing CSV, and no --markdown was given: "
                             "pass --markdown MD")
    inert_flags(args, _INERT, _DEFAULTS)
    check_output_paths({"--out": None if args.report else args.out, "--markdown": args.markdown},
                       {"--report": args.report, "the reference CSV (package data)": REFERENCE_CSV})
    if not args.report:
        check_writable(args.out, "--out")
    if args.markdown:
        check_writable(args.markdown, "--markdown")


def run(args: argparse.Namespace) -> int:
    from .common import cli_logging

    command = "timm-split sweep " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["sweep"] else sys.argv[1:])
    _check_paths(args)
    if args.report:
        rows = _read(args.report)
    else:
        archs = default_tier() if args.tier == "default" else select(args.filter, args.exclude, args.limit)
        if args.tier == "default":
            check_patterns(args.filter, archs, "--filter", "architecture of --tier default")
            check_patterns(args.exclude, archs, "--exclude", "architecture of --tier default")
            archs = [a for a in archs if any(fnmatch.fnmatch(a, f) for f in args.filter)
                     and not any(fnmatch.fnmatch(a, x) for x in args.exclude)][:args.limit]
        progress = sys.stderr.isatty()
        if not progress:  # a log file gets a line per architecture instead of a bar
            cli_logging(_logger.name)
        earlier = {(r["arch"], int(r["split"])) for r in _read(args.out)}  # a resumed file's rows
        rows = run_sweep(archs, args.split, args.out, device=args.device, timeout=args.timeout,
                         workers=args.workers, cpu_max_params=args.cpu_max_params, progress=progress)
        selected = {(a, S) for a in archs for S in args.split}
        print(summary_line(rows, args.out, selected=selected, earlier=earlier), flush=True)
        warning = cpu_check_warning(rows, selected=selected, earlier=earlier, cpu_max_params=args.cpu_max_params) \
            if args.device == "cpu" else None
        if warning:
            print(warning, file=sys.stderr)
    if args.markdown:
        write_markdown(rows, args.markdown, command, args.report or args.out)
        print(f"wrote {args.markdown}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .common import OneLineParser, run_command

    p = OneLineParser(prog="python -m timm_split.commands.sweep", description=__doc__.split("\n")[0])
    add_args(p)
    return run_command("sweep", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
