"""Evaluate a checkpoint: ``timm-split validate``, like timm's ``validate.py``, for split ensembles.

    timm-split validate --checkpoint output/train/r18-s2/model_best.safetensors --data-dir fmnist_png
    timm-split validate --model splitnet_resnet18 --split 2 --num-classes 10 --checkpoint w.pth --img-size 32 \\
        --data-dir fmnist_png --results-file results.csv

Reports, for the ensemble and every member (an S=1 checkpoint alike), top-1 and top-5 (%), NLL (nats), the Brier
score, ECE (15 equal-width bins, a fraction), selective prediction (AURC, accuracy at 90%/95% coverage by max-softmax)
and the members' disagreement and mutual information; with ``--calibrate`` the temperature and the NLL/ECE after
temperature scaling (fitted on a seeded held-out part of the data that is then not scored, or by 2-fold
cross-fitting); with ``--ood-data DIR`` the AUROC and FPR at 95% TPR of telling the data from DIR's images, by
max-softmax, entropy and (S > 1) mutual information. The definitions: :mod:`timm_split.training.uncertainty`.

    timm-split validate --checkpoint run/model_best.safetensors --data-dir fmnist --calibrate \
        --ood-data fmnist/holdout --results-file results.json

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

from ..checks import atomic_write, check_writable
from ..training.data import class_difference, data_sources
from ..training.metrics import collect_member_logits
from .common import (
    autocast_factory, check_output_paths, cli_logging, flag_defaults, inert_flags, resolve_device, split_factor_arg,
    user_error,
)
from ..training.uncertainty import (
    ECE_BINS, MIN_CALIBRATION_SAMPLES, Calibration, check_ood_distinct, uncertainty_report,
)
from .train_checks import MIN_CROP_PCT, MIN_IMG_SIZE

_logger = logging.getLogger(__name__)

__all__ = ["add_validate_args", "validate", "run_validate", "write_results", "score", "result_rows", "format_table",
           "CALIB_SPLIT_FRACTION", "METRIC_KEYS"]


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
    a("--split", type=split_factor_arg, default=None, help="S (default: from the checkpoint)")
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
    a("--calibrate", nargs="?", const="heldout", default=None, choices=("heldout", "crossfit"),
      help="temperature scaling: 'heldout' (the default) fits it on a seeded --calib-split-fraction of the data, "
      "which is then not scored; 'crossfit' fits it on one half and scores the other, both ways")
    a("--calib-split-fraction", type=float, default=None, metavar="F",
      help=f"with --calibrate heldout: the share of the data held out to fit the temperature (default "
      f"{CALIB_SPLIT_FRACTION})")
    a("--calib-seed", type=int, default=None, metavar="N", help="with --calibrate: seeds the held-out part or the "
      "halves (default 0)")
    a("--ood-data", default=None, metavar="DIR", help="a folder of out-of-distribution images (flat or in class "
      "folders): report the AUROC and FPR at 95%% TPR of telling them from the data")
    return parser


CALIB_SPLIT_FRACTION = 0.2


def _check_flags(args: argparse.Namespace) -> None:
    """The flags that can be judged before any work (so a bad --results-file does not fail after the run): the flags'
    values, then the inputs (--ood-data, the checkpoint), then the output (--results-file)."""
    for name, low in (("img_size", MIN_IMG_SIZE), ("batch_size", 1), ("workers", 0), ("split", 1), ("num_classes", 1),
                      ("log_freq", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}; got {v}.")
    if args.crop_pct is not None and not MIN_CROP_PCT <= args.crop_pct < float("inf"):
        raise ValueError(f"--crop-pct must be a finite number >= {MIN_CROP_PCT} (the images are resized to "
                         f"img-size / crop-pct before the centre crop); got {args.crop_pct}.")
    inert_flags(args, _INERT, flag_defaults(add_validate_args(argparse.ArgumentParser())))
    _check_uncertainty_flags(args)
    # the input before the outputs: in a folder with no run yet, the missing checkpoint is the cause to name, not
    # --results-file's folder (which a run would have made)
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"no checkpoint at {args.checkpoint}; pass the file written by timm-split train.")
    if args.results_file:
        check_writable(args.results_file, "--results-file")
        check_output_paths({"--results-file": args.results_file}, {"--checkpoint": args.checkpoint})


_INERT = (
    (("amp_dtype",), lambda a: not a.amp, "it is the dtype of --amp, which is off; add --amp"),
    (("pin_mem",), lambda a: (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"),
     "pinned memory speeds up copies to a GPU, and the device is the CPU"),
)


def _check_uncertainty_flags(args: argparse.Namespace) -> None:
    """--calibrate's companions need it (and a fraction in (0, 1)); --ood-data needs a folder."""
    calibrate = getattr(args, "calibrate", None)
    if getattr(args, "calib_split_fraction", None) is not None:
        if calibrate != "heldout":
            raise ValueError("--calib-split-fraction is the held-out share of --calibrate heldout, which is "
                             f"{'off' if calibrate is None else 'not chosen (--calibrate ' + calibrate + ')'}; add "
                             "--calibrate or drop the flag.")
        if not 0 < args.calib_split_fraction < 1:
            raise ValueError(f"--calib-split-fraction must be in (0, 1); got {args.calib_split_fraction}.")
    if getattr(args, "calib_seed", None) is not None and calibrate is None:
        raise ValueError("--calib-seed seeds --calibrate's split, which is off; add --calibrate or drop the flag.")
    ood = getattr(args, "ood_data", None)
    if ood is not None and not os.path.isdir(ood):
        raise ValueError(f"--ood-data {ood} does not exist or is not a directory; pass a folder of images (flat, or "
                         "in class folders).")


