"""The first hour of a new user (issue 37): the README as a newcomer meets it, and the numbers, labels and files the
commands it documents print and write. Fast: meta models and a tiny test_resnet only."""
import ast
import builtins
import logging
import os
import re

import pytest
import torch

from timm_split.commands.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme() -> str:
    with open(README) as f:
        return f.read()


def _blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", _readme(), flags=re.S)


# ------------------------------------------------------------------------------------------------- 1. README order
def test_install_line_for_the_machine_comes_first_and_no_sudo():
    text = _readme()
    cpu = text.index("--index-url https://download.pytorch.org/whl/cpu")
    first_install = text.index("pip install -e .")
    assert cpu < first_install, "the CPU-wheel line must come before (or with) the first pip install -e ."
    assert "sudo " not in text


def _undefined(code: str):
    """Names a snippet reads but neither imports nor assigns (nor are builtins): it would not run alone."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound)


def test_every_python_snippet_runs_alone():
    blocks = _blocks("python")
    assert len(blocks) >= 5
    for code in blocks:
        assert _undefined(code) == [], code


def test_first_example_shows_the_parity_the_headline_promises():
    import timm

    import timm_split

    first = _blocks("python")[0]
    call = re.search(r"timm\.create_model\((.*?)\)", first).group(1)
    assert "num_classes" not in call or "plan_at='model'" in first
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    plan = timm_split.plan_split(model, 4)
    assert abs(plan.params_ratio - 1) <= 0.02 and abs(plan.macs_ratio - 1) <= 0.04
    # the printed lines in the README are what the plan prints
    for line in str(plan).split("\n")[:3]:
        assert line in _readme(), line
    # the second, explained example: the cfg-planned head and the parity at the model's own head
    with torch.device("meta"):
        m100 = timm.create_model("resnet50", num_classes=100)
    cfg, own = timm_split.plan_split(m100, 4), timm_split.plan_split(m100, 4, plan_at="model")
    assert f"{cfg.params_ratio:.4f}" in _readme() and f"{own.params_ratio:.4f}" in _readme()
    assert abs(own.params_ratio - 1) <= 0.02


def test_no_internal_references():
    text = _readme()
    assert not re.search(r"\bissue \d+", text, flags=re.I)
    assert not re.search(r"(?<![\w/.-])[0-9a-f]{7}(?![\w.-])", text), re.findall(r"\b[0-9a-f]{7}\b", text)
    for jargon in ("seed's rule", "pre-registered", "amendment", "regime gate", "k = 1"):
        assert jargon not in text, jargon


def test_science_paragraph_is_scoped_and_linked():
    top = _readme().split("## Quick start")[0]
    for words in ("Fashion-MNIST", "500 training images", "ResNet-10", "0.31M", "1.2M", "docs/results.md",
                  "docs/science_budget.png"):
        assert words in top, words


# ------------------------------------------------------------------------------------- 2. generated sections only
def test_write_generated_keeps_hand_written_lines(tmp_path, caplog):
    from timm_split.generated import generated_sections, write_generated

    path = tmp_path / "doc.md"
    write_generated(str(path), {"table": "| a |\n|---|\n| 1 |"}, title="Doc", source="gen")
    text = path.read_text()
    assert text.startswith("# Doc\n") and "<!-- generated:table begin (gen) -->" in text
    path.write_text(text.replace("# Doc\n", "# Doc\n\nWritten by hand.\n") + "\nAlso by hand.\n")
    write_generated(str(path), {"table": "| a |\n|---|\n| 2 |"}, source="gen")
    text = path.read_text()
    assert "Written by hand." in text and "Also by hand." in text and "| 2 |" in text and "| 1 |" not in text
    assert generated_sections(str(path)) == {"table": "| a |\n|---|\n| 2 |"}
    # a file without markers: nothing lost, the section appended, a warning
    plain = tmp_path / "plain.md"
    plain.write_text("# Notes\n\nmine\n")
    with caplog.at_level(logging.WARNING, logger="timm_split"):
        write_generated(str(plain), {"table": "x"})
    assert plain.read_text().startswith("# Notes\n\nmine\n") and "x" in plain.read_text()
    assert "appended" in caplog.text
    # broken markers: refused, the file unchanged
    broken = tmp_path / "broken.md"
    broken.write_text("<!-- generated:table begin -->\nhand\n")
    with pytest.raises(ValueError, match="broken"):
        write_generated(str(broken), {"table": "x"})
    assert broken.read_text() == "<!-- generated:table begin -->\nhand\n"


def test_sweep_report_rewrites_only_the_generated_sections_of_zoo_md(tmp_path, capsys):
    from timm_split.generated import generated_sections

    md = tmp_path / "zoo.md"
    with open(os.path.join(ROOT, "docs", "zoo.md")) as f:
        before = f.read()
    md.write_text(before)
    assert main(["sweep", "--report", os.path.join(ROOT, "docs", "zoo.csv"), "--markdown", str(md)]) == 0
    after = md.read_text()
    outside = re.compile(r"<!-- generated:(\w+) begin.*?<!-- generated:\1 end -->", flags=re.S)
    hand = outside.sub("", before)
    assert len([line for line in hand.split("\n") if line.strip()]) > 90
    assert outside.sub("", after) == hand  # every hand-written line kept, in place
    assert generated_sections(str(md))["tables"] == generated_sections(os.path.join(ROOT, "docs", "zoo.md"))["tables"]


def test_every_docs_generator_writes_sections():
    """No generator that writes into docs/ opens its file for a whole rewrite: each writes marked sections."""
    found = []
    for folder in ("benchmarks", "timm_split"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        src = f.read()
                    if re.search(r"""["']docs["'],\s*["'][\w.-]+\.md["']""", src) or "docs/zoo.md" in src:
                        found.append(name)
                        assert "write_generated(" in src or "tables:begin" in src, name
    assert {"sweep.py", "plan_shape.py", "science.py"} <= set(found)
    with open(os.path.join(ROOT, "benchmarks", "speed.py")) as f:
        assert "write_generated(" in f.read()  # --markdown-out, e.g. docs/speed.md
    for rel in ("docs/zoo.md", "docs/plan_shape.md"):
        with open(os.path.join(ROOT, rel)) as f:
            assert "<!-- generated:" in f.read(), rel


