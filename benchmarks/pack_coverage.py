"""How much of the timm zoo the ``'packed'`` execution covers, checked against the loop on the CPU.

    python benchmarks/pack_coverage.py --split 2 4 8 --out docs/pack_coverage.csv    # one model per timm module
    python benchmarks/pack_coverage.py --split 2 4 8 --out docs/pack_coverage.csv --redo too_big   # rows to redo
    python benchmarks/pack_coverage.py --filter 'vit_*' 'convnext_*' --limit 20 --out vit.csv
    python benchmarks/pack_coverage.py --report docs/pack_coverage.csv             # the coverage numbers, per S

For each architecture (one per timm module by default, as ``timm-split sweep --tier default``) and each S of
``--split``: build it (at ``--img-size`` where it takes one, with a 10-class head), split it in S members on the
CPU, pack the members (:func:`timm_split.execution.packed.pack_members`) and compare with the loop: eval outputs,
and in training mode (dropout and drop-path off) outputs, every parameter's gradient and every buffer, each to
``--tol`` of the largest magnitude (training at 4x the batch: BatchNorm over a few 1x1 maps is
ill-conditioned). Where float32 differs by more, both run again in float64 and must agree to 1e-9: the
packing is exact and the network amplifies float32 rounding (``fp64`` column; errors then scaled to ``--tol``).

Architectures over ``--max-params`` (counted on the meta device as built: 10-class head) are built smaller, not
skipped, so that their ops are still checked; the rule is generic (no per-model table), first that fits wins:

1. fewer blocks, through ``timm.create_model`` keyword arguments that the model class's ``__init__`` takes (or a
   field of a dataclass config it takes, as NaFlexVit's ``cfg``): a depth-like name (``depth``, ``depths``,
   ``layers``, ``num_blocks``, ``blocks``, ``num_layers``, ``stage_depths``, ``block_counts``) whose value, as
   timm passes it for this architecture (recorded on meta), is an int or a sequence of ints (nested too). Tried
   in order, each with all such keywords at once, then each alone, until one builds under the cap: ints to at
   most 2 and sequence entries to at most 1; then ints to 1; then entries to at most 2; then every value
   halved (rounded up) k times, from the k that leaves all 1 down to once (NextViT's middle stage repeats a
   pattern of 5 blocks: ``depths=(2,2,5,2)``);
2. the smallest architecture registered in the same timm module (``timm.list_models(module=...)``, ordered by
   parameters on meta) that is under the cap.

The ``built_as`` column says which: ``''`` for the architecture itself, e.g. ``depth=2`` or
``depths=(1,1,1,1)`` (the ``create_model`` keywords), or ``arch:<name>``; ``built_params`` the parameters of
what ran. Where nothing is under the cap, the row stays ``too_big`` and ``failing_op`` says why.

Each (architecture, S) runs in its own process with a ``--timeout``; the CSV is rewritten (atomically: a
temporary file, then ``os.replace``) after every row, so a stopped run resumes: rows already in ``--out`` are
keyed by (arch, split) and skipped; ``--redo too_big`` runs again the rows of a given status (as the ``too_big``
rows written before the smaller builds, which skipped the architecture).

Columns: ``status`` (``ok``, ``mismatch``, ``pack_error``, ``split_error``, ``too_big``, ``timeout``, ``crash``),
``packed_ok`` (outputs and gradients equal the loop's), ``fully_packed`` (no op ran once per member),
``looped_ops`` (how many ops ran per member), ``failing_op`` (the first such op, or the error), ``params`` (the
architecture's own, 1000-class default head), the largest errors, seconds, ``built_as``, ``built_params`` (the
last two appended after the original columns; rows written before them read ``''``: the architecture itself).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import inspect
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


FIELDS = ("arch", "module", "split", "status", "packed_ok", "fully_packed", "looped_ops", "failing_op", "params",
          "img_size", "out_err", "grad_err", "buffer_err", "fp64", "seconds", "built_as", "built_params")
# create_model keywords taken as a number of blocks (an int) or of blocks per stage (a sequence of ints)
DEPTH_NAMES = re.compile(r"^(depths?|layers|num_blocks|blocks|num_layers|stage_depths|block_counts)$")


def _head_kwargs(arch: str) -> Dict:
    """A 10-class head where the architecture has a classifier."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return {"num_classes": 10} if cfg is None or cfg.num_classes else {}


