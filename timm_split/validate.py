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
import contextlib
import csv
import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checks import atomic_write

_logger = logging.getLogger(__name__)

__all__ = ["expected_calibration_error", "classification_metrics", "evaluate", "add_validate_args", "validate",
           "run_validate", "write_results"]


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``; bin ``b`` holds confidences in ``(b/n, (b+1)/n]``
    (a confidence of exactly 0 goes to the first bin).

    Args:
        probs: Probabilities ``[N, K]``.
        target: Class indices ``[N]``.
        n_bins: Number of bins (15 as in Guo et al., 2017).

    Returns:
        The ECE as a fraction in ``[0, 1]``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    conf, pred = probs.float().max(-1)
    correct = (pred == target).float()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, device=conf.device).index_add_(0, bins, conf - correct)
    return float(gap.abs().sum() / max(len(target), 1))


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%), NLL (``loss``, nats, mean) and ECE (fraction) of ``logits [N, K]``.

    ``logits`` may also be log-probabilities (an ``averaging='probs'`` ensemble): softmax leaves them unchanged.
    """
    from timm.utils import accuracy

    logits = logits.float()
    top1, top5 = accuracy(logits, target, topk=(1, min(5, logits.shape[-1])))
    return OrderedDict(loss=float(F.cross_entropy(logits, target)), top1=float(top1), top5=float(top5),
                       ece=expected_calibration_error(logits.softmax(-1), target, n_bins))


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast: Callable[[], Any] = contextlib.nullcontext,
             channels_last: bool = False, members_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             ) -> Dict[str, Any]:
    """Metrics of a :class:`~timm_split.ensemble.SplitEnsemble` and of each member on ``loader``.

    Args:
        model: The ensemble; evaluated in eval mode, its mode restored after.
        loader: Batches ``(images [B, C, H, W], targets [B])`` already on the model's device.
        autocast: A context factory (e.g. bf16 autocast).
        channels_last: Feed channels-last images.
        members_fn: Computes ``[S, B, K]`` instead of ``model.forward_members`` (member-parallel ranks).

    Returns:
        ``{'loss', 'top1', 'top5', 'ece'}`` of the ensemble plus ``'members'``: the same per member.
    """
    was_training = model.training
    model.eval()
    outs, targets = [], []
    try:
        for images, target in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                outs.append((members_fn or model.forward_members)(images).float().cpu())
            targets.append(target.cpu())
    finally:
        model.train(was_training)
    members, target = torch.cat(outs, 1), torch.cat(targets)
    result = classification_metrics(model.combine(members), target)
    result["members"] = [classification_metrics(m, target) for m in members]
    return result


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
    return parser


def _model_from(args: argparse.Namespace, meta: Dict[str, str], num_classes: int) -> nn.Module:
    """The ensemble the checkpoint's weights go into (its own metadata first, then the flags)."""
    import timm

    from .core import split
    from .ensemble import SplitEnsemble

    state = json.loads(meta.get("state", "{}"))
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
        return SplitEnsemble([model], pretrained_cfg=dict(model.pretrained_cfg, architecture=f"splitnet_{base}"))
    return split(model, S, img_size=data["input_size"][-1], in_chans=in_chans, plan_at=state.get("plan_at", "model"))


def validate(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Evaluate ``args.checkpoint``; return one result row for the ensemble and one per member."""
    from timm.data import resolve_data_config

    from .checkpoint import load_checkpoint, read_metadata
    from .data import create_datasets, create_eval_loader
    from .train import autocast_factory, resolve_device

    device = resolve_device(args.device)
    meta = read_metadata(args.checkpoint) if args.checkpoint.endswith(".safetensors") else {}
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"no checkpoint at {args.checkpoint}; pass the file written by timm-split train.")
    _, dataset, classes, data_cfg = create_datasets(args.dataset, args.data_dir, val_split=args.val_split)
    num_classes = args.num_classes or json.loads(meta.get("state", "{}")).get("num_classes") or classes
    if num_classes != classes:
        raise ValueError(f"the checkpoint has {num_classes} classes but {args.data_dir} has {classes}; pass a "
                         "dataset with the same classes.")
    model = _model_from(args, meta, num_classes)
    if data_cfg and not json.loads(meta.get("state", "{}")).get("data_config"):
        model.pretrained_cfg = dict(model.pretrained_cfg, **data_cfg)  # Fashion-MNIST's IDX files: 1 channel
    load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = resolve_data_config({"img_size": args.img_size, "crop_pct": args.crop_pct}, model=model)
    loader = create_eval_loader(dataset, cfg, args.batch_size, device, args.workers, args.pin_mem)
    m = evaluate(model, loader, autocast_factory(device, args.amp, args.amp_dtype), args.channels_last)
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
    from .train import user_error

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
    """``python -m timm_split.validate``."""
    parser = add_validate_args(argparse.ArgumentParser(prog="timm-split validate"))
    return run_validate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