# ------------------------------------------------------------------------------------ 3. one number, one quantity
def test_plan_table_and_by_module_total_agree():
    import timm

    import timm_split
    from timm_split.commands.compare import by_module_table, compare_rows

    rows = compare_rows("resnet18", [2], 64, check=False)
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    plan = timm_split.split(model, 2, img_size=64).split_plan
    assert plan.macs[0] / 1e9 == pytest.approx(rows[0]["gmacs"], rel=1e-9)
    assert plan.macs[1] / 1e9 == pytest.approx(rows[1]["gmacs"], rel=1e-9)
    assert plan.params == (rows[0]["params"], rows[1]["params"])
    table = by_module_table("resnet18", 2, 1, 64).split("\n")
    total = table[2].split()
    assert total[0] == "(total)"
    assert total[4] == f"{rows[0]['gmacs']:.4f}" and total[5] == f"{rows[1]['gmacs']:.4f}"
    assert total[1] == f"{rows[0]['params'] / 1e6:.3f}" and total[2] == f"{rows[1]['params'] / 1e6:.3f}"
    body = [line.rsplit(None, 6) for line in table[3:]]
    assert sum(float(b[4]) for b in body) == pytest.approx(rows[0]["gmacs"], abs=5e-4 * len(body))


def test_plot_has_honest_axes(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from timm_split.commands.compare import plot_rows

    seen = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (seen.append(self), real(self, *a, **k))[1])
    rows = [dict(model="m", split=1, params_ratio=1.0, gmacs_ratio=1.0),
            dict(model="m", split=2, params_ratio=1.004, gmacs_ratio=1.01)]
    plot_rows(rows, str(tmp_path / "p.png"))
    (fig,) = seen
    for ax, tol in zip(fig.axes, (0.02, 0.04)):
        lo, hi = ax.get_ylim()
        assert lo <= 1 - 2 * tol and hi >= 1 + 2 * tol  # a 1% difference does not fill the plot
        assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())  # parity drawn
        assert ax.patches, "the tolerance band"