def _build(arch: str, img_size: int, **kwargs):
    """The model (with ``kwargs``) at ``img_size`` where it takes and runs at it, else at its own size (as the
    sweep's CPU check)."""
    import timm

    from timm_split.commands.sweep import runs_at

    kwargs = dict(_head_kwargs(arch), **kwargs)
    for extra in ({"img_size": img_size}, {}):
        try:
            model = timm.create_model(arch, **kwargs, **extra)
        except Exception:  # noqa: BLE001 - no img_size argument, or not buildable at it
            continue
        size = img_size if runs_at(model, img_size) else None
        return model, size
    return timm.create_model(arch, **kwargs), None


def _meta_model(arch: str, **kwargs):
    import timm

    with torch.device("meta"):
        return timm.create_model(arch, **dict(_head_kwargs(arch), **kwargs))


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _init_args(arch: str, cls: type) -> Dict[str, Any]:
    """The arguments timm passes to ``cls.__init__`` when it builds ``arch`` (recorded on a meta build)."""
    got: Dict[str, Any] = {}
    own = "__init__" in vars(cls)
    init = cls.__init__

    def record(self, *args, **kwargs):
        if not got:  # the outermost call: a subclass's super().__init__ comes after
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            got.update(bound.arguments)
        return init(self, *args, **kwargs)

    cls.__init__ = record
    try:
        _meta_model(arch)
    finally:
        if own:
            cls.__init__ = init
        else:
            del cls.__init__
    got.pop("self", None)
    return got


