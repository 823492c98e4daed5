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