# --------------------------------------------------------------------------------------- 4. labels that say so
def test_sweep_says_when_the_cpu_check_was_skipped():
    from timm_split.commands.sweep import cpu_skipped, summary_line, sweep_one

    (row,) = sweep_one("test_resnet", (2,), device="cpu", cpu_max_params=1)
    assert row["status"] == "ok" and row["cpu_checked"] is False
    assert row["reason"].startswith("cpu check skipped") and cpu_skipped(row)
    assert "skipped on 1" in summary_line([row], "x.csv")


def test_timm_model_tests_words_match_the_script():
    text = _readme()
    assert "timm_model_tests/run.py --force` reruns it" in text
    with open(os.path.join(ROOT, "benchmarks", "timm_model_tests", "run.py")) as f:
        assert "reused" in f.read()


def test_training_log_gives_the_ce_per_member():
    from timm_split.commands.train import member_ce_text

    assert "ce per member 2.4000, summed over the 4 members" == member_ce_text(9.6, 4)
    assert member_ce_text(1.5, 1) == "ce 1.5000"


# ---------------------------------------------------------------------- 5. one naming of Fashion-MNIST's classes
def test_a_checkpoint_of_either_fashion_mnist_source_validates_on_the_other(tmp_path, capsys, caplog):
    from conftest import fake_fashion_idx

    from timm_split.training.data import FASHION_MNIST_CLASSES, FashionMNIST, export_fashion_mnist

    (tmp_path / "idx").mkdir()
    idx = fake_fashion_idx(tmp_path / "idx", 4, 2)
    png = tmp_path / "png"
    export_fashion_mnist(str(png), idx_dir=idx)
    assert sorted(os.listdir(png / "train")) == list(FASHION_MNIST_CLASSES) == FashionMNIST.classes
    sources = {"png": ["--data-dir", str(png)], "idx": ["--dataset", "fashion_mnist", "--data-dir", idx]}
    common = ["--model", "test_resnet", "--split", "2", "--img-size", "28", "--epochs", "1", "-b", "8", "-j", "0",
              "--warmup-epochs", "0", "--no-progress", "--execution", "loop", "--checkpoint-hist", "1"]
    for trained, other in (("png", "idx"), ("idx", "png")):
        with caplog.at_level(logging.INFO, logger="timm_split"):
            assert main(["train", *sources[trained], *common, "--output", str(tmp_path / "runs"),
                         "--experiment", trained]) == 0, capsys.readouterr().err
        assert "training 1 epoch(s)" in caplog.text and "ce per member" in caplog.text
        ckpt = str(tmp_path / "runs" / trained / "model_best.safetensors")
        capsys.readouterr()
        assert main(["validate", "--checkpoint", ckpt, *sources[other], "-j", "0"]) == 0, capsys.readouterr().err
        assert "ensemble" in capsys.readouterr().out.lower()


def test_earlier_idx_class_names_still_validate():
    import argparse

    from timm_split.commands.validate import check_class_names
    from timm_split.training.data import FASHION_MNIST_CLASSES

    old = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    args = argparse.Namespace(data_dir="fmnist", checkpoint="c", num_classes=None)
    assert check_class_names(args, {"class_names": old, "num_classes": 10}, list(FASHION_MNIST_CLASSES)) == 10


