"""How much of the timm zoo the ``'packed'`` execution covers, checked against the loop on the CPU.

    python benchmarks/pack_coverage.py --out docs/pack_coverage.csv                 # one model per timm module
    python benchmarks/pack_coverage.py --filter 'vit_*' 'convnext_*' --limit 20 --out vit.csv
    python benchmarks/pack_coverage.py --report docs/pack_coverage.csv             # the coverage numbers

For each architecture (one per timm module by default, as ``timm-split sweep --tier default``): build it (at
``--img-size`` where it takes one), split it in S members on the CPU if it has fewer than ``--max-params``
parameters, pack the members (:func:`timm_split.execution.packed.pack_members`) and compare with the loop: eval outputs,
and in training mode (dropout and drop-path off) outputs, every parameter's gradient and every buffer, each to
``--tol`` of the largest magnitude (training at 4x the batch: BatchNorm over a few 1x1 maps is
ill-conditioned). Where float32 differs by more, both run again in float64 and must agree to 1e-9: the
packing is exact and the network amplifies float32 rounding (``fp64`` column; errors then scaled to ``--tol``).
Each model runs in its own process with a ``--timeout``; the CSV is rewritten (atomically) after every model,
so a stopped run resumes.

Columns: ``status`` (``ok``, ``mismatch``, ``pack_error``, ``split_error``, ``too_big``, ``timeout``, ``crash``),
``packed_ok`` (outputs and gradients equal the loop's), ``fully_packed`` (no op ran once per member),
``looped_ops`` (how many ops ran per member), ``failing_op`` (the first such op, or the error), the largest
errors, seconds.
"""
from __future__ import annotations

import argparse
import copy
import csv
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch


FIELDS = ("arch", "module", "split", "status", "packed_ok", "fully_packed", "looped_ops", "failing_op", "params",
          "img_size", "out_err", "grad_err", "buffer_err", "fp64", "seconds")


def _build(arch: str, img_size: int):
    """The model at ``img_size`` where it takes and runs at it, else at its own size (as the sweep's CPU check)."""
    import timm

    from timm_split.commands.sweep import runs_at

    cfg = timm.models.get_pretrained_cfg(arch)
    kwargs = {"num_classes": 10} if cfg is None or cfg.num_classes else {}
    for extra in ({"img_size": img_size}, {}):
        try:
            model = timm.create_model(arch, **kwargs, **extra)
        except Exception:  # noqa: BLE001 - no img_size argument, or not buildable at it
            continue
        size = img_size if runs_at(model, img_size) else None
        return model, size
    return timm.create_model(arch, **kwargs), None


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
            params = sum(p.numel() for p in timm.create_model(arch).parameters())
        row["params"] = params
        if params > max_params:
            return dict(row, status="too_big", seconds=0.0)
        model, size = _build(arch, img_size)
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
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: str, rows: List[Dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run(archs: Sequence[str], out: str, workers: int = 1, timeout: float = 300, **options) -> List[Dict]:
    """Check ``archs`` (``workers`` processes at a time, one per model), rewriting ``out`` after each."""
    from timm_split.commands.sweep import module_of

    rows = _read(out)
    done = {r["arch"] for r in rows}
    queue = [a for a in archs if a not in done]
    ctx = mp.get_context("fork")
    running: Dict[str, tuple] = {}
    while queue or running:
        while queue and len(running) < workers:
            arch = queue.pop(0)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(child, arch, options), daemon=True)
            proc.start()
            running[arch] = (proc, parent, time.monotonic())
        time.sleep(0.2)
        for arch, (proc, conn, since) in list(running.items()):
            row = None
            if conn.poll():
                row = conn.recv()
            elif time.monotonic() - since > timeout:
                row = dict(arch=arch, module=module_of(arch), split=options.get("split", 2), status="timeout",
                           failing_op=f"over {timeout:.0f}s", seconds=timeout)
            elif not proc.is_alive():
                row = dict(arch=arch, module=module_of(arch), split=options.get("split", 2), status="crash",
                           failing_op=f"worker died (exit code {proc.exitcode})")
            if row is not None:
                proc.kill()
                proc.join()
                del running[arch]
                rows.append(row)
                _write(out, rows)
                print(f"{arch}: {row['status']} {row.get('failing_op') or ''}"[:160], file=sys.stderr, flush=True)
    return rows


def report(rows: List[Dict]) -> str:
    """The coverage numbers: of the architectures that split, how many pack exactly (and how many fully)."""
    split_ok = [r for r in rows if r["status"] in ("ok", "mismatch", "pack_error", "timeout", "crash")]
    ok = [r for r in split_ok if str(r.get("packed_ok")) == "True"]
    full = [r for r in ok if str(r.get("fully_packed")) == "True"]
    lines = [f"{len(rows)} architectures; {len(split_ok)} split (and are under the size limit); "
             f"packed_ok {len(ok)}/{len(split_ok)} ({100 * len(ok) / max(1, len(split_ok)):.1f}%), "
             f"fully packed (no op run per member) {len(full)}/{len(split_ok)} "
             f"({100 * len(full) / max(1, len(split_ok)):.1f}%)"]
    for r in split_ok:
        if r not in ok or r not in full:
            lines.append(f"  {r['arch']}: {r['status']}, looped_ops={r.get('looped_ops') or 0}: "
                         f"{(r.get('failing_op') or '')[:150]}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from timm_split.commands.sweep import default_tier, select

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--filter", nargs="*", help="fnmatch patterns (default: one architecture per timm module)")
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--limit", type=int)
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--max-params", type=float, default=30e6)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default="pack_coverage.csv")
    p.add_argument("--report", metavar="CSV", help="print the coverage numbers of a CSV and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(_read(args.report)))
        return 0
    archs = select(args.filter, args.exclude, args.limit) if args.filter else default_tier()[:args.limit]
    rows = run(archs, args.out, args.workers, args.timeout, split=args.split, img_size=args.img_size,
               max_params=args.max_params, tol=args.tol)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
