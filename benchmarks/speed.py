"""Speed of a split ensemble against its original model, per execution strategy (issue 7).

    python benchmarks/speed.py                                   # the default grid (see --help)
    python benchmarks/speed.py --model resnet50 --split 2 --mode infer --batch 8 --strategy auto --json out.json
    python benchmarks/speed.py --model resnet50 --split 2 --devices      # "S devices": one pinned core per member

Every cell times the original model and each strategy in the same mode on the same input, interleaved (one
call of each per round, the order rotating), after warm-up; it prints the ratio of medians (strategy /
original) and the spread of the per-round ratios (25th-75th percentile). ``infer`` is a forward under
``torch.no_grad`` in eval mode; ``train`` is forward, loss (CoTrainingLoss on per-member views for the
ensemble, cross-entropy for the original), backward and an SGD step, in train mode. ``--devices`` simulates one
device per member on a CPU: the original runs on one core with one thread, the ensemble with the 'threads'
strategy, each worker pinned to its own core with one thread (``os.sched_setaffinity`` of the worker thread).
Besides wall-clock it reports a "busy ratio": the busiest worker's thread CPU time (members timed by forward
hooks) over the original's, i.e. the latency if each core were a device of its own; on a machine where other
jobs take turns on the same cores, wall-clock cannot show that.
The header records the load average (``os.getloadavg``), threads, ``OMP_WAIT_POLICY``, ``GLIBC_TUNABLES`` and
torch/timm versions; each row the 1-minute load when it finished. ``--profile`` prints the top ops of one call of
each strategy and of the original under ``torch.profiler``. On a machine shared with other jobs run it with
``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads then steal the cores their own team waits for (2x slower
two-thread runs measured here), which flatters every one-thread-per-member strategy.
"""
import argparse
import contextlib
import json
import logging
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

import timm_split
from timm_split import CoTrainingLoss
from timm_split.execution.packed import CudaGraphed
from timm_split.generated import write_generated

from common import run_header, write_json

