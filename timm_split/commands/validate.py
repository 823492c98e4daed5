"""Evaluate a checkpoint: ``timm-split validate``, like timm's ``validate.py``, for split ensembles.

    timm-split validate --checkpoint output/train/r18-s2/model_best.safetensors --data-dir fmnist_png
    timm-split validate --model splitnet_resnet18 --split 2 --num-classes 10 --checkpoint w.pth --img-size 32 \\
        --data-dir fmnist_png --results-file results.csv

Reports the ensemble's and every member's top-1 and top-5 (%), NLL (nats) and ECE (15 bins, a fraction).
A checkpoint written by ``timm-split train`` names its model, S, classes and input in its metadata, so
``--checkpoint`` and the data are all it needs; any other safetensors or ``.pth`` state dict needs ``--model``
(``splitnet_<arch>`` or the base ``<arch>``), ``--split`` and ``--num-classes``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..checks import atomic_write, check_writable
from ..training.data import class_difference
from ..training.metrics import evaluate
from .common import autocast_factory, cli_logging, resolve_device, user_error
from .train_checks import MIN_IMG_SIZE

_logger = logging.getLogger(__name__)

__all__ = ["add_validate_args", "validate", "run_validate", "write_results"]


def write_results(path: str, rows: List[Dict[str, Any]]) -> None:
    """Write result rows as CSV (``.csv``) or JSON (anything else), atomically, as timm's validate does."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            if path.endswith(".csv"):
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            else:
                json.dump(rows, f, indent=2)
    atomic_write(path, write)