# ------------------------------------------------------------------------------ 6. defaults that fit the machine
def test_workers_capped_at_the_cpu_count(monkeypatch, caplog):
    from timm_split.commands import train

    monkeypatch.setattr(train, "cpu_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="timm_split"):
        assert train.cap_workers(4) == 2
    assert "-j 4 loader workers on 2 CPU(s): using 2" in caplog.text
    assert train.cap_workers(1) == 1


# --------------------------------------------------------------- 7, 8. the example's run folder and stated times
def test_training_example_is_sized_and_timed_honestly():
    bash = "\n".join(_blocks("bash"))
    assert "--checkpoint-hist 1" in bash
    text = _readme()
    assert "387 s" in text and "load average 1.4-3.3" in text  # the time under load, beside the idle one


def test_test_command_time_states_its_load():
    text = _readme()
    para = text[text.index("pip install -e '.[dev]' && pytest"):][:900]
    assert "nothing else running" in para and "load average 2-3" in para


# ------------------------------------------------------------------- 9. one epoch numbering, the best beside the last
@pytest.fixture(scope="module")
def numbered_run(tmp_path_factory):
    """A 2-epoch CLI run whose evaluation is faked so that epoch 0 scores best (60%) and the last epoch 1 less
    (50%): ``(its folder, the log lines, stdout)``."""
    import contextlib
    import io

    from conftest import log_records, tiny_png_folder

    from timm_split.commands import train as tr

    folder = tiny_png_folder(tmp_path_factory)
    out = tmp_path_factory.mktemp("runs")
    scores = iter([60.0, 50.0])

    def fake_evaluate(run):
        top1 = next(scores)
        return dict(top1=top1, top5=100.0, loss=1.0, ece=0.1, members=[dict(top1=top1), dict(top1=top1 - 5)])

    stdout = io.StringIO()
    with log_records(level=logging.NOTSET) as records:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setattr(tr, "_evaluate", fake_evaluate)
            code = main(["train", "--data-dir", folder, "--model", "test_resnet", "--split", "2", "--img-size", "16",
                         "--epochs", "2", "-b", "8", "-j", "0", "--warmup-epochs", "0", "--no-progress",
                         "--execution", "loop", "--checkpoint-hist", "2", "--log-interval", "2", "--device", "cpu",
                         "--output", str(out), "--experiment", "r"])
    assert code == 0
    return out / "r", [r.getMessage() for r in records], stdout.getvalue()


@pytest.mark.timeout(300)
def test_every_epoch_number_of_the_last_epoch_agrees_with_its_checkpoint(numbered_run):
    import csv

    run, lines, stdout = numbered_run
    saved = sorted(int(m.group(1)) for m in (re.fullmatch(r"checkpoint-(\d+)\.safetensors", f)
                                             for f in os.listdir(run)) if m)
    assert saved == [0, 1]
    last = saved[-1]
    with open(run / "summary.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == saved
    text = "\n".join(lines + stdout.splitlines())
    assert not re.search(r"epoch \d+/\d+", text), "the old 1-based n/N form"
    # every epoch number a line prints, and its human count where it gives one
    numbered = [(int(e), int(k), int(n)) for e, k, n in re.findall(r"epoch (\d+) \((\d+) of (\d+)\)", text)]
    numbered += [(int(e), int(k), int(n)) for e, k, n in re.findall(r"Train: (\d+) done \((\d+) of (\d+)\)", text)]
    assert numbered and all(k == e + 1 and n == 2 for e, k, n in numbered), numbered
    progress = [int(e) for e in re.findall(r"Train: (\d+) \[", text)]
    assert max(e for e, _, _ in numbered) == max(progress) == last
    # the last epoch, as each kind of line names it
    for line in (f"Train: {last} [0/", f"Train: {last} done ({last + 1} of 2)", f"epoch {last} ({last + 1} of 2): loss",
                 f"at epoch {last} ({last + 1} of 2), the last;"):
        assert line in text, line
    plan = next(line for line in lines if line.startswith("training 2 epoch(s)"))
    assert "(epochs 0 to 1)" in plan


@pytest.mark.timeout(300)
def test_final_summary_gives_the_last_and_the_best_epoch_and_its_file(numbered_run):
    from timm_split.checkpoint import read_metadata, training_state

    run, lines, stdout = numbered_run
    out = stdout.strip().splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("test_resnet S=2: top-1 50.00%") and "at epoch 1 (2 of 2), the last;" in out[0]
    best = run / "model_best.safetensors"
    assert out[1] == (f"*** Best metric: top-1 60.00% at epoch 0 (1 of 2), an earlier epoch than the one above, "
                      f"in {best}")
    assert training_state(read_metadata(str(best)))["epoch"] == 1  # model_best holds epoch 0 (epochs done: 1)
    assert f"*** Best metric: top1 60.0000 at epoch 0 (1 of 2), in {best}" in lines  # timm's log line
    import json
    with open(run / "results.json") as f:
        results = json.load(f)
    assert (results["best_epoch"], results["final_epoch"], results["best_checkpoint"]) == (0, 1, str(best))
    assert 0 < results["train_seconds"] < results["wall_seconds"]  # the training loops' time, and the whole call's
    assert re.search(r"; trained in [0-9.:]+s? \(wall [0-9.:]+s? with setup, evaluation and checkpoints\); ", out[0])


def test_summary_lines_when_the_best_is_the_last_and_for_a_loss_metric():
    import argparse

    from timm_split.commands.train import summary_lines

    final = dict(top1=70.0, top5=99.0, loss=0.5, ece=0.02, members=[dict(top1=68.0)])
    results = dict(final=final, final_epoch=9, best_metric=70.0, best_epoch=9, best_checkpoint="r/model_best.st",
                   params=1e6, gmacs=0.1, train_seconds=12.0, output="r")
    args = argparse.Namespace(model="m", split=1, epochs=10, eval_metric="top1")
    first, best = summary_lines(args, results)
    assert "at epoch 9 (10 of 10), the last;" in first
    assert best == "*** Best metric: top-1 70.00% at epoch 9 (10 of 10), the epoch above, in r/model_best.st"
    args.eval_metric = "loss"
    assert summary_lines(args, dict(results, best_metric=0.4, best_epoch=3))[1].startswith(
        "*** Best metric: NLL 0.4000 at epoch 3 (4 of 10), an earlier epoch than the one above")
    # a resume with nothing left to train: no evaluation, only the best the checkpoint recorded
    assert summary_lines(args, dict(results, final=None, final_epoch=None, best_metric=0.4, best_epoch=3)) == [
        "*** Best metric: NLL 0.4000 at epoch 3 (4 of 10), in r/model_best.st"]


# ------------------------------------------------------------------------------------- 10. an ETA that is honest
def test_eta_leaves_out_the_first_update_and_says_so_until_it_can():
    import math

    from timm_split.training.metrics import RunEstimate, Throughput, eta_text

    now = [0.0]
    pace = Throughput(10, clock=lambda: now[0], warmup=1)
    now[0] = 20.0  # the first step: the loader's workers start, the kernels warm up
    pace.update(8)
    assert pace.eta() == math.inf and eta_text(pace.eta()) == "measuring"
    for _ in range(2):  # then 1 s a step
        now[0] += 1.0
        pace.update(8)
    assert pace.step_seconds() == 1.0 and pace.eta() == 7.0  # not 22 s / 3 steps * 7 = 51 s
    assert eta_text(pace.eta()) == "7.0s" and eta_text(3725.0) == "1:02:05"
    # the run: the epochs after this one at this epoch's steady pace (10 s each), while no epoch is done
    now[0] = 0.0
    est = RunEstimate(4, clock=lambda: now[0])
    est.begin(0, 10, warmup=1)
    now[0] = 20.0
    est.update(8)
    for _ in range(3):
        now[0] += 1.0
        est.update(8)
    assert est.left(0) == (6.0 + 3 * 10.0, False)
    for _ in range(6):
        now[0] += 1.0
        est.update(8)
    est.trained()
    now[0] += 2.0  # evaluation and checkpoints
    assert est.finish()["steady"] == 12.0  # 39 s less the first update's 19 s start-up
    est.begin(1, 10, warmup=1)  # the first update of a later epoch: its rest at the epochs' pace
    now[0] += 1.0
    est.update(8)
    assert est.left(1) == (pytest.approx(10.0 * 9 / 10 + 2.0 + 2 * 12.0), True)


def test_the_last_line_labels_its_times():
    """The last line's time is the training loops' (``train_seconds``), labelled, beside the command's wall time
    (setup, evaluation and checkpoints included); a resumed run's training time counts every process."""
    import argparse

    from timm_split.commands.train import summary_lines, time_text

    results = dict(train_seconds=364.2, wall_seconds=428.6)
    assert time_text(results) == "trained in 6:04 (wall 7:09 with setup, evaluation and checkpoints)"
    assert time_text(results, resumed=True) == ("trained in 6:04 over the run's processes (this one: wall 7:09 with "
                                                "setup, evaluation and checkpoints)")
    assert time_text(dict(train_seconds=42.0)) == "trained in 42.0s"  # a results.json written before wall_seconds
    final = dict(top1=70.0, top5=99.0, loss=0.5, ece=0.02, members=[dict(top1=68.0)])
    line = summary_lines(argparse.Namespace(model="m", split=1, epochs=10, eval_metric="top1", resume=""),
                         dict(results, final=final, final_epoch=9, params=1e6, gmacs=0.1, output="runs/r"))[0]
    assert line.endswith("; 1.000M params, 0.1000 GMACs; trained in 6:04 (wall 7:09 with setup, evaluation and "
                         "checkpoints); runs/r"), line
