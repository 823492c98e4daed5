"""Training throughput of the real trainer: an S=2 / S=4 epoch against the original's (issue 30).

    python benchmarks/train_speed.py                       # the default grid: 3 models x S=1,2,4, --json docs/...
    python benchmarks/train_speed.py --model resnet18 --img-size 32 --splits 1 2 --rounds 3 --images 320
    python benchmarks/train_speed.py --model resnet18 --img-size 32 --profile 2   # where the S=2 step spends time

Each cell builds one run per S with the trainer's own ``setup_run`` (the same flags as ``timm-split train``:
S views per image from the member loader, Mixup, ``CoTrainingLoss``, backward, the optimizer, EMA if asked) on
a synthetic ImageFolder of random RGB images, then times whole epochs of ``train_one_epoch``, interleaved: every
round runs one epoch of each S, the order rotating, after one warm-up epoch each. It prints the median epoch time
per S and the ratio of medians to S=1, with the spread of the per-round ratios (25th-75th percentile). The
header records the load average, threads and versions; ``--json`` writes every round's times.

``--breakdown`` times the parts of one step on a fixed batch (loader excluded): the member views' batch
augmentation, forward, loss, backward and the optimizer step, for each S, so the extra cost of S>1 can be
attributed. ``--profile S`` prints torch.profiler's top ops of a few steps at that S.
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

from timm_split.commands.train import setup_run, train_args, train_one_epoch

from common import image_folder, run_header, write_json

CLASSES = [f"c{k}" for k in range(10)]
GRID = [("resnet18", 32, {}), ("efficientnet_b0", 64, {}), ("vit_tiny_patch16_224", 64, {"img_size": 64})]


def build_runs(args: argparse.Namespace, model: str, img: int, kwargs: Dict, data_dir: str) -> Dict[int, object]:
    """One trainer run per S, the same flags but ``--split``."""
    runs = {}
    for s in args.splits:
        flags = train_args(data_dir=data_dir, model=model, split=s, img_size=img, batch_size=args.batch,
                           workers=args.workers, epochs=100, warmup_epochs=0, device="cpu", model_kwargs=kwargs,
                           mixup=args.mixup, aa=args.aa, reprob=args.reprob, model_ema=args.model_ema,
                           execution=args.execution if s > 1 else "loop", opt=args.opt, log_interval=10 ** 6,
                           seed=0)
        runs[s] = setup_run(flags)
    return runs


def _quartiles(xs: List[float]) -> List[float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [q[0], q[2]]


def time_epochs(runs: Dict[int, object], rounds: int) -> Dict[int, List[float]]:
    """Epoch seconds per S: one warm-up epoch each, then ``rounds`` rounds, the order rotating."""
    order = list(runs)
    for s in order:
        train_one_epoch(runs[s], 0, progress=False)
    times: Dict[int, List[float]] = {s: [] for s in order}
    for r in range(rounds):
        for s in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            train_one_epoch(runs[s], 1 + r, progress=False)
            times[s].append(time.perf_counter() - t0)
    return times


def breakdown(run, repeats: int = 5) -> Dict[str, float]:
    """Median seconds of each part of one step on one fixed batch: augment, forward, loss, backward, step."""
    views0, target0 = next(iter(run.train_loader))
    parts: Dict[str, List[float]] = {k: [] for k in ("augment", "forward", "loss", "backward", "optimizer")}
    run.model.train()
    for i in range(repeats + 1):
        t = [time.perf_counter()]
        views, target = run.augment(views0, target0)
        t.append(time.perf_counter())
        logits = run.model(views)
        t.append(time.perf_counter())
        loss = run.loss_fn(logits, target, epoch=1.0)["loss"]
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        run.optimizer.step()
        run.optimizer.zero_grad()
        t.append(time.perf_counter())
        if i:  # the first is warm-up
            for k, a, b in zip(parts, t, t[1:]):
                parts[k].append(b - a)
    return {k: statistics.median(v) for k, v in parts.items()}


def profile(run, rows: int = 15) -> str:
    """torch.profiler's top ops (self CPU time) over one epoch of ``run`` (after a warm-up epoch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    train_one_epoch(run, 0, progress=False)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_epoch(run, 1, progress=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def header() -> Dict[str, object]:
    """``common.run_header()``, plus ``load``: the load average under the name this benchmark's records used."""
    h = run_header()
    return dict(h, load=h["load_average"])


def cell_record(model: str, img: int, times: Dict[int, List[float]], parts: Optional[Dict]) -> Dict:
    """Median epoch seconds per S and the ratio of medians to S=1, with the per-round ratios' quartiles."""
    base = times[min(times)]
    rec = {"model": model, "img_size": img, "epoch_seconds": times, "median": {}, "ratio": {}, "ratio_iqr": {}}
    for s, ts in times.items():
        per_round = [t / b for t, b in zip(ts, base)]
        rec["median"][s] = statistics.median(ts)
        rec["ratio"][s] = statistics.median(ts) / statistics.median(base)
        rec["ratio_iqr"][s] = _quartiles(per_round)
    if parts:
        rec["breakdown"] = parts
    return rec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="one model instead of the grid (with --img-size)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"img_size\": 64}'")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--images", type=int, default=640, help="train images per epoch (10 classes; rounded down to a "
                   "multiple of 10)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--execution", default="loop", help="the trainer's --execution for S > 1 (S=1 is the original "
                   "model, run as it is)")
    p.add_argument("--opt", default="sgd")
    p.add_argument("--mixup", type=float, default=0.2)
    p.add_argument("--aa", default="rand-m9-mstd0.5")
    p.add_argument("--reprob", type=float, default=0.25)
    p.add_argument("--model-ema", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of one step per S")
    p.add_argument("--profile", type=int, metavar="S", help="print the top ops of one epoch at this S and exit")
    p.add_argument("--json", help="write the records here")
    return p


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = _parser().parse_args(argv)
    cells = [(args.model, args.img_size, args.model_kwargs)] if args.model else GRID
    records = []
    print(json.dumps(header()))
    with tempfile.TemporaryDirectory() as tmp:
        for model, img, kwargs in cells:
            data = os.path.join(tmp, str(img))
            if not os.path.isdir(data):  # a tenth as many validation images
                image_folder(data, {"train": CLASSES}, max(1, args.images // len(CLASSES)), img)
                image_folder(data, {"validation": CLASSES}, max(1, args.images // 10 // len(CLASSES)), img, seed=1)
            if args.profile:
                args.splits = [args.profile]
                print(profile(build_runs(args, model, img, kwargs, data)[args.profile]))
                continue
            runs = build_runs(args, model, img, kwargs, data)
            times = time_epochs(runs, args.rounds)
            parts = {s: breakdown(r) for s, r in runs.items()} if args.breakdown else None
            rec = cell_record(model, img, times, parts)
            rec["chosen"] = {s: r.ensemble.chosen_execution(training=True) for s, r in runs.items()}
            records.append(rec)
            print(f"{model} @{img}px b{args.batch} {args.execution}: " + "  ".join(
                f"S={s} {rec['median'][s]:.2f}s x{rec['ratio'][s]:.3f} [{q[0]:.2f}-{q[1]:.2f}]"
                for s, q in rec["ratio_iqr"].items()) + f"  (ran: {rec['chosen']})", flush=True)
            if parts:
                for s, p in parts.items():
                    print(f"    S={s} step parts (s): " + " ".join(f"{k} {v:.3f}" for k, v in p.items()))
    if args.json:
        write_json(args.json, {"header": header(), "args": vars(args), "records": records})
    return records


if __name__ == "__main__":
    main()
