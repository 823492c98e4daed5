"""Progress lines in a log without a terminal (issue 28): images/s and the time left of train, validate, sweep and
compare."""
import logging
import re
import time

import pytest

from timm_split.commands.main import main
from timm_split.commands.train import train, train_args
from timm_split.training.metrics import Throughput, format_seconds

from conftest import tiny_png_folder

NUM = r"([0-9.]+)"
ETA = r"([0-9:.]+s?|measuring)"


def _seconds(text: str) -> float:
    """``'4.2s'``, ``'01:05'`` or ``'1:02:05'`` in seconds (``'measuring'``: not known yet, inf)."""
    if text == "measuring":
        return float("inf")
    if text.endswith("s"):
        return float(text[:-1])
    out = 0.0
    for part in text.split(":"):
        out = 60 * out + float(part)
    return out


def _lines(records, pattern):
    return [m.groups() for m in (re.search(pattern, r.getMessage()) for r in records) if m]


def test_throughput_and_format_seconds():
    now = [10.0]
    pace = Throughput(4, clock=lambda: now[0])
    now[0] = 12.0
    pace.update(64)
    assert pace.rate() == 32 and pace.eta() == 6  # 2 s a step, 3 steps left
    pace.update(192, steps=3)
    assert pace.eta() == 0
    assert [format_seconds(s) for s in (4.24, 65, 3725)] == ["4.2s", "01:05", "1:02:05"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch non-TTY run of test_resnet S=2 on 40 images (5 batches of 8), its log records and folder."""
    folder = tiny_png_folder(tmp_path_factory)
    out = tmp_path_factory.mktemp("runs")
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("timm_split")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train(train_args(data_dir=folder, model="test_resnet", split=2, img_size=28, epochs=2, batch_size=8,
                         workers=0, lr=0.05, warmup_epochs=0, output=str(out), experiment="run", device="cpu",
                         log_interval=2), progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return folder, out / "run", records


@pytest.mark.timeout(120)
def test_train_log_has_images_per_second_and_eta(trained):
    _, _, records = trained
    steps = _lines(records, r"Train: (\d) \[(\d)/(\d)\] loss \S+ \(ce per member \S+, summed over the 2 members\) lr \S+, "
                   + NUM + r" img/s, epoch ETA " + ETA)
    # updates 0, 2 and the last (4) of each epoch
    assert [(int(e), int(i), int(n)) for e, i, n, _, _ in steps] == [(e, i, 5) for e in (0, 1) for i in (0, 2, 4)]
    assert all(float(rate) > 0 for *_, rate, _ in steps)
    for epoch in range(2):
        etas = [_seconds(eta) for e, *_, eta in steps if int(e) == epoch]
        assert etas[-1] == 0 and etas == sorted(etas, reverse=True), etas  # 0.1 s resolution: may be 0.0s
        assert etas[0] == float("inf")  # the first update (the loader's start) is not a pace: 'measuring'
    epochs = _lines(records, r"Train: (\d) done \(\d of 2\), (\d+) images in \S+, " + NUM + r" img/s; run ETA "
                    + ETA + r" \((\d) epochs? left\)")
    assert [(int(e), int(n), int(left)) for e, n, _, _, left in epochs] == [(0, 40, 1), (1, 40, 0)]
    assert all(float(rate) > 0 for _, _, rate, _, _ in epochs)
    assert _seconds(epochs[0][3]) > 0 and _seconds(epochs[1][3]) == 0


@pytest.mark.timeout(120)
def test_validate_logs_images_per_second_and_eta(trained, caplog):
    folder, run, _ = trained
    with caplog.at_level(logging.INFO, logger="timm_split"):
        assert main(["validate", "--checkpoint", str(run / "last.safetensors"), "--data-dir", folder, "-j", "0",
                     "-b", "4", "--log-freq", "2"]) == 0
    lines = _lines(caplog.records, r"Eval: \[(\d+)/(\d+)\] " + NUM + r" img/s, ETA " + ETA)
    assert [(int(i), int(n)) for i, n, _, _ in lines] == [(1, 5), (3, 5), (5, 5)]  # 20 images in batches of 4
    assert all(float(rate) > 0 for _, _, rate, _ in lines)
    assert lines[0][3] == "measuring"  # the first batch starts the loader: no pace yet
    assert _seconds(lines[0][3]) >= _seconds(lines[1][3]) >= _seconds(lines[-1][3]) == 0  # 0.1 s resolution


def test_validate_log_freq_must_not_be_negative(tmp_path, capsys):
    assert main(["validate", "--checkpoint", str(tmp_path / "w.pth"), "--log-freq", "-1"]) == 2
    assert "--log-freq must be >= 0" in capsys.readouterr().err


def _check_models(lines, names):
    want = [(k + 1, len(names), a) for k, a in enumerate(names)]
    assert [(int(i), int(n), name) for i, n, name, *_ in lines] == want
    etas = [_seconds(eta) for *_, eta in lines]
    assert all(_seconds(elapsed) >= 0 for *_, elapsed, _ in lines)
    assert etas[0] > 0 and etas[-1] == 0 and etas == sorted(etas, reverse=True), etas


def test_compare_logs_models_done_and_eta(monkeypatch, caplog):
    from timm_split.commands import compare

    monkeypatch.setattr(compare, "compare_rows", lambda name, *a, **k: time.sleep(0.05) or [{"model": name}])
    names = ["resnet18", "resnet34", "resnet50"]
    with caplog.at_level(logging.INFO, logger="timm_split"):
        rows = compare.compare_models(names, [2], progress=False)
    assert [r["model"] for r in rows] == names
    _check_models(_lines(caplog.records, r"compare: (\d)/(\d) models \((\w+)\), elapsed " + ETA + ", ETA " + ETA),
                  names)


@pytest.mark.timeout(60)
def test_sweep_logs_models_done_and_eta(tmp_path, monkeypatch, caplog):
    from timm_split.commands import sweep

    def fake(arch, splits, *args, **kwargs):
        time.sleep(0.05)
        return [dict(arch=arch, module="m", split=S, status="ok", reason="", seconds=0.05) for S in splits]

    monkeypatch.setattr(sweep, "sweep_one", fake)  # the forked workers inherit it
    with caplog.at_level(logging.INFO, logger="timm_split"):
        sweep.run_sweep(["a", "b", "c"], [2], str(tmp_path / "s.csv"), progress=False)
    _check_models(_lines(caplog.records, r"sweep: (\d)/(\d) models \((\w+): ok\), elapsed " + ETA + ", ETA " + ETA),
                  ["a", "b", "c"])