def add_validate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``timm-split validate`` flags (timm validate.py's names; the dataset split is ``--val-split``)."""
    a = parser.add_argument
    a("--checkpoint", required=True, metavar="PATH", help="a .safetensors written by timm-split train, or any "
      "safetensors/.pth state dict of a splitnet_* model")
    a("--data-dir", default=None, metavar="DIR", help="dataset root (default: Fashion-MNIST's IDX files)")
    a("--dataset", default="", metavar="NAME", help="'' = ImageFolder/ImageTar (or Fashion-MNIST without --data-dir)")
    a("--val-split", default="validation", metavar="NAME", help="dataset split to evaluate (timm: --split)")
    a("--model", default=None, help="splitnet_<arch> or <arch> (default: from the checkpoint)")
    a("--split", type=int, default=None, help="S (default: from the checkpoint)")
    a("--num-classes", type=int, default=None, help="default: from the checkpoint or the dataset")
    a("--img-size", type=int, default=None)
    a("--crop-pct", type=float, default=None)
    a("-b", "--batch-size", type=int, default=256)
    a("-j", "--workers", type=int, default=4)
    a("--pin-mem", action="store_true")
    a("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    a("--amp", action="store_true", help="autocast (bfloat16 on CPU, --amp-dtype on CUDA)")
    a("--amp-dtype", default=None, choices=("float16", "bfloat16"))
    a("--channels-last", action="store_true")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--results-file", default="", metavar="FILE", help="write the results as .csv or .json")
    a("--log-freq", type=int, default=10, metavar="N", help="log images/s and the time left every N batches (timm's "
      "flag; 0: never)")
    return parser


def _model_from(args: argparse.Namespace, meta: Dict[str, str], num_classes: int) -> nn.Module:
    """The ensemble the checkpoint's weights go into (its own metadata first, then the flags)."""
    import timm

    from ..checkpoint import training_state
    from ..core import split
    from ..ensemble import single

    state = training_state(meta)
    name = args.model or state.get("model")
    if not name:
        raise ValueError(f"{args.checkpoint} does not name its model; pass --model (e.g. splitnet_resnet18).")
    base = name[len("splitnet_"):] if name.startswith("splitnet_") else name
    if not timm.is_model(base):
        raise ValueError(f"unknown model {name!r}; see timm.list_models().")
    S = args.split or int(meta.get("split_factor") or 2)
    data = state.get("data_config")
    if not data:  # any state dict of a splitnet_* model: the registry builds it as it was built
        return timm.create_model(f"splitnet_{base}", split_factor=S, num_classes=num_classes)
    in_chans = data["input_size"][0]
    model = timm.create_model(base, num_classes=num_classes, in_chans=in_chans, **state.get("model_kwargs", {}))
    model.pretrained_cfg = dict(model.pretrained_cfg, **data)
    if S == 1:
        return single(model, base)
    return split(model, S, img_size=data["input_size"][-1], in_chans=in_chans, plan_at=state.get("plan_at", "model"))


def _check_flags(args: argparse.Namespace) -> None:
    """The flags that can be judged before any work (so a bad --results-file does not fail after the run)."""
    for name, low in (("img_size", MIN_IMG_SIZE), ("batch_size", 1), ("workers", 0), ("split", 1), ("num_classes", 1),
                      ("log_freq", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}; got {v}.")
    if args.crop_pct is not None and not 0 < args.crop_pct:
        raise ValueError(f"--crop-pct must be > 0; got {args.crop_pct}.")
    if args.results_file:
        check_writable(args.results_file, "--results-file")


def check_class_names(args: argparse.Namespace, state: Dict[str, Any], names: List[str]) -> int:
    """The class count to build; ``ValueError`` where the data's classes are not the checkpoint's (by name)."""
    saved, where = state.get("class_names"), args.data_dir or "the data"
    if saved is not None and saved != names:
        what = class_difference(saved, names, "the checkpoint", "the data")
        raise ValueError(f"{args.checkpoint} was trained on other classes than {where} has ({what}); a class is "
                         "scored by its index, so evaluate on data with the training's class folders.")
    if args.num_classes is not None and args.num_classes != len(names):
        raise ValueError(f"--num-classes {args.num_classes} but {where} has {len(names)} classes; drop --num-classes "
                         f"or pass {len(names)}.")
    trained = state.get("num_classes")
    if trained is not None and trained != len(names):
        raise ValueError(f"{args.checkpoint} has {trained} classes but {where} has {len(names)}; pass a dataset "
                         "with the training's classes.")
    return len(names)


def validate(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Evaluate ``args.checkpoint``; return one result row for the ensemble and one per member."""
    from timm.data import resolve_data_config

    from ..checkpoint import load_checkpoint, read_metadata, training_state
    from ..training.data import create_eval_dataset, create_eval_loader

    _check_flags(args)
    device = resolve_device(args.device)
    meta = read_metadata(args.checkpoint) if args.checkpoint.endswith(".safetensors") else {}
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"no checkpoint at {args.checkpoint}; pass the file written by timm-split train.")
    dataset, names, data_cfg = create_eval_dataset(args.dataset, args.data_dir, args.val_split)
    state = training_state(meta)
    num_classes = check_class_names(args, state, names)
    model = _model_from(args, meta, num_classes)
    if data_cfg and not state.get("data_config"):
        model.pretrained_cfg = dict(model.pretrained_cfg, **data_cfg)  # Fashion-MNIST's IDX files: 1 channel
    load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = resolve_data_config({"img_size": args.img_size, "crop_pct": args.crop_pct}, model=model)
    loader = create_eval_loader(dataset, cfg, args.batch_size, device, args.workers, args.pin_mem)
    m = evaluate(model, loader, autocast_factory(device, args.amp, args.amp_dtype), args.channels_last,
                 log_interval=args.log_freq)
    name = model.pretrained_cfg.get("architecture", args.model)
    common = {"model": name, "split": model.split_factor, "checkpoint": args.checkpoint,
              "img_size": cfg["input_size"][-1], "crop_pct": cfg["crop_pct"], "ema": bool(args.use_ema)}
    rows = [dict(common, member="ensemble", **_row(m))]
    rows += [dict(common, member=str(i), **_row(mm)) for i, mm in enumerate(m["members"])]
    return rows


def _row(m: Dict[str, Any]) -> Dict[str, float]:
    return {"top1": round(m["top1"], 4), "top1_err": round(100 - m["top1"], 4), "top5": round(m["top5"], 4),
            "top5_err": round(100 - m["top5"], 4), "nll": round(m["loss"], 6), "ece": round(m["ece"], 6)}


def run_validate(args: argparse.Namespace) -> int:
    """``timm-split validate``: print the results (and write ``--results-file``); user errors exit 2 in one line."""
    cli_logging(evaluate.__module__)  # its progress lines (--log-freq)
    try:
        rows = validate(args)
        if args.results_file:
            write_results(args.results_file, rows)
    except (ValueError, FileNotFoundError, OSError) as e:
        return user_error("validate", e)
    for r in rows:
        print(f"{r['model']} S={r['split']} {r['member']:>8}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  "
              f"NLL {r['nll']:.4f}  ECE {r['ece']:.4f}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_split.commands.validate``."""
    parser = add_validate_args(argparse.ArgumentParser(prog="timm-split validate"))
    return run_validate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
