"""Does dividing a saturated network into S co-trained members beat it at the same params and FLOPs?

    nohup python benchmarks/science.py > science.log 2>&1 &     # the full benchmark (about 55 min, 1 thread)
    python benchmarks/science.py --quick                          # the whole pipeline on a tiny budget (~1 min)
    python benchmarks/science.py --report-only                    # rewrite docs/results.{md,png} from results.json

Model: a wide ResNet-10 built with timm's ``ResNet`` class (BasicBlock x [1, 1, 1, 1], channels
``(16, 32, 64, 128) * k``, a 3-conv deep stem of width 8 with stride 2 and no stem max-pool, so stages run at
14, 7, 4 and 2 px on a 28 px, 1-channel Fashion-MNIST image). Every configuration trains with
``timm_split.train.train`` on the same fixed subset, for the same epochs, with the same schedule:

* ``big``: the network at width ``k``; ``s2`` / ``s4``: ``split(big, S)`` co-trained (JS, weight 0.5);
* ``s2_nocot``: S=2 without the JS term; ``s2_sameview``: S=2, every member sees the same augmented view;
* saturation: the single network at ``k/2`` and ``2k`` (``"saturation"`` in results.json).

Runs already finished (``<runs>/<name>/results.json`` with the same arguments) are read back, not retrained.
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm_split  # noqa: E402
from timm_split.count import count  # noqa: E402
from timm_split.train import train, train_args  # noqa: E402

CONFIGS = {  # name: (split, train_args overrides)
    "big": (1, {}),
    "s2": (2, {}),
    "s4": (4, {}),
    "s2_nocot": (2, {"cot_weight": 0.0}),
    "s2_sameview": (2, {"same_view": True}),
}
PAPER = {"big": 15.50, "s2": 14.48, "s4": 14.26}  # CIFAR-100 top-1 error (%), WRN-28-10, Divide and Co-training


def wide_resnet10(k: float) -> nn.Module:
    """The benchmark's network at width multiplier ``k`` (1-channel 28 px input, 10 classes)."""
    from timm.models.resnet import BasicBlock, ResNet

    channels = tuple(max(1, round(c * k)) for c in (16, 32, 64, 128))
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, in_chans=1, stem_type="deep", stem_width=8,
                   channels=channels)
    model.maxpool = nn.Identity()  # 28 px: keep 14 px after the stride-2 stem
    model.pretrained_cfg = {"architecture": f"wide_resnet10_k{k:g}", "input_size": (1, 28, 28)}
    return model


def _run(name: str, cfg: argparse.Namespace, k: float, runs_dir: str) -> Dict[str, Any]:
    """Train one run (or read it back if its results are complete) and return its results.json row."""
    cfg.output, cfg.experiment = runs_dir, f"{name}-k{k:g}-seed{cfg.seed}"
    path = os.path.join(runs_dir, cfg.experiment, "results.json")
    log = None
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        same = {k2: v for k2, v in old["args"].items() if k2 not in ("resume",)} == \
            {k2: v for k2, v in json.loads(json.dumps(vars(cfg), default=str)).items() if k2 not in ("resume",)}
        if same and old.get("final"):
            log = old
            print(f"  {name} seed {cfg.seed}: read back from {path}", flush=True)
    if log is None:
        log = train(cfg, model_fn=lambda: wide_resnet10(k), progress=False)
    fin = log["final"]
    row = {"config": name, "seed": cfg.seed, "width": k, "split": cfg.split, "params": int(log["params"]),
           "gmacs": float(log["gmacs"]), "epochs": cfg.epochs, "ensemble_top1": fin["top1"],
           "member_top1": [m["top1"] for m in fin["members"]], "nll": fin["loss"],
           "ece": fin["ece"], "member_nll": [m["loss"] for m in fin["members"]],
           "train_seconds": float(log["train_seconds"])}
    print(f"  {name:12s} k={k:g} seed {cfg.seed}: top-1 {row['ensemble_top1']:.2f}% (members "
          f"{', '.join(f'{t:.2f}' for t in row['member_top1'])}), NLL {row['nll']:.4f}, ECE {row['ece']:.4f}, "
          f"{row['train_seconds']:.0f}s", flush=True)
    return row


def check_costs(k: float, splits=(2, 4)) -> List[Dict[str, Any]]:
    """Params and GMACs of the big network and of its splits, counted with ``count()``; printed."""
    big = wide_resnet10(k)
    base = count(big, 28, in_chans=1)
    rows = [{"split": 1, "params": base.params, "gmacs": base.gmacs}]
    for S in splits:
        ens = timm_split.split(big, S, img_size=28)
        c = count(ens.members[0], 28, in_chans=1)
        rows.append({"split": S, "params": S * c.params, "gmacs": S * c.gmacs})
    for r in rows:
        r["params_ratio"], r["gmacs_ratio"] = r["params"] / base.params, r["gmacs"] / base.gmacs
        print(f"  S={r['split']}: {r['params']:,} params ({r['params_ratio']:.4f}), {r['gmacs'] * 1e3:.3f} MMACs "
              f"({r['gmacs_ratio']:.4f})", flush=True)
    return rows


