"""Export an ensemble as one deployable file: ``timm-split export``.

    timm-split export --model resnet18 --split 2 --img-size 224 --output r18s2.onnx --check
    timm-split export --checkpoint runs/r18-s2/model_best.safetensors --use-ema --format pt2 --dynamic-batch \\
        --output r18s2.pt2 --check

One file holds all S members and their averaging, with the model's pretrained cfg (mean, std, input size,
classes, split factor) in its metadata (:func:`timm_split.export.export_ensemble`). A checkpoint written by
``timm-split train`` names its model, S, classes and input; any other safetensors or ``.pth`` state dict of a
``splitnet_<arch>`` needs ``--model``, ``--split`` and ``--num-classes`` (as ``timm-split validate``). Without a
checkpoint, ``--model NAME --split S`` exports a freshly initialised split (to try the deployment path).
``--use-ema`` exports the checkpoint's EMA weights, as ``timm-split validate --use-ema`` evaluates them (without it,
the raw weights); a line of the output says which weights were written.
User errors (an op that does not export, an unwritable ``--output``, a corrupt checkpoint, ``--opset`` out of
range) print one line and exit 2, leaving no file behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from ..checks import check_writable
from ..errors import SplitError
from ..export import (CHECK_TOLERANCE, DEFAULT_OPSET, FORMATS, GRAPHS, MAX_DYNAMIC_BATCH, MAX_OPSET, MIN_OPSET,
                      ExportError, export_ensemble)
from .common import check_output_paths, cli_logging, int_at_least, split_factor_arg, user_error
from .train_checks import MIN_IMG_SIZE

_logger = logging.getLogger(__name__)

__all__ = ["add_export_args", "build_ensemble", "run_export", "weights_line", "main"]


def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``timm-split export`` flags."""
    a = parser.add_argument
    a("--checkpoint", default=None, metavar="FILE", help="a .safetensors written by timm-split train, or any "
      "safetensors/.pth state dict of a splitnet_* model (with --model, --split, --num-classes)")
    a("--model", default=None, help="<arch> or splitnet_<arch> (default: from the checkpoint)")
    a("--split", type=split_factor_arg, default=None, help="S (default: from the checkpoint; 2 without one)")
    a("--num-classes", type=int_at_least(0, "--num-classes"), default=None,
      help="classes (default: from the checkpoint, else the model's)")
    a("--use-ema", action="store_true", help="export the checkpoint's EMA weights (validate's rule: without it, the "
      "raw weights; a --model-ema run's model_best was chosen by its EMA, so pass it there); the output says which")
    a("--output", "-o", required=True, metavar="FILE", help="the file to write (e.g. r18s2.onnx, r18s2.pt2)")
    a("--format", choices=FORMATS, default=None, help="onnx or pt2 (default: from --output's extension, else onnx)")
    a("--img-size", type=int_at_least(MIN_IMG_SIZE, "--img-size (pixels)"), default=None,
      help="square input size (default: the model's input size)")
    b = parser.add_mutually_exclusive_group()
    b.add_argument("--batch-size", "-b", type=int_at_least(1, "--batch-size"), default=None,
                   help="fixed batch size (default 1)")
    b.add_argument("--dynamic-batch", action="store_true", help=f"any batch size from 1 to {MAX_DYNAMIC_BATCH}")
    a("--opset", type=int, default=None, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    a("--graph", choices=GRAPHS, default="members", help="'members': the members side by side (default, faster "
      "in onnxruntime on CPU); 'packed': the packed network (fixed batch only)")
    a("--check", action="store_true", help="run the written file (onnxruntime / torch.export.load) and PyTorch on "
      "the same inputs; fail if the outputs differ by more than --atol")
    a("--atol", type=float, default=CHECK_TOLERANCE,
      help=f"the check's largest allowed max abs difference (default {CHECK_TOLERANCE:g})")
    return parser


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    return "pt2" if args.output.endswith(".pt2") else "onnx"


def _check_flags(args: argparse.Namespace, fmt: str) -> None:
    """Everything that can be judged before the (slow) build and export."""
    if args.checkpoint is None and args.model is None:
        raise ValueError("pass --checkpoint FILE (written by timm-split train) or --model NAME --split S")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise ValueError(f"no checkpoint at {args.checkpoint}; pass the file written by timm-split train "
                         "(e.g. <output>/model_best.safetensors)")
    if args.use_ema and args.checkpoint is None:
        raise ValueError("--use-ema needs --checkpoint (the EMA weights are in the checkpoint)")
    if args.opset is not None:
        if fmt != "onnx":
            raise ValueError(f"--opset applies to --format onnx only; drop it for {fmt}")
        if not MIN_OPSET <= args.opset <= MAX_OPSET:
            raise ValueError(f"--opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {args.opset}: torch.onnx writes "
                             f"opset {MIN_OPSET} natively (the default) and {MAX_OPSET} is the highest checked "
                             "with onnxruntime")
    if args.graph == "packed" and args.dynamic_batch:
        raise ValueError("--graph packed is built for one input shape: pass --batch-size, or drop --graph for a "
                         "dynamic batch")
    check_writable(args.output, "--output")
    check_output_paths({"--output": args.output}, {"--checkpoint": args.checkpoint})


def build_ensemble(checkpoint: Optional[str], model: Optional[str], split_factor: Optional[int],
                   num_classes: Optional[int] = None, use_ema: bool = False):
    """The ensemble to export: a checkpoint's (its own metadata first, then the flags) or a fresh split.

    Args:
        checkpoint: a timm_split checkpoint, or a safetensors/.pth state dict of a ``splitnet_<arch>`` (None: a
            freshly initialised split of ``model``).
        model: ``<arch>`` or ``splitnet_<arch>`` (default: the checkpoint's).
        split_factor: S (default: the checkpoint's, else 2).
        num_classes: classes (default: the checkpoint's, else the model's).
        use_ema: load the checkpoint's EMA weights.

    Returns:
        The :class:`~timm_split.SplitEnsemble`, weights loaded, in eval mode.

    Raises:
        ValueError: an unknown model, or a missing, corrupt or mismatched checkpoint (the message names the fix).
    """
    import timm

    from ..core import split
    from ..ensemble import single
    from ..training.warm_start import ensemble_from_checkpoint

    if checkpoint:
        return ensemble_from_checkpoint(checkpoint, "--checkpoint", model=model, split_factor=split_factor,
                                        num_classes=num_classes, use_ema=use_ema, model_flag="--model")[0]
    base = model[len("splitnet_"):] if model.startswith("splitnet_") else model
    if not timm.is_model(base):
        raise ValueError(f"unknown model {model!r}; see timm.list_models() (e.g. resnet18).")
    net = timm.create_model(base, **({} if num_classes is None else {"num_classes": num_classes}))
    S = split_factor or 2
    return (single(net, base) if S == 1 else split(net, S)).eval()


def run_export(args: argparse.Namespace) -> int:
    """``timm-split export``: write the file, print what was written (and the check); user errors exit 2."""
    cli_logging("timm_split.export")
    fmt = _format(args)
    try:
        _check_flags(args, fmt)
        ens = build_ensemble(args.checkpoint, args.model, args.split, args.num_classes, args.use_ema)
        result = export_ensemble(ens, args.output, format=fmt, img_size=args.img_size, batch_size=args.batch_size,
                                 dynamic_batch=args.dynamic_batch, opset=args.opset if fmt == "onnx" else None,
                                 check=args.check, graph=args.graph, atol=args.atol)
    except (ValueError, ExportError, SplitError, ImportError, OSError) as e:
        return user_error("export", e)
    m = result.metadata
    batch = "batch" if args.dynamic_batch else str(result.input_shape[0])
    opset = f", opset {m['opset']}" if "opset" in m else ""
    graph = "members side by side" if result.graph == "members" else "packed"
    size = ", ".join(map(str, result.input_shape[1:]))
    print(f"wrote {result.path}: {m['split_factor']} x {m['architecture']} ({graph}, {m['averaging']} averaged), "
          f"{fmt}{opset}, input [{batch}, {size}], output {m['output_name']}, "
          f"{os.path.getsize(result.path) / 1e6:.1f} MB")
    print(weights_line(args.checkpoint, args.use_ema))
    if result.max_abs_diff is not None:
        runtime = "onnxruntime" if fmt == "onnx" else "torch.export.load"
        print(f"check: PyTorch {_head(result.reference)}")
        print(f"check: {runtime} {_head(result.exported)}")
        print(f"check: max abs diff {result.max_abs_diff:.3g} <= {args.atol:g}: ok")
    return 0


def weights_line(checkpoint: Optional[str], use_ema: bool) -> str:
    """Which weights ``timm-split export`` wrote: the checkpoint's EMA or raw weights (validate's rule: the EMA with
    ``--use-ema`` only), or a fresh initialisation.

    Args:
        checkpoint: the ``--checkpoint`` (None: a freshly initialised split).
        use_ema: ``--use-ema``.

    Returns:
        ``weights: EMA weights of FILE``, ``weights: raw weights of FILE`` (saying when the file also holds EMA
        weights, and how to export those) or ``weights: freshly initialised (no --checkpoint)``.
    """
    from ..training.warm_start import has_ema

    if not checkpoint:
        return "weights: freshly initialised (no --checkpoint)"
    if use_ema:
        return f"weights: EMA weights of {checkpoint}"
    if has_ema(checkpoint):
        return (f"weights: raw weights of {checkpoint}; it also holds EMA weights (a --model-ema run, whose "
                "model_best was chosen by the EMA): pass --use-ema to export those")
    return f"weights: raw weights of {checkpoint} (it holds no EMA weights)"


def _head(t, n: int = 5) -> str:
    return "[" + ", ".join(f"{v:.6f}" for v in t.flatten()[:n].tolist()) + ", ...]"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_split.commands.export``."""
    parser = add_export_args(argparse.ArgumentParser(prog="timm-split export"))
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
