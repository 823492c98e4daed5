"""``timm_split.commands.train_flags``: the train flags, grouped and documented as in timm's train.py."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Set

import pytest
import yaml

from timm_split.commands.train_flags import TIMM_ONLY_FLAGS, add_train_args

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


# ----------------------------------------------------------------------------------------------------------
# -c/--config with a timm train.py args.yaml: timm's flags that timm-split lacks load at train.py's default

TIMM_ARGS = os.path.join(os.path.dirname(__file__), "data", "timm_args.yaml")


def _timm_args() -> dict:
    with open(TIMM_ARGS) as f:
        return yaml.safe_load(f)


def _write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(cfg, default_flow_style=False))
    return str(path)


def _refused(capsys, path: str) -> str:
    """``timm-split train -c path`` is a usage error (exit 2) in one line naming the file; that line."""
    from timm_split.commands.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "-c", path])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("usage:")]
    assert len(err) == 1 and path in err[0], err
    return err[0]


def test_a_timm_args_yaml_loads_with_its_recipe(caplog) -> None:
    """A run folder's args.yaml (every timm train.py flag, the recipe's values) parses: our flags take its values,
    the positional DIR is data_dir, and the timm-only flags at train.py's default are listed once and dropped."""
    with caplog.at_level(logging.INFO, logger="timm_split.commands.train_flags"):
        args = _ours().parse_args(["-c", TIMM_ARGS, "--epochs", "2"])
    assert (args.model, args.batch_size, args.opt, args.lr, args.weight_decay, args.sched) == \
        ("resnet50", 256, "lamb", 0.005, 0.02, "cosine")
    assert (args.aa, args.reprob, args.mixup, args.cutmix, args.drop_path, args.amp, args.channels_last) == \
        ("rand-m7-mstd0.5-inc1", 0.25, 0.1, 1.0, 0.05, True, True)
    assert (args.model_ema, args.model_ema_decay, args.data_dir, args.epochs) == (True, 0.9999, "/data/imagenet", 2)
    assert args.ratio == [0.75, 4 / 3] and args.decay_milestones == [90, 180, 270] and args.model_kwargs == {}
    assert not hasattr(args, "torchscript") and not hasattr(args, "log_wandb") and not hasattr(args, "data")
    lines = [r.getMessage() for r in caplog.records if "does not implement" in r.getMessage()]
    assert len(lines) == 1 and "torchscript" in lines[0] and "naflex_loader" in lines[0], lines


def test_the_timm_args_yaml_holds_every_flag_of_both_tables() -> None:
    """The fixture is a whole train.py args.yaml: each of its keys is one of our flags or TIMM_ONLY_FLAGS (or the
    positional ``data``), each timm-only key at the table's default, and every table entry but the older
    releases' is in it; so the table and the fixture check each other."""
    cfg = _timm_args()
    ours = {a.dest for a in _ours()._actions if a.option_strings} - {"help", "config"}
    timm_split_only = {"split", "split_init", "cot_weight", "cot_warmup_epochs", "cot_mode", "same_view", "execution",
                       "drop_scale", "member_parallel", "train_subset", "eval_every", "threads", "no_progress",
                       "kd_model_checkpoint"}
    assert set(cfg) - {"data"} <= ours | set(TIMM_ONLY_FLAGS)
    assert ours - timm_split_only <= set(cfg), sorted(ours - timm_split_only - set(cfg))
    older = {"aot_autograd", "amp_impl", "apex_amp", "native_amp", "bn_tf", "jsd"}
    assert set(TIMM_ONLY_FLAGS) - older == {k for k in cfg if k in TIMM_ONLY_FLAGS}
    for k in set(cfg) & set(TIMM_ONLY_FLAGS):
        assert cfg[k] == TIMM_ONLY_FLAGS[k][0], k


def test_older_releases_recipe_keys_load_at_their_defaults(tmp_path) -> None:
    """Keys of flags older timm releases wrote (timm 0.4-0.9) load at their defaults; numbers by value."""
    path = _write(tmp_path, {"model": "resnet18", "aot_autograd": False, "apex_amp": False, "native_amp": False,
                             "amp_impl": "native", "bn_tf": False, "jsd": False, "lr_k_decay": 1, "data": None,
                             "data_dir": "/d", "layer_decay_min_scale": 0.0, "wandb_tags": []})
    args = _ours().parse_args(["-c", path])
    assert (args.model, args.data_dir) == ("resnet18", "/d")


def test_data_dir_wins_over_the_positional_data(tmp_path) -> None:
    """timm reads the positional DIR only when --data-dir is unset."""
    assert _ours().parse_args(["-c", _write(tmp_path, {"data": "/a", "data_dir": "/b"})]).data_dir == "/b"
    assert _ours().parse_args(["-c", _write(tmp_path, {"data": "/a"}), "--data-dir", "/c"]).data_dir == "/c"


@pytest.mark.parametrize("key, value, named", [
    ("torchscript", True, "torchscript: true sets a timm train.py flag that timm-split train does not implement "
                          "(use torchcompile); remove the key or set it to train.py's default, false."),
    ("bce_loss", True, "bce_loss: true sets a timm train.py flag"),
    ("pretrained", True, "give the weights file as initial_checkpoint"),
    ("lr_cycle_limit", 3, "lr_cycle_limit: 3 sets a timm train.py flag that timm-split train does not implement; "
                          "remove the key or set it to train.py's default, 1."),
    ("wandb_tags", ["a"], "wandb_tags: [\"a\"]"),
    ("torchscript", 0, "torchscript: 0 sets"),  # a boolean flag's default is false, not 0
])
def test_a_timm_only_flag_off_its_default_is_refused(tmp_path, capsys, key, value, named) -> None:
    """The recipe with one timm-only flag changed: one line naming the key, its value, why, and the fix."""
    cfg = dict(_timm_args(), **{key: value})
    line = _refused(capsys, _write(tmp_path, cfg))
    assert named in line, line


def test_several_timm_only_flags_off_their_defaults_in_one_line(tmp_path, capsys) -> None:
    cfg = dict(_timm_args(), bce_loss=True, bce_target_thresh=0.2, log_wandb=True)
    line = _refused(capsys, _write(tmp_path, cfg))
    for part in ("bce_loss: true (default false", "bce_target_thresh: 0.2 (default null", "log_wandb: true",
                 "remove these keys or set them to train.py's defaults"):
        assert part in line, (part, line)


def test_a_key_of_neither_is_refused_with_the_closest_flags(tmp_path, capsys) -> None:
    """Not ours, not train.py's: refused as unknown, with difflib's closest flags of either."""
    line = _refused(capsys, _write(tmp_path, dict(_timm_args(), lr_noise_pc=0.5, mixup_alpha=0.2)))
    assert "unknown keys lr_noise_pc (did you mean lr_noise_pct" in line and "mixup_alpha" in line, line
    assert "not timm-split train flags nor timm train.py's" in line