def _stats(values: List[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _group(rows: List[Dict[str, Any]], key: str) -> Dict[Any, List[Dict[str, Any]]]:
    out: Dict[Any, List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def write_report(results: Dict[str, Any], out_dir: str) -> None:
    """Write the tables of ``results.md`` and ``results.png``.

    An existing ``results.md`` keeps everything outside its ``<!-- tables:begin -->`` / ``<!-- tables:end -->``
    markers (the hand-written analysis); only the generated part between them is replaced.
    """
    runs, sat = results["runs"], results.get("saturation", [])
    meta = results["meta"]
    lines = [
        f"Command: `{meta['command'].strip()}`; {meta['threads']} thread(s), {meta['machine']}, total wall "
        f"{meta['wall_minutes']:.1f} min. Network width k={meta['width']:g}, {meta['train_subset']} training images "
        f"(fixed subset), {meta['epochs']} epochs, batch {meta['batch_size']}, SGD lr {meta['lr']} cosine, "
        f"weight decay {meta['weight_decay']} (x exp(1/S-1)), test on the 10,000 test images. Seeds "
        f"{meta['seeds']}; mean ± std over seeds.", "",
        "## Equal cost (counted with `timm_split.count.count`, fvcore convention)", "",
        "| S | params | params ratio | MMACs | MACs ratio |", "|---|---|---|---|---|",
    ]
    for c in results["costs"]:
        lines.append(f"| {c['split']} | {c['params']:,} | {c['params_ratio']:.4f} | {c['gmacs'] * 1e3:.3f} | "
                     f"{c['gmacs_ratio']:.4f} |")
    lines += ["", "## Results", "",
              "| config | S | seeds | params | MMACs | ensemble top-1 (%) | member top-1 (%) | NLL | ECE (%) | "
              "train s/run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in _group(runs, "config").items():
        lines.append(
            f"| {name} | {rs[0]['split']} | {len(rs)} | {rs[0]['params']:,} | {rs[0]['gmacs'] * 1e3:.3f} | "
            f"{_stats([r['ensemble_top1'] for r in rs])} | "
            f"{_stats([statistics.mean(r['member_top1']) for r in rs])} | "
            f"{_stats([r['nll'] for r in rs], 3)} | {_stats([100 * r['ece'] for r in rs])} | "
            f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    if sat:
        lines += ["", "## Width saturation (single network)", "",
                  "| width k | params | MMACs | top-1 (%) | NLL | seeds |", "|---|---|---|---|---|---|"]
        big = [dict(r, width=meta["width"]) for r in runs if r["config"] == "big"]
        for k, rs in sorted(_group(sat + big, "width").items()):
            lines.append(f"| {k:g} | {rs[0]['params']:,} | {rs[0]['gmacs'] * 1e3:.3f} | "
                         f"{_stats([r['ensemble_top1'] for r in rs])} | {_stats([r['nll'] for r in rs], 3)} | "
                         f"{len(rs)} |")
    lines += ["", "## Against the paper (CIFAR-100, WRN-28-10, top-1 error %)", "",
              "| | paper error | paper change vs big | here: error | here: change vs big |", "|---|---|---|---|---|"]
    groups = _group(runs, "config")
    err = {n: statistics.mean(100 - r["ensemble_top1"] for r in groups[n]) for n in PAPER if n in groups}
    for name, paper in PAPER.items():
        here = _stats([100 - r["ensemble_top1"] for r in groups[name]]) if name in groups else "-"
        rel = f"{100 * (err[name] / err['big'] - 1):+.1f}%" if name in err and "big" in err else "-"
        lines.append(f"| {name} | {paper:.2f} | {100 * (paper / PAPER['big'] - 1):+.1f}% | {here} | {rel} |")
    begin, end = "<!-- tables:begin (generated by benchmarks/science.py) -->", "<!-- tables:end -->"
    tables = begin + "\n" + "\n".join(lines) + "\n" + end
    path = os.path.join(out_dir, "results.md")
    text = open(path).read() if os.path.isfile(path) else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + tables + text[text.index(end) + len(end):]
    else:
        text = "# Divide and co-train: a wide ResNet-10 on Fashion-MNIST\n\n" + tables + "\n"
    with open(path, "w") as f:
        f.write(text)
    _plot(results, os.path.join(out_dir, "results.png"))


def _plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs, sat, meta = results["runs"], results.get("saturation", []), results["meta"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    single = [dict(r, width=meta["width"]) for r in runs if r["config"] == "big"] + sat
    pts = sorted((rs[0]["gmacs"] * 1e3, [r["ensemble_top1"] for r in rs], k)
                 for k, rs in _group(single, "width").items())
    if pts:
        ax.errorbar([p[0] for p in pts], [statistics.mean(p[1]) for p in pts],
                    yerr=[statistics.stdev(p[1]) if len(p[1]) > 1 else 0 for p in pts], fmt="o-", color="k",
                    capsize=3, label="single network, width k/2, k, 2k")
        for x, ys, k in pts:
            ax.annotate(f"k={k:g}", (x, statistics.mean(ys)), textcoords="offset points", xytext=(4, -12), fontsize=8)
    # name: marker, colour, x offset (the splits sit at the big network's cost; offsets keep them apart)
    markers = {"s2": ("s", "C0", 1.0), "s4": ("D", "C1", 1.04), "s2_nocot": ("v", "C2", 0.96),
               "s2_sameview": ("^", "C3", 0.92)}
    for name, rs in _group(runs, "config").items():
        if name not in markers:
            continue
        ys = [r["ensemble_top1"] for r in rs]
        m, c, dx = markers[name]
        ax.errorbar([rs[0]["gmacs"] * 1e3 * dx], [statistics.mean(ys)],
                    yerr=[statistics.stdev(ys) if len(ys) > 1 else 0], fmt=m, color=c, capsize=3,
                    label=f"{name} (width k split)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("MMACs per image (fvcore)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Fashion-MNIST, {meta['train_subset']} train images, {meta['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=1.0, help="width multiplier k of the big network")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train-subset", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.0), help="random-resized-crop area range")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--saturation-seeds", type=int, nargs="*", default=None,
                    help="seeds of the k/2 and 2k single networks (default: the first seed for 2k, all for k/2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--out-dir", default=None, help="where results.{json,md,png} go (default docs/)")
    ap.add_argument("--runs-dir", default=None, help="run directories (default runs/science)")
    ap.add_argument("--quick", action="store_true", help="tiny budget smoke test (~1 min), writes runs/science_quick")
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md/png from results.json")
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if args.quick:
        args.width, args.epochs, args.train_subset, args.seeds = 0.5, 1, 512, [0]
        args.out_dir = args.out_dir or os.path.join(root, "runs", "science_quick")
        args.runs_dir = args.runs_dir or os.path.join(root, "runs", "science_quick", "runs")
    out_dir = args.out_dir or os.path.join(root, "docs")
    runs_dir = args.runs_dir or os.path.join(root, "runs", "science")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    if args.report_only:
        with open(json_path) as f:
            write_report(json.load(f), out_dir)
        print(f"wrote {out_dir}/results.md and results.png")
        return

    torch.set_num_threads(args.threads)
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    k = args.width
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); width k={k:g}, {args.train_subset} "
          f"images, {args.epochs} epochs, seeds {args.seeds}", flush=True)
    print("equal cost check:", flush=True)
    costs = check_costs(k)
    results: Dict[str, Any] = {"runs": [], "saturation": [], "costs": costs}
    meta = {"command": " ".join(["python benchmarks/science.py"] + sys.argv[1:]), "width": k,
            "epochs": args.epochs, "train_subset": args.train_subset, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "scale": list(args.scale), "seeds": args.seeds,
            "threads": args.threads,
            "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}", "amp": args.amp}
    results["meta"] = meta

    def base(seed: int, split: int, width: float = k, **kw) -> argparse.Namespace:
        # the benchmark's recipe (timm's train.py defaults differ): no label smoothing or colour jitter, no LR
        # warm-up, the cosine schedule stepped every update, 1-channel 28 px Fashion-MNIST in the main process
        return train_args(model=f"wide_resnet10_k{width:g}", split=split, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          train_subset=args.train_subset, scale=list(args.scale), seed=seed, eval_every=0,
                          amp=args.amp, smoothing=0.0, color_jitter=0.0, train_interpolation="bilinear",
                          warmup_epochs=0, sched_on_updates=True, workers=0, img_size=28, **kw)

    def save() -> None:
        meta["wall_minutes"] = (time.perf_counter() - t_start) / 60
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)

    sat_seeds = args.saturation_seeds
    for seed in args.seeds:
        for name in args.configs:
            split, kw = CONFIGS[name]
            results["runs"].append(_run(name, base(seed, split, **kw), k, runs_dir))
            save()
        for kk in (k / 2, 2 * k):
            seeds = sat_seeds if sat_seeds is not None else (args.seeds if kk < k else args.seeds[:1])
            if seed in seeds:
                row = _run("big", base(seed, 1, kk), kk, runs_dir)
                results["saturation"].append(row)
                save()
    save()
    write_report(results, out_dir)
    print(f"wrote {json_path}, results.md, results.png; total {meta['wall_minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    main()