def check_class_names(args: argparse.Namespace, state: Dict[str, Any], names: List[str]) -> int:
    """The class count to build; ``ValueError`` where the data's classes are not the checkpoint's (by name;
    Fashion-MNIST's earlier IDX names count as today's, :func:`~timm_split.training.data.canonical_class_names`)."""
    from ..training.data import canonical_class_names

    saved, where = canonical_class_names(state.get("class_names")), args.data_dir or "the data"
    if saved is not None and saved != canonical_class_names(names):
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

    from ..checkpoint import read_metadata, training_state
    from ..training.data import (check_ood_distinct_files, create_eval_dataset, create_eval_loader, create_ood_dataset,
                                 set_image_mode)
    from ..training.warm_start import ensemble_from_checkpoint

    _check_flags(args)
    device = resolve_device(args.device)
    meta = read_metadata(args.checkpoint) if args.checkpoint.endswith(".safetensors") else {}
    dataset, names, data_cfg = create_eval_dataset(args.dataset, args.data_dir, args.val_split)
    check_output_paths({"--results-file": args.results_file}, {
        "--checkpoint": args.checkpoint, "--data-dir": data_sources(dataset),
        "--ood-data": getattr(args, "ood_data", None)})
    state = training_state(meta)
    num_classes = check_class_names(args, state, names)
    model = ensemble_from_checkpoint(args.checkpoint, "--checkpoint", model=args.model, split_factor=args.split,
                                     num_classes=num_classes, use_ema=args.use_ema, model_flag="--model")[0]
    if data_cfg and not state.get("data_config"):
        model.pretrained_cfg = dict(model.pretrained_cfg, **data_cfg)  # Fashion-MNIST's IDX files: 1 channel
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = resolve_data_config({"img_size": args.img_size, "crop_pct": args.crop_pct}, model=model)
    set_image_mode(dataset, cfg["input_size"][0])  # IDX files ('L') or PNGs ('RGB'): read as the model was trained
    ood = None
    if getattr(args, "ood_data", None):
        ood = create_ood_dataset(args.ood_data, in_chans=cfg["input_size"][0])
        check_ood_distinct_files(ood, dataset, args.ood_data)
    autocast = autocast_factory(device, args.amp, args.amp_dtype)
    loader = create_eval_loader(dataset, cfg, args.batch_size, device, args.workers, args.pin_mem)
    members, target = collect_member_logits(model, loader, autocast, args.channels_last, log_interval=args.log_freq)
    ood_members = None
    if ood is not None:
        ood_loader = create_eval_loader(ood, cfg, args.batch_size, device, args.workers, args.pin_mem)
        ood_members = collect_member_logits(model, ood_loader, autocast, args.channels_last,
                                            log_interval=args.log_freq, what="OOD")[0]
        check_ood_distinct(members, ood_members)
    report = score(members, target, ood_members, getattr(args, "calibrate", None),
                   getattr(args, "calib_split_fraction", None), getattr(args, "calib_seed", None),
                   getattr(model, "averaging", "logits"))
    name = model.pretrained_cfg.get("architecture", args.model)
    common = {"model": name, "split": model.split_factor, "checkpoint": args.checkpoint,
              "img_size": cfg["input_size"][-1], "crop_pct": cfg["crop_pct"], "ema": bool(args.use_ema),
              "n": report["n"], "calibration": report["calibration"], "n_calib": report["n_calib"],
              "calib_seed": report.get("calib_seed"), "ood_data": getattr(args, "ood_data", None),
              "n_ood": report["n_ood"], "ece_bins": ECE_BINS}
    return result_rows(report, common)


