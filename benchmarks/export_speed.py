"""Latency of an exported split ensemble against the original exported the same way, in onnxruntime on CPU (issue 42).

    python benchmarks/export_speed.py                         # the full grid: run it on a quiet machine
    python benchmarks/export_speed.py --models resnet50 --split 2 --rounds 5 --warmup 2 \\
        --json /tmp/export_speed.json --md /tmp/export.md    # a dry run

For every model and S, the split (``timm_split.split(model, S)``) and the original (the S=1 wrapper
``timm_split.ensemble.single``, so both go through :func:`timm_split.export.export_ensemble` the same way: one
ONNX file each, opset 18, dynamic batch, ``--graph`` members side by side by default) are exported and checked
(max abs diff <= 1e-4 against PyTorch). Both files are then timed in onnxruntime on CPU, in its sequential and
its parallel execution mode (``--threads`` intra-op threads, 2 by default; the parallel mode also gets
``--threads`` inter-op threads; thread spinning off in both sessions, so one session's idle pool does not spin
beside the other's run), at batch 1 and 8: after ``--warmup`` calls each, ``--rounds`` interleaved
rounds (one call of each per round, the order alternating), medians, and the ratio of the medians (split /
original) from the same run, with the 25th-75th percentile of the per-round ratios as the spread. The PyTorch
loop (the ensemble's eager forward under ``torch.no_grad``, ``torch.set_num_threads(--threads)``) is timed the
same way for reference.

Writes the rows and the run header (versions, cores, load average) to ``--json`` (atomically) and the table into
the generated section ``export-speed`` of ``--md`` (the hand-written text around it is kept). The goal
(issue 42): ratio <= 1.00 at S=2 and <= 1.10 at S=4 in the better execution mode. Timings on a machine shared
with other jobs are not trustworthy: the header's load average says how quiet the run was.
"""
import argparse
import logging
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import timm
import torch

import timm_split
from timm_split.ensemble import single
from timm_split.export import export_ensemble
from timm_split.generated import write_generated

from common import ROOT, run_header, write_json

