"""The ``timm-split train`` flags, documented and grouped as in timm's ``train.py``.

Every flag keeps timm's name, type and default (where it is timm's) and gets a help line, in timm's wording where
the flag is timm's; the help shows each meaningful default, or says where an unset (``None``) default is computed.
The groups carry timm ``train.py``'s titles, plus one for our own flags (``SplitNet (timm_split) parameters``).
What differs from timm is said in the help: ``--num-classes`` defaults to the dataset's class count (timm: the
model's), ``--weight-decay`` is scaled by ``exp(1/S - 1)``, ``--drop``/``--drop-path`` are divided per
``--drop-scale``, ``--amp`` is bfloat16 on the CPU.

``-c/--config FILE`` is timm ``train.py``'s: a YAML of ``flag_dest: value`` pairs read first, as the parser's
defaults, so any flag on the command line wins. A run folder's ``args.yaml`` (timm writes every ``train.py`` flag
there) loads as it is: a key of a ``train.py`` flag that timm-split does not implement (:data:`TIMM_ONLY_FLAGS`) is
accepted at ``train.py``'s default, where it changes nothing, and refused, naming the key and its value, anywhere
else. Unlike timm, a key that is no flag of either, or a value of the wrong type, is refused, naming the key (timm's
``set_defaults`` would keep it silently).

    parser = add_train_args(argparse.ArgumentParser(prog="timm-split train"))
    args = parser.parse_args(["-c", "recipe.yaml", "--epochs", "10"])   # recipe.yaml's values, epochs 10
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..execution import STRATEGIES

__all__ = ["TIMM_ONLY_FLAGS", "add_train_args", "load_config"]

_logger = logging.getLogger(__name__)

_Add = Callable[..., Any]


def _dataset_flags(g: _Add) -> None:
    """Dataset parameters: where the images come from.

    Args:
        g: The group's ``add_argument``.
    """
    g("--data-dir", default=None, metavar="DIR",
      help="path to dataset (root dir) (default: Fashion-MNIST's IDX files)")
    g("--dataset", default="", metavar="NAME",
      help="dataset type + name: '' = ImageFolder/ImageTar at --data-dir (Fashion-MNIST without --data-dir), "
      "fashion_mnist, or a timm '<type>/<name>' already on disk, e.g. torch/cifar10 (default: '')")
    g("--train-split", default="train", metavar="NAME", help="dataset train split (default: %(default)s)")
    g("--val-split", default="validation", metavar="NAME", help="dataset validation split (default: %(default)s)")
    g("--class-map", default="", metavar="FILENAME", help="path to class to idx mapping file (default: none)")


def _model_flags(g: _Add) -> None:
    """Model parameters: the model, its input and batch, and resuming.

    Args:
        g: The group's ``add_argument``.
    """
    from .common import KeyValueArgs as ParseKwargs  # timm's, with a one-line error for a pair without '='

    g("--model", default="resnet50", metavar="MODEL", help="name of the timm model to train (default: %(default)s)")
    g("--initial-checkpoint", default="", metavar="PATH",
      help="initialize the model from this checkpoint: a timm-split train checkpoint (S=1: the model that is then "
      "split, see --split-init; S members: the split itself) or a timm model's .pth/.safetensors state dict "
      "(default: none)")
    g("--resume", default="", metavar="PATH",
      help="resume full model and optimizer state from a checkpoint of this run, e.g. <output>/last.safetensors, "
      "or its folder (default: none)")
    g("--no-resume-opt", action="store_true", help="prevent resume of optimizer state when resuming model")
    g("--num-classes", type=int, default=None, metavar="N",
      help="number of label classes (default: the dataset's class count; timm's train.py: the model's)")
    g("--in-chans", type=int, default=None, metavar="N",
      help="image input channels (default: --input-size's C, else 1 for Fashion-MNIST, else 3)")
    g("--img-size", type=int, default=None, metavar="N",
      help="image size (default: 28 for Fashion-MNIST, else the model's)")
    g("--input-size", default=None, nargs=3, type=int, metavar=("C", "H", "W"),
      help="input all image dimensions, e.g. --input-size 3 224 224 (default: from --img-size or the model)")
    g("--crop-pct", default=None, type=float, metavar="N",
      help="input image center crop percent, for validation only (default: 1.0 for Fashion-MNIST, else "
      "the model's)")
    g("--mean", type=float, nargs="+", default=None, metavar="MEAN",
      help="override mean pixel value of dataset (default: Fashion-MNIST's, else the model's)")
    g("--std", type=float, nargs="+", default=None, metavar="STD",
      help="override std deviation of dataset (default: Fashion-MNIST's, else the model's)")
    g("--interpolation", default="", metavar="NAME",
      help="image resize interpolation type, overrides the model's (default: bilinear for Fashion-MNIST, "
      "else the model's)")
    g("-b", "--batch-size", type=int, default=128, metavar="N",
      help="input batch size for training, per process (default: %(default)s)")
    g("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
      help="validation batch size override (default: --batch-size)")
    g("--channels-last", action="store_true", help="use channels_last memory layout")
    g("--grad-accum-steps", type=int, default=1, metavar="N",
      help="the number of steps to accumulate gradients (default: %(default)s)")
    g("--grad-checkpointing", action="store_true",
      help="enable gradient checkpointing through model blocks/stages")
    g("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
      help="extra timm.create_model keyword arguments as key=value pairs, e.g. drop_rate=0.1 (default: none)")


def _scripting_flags(g: _Add) -> None:
    """Scripting / codegen: compiling the model.

    Args:
        g: The group's ``add_argument``.
    """
    g("--torchcompile", nargs="?", type=str, default=None, const="inductor",
      help="enable torch.compile of the members' forward w/ specified backend (bare flag: %(const)s; "
      "default: off)")


def _device_flags(g: _Add) -> None:
    """Device parameters: mixed precision (``--device`` is with our flags).

    Args:
        g: The group's ``add_argument``.
    """
    g("--amp", action="store_true", help="mixed precision: float16 on CUDA (grad scaler), bfloat16 on CPU")
    g("--amp-dtype", default=None, choices=("float16", "bfloat16"),
      help="lower precision AMP dtype (default: float16 on CUDA, bfloat16 on CPU)")


def _optimizer_flags(g: _Add) -> None:
    """Optimizer parameters: timm's ``create_optimizer_v2`` and gradient clipping.

    Args:
        g: The group's ``add_argument``.
    """
    from .common import KeyValueArgs as ParseKwargs  # timm's, with a one-line error for a pair without '='

    g("--opt", default="sgd", metavar="OPTIMIZER", help="optimizer (default: %(default)s)")
    g("--opt-eps", default=None, type=float, metavar="EPSILON", help="optimizer epsilon (default: the opt's)")
    g("--opt-betas", default=None, type=float, nargs="+", metavar="BETA", help="optimizer betas (default: the opt's)")
    g("--momentum", type=float, default=0.9, metavar="M", help="optimizer momentum (default: %(default)s)")
    g("--weight-decay", type=float, default=2e-5,
      help="weight decay for S=1, scaled by exp(1/S - 1) for S members (default: %(default)s)")
    g("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: none, no clipping)")
    g("--clip-mode", default="norm",
      help="gradient clipping mode, one of 'norm', 'value', 'agc' (default: %(default)s)")
    g("--opt-kwargs", nargs="*", default={}, action=ParseKwargs,
      help="extra optimizer keyword arguments as key=value pairs (default: none)")


def _schedule_flags(g: _Add) -> None:
    """Learning rate schedule parameters: timm's ``create_scheduler_v2`` and the lr's batch-size rule.

    Args:
        g: The group's ``add_argument``.
    """
    g("--sched", default="cosine", metavar="SCHEDULER", help="LR scheduler (default: %(default)s)")
    g("--sched-on-updates", action="store_true", help="apply LR scheduler step on update instead of epoch end")
    g("--lr", type=float, default=None, metavar="LR",
      help="learning rate, overrides --lr-base if set (default: lr-base * global batch / lr-base-size, "
      "see --lr-base-scale)")
    g("--lr-base", type=float, default=0.1, metavar="LR",
      help="base learning rate: lr = lr_base * global_batch_size / base_size (default: %(default)s)")
    g("--lr-base-size", type=int, default=256, metavar="DIV",
      help="base learning rate batch size (divisor) (default: %(default)s)")
    g("--lr-base-scale", default="", metavar="SCALE",
      help="base learning rate vs batch_size scaling, 'linear' or 'sqrt' (default: sqrt for ada*/lamb "
      "optimizers, else linear)")
    g("--warmup-lr", type=float, default=1e-5, metavar="LR", help="warmup learning rate (default: %(default)s)")
    g("--min-lr", type=float, default=0, metavar="LR",
      help="lower lr bound for cyclic schedulers that hit 0 (default: %(default)s)")
    g("--epochs", type=int, default=300, metavar="N", help="number of epochs to train (default: %(default)s)")
    g("--decay-milestones", default=[90, 180, 270], type=int, nargs="+", metavar="MILESTONES",
      help="list of decay epoch indices for multistep lr, must be increasing (default: 90 180 270)")
    g("--decay-epochs", type=float, default=90, metavar="N", help="epoch interval to decay LR (default: %(default)s)")
    g("--warmup-epochs", type=int, default=5, metavar="N",
      help="epochs to warmup LR, if scheduler supports (default: %(default)s)")
    g("--warmup-prefix", action="store_true", help="exclude warmup period from decay schedule")
    g("--cooldown-epochs", type=int, default=0, metavar="N",
      help="epochs to cooldown LR at min_lr, after cyclic schedule ends (default: %(default)s)")
    g("--patience-epochs", type=int, default=10, metavar="N",
      help="patience epochs for Plateau LR scheduler (default: %(default)s)")
    g("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE", help="LR decay rate (default: %(default)s)")


def _augmentation_flags(g: _Add) -> None:
    """Augmentation and regularization parameters: each member's view, random erasing, mixup, dropout.

    Args:
        g: The group's ``add_argument``.
    """
    g("--no-aug", action="store_true", help="disable all training augmentation, override other train aug args")
    g("--scale", type=float, nargs="+", default=[0.08, 1.0], metavar="PCT",
      help="random resize scale (default: 0.08 1.0)")
    g("--ratio", type=float, nargs="+", default=[3. / 4., 4. / 3.], metavar="RATIO",
      help="random resize aspect ratio (default: 0.75 1.33)")
    g("--hflip", type=float, default=0.5, help="horizontal flip training aug probability (default: %(default)s)")
    g("--vflip", type=float, default=0., help="vertical flip training aug probability (default: %(default)s)")
    g("--color-jitter", type=float, default=0.4, metavar="PCT", help="color jitter factor (default: %(default)s)")
    g("--aa", default=None, metavar="NAME",
      help="AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5, 'v0' or 'original' (default: none)")
    g("--reprob", type=float, default=0., metavar="PCT", help="random erase prob (default: %(default)s)")
    g("--remode", default="pixel", help="random erase mode (default: %(default)s)")
    g("--recount", type=int, default=1, help="random erase count (default: %(default)s)")
    g("--mixup", type=float, default=0.0, help="mixup alpha, mixup enabled if > 0 (default: %(default)s)")
    g("--cutmix", type=float, default=0.0, help="cutmix alpha, cutmix enabled if > 0 (default: %(default)s)")
    g("--cutmix-minmax", type=float, nargs="+", default=None,
      help="cutmix min/max ratio, overrides alpha and enables cutmix if set (default: none)")
    g("--mixup-prob", type=float, default=1.0,
      help="probability of performing mixup or cutmix when either/both is enabled (default: %(default)s)")
    g("--mixup-switch-prob", type=float, default=0.5,
      help="probability of switching to cutmix when both mixup and cutmix enabled (default: %(default)s)")
    g("--mixup-mode", default="batch",
      help="how to apply mixup/cutmix params, per 'batch', 'pair' or 'elem' (default: %(default)s)")
    g("--mixup-off-epoch", default=0, type=int, metavar="N",
      help="turn off mixup after this epoch, disabled if 0 (default: %(default)s)")
    g("--smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)")
    g("--train-interpolation", default="random",
      help="training interpolation: random, bilinear, bicubic, or '' for the model's (default: %(default)s)")
    g("--drop", type=float, default=0.0, metavar="PCT",
      help="dropout rate, divided per --drop-scale for S > 1 (default: %(default)s)")
    g("--drop-path", type=float, default=None, metavar="PCT",
      help="drop path rate, divided per --drop-scale for S > 1 (default: the model's)")
    g("--drop-block", type=float, default=None, metavar="PCT", help="drop block rate (default: the model's)")


def _batch_norm_flags(g: _Add) -> None:
    """Batch norm parameters: BatchNorm statistics across DDP ranks.

    Args:
        g: The group's ``add_argument``.
    """
    g("--dist-bn", default="reduce",
      help="distribute BatchNorm stats between nodes after each epoch ('broadcast', 'reduce' or ''; DDP only) "
      "(default: %(default)s)")


def _ema_flags(g: _Add) -> None:
    """Model exponential moving average parameters: timm's ``ModelEmaV3``.

    Args:
        g: The group's ``add_argument``.
    """
    g("--model-ema", action="store_true",
      help="enable tracking moving average of model weights (evaluated and checkpointed instead of the model)")
    g("--model-ema-decay", type=float, default=0.9998,
      help="decay factor for model weights moving average (default: %(default)s)")
    g("--model-ema-warmup", action="store_true", help="enable warmup for model EMA decay")


def _misc_flags(g: _Add) -> None:
    """Miscellaneous parameters: seed, logging, checkpoints, loaders, output.

    Args:
        g: The group's ``add_argument``.
    """
    g("-c", "--config", default="", metavar="FILE",
      help="YAML config file specifying default arguments (timm's train.py; a run's args.yaml loads): keys are "
      "flag names with '_' (batch_size: 64); flags on the command line win; a timm train.py flag not implemented "
      "here is accepted at train.py's default only; unknown keys are refused (default: none)")
    g("--seed", type=int, default=42, metavar="S", help="random seed (default: %(default)s)")
    g("--log-interval", type=int, default=50, metavar="N",
      help="how many optimizer updates to wait before logging training status (default: %(default)s)")
    g("--checkpoint-hist", type=int, default=10, metavar="N",
      help="number of checkpoints to keep (default: %(default)s)")
    g("-j", "--workers", type=int, default=4, metavar="N",
      help="how many data loading worker processes to use, per process (default: %(default)s, capped at the CPUs "
           "the process may use)")
    g("--pin-mem", action="store_true",
      help="pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU")
    g("--output", default="", metavar="PATH", help="path to output folder (default: ./output/train)")
    g("--experiment", default="", metavar="NAME",
      help="name of train experiment, name of sub-folder for output (default: <date>-<model>-s<S>; "
      "with --resume and no --output: the checkpoint's folder)")
    g("--eval-metric", default="top1", metavar="EVAL_METRIC",
      help="best metric, which picks model_best (e.g. top1, top5, loss) (default: %(default)s)")


def _splitnet_flags(g: _Add) -> None:
    """SplitNet (timm_split) parameters: ours, not timm's.

    Args:
        g: The group's ``add_argument``.
    """
    g("--split", type=int, default=1, help="S, the number of members (1 = the plain model) (default: %(default)s)")
    g("--split-init", default="random", choices=("random", "inherit"),
      help="members' init: 'random' (from scratch) or 'inherit' (each member takes its own channel subset of the "
      "--initial-checkpoint model's trained weights: split a trained model) (default: %(default)s)")
    g("--cot-weight", type=float, default=0.5,
      help="weight of the co-training (JS) term; 0 disables it (default: %(default)s)")
    g("--cot-warmup-epochs", type=float, default=None,
      help="epochs to ramp the co-training weight up (default: epochs * 40/300)")
    g("--cot-mode", choices=("js", "kl", "kl_mixture"), default="js",
      help="co-training divergence: Jensen-Shannon, the seed's pairwise KL, or KL to the other members' mean "
      "(default: %(default)s)")
    g("--same-view", action="store_true", help="ablation: every member sees the same augmented view")
    g("--execution", default="auto", choices=STRATEGIES,
      help="how the members run each step (docs/speed.md): 'auto' times the candidates on the first step (8 calls) "
      "and keeps the fastest; a checkpoint records the choice and --resume reuses it (default: %(default)s)")
    g("--drop-scale", default="S", choices=("S", "sqrt"),
      help="divide --drop/--drop-path by S (SplitNet's ResNet rule) or sqrt(S) (its SE/EfficientNet rule) "
      "(default: %(default)s)")
    g("--member-parallel", action="store_true", help="torchrun: one member per rank (world size = --split)")
    g("--train-subset", type=int, default=None, metavar="N",
      help="train on a fixed random N images (default: the whole train split)")
    g("--eval-every", type=int, default=1, metavar="N",
      help="evaluate every N epochs, 0: only after the last (default: %(default)s)")
    g("--device", default=None,
      help="device to train on (default: cuda if available, else cpu; torchrun: cuda:<local rank>)")
    g("--threads", type=int, default=None, help="torch.set_num_threads for each process (default: torch's)")
    g("--no-progress", action="store_true", help="no tqdm progress bar (it shows only on a terminal)")


def _distillation_flags(g: _Add) -> None:
    """Knowledge distillation parameters: timm ``train.py``'s names, semantics and defaults; each member distils.

    Args:
        g: The group's ``add_argument``.
    """
    g("--kd-model-name", default=None, metavar="MODEL",
      help="name of teacher model for knowledge distillation: a timm model whose weights --kd-model-checkpoint "
      "holds (nothing downloads); with a timm-split checkpoint it may be left out (default: none, no distillation)")
    g("--kd-model-checkpoint", default="", metavar="PATH",
      help="the teacher's local weights: a timm-split train checkpoint (any S: an ensemble teaches through its "
      "averaged output; its EMA weights if it has them) or a --kd-model-name model's .pth/.safetensors state dict "
      "(timm: LogitDistillationTask's teacher_pretrained_path) (default: none)")
    g("--kd-distill-type", default="logit", choices=("logit", "feature", "token"),
      help="type of distillation: 'logit' for output distillation (timm's 'feature' and 'token' are not "
      "supported here) (default: %(default)s)")
    g("--kd-loss-type", default="kl", choices=("kl",),
      help="loss function for logit distillation: KL(teacher || member) at --kd-temperature, times T^2 "
      "(default: %(default)s)")
    g("--distill-loss-weight", default=None, type=float, metavar="W",
      help="weight for distillation loss; if both weights are given: loss = task_weight * task + distill_weight * "
      "distill (+ the co-training term); if only --task-loss-weight: distill_weight = 1 - task_weight "
      "(default: 1.0)")
    g("--task-loss-weight", default=None, type=float, metavar="W",
      help="weight for task (classification) loss, see --distill-loss-weight for weighting modes (default: 1.0)")
    g("--kd-temperature", default=4.0, type=float, metavar="T",
      help="temperature for softmax in distillation (typical range: 1-4) (default: %(default)s)")


_GROUPS: Tuple[Tuple[str, Callable[[_Add], None]], ...] = (
    ("Dataset parameters", _dataset_flags),
    ("Model parameters", _model_flags),
    ("Scripting / codegen", _scripting_flags),
    ("Device parameters", _device_flags),
    ("Optimizer parameters", _optimizer_flags),
    ("Learning rate schedule parameters", _schedule_flags),
    ("Augmentation and regularization parameters", _augmentation_flags),
    ("Batch norm parameters", _batch_norm_flags),
    ("Model exponential moving average parameters", _ema_flags),
    ("Miscellaneous parameters", _misc_flags),
    ("Knowledge distillation parameters", _distillation_flags),
    ("SplitNet (timm_split) parameters", _splitnet_flags),
)


_VIEWS = "AugMix splits would be a second kind of view beside the members' own"
_LOSS = "the loss is the members' cross-entropy plus the co-training term"
_NAFLEX = "there is no NaFlex loader"
_KD = "only logit distillation is implemented"

# timm train.py's flags that timm-split train does not implement: dest -> (train.py's default, what to do instead or
# why not; '' when there is nothing to add). timm writes every flag into a run's args.yaml, so a recipe holds them all:
# -c accepts one at this default (it changes nothing) and refuses any other value. The flags of timm 1.0's train.py
# (up to its distillation flags), plus older releases' (aot_autograd, apex_amp, native_amp, amp_impl, bn_tf, jsd) so
# that earlier recipes load too. The flags timm-split does implement are the groups above, with timm's defaults.
# Checked against upstream train.py at 2aabaef039d918d453b58714ab84562609981112 (a timm 0.9 snapshot): each of its
# flags is one of ours or a key here at the same default (amp_dtype is ours, default None where train.py's is
# 'float16': unset means float16 on CUDA as there). The other keys here that it lacks are newer train.py's (timm 1.0),
# except those marked "older releases": not in train.py any more, kept for their recipes only.
TIMM_ONLY_FLAGS: Dict[str, Tuple[Any, str]] = {
    # Dataset parameters (``data`` is train.py's deprecated positional DIR: -c reads it as data_dir, as timm does)
    "train_num_samples": (None, ""),
    "val_num_samples": (None, ""),
    "dataset_download": (False, "nothing is downloaded: put the dataset on disk"),
    "input_img_mode": (None, ""),
    "input_key": (None, ""),
    "target_key": (None, ""),
    "dataset_trust_remote_code": (False, "nothing is downloaded"),
    # Model parameters
    "pretrained": (False, "no hub weights are downloaded: give the weights file as initial_checkpoint"),
    "pretrained_path": (None, "give the weights file as initial_checkpoint"),
    "gp": (None, "pass global_pool in model_kwargs"),
    "fuser": ("", ""),
    "fast_norm": (False, ""),
    "head_init_scale": (None, ""),
    "head_init_bias": (None, ""),
    "torchcompile_mode": (None, ""),
    "torchscript": (False, "use torchcompile"),
    "aot_autograd": (False, "use torchcompile"),  # older releases (gone before 2aabaef)
    # Device parameters
    "model_dtype": (None, "use amp (and amp_dtype)"),
    "amp_impl": ("native", "AMP is torch's native autocast"),  # older releases (in 2aabaef, not newer)
    "apex_amp": (False, "AMP is torch's native autocast: use amp"),  # older releases (before amp_impl)
    "native_amp": (False, "use amp"),  # older releases (before amp_impl)
    "no_ddp_bb": (False, ""),
    "synchronize_step": (False, ""),
    "local_rank": (0, "torchrun sets each process's rank"),
    "device_modules": (None, ""),
    # Optimizer parameters
    "layer_decay": (None, "SplitNet's scaled weight decay owns the parameter groups"),
    "layer_decay_min_scale": (0, "SplitNet's scaled weight decay owns the parameter groups"),
    "layer_decay_no_opt_scale": (None, "SplitNet's scaled weight decay owns the parameter groups"),
    # Learning rate schedule parameters
    "lr_noise": (None, ""),
    "lr_noise_pct": (0.67, ""),
    "lr_noise_std": (1.0, ""),
    "lr_cycle_mul": (1.0, ""),
    "lr_cycle_decay": (0.5, ""),
    "lr_cycle_limit": (1, ""),
    "lr_k_decay": (1.0, ""),
    "epoch_repeats": (0.0, ""),
    "start_epoch": (None, "resume restarts at the checkpoint's epoch"),
    # Augmentation and regularization parameters
    "train_crop_mode": (None, ""),
    "color_jitter_prob": (None, ""),
    "grayscale_prob": (None, ""),
    "gaussian_blur_prob": (None, ""),
    "aug_repeats": (0, ""),
    "aug_splits": (0, _VIEWS),
    "jsd_loss": (False, _VIEWS),
    "jsd": (False, _VIEWS),  # older releases (jsd_loss's old name)
    "resplit": (False, _VIEWS),
    "bce_loss": (False, _LOSS),
    "bce_sum": (False, _LOSS),
    "bce_target_thresh": (None, _LOSS),
    "bce_pos_weight": (None, _LOSS),
    "drop_connect": (None, "use drop_path (timm's name for it since 0.3)"),
    # Batch norm parameters
    "bn_momentum": (None, ""),
    "bn_eps": (None, ""),
    "bn_tf": (False, ""),  # older releases
    "sync_bn": (False, ""),
    "split_bn": (False, _VIEWS),
    # Model exponential moving average parameters
    "model_ema_force_cpu": (False, "the EMA lives with the model"),
    # Miscellaneous parameters
    "worker_seeding": ("all", ""),
    "recovery_interval": (0, ""),
    "save_images": (False, ""),
    "no_prefetcher": (False, "the training loader is timm's prefetcher"),
    "tta": (0, ""),
    "use_multi_epochs_loader": (False, ""),
    "log_wandb": (False, "every epoch's metrics are in the run's summary.csv"),
    "wandb_project": (None, ""),
    "wandb_tags": ([], ""),
    "wandb_resume_id": ("", ""),
    "naflex_loader": (False, _NAFLEX),
    "naflex_train_seq_lens": ([128, 256, 576, 784, 1024], _NAFLEX),
    "naflex_max_seq_len": (576, _NAFLEX),
    "naflex_patch_sizes": (None, _NAFLEX),
    "naflex_patch_size_probs": (None, _NAFLEX),
    "naflex_loss_scale": ("linear", _NAFLEX),
    # Knowledge distillation parameters
    "kd_student_feature_dim": (None, _KD),
    "kd_teacher_feature_dim": (None, _KD),
    "kd_token_distill_type": ("soft", _KD),
}


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``timm-split train`` flags to ``parser``, in timm ``train.py``'s argument groups plus ours.

    Args:
        parser: The parser to extend (its own ``-h/--help`` stays where it is).

    Returns:
        ``parser``, with one argument group per title of timm's ``train.py`` and ``SplitNet (timm_split)
        parameters``; every flag has a help line that shows its default or says where it is computed.
    """
    for title, add_flags in _GROUPS:
        add_flags(parser.add_argument_group(title).add_argument)
    _read_config_first(parser)
    return parser