def score(members: torch.Tensor, target: torch.Tensor, ood_members: Optional[torch.Tensor] = None,
          calibrate: Optional[str] = None, fraction: Optional[float] = None, seed: Optional[int] = None,
          averaging: str = "logits") -> Dict[str, Any]:
    """The uncertainty report of ``members [S, N, K]`` as validate's flags ask for it.

    Args:
        members: The members' logits on the data.
        target: ``[N]`` class indices.
        ood_members: The members' logits on the OOD images, or None.
        calibrate: None, ``'heldout'`` (a seeded ``fraction`` of the samples fits the temperature and is dropped
            from every score) or ``'crossfit'``.
        fraction: The held-out share (default :data:`CALIB_SPLIT_FRACTION`).
        seed: Seeds the held-out part or the halves (default 0).
        averaging: How the members combine.

    Returns:
        :func:`~timm_split.training.uncertainty.uncertainty_report`'s dict, plus ``calib_seed`` with ``calibrate``.
    """
    seed = 0 if seed is None else seed
    calib = None
    if calibrate == "heldout":
        fraction = CALIB_SPLIT_FRACTION if fraction is None else fraction
        n = members.shape[1]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        k = int(round(fraction * n))
        if k < MIN_CALIBRATION_SAMPLES:
            raise ValueError(f"--calib-split-fraction {fraction} of {n} images holds out {k}; fitting a temperature "
                             f"needs at least {MIN_CALIBRATION_SAMPLES}: raise the fraction, use more data, or "
                             "--calibrate crossfit.")
        if k >= n:
            raise ValueError(f"--calib-split-fraction {fraction} of {n} images leaves none to score; lower it.")
        held, scored = order[:k].sort().values, order[k:].sort().values
        calib = Calibration.heldout(members[:, held], target[held])
        members, target = members[:, scored], target[scored]
    elif calibrate == "crossfit":
        calib = Calibration.crossfit(seed)
    elif calibrate is not None:
        raise ValueError(f"--calibrate takes heldout or crossfit; got {calibrate!r}.")
    report = uncertainty_report(members, target, ood_members, calib=calib, averaging=averaging)
    if calibrate is not None:
        report["calib_seed"] = seed
    return report


METRIC_KEYS = ("top1", "top1_err", "top5", "top5_err", "nll", "brier", "ece", "temperature", "temperature_fold_a",
               "temperature_fold_b", "nll_ts", "ece_ts", "aurc", "acc_cov90", "acc_cov95", "disagreement",
               "pairwise_disagreement", "mutual_info", "ood_auroc_msp", "ood_fpr95_msp", "ood_auroc_entropy",
               "ood_fpr95_entropy", "ood_auroc_mi", "ood_fpr95_mi")


_DIGITS = {k: 4 for k in ("top1", "top1_err", "top5", "top5_err", "acc_cov90", "acc_cov95")}  # %, as timm writes