STRATEGIES = ["loop", "threads", "packed", "threads+packed", "auto"]


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _step_fn(model, x, y, train: bool, ensemble: bool, amp: Optional[torch.dtype] = None,
             cuda_graph: bool = False) -> Callable[[], None]:
    """One timed call: inference forward, or forward + loss + backward + SGD step; ``amp``: autocast dtype;
    ``cuda_graph``: inference replayed from a CUDA graph captured on the first call (warm-up)."""
    device = (x[0] if isinstance(x, (list, tuple)) else x).device.type
    autocast = (lambda: torch.autocast(device, dtype=amp)) if amp else contextlib.nullcontext
    if not train:
        def forward(v):
            with torch.no_grad(), autocast():
                return model(v)
        graphed = []

        def infer() -> None:  # returns nothing: a returned float is a busy time (--devices)
            if not cuda_graph:
                forward(x)
                return
            if not graphed:
                graphed.append(CudaGraphed(forward, [x]))
            graphed[0](x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = CoTrainingLoss()

    def step():
        with autocast():
            out = model.forward_members(x) if ensemble else model(x)
            loss = loss_fn(out, y, epoch=1)["loss"] if ensemble else F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


@contextlib.contextmanager
def _pinned(cores: Optional[List[int]], threads: int):
    """Run the calling thread on ``cores`` with ``threads`` intra-op threads, then restore both."""
    mask, n = os.sched_getaffinity(0), torch.get_num_threads()
    if cores is not None:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(n)


def _time_cell(fns: Dict[str, Callable[[], Optional[float]]], contexts: Dict[str, Callable], warmup: int,
               repeats: int, sync: Callable[[], None] = lambda: None
               ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Interleaved wall times per fn, and the busy times the fns return (``--devices``; else empty). ``sync``
    waits for the device (``torch.cuda.synchronize``) before and after each timed call."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}  # a strategy failing in warm-up stays empty
    busy: Dict[str, List[float]] = {n: [] for n in names}
    for n in list(names):
        with contexts[n]():
            try:
                for _ in range(warmup):
                    fns[n]()
            except Exception as e:  # noqa: BLE001 - a strategy that fails here is reported, not timed
                if n == "original":
                    raise
                logging.getLogger("speed").warning("%s failed in warm-up: %s: %s", n, type(e).__name__, e)
                names.remove(n)
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            with contexts[n]():
                sync()
                t = time.perf_counter()
                b = fns[n]()
                sync()
                times[n].append(time.perf_counter() - t)
                if b is not None:
                    busy[n].append(b)
    return times, busy


def _busy_original(fn: Callable[[], None]) -> Callable[[], float]:
    """The calling thread's CPU time for ``fn`` (it runs one intra-op thread, so that is all its compute)."""
    def timed() -> float:
        c = time.thread_time()
        fn()
        return time.thread_time() - c
    return timed


def _busy_members(fn: Callable[[], None], ens, workers: int) -> Callable[[], float]:
    """The busiest worker's CPU time: each member's forward is timed on its worker thread (hooks)."""
    spent = [0.0] * len(ens.members)
    for i, m in enumerate(ens.members):
        m.register_forward_pre_hook(lambda mod, args, i=i: spent.__setitem__(i, spent[i] - time.thread_time()))
        m.register_forward_hook(lambda mod, args, out, i=i: spent.__setitem__(i, spent[i] + time.thread_time()))

    def timed() -> float:
        spent[:] = [0.0] * len(spent)
        fn()
        return max(sum(spent[w::workers]) for w in range(workers))
    return timed


def _record(cell: dict, strategy: str, times: List[float], original: List[float], busy: List[float],
            busy_original: List[float]) -> dict:
    """One strategy's record: ratio of medians, spread of the per-round ratios, ms, load."""
    base = statistics.median(original)
    ratios = [t / o for t, o in zip(times, original)]
    rec = dict(cell, strategy=strategy, ratio=statistics.median(times) / base,
               spread=_quantile(ratios, 0.75) - _quantile(ratios, 0.25), ms=1e3 * statistics.median(times),
               original_ms=1e3 * base, load=round(os.getloadavg()[0], 2), threads=torch.get_num_threads())
    if busy:  # each simulated device's own compute time, blind to other jobs taking turns on its core
        rec["busy_ratio"] = statistics.median(busy) / statistics.median(busy_original)
    return rec


def run_cell(model_name: str, split: int, mode: str, batch: int, img: int, strategies: List[str], warmup: int,
             repeats: int, devices: bool = False, profile: bool = False, channels_last: bool = False,
             device: str = "cpu", compiled_original: bool = False, amp: Optional[torch.dtype] = None,
             cuda_graph: bool = False, profile_misses: bool = False) -> List[dict]:
    """Time the original and each strategy in one (model, S, mode, batch) cell; one record per strategy.

    ``amp``: bf16/fp16 autocast on both sides; ``cuda_graph``: inference on both sides replayed from CUDA
    graphs; ``profile_misses``: profile (top kernels) the original and every strategy that misses its target
    (:func:`target`), into the record's ``profile``."""
    torch.manual_seed(0)
    kwargs = {"img_size": img} if "vit" in model_name else {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(model_name, **kwargs).to(device=device, memory_format=fmt)
    train = mode == "train"
    model.train(train)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=fmt)
    views = torch.randn(split, batch, 3, img, img, device=device) if train else x
    if train and channels_last:
        views = [v.contiguous(memory_format=fmt) for v in views]
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    cuda = torch.device(device).type == "cuda"
    fns = {"original": _step_fn(model, x, y, train, False, amp, cuda_graph)}
    contexts: Dict[str, Callable] = {"original": contextlib.nullcontext}
    ensembles = {}
    if devices:
        ncores = len(os.sched_getaffinity(0))
        cores = sorted(os.sched_getaffinity(0))
        contexts["original"] = lambda: _pinned([cores[0]], 1)
        strategies = ["threads"]
        e = timm_split.split(model, split, img_size=img).train(train).to(memory_format=fmt)
        e.set_execution("threads", cores=[[cores[i % ncores]] for i in range(min(split, ncores))])
        ensembles["threads"] = e
    else:
        for s in strategies:
            e = timm_split.split(model, split, img_size=img).train(train).to(memory_format=fmt)
            try:
                e.set_execution(s)
            except ValueError as err:
                logging.getLogger("speed").info("%s S=%d: %s skipped (%s)", model_name, split, s, str(err)[:80])
                continue
            ensembles[s] = e
    for s, e in ensembles.items():
        fns[s] = _step_fn(e, views, y, train, True, amp, cuda_graph)
        contexts.setdefault(s, contextlib.nullcontext)
    if compiled_original:  # the fair reference for 'compile': the original compiled the same way
        ensembles["original+compile"] = torch.compile(model)
        fns["original+compile"] = _step_fn(ensembles["original+compile"], x, y, train, False)
        contexts["original+compile"] = contextlib.nullcontext
    if devices:
        fns["original"] = _busy_original(fns["original"])
        fns["threads"] = _busy_members(fns["threads"], ensembles["threads"], min(split, ncores))
    times, busy = _time_cell(fns, contexts, warmup, repeats, torch.cuda.synchronize if cuda else lambda: None)
    cell = {"model": model_name, "S": split, "mode": mode, "batch": batch, "img_size": img,
            "device": (torch.cuda.get_device_name(device) if cuda else "cpu")
            + (f" ({len(os.sched_getaffinity(0))} cores pinned 1/member)" if devices else ""),
            "memory_format": "channels_last" if channels_last else "contiguous",
            "dtype": str(amp).replace("torch.", "") if amp else "float32", "cuda_graph": cuda_graph}
    records = []
    for s in [s for s in ensembles if times.get(s)]:
        rec = _record(cell, s + ("@devices" if devices else ""), times[s], times["original"], busy[s],
                      busy["original"])
        if s == "auto":
            rec["chose"] = sorted(set(ensembles[s]._execution.choices.values()))
        if profile_misses and rec["ratio"] > target(rec):
            rec["profile"] = {n: _profile(fns[n], contexts[n], cuda) for n in ("original", s)}
        records.append(rec)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        for s in ensembles:
            with prof(activities=[ProfilerActivity.CPU]) as p, contexts[s]():
                fns[s]()
            print(f"--- profile {model_name} S={split} {mode} b{batch} {s}")
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        with prof(activities=[ProfilerActivity.CPU]) as p, contexts["original"]():
            fns["original"]()
        print(f"--- profile {model_name} {mode} b{batch} original")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return records


TARGETS = {("train", 2): 1.10, ("train", 4): 1.25, ("infer", 2): 1.05, ("infer", 4): 1.15}


def target(rec: dict) -> float:
    """Issue 16's GPU target for a record: training step S=2 1.10, S=4 1.25; inference S=2 1.05, S=4 1.15 at
    large batch; inference at batch 1 S=2 1.2 (under CUDA graphs)."""
    if rec["mode"] == "infer" and rec["batch"] == 1:
        return 1.2 if rec["S"] == 2 else float("inf")
    return TARGETS.get((rec["mode"], rec["S"]), float("inf"))


def _profile(fn: Callable, context: Callable, cuda: bool, rows: int = 10) -> str:
    """The top ops of one call (by device time on CUDA) as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile as prof
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prof(activities=activities) as p, context():
        fn()
        if cuda:
            torch.cuda.synchronize()
    return p.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows)


def markdown(records: List[dict]) -> str:
    """The records as one markdown row per cell and a column per strategy (the tables in docs/speed.md)."""
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    cells: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        cells.setdefault((r["model"], r["S"], r["mode"], r["batch"], r["img_size"]), {})[r["strategy"]] = r
    lines = ["| model | S | mode | batch@px | original ms | " + " | ".join(strategies)
             + (" | auto chose" if "auto" in strategies else "") + " | load |",
             "|---" * (6 + len(strategies) + ("auto" in strategies)) + "|"]
    for (model, split, mode, batch, img), row in cells.items():
        any_r = next(iter(row.values()))
        vals = [f"{row[s]['ratio']:.2f} ±{row[s]['spread'] / 2:.2f}" if s in row else "n/a" for s in strategies]
        chose = [", ".join(row["auto"]["chose"]) if "auto" in row else "n/a"] if "auto" in strategies else []
        mode += " (graphs)" if any_r.get("cuda_graph") else ""
        lines.append(f"| {model} | {split} | {mode} | {batch}@{img} | {any_r['original_ms']:.1f} | "
                     + " | ".join(vals + chose) + f" | {max(r['load'] for r in row.values()):.1f} |")
    return "\n".join(lines)


def _header() -> str:
    """``common.run_header()`` as the one line this benchmark prints and records."""
    h = run_header()
    load = ", ".join(f"{x:.2f}" for x in h["load_average"])
    return (f"torch {h['torch']}, timm {h['timm']}, {h['machine']}, cores {h['cpus']}, intra-op threads "
            f"{h['threads']}, mkldnn {h['mkldnn']}, OMP_WAIT_POLICY={h['OMP_WAIT_POLICY']!r}, "
            f"GLIBC_TUNABLES={h['GLIBC_TUNABLES']!r}, load average {load}"
            + (f", GPU {h['gpu']}, CUDA {h['cuda']}" if h["gpu"] else ""))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["resnet50", "efficientnet_b0", "vit_small_patch16_224"])
    ap.add_argument("--split", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    ap.add_argument("--batch", nargs="+", type=int, default=None,
                    help="default: 1 and 32 for infer, 32 for train")
    ap.add_argument("--train-batch", nargs="+", type=int, default=None, help="train batches (default: --batch)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="default: 224 on a GPU; on the CPU 224 at batch 1, 128 at batch 32 inference, 96 for "
                         "train (2-core budget)")
    ap.add_argument("--strategy", nargs="+", default=STRATEGIES, choices=STRATEGIES + ["compile"])
    ap.add_argument("--devices", action="store_true", help="S devices simulated by one pinned core per member")
    ap.add_argument("--device", default="cpu", help="where the original and the members run: cpu or cuda[:i]")
    ap.add_argument("--channels-last", action="store_true",
                    help="original, members and input channels-last (the packed strategy always is on CPU)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="autocast dtype for both sides (timm trains with bf16 autocast)")
    ap.add_argument("--cuda-graphs-max-batch", type=int, default=0,
                    help="on CUDA, inference at batches up to this runs from CUDA graphs on both sides")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--compiled-original", action="store_true",
                    help="also time torch.compile(original), the reference to read the 'compile' strategy against")
    ap.add_argument("--profile", action="store_true", help="print the top ops of each strategy (torch.profiler)")
    ap.add_argument("--profile-misses", action="store_true",
                    help="profile (top kernels) every strategy that misses issue 16's target, into the JSON")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no new cell after this (the records so far are written)")
    ap.add_argument("--json", default=None, help="write the records to this file (after every cell)")
    ap.add_argument("--markdown-out", default=None, help="write the markdown table to this file")
    ap.add_argument("--markdown", nargs="*", default=None, metavar="JSON",
                    help="print the records as a markdown table at the end; given files, only print theirs")
    return ap


def _cells(args: argparse.Namespace):
    """(model, S, mode, batch, img) in grid order."""
    for model_name in args.model:
        for split in args.split:
            for mode in args.mode:
                batches = (args.train_batch or args.batch or [32]) if mode == "train" else (args.batch or [1, 32])
                for batch in batches:
                    img = args.img_size or (224 if batch == 1 or args.device != "cpu" else 128 if mode == "infer"
                                            else 96)
                    yield model_name, split, mode, batch, img


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = _parser().parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            with open(path) as f:
                print(markdown(json.load(f)["records"]))
        return []
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    cuda = torch.device(args.device).type == "cuda"
    print(_header())
    records, start = [], time.monotonic()
    print(f"{'model':24s} {'S':>2s} {'mode':5s} {'batch':>5s} {'img':>4s} {'strategy':16s} {'ratio':>6s} "
          f"{'spread':>6s} {'ms':>9s} {'orig ms':>9s} {'load':>5s}")
    for model_name, split, mode, batch, img in _cells(args):
        if args.budget and time.monotonic() - start > args.budget:
            print(f"budget of {args.budget:.0f}s spent: stopping before {model_name} S={split} {mode} b{batch}")
            break
        graphs = cuda and mode == "infer" and batch <= args.cuda_graphs_max_batch
        for r in run_cell(model_name, split, mode, batch, img, args.strategy, args.warmup, args.repeats,
                          args.devices, args.profile, args.channels_last, args.device, args.compiled_original,
                          amp, graphs, args.profile_misses):
            records.append(r)
            extra = f"  (chose {', '.join(r['chose'])})" if "chose" in r else ""
            extra += f"  busy ratio {r['busy_ratio']:.3f}" if "busy_ratio" in r else ""
            extra += f"  target {target(r):.2f}" + (" MISSED" if r["ratio"] > target(r) else "") \
                if target(r) < float("inf") and cuda else ""
            print(f"{r['model']:24s} {r['S']:2d} {r['mode']:5s} {r['batch']:5d} {r['img_size']:4d} "
                  f"{r['strategy']:16s} {r['ratio']:6.3f} {r['spread']:6.3f} {r['ms']:9.1f} "
                  f"{r['original_ms']:9.1f} {r['load']:5.2f}{extra}", flush=True)
        if args.json:
            write_json(args.json, {"header": _header(), "args": vars(args), "records": records})
    if args.markdown_out:
        # only its generated section: a hand-written document (docs/speed.md) keeps everything else
        write_generated(args.markdown_out, {"table": markdown(records)}, title="Speed",
                        source="python benchmarks/speed.py --markdown-out")
    if args.markdown is not None:
        print(markdown(records))
    return records


if __name__ == "__main__":
    main()