# ----------------------------------------------------------------------------------------------------------
# -c/--config: timm train.py's YAML of defaults

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _config_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """``value`` as ``action`` stores it (a string goes through the flag's own type, as argparse does), or a
    ``ValueError`` naming ``key``."""
    flag = action.option_strings[-1]

    def bad(want: str) -> ValueError:
        return ValueError(f"{where}: {key}: {value!r} is not {want} (as {flag} takes it); fix the value or drop "
                          "the key.")

    def one(v: Any) -> Any:
        if isinstance(v, str) and action.type is not None:
            try:
                return action.type(v)
            except (TypeError, ValueError):
                raise bad(f"a {getattr(action.type, '__name__', 'valid')} value") from None
        if action.type is int and not (isinstance(v, int) and not isinstance(v, bool)):
            raise bad("an integer")
        if action.type is float:
            if not _is_number(v):
                raise bad("a number")
            return float(v)
        return v

    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(action.default, dict) or action.dest.endswith("_kwargs"):  # ParseKwargs: key=value pairs
        if not isinstance(value, dict):
            raise bad("a mapping of keyword arguments")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise bad(f"a list of {action.nargs} values")
        out: Any = [one(v) for v in value]
    else:
        out = one(value)
    for v in (out if isinstance(out, list) else [out]):
        if action.choices is not None and v not in action.choices:
            raise bad(f"one of {', '.join(map(str, action.choices))}")
    return out


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a ``-c/--config`` YAML (timm ``train.py``'s) and check it against ``parser``'s flags.

    Args:
        path: The YAML file: a mapping of flag dests (``batch_size: 64``; ``batch-size`` is read the same) to values.
        parser: The parser whose flags the keys must name.

    Returns:
        ``{dest: value}`` for ``parser``'s flags, each value as the flag stores it (string values through the flag's
        type). The keys of timm train.py flags that ``parser`` lacks (:data:`TIMM_ONLY_FLAGS`) are left out: at
        train.py's default they change nothing (listed once at INFO). ``data`` (train.py's positional DIR) is
        ``data_dir`` when that is unset, as timm reads it.

    Raises:
        ValueError: a missing or unreadable file, a YAML that is not a mapping, an unknown key (named, with the
            closest flags), a key of :data:`TIMM_ONLY_FLAGS` off train.py's default (named, with its value), or a
            value of the wrong type or outside the flag's choices.
    """
    import yaml

    where = f"--config {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file; pass a YAML file of flag: value pairs (e.g. batch_size: 64).")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{where} cannot be read as YAML ({type(e).__name__}: {e}); fix the file.") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} holds a {type(cfg).__name__}, not a mapping of flag: value pairs (e.g. "
                         "batch_size: 64).")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    cfg = _timm_data_key(cfg, where)
    unknown: List[str] = [str(k) for k in cfg
                          if str(k).replace("-", "_") not in actions and str(k).replace("-", "_") not in TIMM_ONLY_FLAGS]
    if unknown:
        known = list(actions) + list(TIMM_ONLY_FLAGS)
        hints = [f"{k} (did you mean {', '.join(m)}?)" if m else k for k in unknown
                 for m in [difflib.get_close_matches(k.replace("-", "_"), known, n=2)]]
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {'; '.join(hints)}: not timm-split "
                         "train flags nor timm train.py's (keys are flag names with '_', e.g. batch_size); drop "
                         f"{'them' if len(unknown) > 1 else 'it'}")
    _check_timm_only(cfg, where)
    return {k.replace("-", "_"): _config_value(actions[k.replace("-", "_")], k, v, where) for k, v in cfg.items()
            if str(k).replace("-", "_") in actions}


def _timm_data_key(cfg: Dict[Any, Any], where: str) -> Dict[Any, Any]:
    """``cfg`` with timm train.py's deprecated positional ``data`` (DIR) read as ``data_dir``, as timm reads it
    (``data_dir`` wins when both are set; ``data: null`` is its default)."""
    if "data" not in cfg:
        return cfg
    cfg = dict(cfg)
    data = cfg.pop("data")
    if data is not None and cfg.get("data_dir", cfg.get("data-dir")) is None:
        cfg.pop("data-dir", None)
        cfg["data_dir"] = data
        _logger.info("%s: data (timm train.py's positional DIR) %r read as data_dir", where, data)
    return cfg


def _same(a: Any, b: Any) -> bool:
    """Whether a YAML value is a default: booleans only as booleans, numbers by value, lists item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _yaml(v: Any) -> str:
    """``v`` as YAML writes it in flow style (true, null, [1, 2], 'x')."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _check_timm_only(cfg: Dict[Any, Any], where: str) -> None:
    """Accept the keys of :data:`TIMM_ONLY_FLAGS` that hold train.py's default (listed once at INFO); refuse, in one
    line naming each key and its value, the ones that would change what train.py does."""
    keys = [(str(k), str(k).replace("-", "_")) for k in cfg if str(k).replace("-", "_") in TIMM_ONLY_FLAGS]
    changed = [(k, cfg[k], *TIMM_ONLY_FLAGS[d]) for k, d in keys if not _same(cfg[k], TIMM_ONLY_FLAGS[d][0])]
    if len(changed) == 1:
        k, v, default, why = changed[0]
        raise ValueError(f"{where}: {k}: {_yaml(v)} sets a timm train.py flag that timm-split train does not "
                         f"implement{' (' + why + ')' if why else ''}; remove the key or set it to train.py's default, "
                         f"{_yaml(default)}.")
    if changed:
        what = "; ".join(f"{k}: {_yaml(v)} (default {_yaml(default)}{', ' + why if why else ''})"
                         for k, v, default, why in changed)
        raise ValueError(f"{where}: timm train.py flags that timm-split train does not implement, set off their "
                         f"defaults: {what}; remove these keys or set them to train.py's defaults.")
    if keys:
        _logger.info("%s: %d timm train.py flag%s that timm-split does not implement, at train.py's default%s (no "
                     "effect): %s", where, len(keys), "s" if len(keys) > 1 else "", "s" if len(keys) > 1 else "",
                     ", ".join(k for k, _ in keys))


def _config_path(argv: Sequence[str]) -> str:
    """The ``-c/--config`` value in ``argv`` ('' if none), found as timm's first parser finds it."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default="")
    return pre.parse_known_args(list(argv))[0].config


def _read_config_first(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` timm ``train.py``'s two passes: ``-c/--config`` first, its YAML as the defaults, then the
    whole command line, so an explicit flag wins. The YAML's defaults last for that one parse (a parser reused for
    another command line starts from its own defaults again); a bad YAML is a usage error naming the key (exit 2).
    """
    parse = parser.parse_known_args

    def parse_known_args(args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
        argv = sys.argv[1:] if args is None else list(args)
        path = _config_path(argv)
        if not path:
            return parse(argv, namespace)
        try:
            cfg = load_config(path, parser)
        except ValueError as e:
            parser.error(str(e))
        actions = {a.dest: a for a in parser._actions if a.dest in cfg}
        saved = {k: a.default for k, a in actions.items()}
        try:
            for k, a in actions.items():
                a.default = cfg[k]
            return parse(argv, namespace)
        finally:
            for k, a in actions.items():
                a.default = saved[k]

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
