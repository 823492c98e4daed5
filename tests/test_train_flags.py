"""``timm_split.commands.train_flags``: the train flags, grouped and documented as in timm's train.py."""
from __future__ import annotations

import argparse
from typing import Set

from timm_split.commands.train_flags import add_train_args

TITLES = ("Dataset parameters", "Model parameters", "Scripting / codegen", "Device parameters",
          "Optimizer parameters", "Learning rate schedule parameters", "Augmentation and regularization parameters",
          "Batch norm parameters", "Model exponential moving average parameters", "Miscellaneous parameters",
          "Knowledge distillation parameters", "SplitNet (timm_split) parameters")

ARGVS = [
    [],
    ["--model", "resnet18", "--split", "2", "--img-size", "32", "--epochs", "3", "--opt", "adamw",
     "--opt-betas", "0.9", "0.99", "--model-kwargs", "drop_rate=0.1", "--torchcompile", "--aa", "rand-m9-mstd0.5",
     "-vb", "8", "--dr", "0.5"],
    ["-b", "32", "-j", "0", "--input-size", "1", "28", "28", "--mean", "0.5", "--std", "0.25", "--torchcompile",
     "eager", "--amp", "--amp-dtype", "bfloat16", "--execution", "threads", "--cot-mode", "kl_mixture",
     "--drop-scale", "sqrt", "--opt-kwargs", "foo=1", "--decay-milestones", "3", "5", "--same-view",
     "--model-ema", "--model-ema-warmup", "--no-progress", "--cot-warmup-epochs", "2.5", "--device", "cpu",
     "--threads", "2", "--train-subset", "100", "--eval-every", "0", "--dist-bn", "", "--lr", "0.01"],
]


def _ours() -> argparse.ArgumentParser:
    return add_train_args(argparse.ArgumentParser(prog="timm-split train"))


def _option_strings(parser: argparse.ArgumentParser) -> Set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_timm_flag_names_parse_to_timm_dests() -> None:
    """timm train.py's spellings (``-vb``, ``--dr``, a bare ``--torchcompile``) land where timm's code reads them."""
    args = _ours().parse_args(ARGVS[1])
    assert (args.validation_batch_size, args.decay_rate, args.torchcompile) == (8, 0.5, "inductor")
    assert args.opt_betas == [0.9, 0.99] and args.model_kwargs == {"drop_rate": 0.1}
    args = _ours().parse_args(ARGVS[2])
    assert args.input_size == [1, 28, 28] and args.dist_bn == "" and args.cot_warmup_epochs == 2.5
    assert _option_strings(_ours()) >= {"--model-ema-decay", "--lr-base-scale", "--mixup-off-epoch", "--split"}


def test_every_flag_documented_in_a_named_group() -> None:
    """Every flag has help and sits in one of timm's groups (or ours); ``--help`` shows the titles and defaults."""
    parser = _ours()
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help and a.help.strip(), a.option_strings
    default_groups = {id(parser._positionals), id(parser._optionals)}
    grouped = {id(a) for g in parser._action_groups if id(g) not in default_groups for a in g._group_actions}
    loose = [a.option_strings for a in parser._actions
             if id(a) not in grouped and not isinstance(a, argparse._HelpAction)]
    assert not loose
    titles = [g.title for g in parser._action_groups if id(g) not in default_groups]
    assert titles == list(TITLES)

    text = parser.format_help()
    for title in TITLES:
        assert f"{title}:" in text, title
    flat = " ".join(text.split())  # undo the help formatter's line wrapping
    for shown in ("(default: 300)", "(default: sgd)", "(default: 128)", "(default: cosine)", "(default: 0.9998)",
                  "(default: auto)", "(default: epochs * 40/300)", "(default: the dataset's class count",
                  "(default: lr-base * global batch / lr-base-size", "(bare flag: inductor"):
        assert shown in flat, shown


def test_help_shows_every_meaningful_default() -> None:
    """A flag with a default other than None/False/''/{} says so in its help."""
    for a in _ours()._actions:
        if isinstance(a, argparse._HelpAction) or a.default in (None, False, "", {}):
            continue
        assert "default" in a.help, a.option_strings