def result_rows(report: Dict[str, Any], common: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row for the ensemble and one per member, each with every key of :data:`METRIC_KEYS` (None: not
    measured, e.g. the temperature without --calibrate, or the OOD scores without --ood-data), so results files of
    any flags and any S have the same columns."""
    def row(member: str, m: Dict[str, Any]) -> Dict[str, Any]:
        m = dict(m, top1_err=100 - m["top1"], top5_err=100 - m["top5"])
        return dict(common, member=member, **{k: None if m.get(k) is None else round(float(m[k]), _DIGITS.get(k, 6))
                                              for k in METRIC_KEYS})

    return [row("ensemble", report["ensemble"])] + [row(str(i), m) for i, m in enumerate(report["members"])]


TABLE = (("top1", "top-1 (%)", "{:.2f}"), ("top5", "top-5 (%)", "{:.2f}"), ("nll", "NLL", "{:.4f}"),
         ("brier", "Brier", "{:.4f}"), ("ece", "ECE (15 bins)", "{:.4f}"), ("temperature", "temperature T", "{:.3f}"),
         ("nll_ts", "NLL at T", "{:.4f}"), ("ece_ts", "ECE at T", "{:.4f}"), ("aurc", "AURC", "{:.4f}"),
         ("acc_cov90", "acc. @90% cov. (%)", "{:.2f}"), ("acc_cov95", "acc. @95% cov. (%)", "{:.2f}"),
         ("disagreement", "disagreement w/ ens.", "{:.4f}"), ("pairwise_disagreement", "pairwise disagreement",
                                                              "{:.4f}"),
         ("mutual_info", "mutual info (nats)", "{:.4f}"), ("ood_auroc_msp", "OOD AUROC, MSP", "{:.4f}"),
         ("ood_fpr95_msp", "OOD FPR95, MSP", "{:.4f}"), ("ood_auroc_entropy", "OOD AUROC, entropy", "{:.4f}"),
         ("ood_fpr95_entropy", "OOD FPR95, entropy", "{:.4f}"), ("ood_auroc_mi", "OOD AUROC, MI", "{:.4f}"),
         ("ood_fpr95_mi", "OOD FPR95, MI", "{:.4f}"))


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as a readable table: a metric per line, a column for the ensemble and each member."""
    r0 = rows[0]
    head = f"{r0['model']} S={r0['split']}: {r0['n']} images scored"
    if r0.get("calibration") == "heldout":
        head += f"; temperature fitted on {r0['n_calib']} held-out images (seed {r0['calib_seed']}), not scored"
    elif r0.get("calibration") == "crossfit":
        head += f"; temperature by 2-fold cross-fitting (seed {r0['calib_seed']})"
    if r0.get("n_ood"):
        head += f"; OOD: {r0['n_ood']} images of {r0['ood_data']} (in-distribution = positive)"
    names = ["ensemble"] + [f"member {r['member']}" for r in rows[1:]]
    width = max(10, *(len(n) for n in names))
    lines = [head, f"{'':<22}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for key, label, fmt in TABLE:
        if all(r.get(key) is None for r in rows):
            continue
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for r in rows]
        lines.append(f"{label:<22}" + "".join(f"{c:>{width + 2}}" for c in cells))
    if r0["split"] == 1:
        lines.append("S=1: disagreement and mutual information are 0 by definition (one member).")
    return "\n".join(lines)


def run_validate(args: argparse.Namespace) -> int:
    """``timm-split validate``: print the results (and write ``--results-file``); user errors exit 2 in one line."""
    cli_logging(collect_member_logits.__module__)  # its progress lines (--log-freq)
    try:
        rows = validate(args)
        if args.results_file:
            write_results(args.results_file, rows)
    except (ValueError, FileNotFoundError, OSError) as e:
        return user_error("validate", e)
    print(format_table(rows))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_split.commands.validate``."""
    from .common import OneLineParser, run_command

    parser = add_validate_args(OneLineParser(prog="timm-split validate"))
    return run_command("validate", run_validate, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
