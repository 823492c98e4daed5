"""The ``timm-split`` command: ``demo``, ``compare`` (and the tools later issues add)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from timm_split.commands.common import OneLineParser, int_at_least, run_command, split_factor_arg

__all__ = ["main"]


_img_size = int_at_least(8, "--img-size (pixels)")


def _cmd_demo(args) -> int:
    import timm

    import timm_split
    from timm_split.commands.compare import compare_rows, format_rows, resolve_models

    if resolve_models([args.model]) != [args.model]:
        raise ValueError(f"--model takes one timm model name, not a pattern; got {args.model!r}")
    model = timm.create_model(args.model)
    ens = timm_split.split(model, args.split)
    print(ens.split_plan)
    print()
    rows = compare_rows(args.model, [1, 2, 4])
    print(format_rows(rows, "table"))
    x = timm.data.resolve_data_config({}, model=ens)["input_size"]
    import torch
    with torch.no_grad():
        out = ens.eval()(torch.randn(1, *x))
    print(f"\nensemble of {ens.split_factor} x {args.model}: output {tuple(out.shape)}, "
          f"{sum(p.numel() for p in ens.parameters()) / 1e6:.2f}M params "
          f"(original {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M)")
    return 0


_COMPARE_INERT = (
    (("by_module",), lambda a: not set(a.split) - {1}, "--by-module breaks down the splits, and --split has only "
     "1 (the original); pass --split 2 or more"),
    (("per_member",), lambda a: a.format == "json", "--format json always lists the members"),
    (("per_member",), lambda a: a.format != "json" and not set(a.split) - {1},
     "--split has only 1 (the original), which has no members; pass --split 2 or more"),
)


def _cmd_compare(args) -> int:
    from timm_split.commands.common import check_output_paths, inert_flags
    from timm_split.commands.compare import check_plot_path, compare_models, format_rows, plot_rows, resolve_models

    names = resolve_models(args.models)
    inert_flags(args, _COMPARE_INERT, {"by_module": None, "per_member": False})
    if args.plot:  # before the counting, which can take minutes
        check_plot_path(args.plot)
        check_output_paths({"--plot": args.plot}, {})
    logging.getLogger(compare_models.__module__).setLevel(logging.INFO)  # its progress lines, without a terminal
    rows = compare_models(names, args.split, args.img_size, reparam=args.reparam, check=not args.no_check)
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    fmt = args.format or "table"
    print(format_rows(rows, fmt, per_member=args.per_member), flush=True)
    if args.by_module:
        from timm_split.commands.compare import by_module_table
        for name in names:
            for S in sorted(set(args.split) - {1}):
                if any(r["model"] == name and r["split"] in (1, S) for r in failed):
                    continue
                print()
                print(by_module_table(name, S, args.by_module, args.img_size))
    if args.plot:
        plot_rows(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    bad = [r for r in rows if r["counter_check"] is not None and r["counter_check"] > 1e-3]
    for r in bad:
        logging.getLogger("timm_split").warning(
            "%s S=%d: fvcore and FlopCounterMode disagree by %.2f%%", r["model"], r["split"], 100 * r["counter_check"])
    for r in failed:
        print(f"timm-split compare: error: {r['model']} S={r['split']}: {r['status']}", file=sys.stderr)
    if len(failed) > 1:
        print(f"timm-split compare: {len(failed)} of {len(rows)} rows failed (their status says why); the others "
              "are above", file=sys.stderr)
    return 1 if failed else 0


def _cmd_export_fashion_mnist(args) -> int:
    from timm_split.training.data import export_fashion_mnist
    from timm_split.commands.common import user_error

    if not os.path.isdir(args.idx_dir):
        return user_error("export-fashion-mnist", ValueError(
            f"--idx-dir {args.idx_dir}: no such folder; pass the folder that holds Fashion-MNIST's IDX files "
            "(train-images-idx3-ubyte.gz ...), or install them: apt-get install dataset-fashion-mnist "
            "(/usr/share/datasets/fashion-mnist, the default)."))
    from timm_split.commands.common import check_output_paths
    from timm_split.training.data import EXPORT_MARKER

    check_output_paths({"DIR/train": os.path.join(args.out, "train"),
                        "DIR/validation": os.path.join(args.out, "validation"),
                        f"DIR/{EXPORT_MARKER}": os.path.join(args.out, EXPORT_MARKER)}, {"--idx-dir": args.idx_dir})
    try:
        counts = export_fashion_mnist(args.out, args.per_class, args.val_per_class, args.idx_dir,
                                      holdout_classes=args.holdout_classes or ())
    except (ValueError, FileNotFoundError, OSError) as e:
        return user_error("export-fashion-mnist", e)
    held = f" and {counts['holdout']} held-out-class PNGs ({args.out}/holdout, for --ood-data)" if "holdout" in counts \
        else ""
    print(f"wrote {counts['train']} train and {counts['validation']} validation PNGs{held} to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="timm-split", description="Divide timm models into S thinner co-trained copies.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="split a model, print its plan and the param/FLOP comparison (no data)")
    d.add_argument("--model", default="resnet50")
    d.add_argument("--split", type=split_factor_arg, default=4)
    d.set_defaults(fn=_cmd_demo)
    c = sub.add_parser("compare", help="params and GMACs of models and their splits, counted with fvcore")
    c.add_argument("models", nargs="+", help="timm model names or wildcards ('convnext_*')")
    c.add_argument("--split", type=split_factor_arg, nargs="+", default=[2, 4], help="split factors (default 2 4)")
    c.add_argument("--img-size", type=_img_size, default=None, help="square input size (default: the model's)")
    c.add_argument("--format", choices=["table", "md", "csv", "json"], default=None)
    c.add_argument("--per-member", action="store_true", help="one row per member as well")
    c.add_argument("--by-module", type=int_at_least(1, "--by-module depth"), metavar="DEPTH",
                   help="also break params and MACs down by module path, to this depth")
    c.add_argument("--plot", metavar="PNG", help="write params and GMACs against S to a PNG (ratios to the "
                   "original, parity and the ±2%%/±4%% band drawn)")
    c.add_argument("--reparam", action="store_true",
                   help="count the deployed (re-parameterized) form, as timm publishes repvgg/fastvit/mobileone/levit")
    c.add_argument("--no-check", action="store_true", help="skip the FlopCounterMode cross-check")
    c.set_defaults(fn=_cmd_compare)
    from timm_split.commands.train import add_train_args, run_train
    t = sub.add_parser("train", help="co-train a timm model's split ensemble with timm's train.py recipe "
                       "(an ImageFolder, or Fashion-MNIST with no data flags)")
    add_train_args(t).set_defaults(fn=run_train)
    from timm_split.commands.validate import add_validate_args, run_validate
    v = sub.add_parser("validate", help="top-1/top-5, NLL, Brier, ECE, temperature scaling, selective "
                       "prediction, diversity and OOD detection of a checkpoint's ensemble and members")
    add_validate_args(v).set_defaults(fn=run_validate)
    e = sub.add_parser("export-fashion-mnist", help="write Fashion-MNIST as an ImageFolder of PNGs")
    e.add_argument("out", metavar="DIR", help="folder to create (DIR/train, DIR/validation)")
    e.add_argument("--per-class", type=int_at_least(1, "--per-class"), default=None,
                   help="train images per class (default: all 6000)")
    e.add_argument("--val-per-class", type=int_at_least(1, "--val-per-class"), default=None,
                   help="validation images per class (default: --per-class, or all 1000)")
    e.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist", help="where the IDX files are")
    e.add_argument("--holdout-classes", type=int, nargs="+", default=None, metavar="K",
                   help="labels (0-9) to leave out of train/validation and write to DIR/holdout instead (test-split "
                   "images, --val-per-class of each): out-of-distribution data for validate --ood-data")
    e.set_defaults(fn=_cmd_export_fashion_mnist)
    from timm_split.commands.export import add_export_args, run_export
    x = sub.add_parser("export", help="write a split ensemble as one ONNX or torch.export (.pt2) file")
    add_export_args(x).set_defaults(fn=run_export)
    from timm_split.commands.sweep import add_args as add_sweep_args, run as run_sweep
    w = sub.add_parser("sweep", help="split every timm architecture and check shapes and params/FLOPs parity")
    add_sweep_args(w)
    w.set_defaults(fn=run_sweep)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except (ValueError, TypeError) as e:  # an argparse action's own parsing: one line, as every usage error
        print(f"timm-split: error: {' '.join(str(e).split())}; see timm-split --help", file=sys.stderr)
        raise SystemExit(2) from None
    if unknown:
        print(f"timm-split {args.cmd}: error: unknown flag(s) {' '.join(unknown)}; see timm-split {args.cmd} --help",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args.cmd, args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