def _shorter(value: Any, most: Tuple[int, int] = (2, 1), halve: int = 0, top: bool = True) -> Any:
    """``value`` with fewer blocks: an int to at most ``most[0]``, a sequence of ints (nested too) to at most
    ``most[1]`` each; with ``halve`` = k instead each int (entry) over 1 divided by 2**k, rounded up. ``None``
    for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return -(-value // 2 ** halve) if halve else min(value, most[0] if top else most[1])
    if isinstance(value, (list, tuple)) and value:
        inner = [_shorter(v, most, halve, top=False) for v in value]
        return None if any(v is None for v in inner) else type(value)(inner)
    return None


def _flat(value: Any) -> List[int]:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def _fmt(kwargs: Dict[str, Any]) -> str:
    """``create_model`` keywords as ``built_as`` writes them: ``depth=2``, ``depths=(1,1,1,1)``."""
    return ",".join(f"{k}={v!r}".replace(" ", "") for k, v in kwargs.items())


# how far the depth-like values are shortened, in the order tried: (an int's most, a sequence's most per entry),
# then halved k times for k from the most that changes anything down to 1 (stages whose structure repeats a
# pattern of blocks, as NextViT's 5, need more than 1 or 2)
LADDER = ((2, 1), (1, 1), (2, 2))


def depth_kwargs(arch: str, cls: type) -> List[Dict[str, Any]]:
    """The depth-like ``create_model`` keywords of ``arch`` (of ``cls.__init__`` or of a dataclass config it
    takes), with shorter values, where the value timm passes for ``arch`` is an int or ints: for each step of
    :data:`LADDER`, all of them at once, then each alone (the sets to try, in order, without repeats)."""
    found: Dict[str, Any] = {}
    for name, value in _init_args(arch, cls).items():
        fields = ({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
                  if dataclasses.is_dataclass(value) and not isinstance(value, type) else {name: value})
        for key, val in fields.items():
            if DEPTH_NAMES.match(key) and _shorter(val) is not None and key not in found:
                found[key] = val
    deepest = max([1] + [int(x) for v in found.values() for x in _flat(v)])
    steps = [dict(most=m) for m in LADDER] + [dict(halve=k) for k in range(deepest.bit_length(), 0, -1)]
    tries: List[Dict[str, Any]] = []
    for step in steps:
        short = {k: _shorter(v, **step) for k, v in found.items() if _shorter(v, **step) != v}
        for kwargs in [short] + ([{k: v} for k, v in short.items()] if len(short) > 1 else []):
            if kwargs and kwargs not in tries:
                tries.append(kwargs)
    return tries


def pick_build(arch: str, max_params: float) -> Tuple[str, Dict[str, Any], int, str]:
    """What to build for ``arch`` under ``max_params`` (parameters on meta, as built): ``(name, create_model
    keywords, params, built_as)``; ``built_as`` is ``''`` for the architecture itself, the keywords that shorten
    its depth, or ``arch:<name>`` for the smallest architecture of its timm module under the cap. Raises
    :class:`TooBig` (saying why) where none is."""
    import timm

    from timm_split.commands.sweep import module_of, one_line

    model = _meta_model(arch)
    params = _count(model)
    if params <= max_params:
        return arch, {}, params, ""
    cls, why = type(model), [f"{params / 1e6:.1f}M params as built, over {max_params / 1e6:g}M"]
    try:
        tries = depth_kwargs(arch, cls)
    except Exception as e:  # noqa: BLE001 - the recording build failed: no depth to shorten
        tries, why = [], why + [f"recording {cls.__name__}.__init__'s arguments: {one_line(e)[:80]}"]
    if not tries:
        why.append(f"{cls.__name__}.__init__ takes no depth-like int or ints over 1")
    for kwargs in tries:
        try:
            n = _count(_meta_model(arch, **kwargs))
        except Exception as e:  # noqa: BLE001 - timm's entrypoint or the class refused these keywords
            why.append(f"{_fmt(kwargs)}: {type(e).__name__}: {one_line(e)[:80]}")
            continue
        if n <= max_params and n < params:
            return arch, kwargs, n, _fmt(kwargs)
        why.append(f"{_fmt(kwargs)}: {n / 1e6:.1f}M")
    module = module_of(arch)
    sizes = []
    for other in timm.list_models(module=module) if module else []:
        if other != arch and not other.startswith("splitnet_"):
            try:
                sizes.append((_count(_meta_model(other)), other))
            except Exception:  # noqa: BLE001 - not buildable on meta: not a candidate
                pass
    if sizes and min(sizes)[0] <= max_params:
        n, other = min(sizes)
        return other, {}, n, f"arch:{other}"
    why.append(f"module {module}: " + (f"smallest other {min(sizes)[1]} {min(sizes)[0] / 1e6:.1f}M" if sizes
                                        else "no other architecture"))
    raise TooBig("; ".join(why), params)


class TooBig(Exception):
    """No build of an architecture under the size cap (the message says what was tried)."""

    def __init__(self, why: str, params: int):
        super().__init__(why)
        self.params = params


def _no_dropout(model) -> None:
    """Dropout p, DropPath drop_prob and every ``*drop*`` float attribute (``drop_rate`` read by a forward) to 0:
    random draws differ between the packed network and the loop."""
    for m in model.modules():
        for attr, val in list(vars(m).items()):
            if isinstance(val, float) and (attr == "p" and isinstance(m, torch.nn.modules.dropout._DropoutNd)
                                           or "drop" in attr):
                setattr(m, attr, 0.0)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) / (float(b.abs().max()) + 1e-12) if b.numel() else 0.0


def _run(ens, x, w, packed: bool, train: bool):
    """Eval output, or in training the output, gradients and buffers, of a copy of ``ens`` (packed or loop)."""
    import torch

    from timm_split.execution.packed import pack_members

    ens = copy.deepcopy(ens).train(train)
    fn = pack_members(ens.members) if packed else ens.forward_members
    if not train:
        with torch.no_grad():
            return fn(x), [], [], getattr(fn, "looped_ops", [])
    out = fn(x)
    (out * w.to(out.dtype)).sum().backward()
    grads = [p.grad for p in ens.parameters()]
    buffers = [b for b in ens.buffers() if b.is_floating_point()]
    return out, grads, buffers, getattr(fn, "looped_ops", [])


def _errors(got, want) -> Dict[str, float]:
    """Largest relative errors: outputs, gradients (relative to the largest gradient), buffers."""
    out, grads, buffers, _ = got
    scale = max([float(g.abs().max()) for g in want[1] if g is not None] + [1e-12])
    if any((g is None) != (h is None) for g, h in zip(grads, want[1])):
        return {"out_err": float("inf"), "grad_err": float("inf"), "buffer_err": float("inf")}
    return {"out_err": _rel(out, want[0]),
            "grad_err": max([float((g.double() - h.double()).abs().max()) / scale
                             for g, h in zip(grads, want[1]) if h is not None] + [0.0]),
            # a buffer the forward replaces (ConViT's rel_indices cache) is compared only where the shapes agree
            "buffer_err": max([_rel(a, b) for a, b in zip(buffers, want[2]) if a.shape == b.shape] + [0.0])}


def _compare(ens, x, tol: float, tol64: float = 1e-9):
    """Packed vs loop in eval and in training. Where they differ by more than ``tol`` in float32, both run in
    float64 and must agree to ``tol64``: the packing is then exact and the float32 difference is rounding that
    an ill-conditioned network amplifies (BatchNorm in training through many layers: the loop's own float32
    gradients are 0.1 off float64 for convmixer_768_32). The ``fp64`` column says where this was needed."""
    import torch

    w = torch.randn(_run(ens, x, None, False, False)[0].shape, generator=torch.Generator().manual_seed(1))
    errs, note, looped = {}, "", []
    for train in (False, True):
        if train:  # BatchNorm in training over a 1x1 map of 2 samples is ill-conditioned: more samples
            x = x.repeat(4, 1, 1, 1) + 0.1 * torch.randn(4 * x.shape[0], *x.shape[1:])
            w = w.repeat(1, 4, *([1] * (w.dim() - 2)))
        packed = _run(ens, x, w, True, train)
        looped += packed[3]
        e = _errors(packed, _run(ens, x, w, False, train))
        if max(e.values()) > tol:
            ens.double()
            x64, w64 = x.double(), w.double()
            e64 = _errors(_run(ens, x64, w64, True, train), _run(ens, x64, w64, False, train))
            ens.float()
            note += f"{'train' if train else 'eval'}: float32 {max(e.values()):.2g}, float64 {max(e64.values()):.2g}; "
            e = {k: v * tol / tol64 for k, v in e64.items()}  # scaled: ok where float64 is within tol64
        for k, v in e.items():
            errs[k] = max(errs.get(k, 0.0), v)
    return errs, note, sorted(set(looped))


def check_one(arch: str, split: int = 2, img_size: int = 64, max_params: float = 30e6, tol: float = 1e-4) -> Dict:
    """Pack one architecture's members and compare them with the loop; never raises (errors become rows)."""
    import timm
    import torch

    import timm_split
    from timm_split.commands.sweep import module_of, one_line

    t0 = time.perf_counter()
    row = dict(arch=arch, module=module_of(arch), split=split)
    try:
        with torch.device("meta"):
            row["params"] = sum(p.numel() for p in timm.create_model(arch).parameters())
        try:
            name, kwargs, row["built_params"], row["built_as"] = pick_build(arch, max_params)
        except TooBig as e:
            return dict(row, status="too_big", failing_op=str(e), built_params=e.params,
                        seconds=round(time.perf_counter() - t0, 2))
        model, size = _build(name, img_size, **kwargs)
        _no_dropout(model)
        row["img_size"] = size or ""
        try:
            ens = timm_split.split(model, split, img_size=size)
        except Exception as e:  # noqa: BLE001 - not splittable: outside the coverage denominator
            return dict(row, status="split_error", failing_op=one_line(e), seconds=round(time.perf_counter() - t0, 2))
        torch.manual_seed(0)
        for p in ens.parameters():  # zero-initialised heads would make every comparison trivially equal
            p.data.add_(torch.randn_like(p) * 0.02)
        c, h, w = ens.split_plan.input_size
        x = torch.randn(2, c, h, w)
        try:
            errs, note, looped = _compare(ens, x, tol)
        except Exception as e:  # noqa: BLE001
            return dict(row, status="pack_error", packed_ok=False, failing_op=f"{type(e).__name__}: {one_line(e)}",
                        seconds=round(time.perf_counter() - t0, 2))
        ok = all(v <= tol for v in errs.values())
        row.update(errs, status="ok" if ok else "mismatch", packed_ok=ok, fully_packed=ok and not looped,
                   looped_ops=len(looped), failing_op=looped[0] if looped else "", fp64=note)
    except Exception as e:  # noqa: BLE001
        row.update(status="crash", failing_op=f"{type(e).__name__}: {one_line(e)}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _child(conn, arch: str, options: Dict) -> None:
    import logging
    import warnings

    import torch
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # oneDNN builds a kernel per new shape: slow for one call each
    logging.getLogger("timm_split").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    conn.send(check_one(arch, **options))


def _read(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:  # rows written before a column was appended read '' there
        return [{k: r.get(k) or "" for k in FIELDS} for r in csv.DictReader(f)]


def _write(path: str, rows: List[Dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run(archs: Sequence[str], out: str, splits: Sequence[int] = (2,), workers: int = 1, timeout: float = 300,
        redo: Sequence[str] = (), **options) -> List[Dict]:
    """Check ``archs`` at each S of ``splits`` (``workers`` processes at a time, one per (arch, S)), rewriting
    ``out`` after each; (arch, S) rows already in ``out`` are kept and not run again, except those whose status is
    in ``redo`` (dropped from ``out`` at its next rewrite)."""
    from timm_split.commands.sweep import module_of

    rows = [r for r in _read(out) if r["status"] not in redo]
    done = {(r["arch"], int(r["split"])) for r in rows}
    queue = [(a, s) for a in archs for s in splits if (a, s) not in done]
    ctx = mp.get_context("fork")
    running: Dict[tuple, tuple] = {}
    while queue or running:
        while queue and len(running) < workers:
            arch, split = key = queue.pop(0)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(child, arch, dict(options, split=split)), daemon=True)
            proc.start()
            running[key] = (proc, parent, time.monotonic())
        time.sleep(0.2)
        for (arch, split), (proc, conn, since) in list(running.items()):
            row = None
            if conn.poll():
                row = conn.recv()
            elif time.monotonic() - since > timeout:
                row = dict(arch=arch, module=module_of(arch), split=split, status="timeout",
                           failing_op=f"over {timeout:.0f}s", seconds=timeout)
            elif not proc.is_alive():
                row = dict(arch=arch, module=module_of(arch), split=split, status="crash",
                           failing_op=f"worker died (exit code {proc.exitcode})")
            if row is not None:
                proc.kill()
                proc.join()
                del running[(arch, split)]
                rows.append(row)
                _write(out, rows)
                built = f" [{row['built_as']}]" if row.get("built_as") else ""
                print(f"{arch} S={split}{built}: {row['status']} {row.get('failing_op') or ''}"[:160],
                      file=sys.stderr, flush=True)
    return rows


def report(rows: List[Dict]) -> str:
    """The coverage numbers per S: of the architectures that split, how many pack exactly (and how many fully),
    and every row that does not, with its status and failing op."""
    lines = []
    for split in sorted({int(r["split"]) for r in rows}):
        at = [r for r in rows if int(r["split"]) == split]
        split_ok = [r for r in at if r["status"] in ("ok", "mismatch", "pack_error", "timeout", "crash")]
        ok = [r for r in split_ok if str(r.get("packed_ok")) == "True"]
        full = [r for r in ok if str(r.get("fully_packed")) == "True"]
        smaller = [r for r in split_ok if r.get("built_as")]
        other = sorted({r["status"] for r in at} - {r["status"] for r in split_ok})
        others = "".join(f", {sum(r['status'] == st for r in at)} {st}" for st in other)
        lines.append(f"S={split}: {len(at)} architectures{others}; of the {len(split_ok)} that split "
                     f"({len(smaller)} built smaller, see built_as): "
                     f"packed_ok {len(ok)}/{len(split_ok)} ({100 * len(ok) / max(1, len(split_ok)):.1f}%), "
                     f"fully packed (no op run per member) {len(full)}/{len(split_ok)} "
                     f"({100 * len(full) / max(1, len(split_ok)):.1f}%)")
        if smaller:
            lines.append("  built smaller: " + ", ".join(f"{r['arch']} ({r['built_as']})" for r in smaller))
        for r in at:
            if r not in full:
                built = f" [{r['built_as']}]" if r.get("built_as") else ""
                packed = (f", packed_ok={r.get('packed_ok') or False}, looped_ops={r.get('looped_ops') or 0}"
                          if r in split_ok else "")
                why = r.get("failing_op") or ""
                if r["status"] == "too_big" and not why:  # a row from before the smaller builds
                    why = f"{r.get('params')} params, skipped (an old row: --redo too_big builds it smaller)"
                lines.append(f"  {r['arch']}{built}: {r['status']}{packed}: {why[:200]}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from timm_split.commands.sweep import default_tier, select

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--filter", nargs="*", help="fnmatch patterns (default: one architecture per timm module)")
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--limit", type=int)
    p.add_argument("--split", type=int, nargs="+", default=[2], help="S values, e.g. 2 4 8 (one row per arch and S)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--max-params", type=float, default=30e6,
                   help="size cap on the model as built (meta, 10-class head); over it, built smaller (see above)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default="pack_coverage.csv")
    p.add_argument("--redo", nargs="*", default=[], metavar="STATUS",
                   help="run again the rows of --out with these statuses (e.g. too_big timeout crash)")
    p.add_argument("--report", metavar="CSV", help="print the coverage numbers of a CSV and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(_read(args.report)))
        return 0
    archs = select(args.filter, args.exclude, args.limit) if args.filter else default_tier()[:args.limit]
    rows = run(archs, args.out, args.split, args.workers, args.timeout, args.redo, img_size=args.img_size,
               max_params=args.max_params, tol=args.tol)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