_logger = logging.getLogger("export_speed")
MODELS = ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224"]
GOAL = {2: 1.00, 4: 1.10}
MODES = ("sequential", "parallel")


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _session(path: str, mode: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Interleaved sessions: a session's pool threads spin-wait after each run by default and then compete with the
    # next session's run (per-round ratios of 0.6-1.9 in a first run); no spinning keeps each call to itself.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if mode == "parallel":
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        opts.inter_op_num_threads = threads
    else:
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each function: ``warmup`` calls each, then ``rounds`` rounds of one call each (the
    order alternating between rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def _row(model: str, S: int, batch: int, runtime: str, times: Dict[str, List[float]]) -> Dict:
    orig, split = times["original"], times["split"]
    ratios = [s / o for s, o in zip(split, orig)]
    med_o, med_s = statistics.median(orig), statistics.median(split)
    return dict(model=model, split=S, batch=batch, runtime=runtime, original_ms=round(1e3 * med_o, 3),
                split_ms=round(1e3 * med_s, 3), ratio=round(med_s / med_o, 4),
                ratio_q25=round(_quantile(ratios, 0.25), 4), ratio_q75=round(_quantile(ratios, 0.75), 4),
                rounds=len(orig), load_1min=round(os.getloadavg()[0], 2))


def bench_model(name: str, splits: List[int], batches: List[int], args: argparse.Namespace, folder: str) -> List[Dict]:
    """Export the original and each split of ``name``, then time them (onnxruntime modes, PyTorch loop)."""
    torch.manual_seed(0)
    base = timm.create_model(name).eval()
    files = {}
    original = single(base, name).eval()
    files[1] = os.path.join(folder, f"{name}_s1.onnx")
    export_ensemble(original, files[1], dynamic_batch=True, check=True)
    ensembles = {}
    for S in splits:
        ensembles[S] = timm_split.split(base, S, seed=0).eval()
        files[S] = os.path.join(folder, f"{name}_s{S}.onnx")
        graph = "members" if args.graph == "members" else "packed"
        if graph == "packed":  # the packed graph is built per input shape: one file per batch
            for b in batches:
                export_ensemble(ensembles[S], files[S].replace(".onnx", f"_b{b}.onnx"), batch_size=b,
                                check=True, graph=graph)
        else:
            export_ensemble(ensembles[S], files[S], dynamic_batch=True, check=True)
    rows = []
    size = base.pretrained_cfg["input_size"]
    for batch in batches:
        x = torch.randn(batch, *size)
        feed = {"input": x.numpy()}
        for mode in MODES:
            orig = _session(files[1], mode, args.threads)
            for S in splits:
                path = files[S] if args.graph == "members" else files[S].replace(".onnx", f"_b{batch}.onnx")
                sess = _session(path, mode, args.threads)
                times = interleaved({"original": lambda: orig.run(None, feed), "split": lambda: sess.run(None, feed)},
                                    args.rounds, args.warmup)
                rows.append(_row(name, S, batch, f"onnxruntime-{mode}", times))
                _logger.info("%s", rows[-1])
        torch.set_num_threads(args.threads)
        with torch.no_grad():
            for S in splits:
                ens = ensembles[S]
                times = interleaved({"original": lambda: base(x), "split": lambda: ens(x)}, args.rounds, args.warmup)
                rows.append(_row(name, S, batch, "pytorch", times))
                _logger.info("%s", rows[-1])
    return rows


def table(rows: List[Dict], header: Dict) -> str:
    """The markdown table: per model, S and batch, the split/original ratio of medians per runtime."""
    cells: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["split"], r["batch"]), {})[r["runtime"]] = r
    lines = [f"Run: {header['date']}, {header['machine']}, {header['cpus']} cores, load average "
             f"{header['load_average']} at the start, onnxruntime {header['onnxruntime']}, {header['rounds']} "
             f"rounds after {header['warmup']} warm-up calls, {header['ort_threads']} intra-op threads, graph "
             f"'{header['graph']}'. Ratio = split / original latency, medians of one run (25th-75th percentile of "
             "the per-round ratios in brackets). Goal (<= 1.00 at S=2, <= 1.10 at S=4) judged on what a deployment "
             "sees: the split in its faster mode against the original in its faster mode (the per-mode ratios "
             "compare a mode with itself; the parallel mode is slower for the original).", "",
             "| model | S | batch | original ms (ORT seq) | ORT sequential | ORT parallel | better mode | "
             "best split / best original | goal | PyTorch loop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, S, batch), by in sorted(cells.items()):
        def cell(rt: str) -> str:
            r = by.get(rt)
            return f"{r['ratio']:.2f} ({r['ratio_q25']:.2f}-{r['ratio_q75']:.2f})" if r else "-"
        ort_rows = [by[f"onnxruntime-{m}"] for m in MODES if f"onnxruntime-{m}" in by]
        best = min(ort_rows, key=lambda r: r["ratio"]) if ort_rows else None
        goal = GOAL.get(S)
        seq = by.get("onnxruntime-sequential")
        # What a deployment sees: the split in its faster mode against the original in its faster mode (the
        # modes' own ratios compare each mode with itself, and the parallel mode can be slower for both).
        deploy, met = "-", "-"
        if ort_rows:
            fast_s = min(ort_rows, key=lambda r: r["split_ms"])
            fast_o = min(ort_rows, key=lambda r: r["original_ms"])
            ratio = fast_s["split_ms"] / fast_o["original_ms"]
            met = "-" if goal is None else ("met" if ratio <= goal else f"missed (> {goal:.2f})")
            deploy = (f"{ratio:.2f} ({fast_s['split_ms']:.1f} ms "
                      f"{fast_s['runtime'].split('-')[1][:3]} / {fast_o['original_ms']:.1f} ms "
                      f"{fast_o['runtime'].split('-')[1][:3]})")
        lines.append(f"| {model} | {S} | {batch} | {seq['original_ms'] if seq else float('nan'):.1f} | "
                     f"{cell('onnxruntime-sequential')} | {cell('onnxruntime-parallel')} | "
                     f"{best['runtime'].split('-')[1] if best else '-'} | {deploy} | {met} | {cell('pytorch')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--split", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op (and parallel inter-op) threads")
    p.add_argument("--graph", choices=["members", "packed"], default="members")
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "export_speed_cpu.json"))
    p.add_argument("--md", default=os.path.join(ROOT, "docs", "export.md"))
    p.add_argument("--from-json", action="store_true", help="rewrite --md's table from --json; time nothing")
    args = p.parse_args()
    if args.from_json:
        import json

        with open(args.json) as f:
            run = json.load(f)
        source = run["header"].get("command", "python benchmarks/export_speed.py")
        write_generated(args.md, {"export-speed": table(run["rows"], run["header"])},
                        title="Deploy: export a split ensemble", source=source)
        print(table(run["rows"], run["header"]))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in (_logger.name, "timm_split.export"):  # progress and checks; not the exporters' own INFO lines
        logging.getLogger(name).setLevel(logging.INFO)
    import onnxruntime as ort

    header = run_header(onnxruntime=ort.__version__, rounds=args.rounds, warmup=args.warmup,
                        ort_threads=args.threads, graph=args.graph, models=args.models, splits=args.split,
                        batches=args.batch, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += bench_model(name, args.split, args.batch, args, folder)
    header["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    command = "python benchmarks/export_speed.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k not in ("json", "md", "from_json") and v != p.get_default(k))
    header["command"] = command.strip()
    write_json(args.json, dict(header=header, rows=rows))
    write_generated(args.md, {"export-speed": table(rows, header)}, title="Deploy: export a split ensemble",
                    source=command.strip())
    print(table(rows, header))
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
