"""Progress lines in a log without a terminal (issue 28): images/s and the time left of train, validate, sweep and
compare."""
import logging
import re
import time

import pytest

from timm_split.commands import train as tr
from timm_split.commands.main import main
from timm_split.commands.train import train, train_args
from timm_split.training.metrics import RunEstimate, Throughput, clock_text, duration_text, format_seconds

from conftest import log_records, tiny_png_folder

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
    with log_records() as records:
        train(train_args(data_dir=folder, model="test_resnet", split=2, img_size=28, epochs=2, batch_size=8,
                         workers=0, lr=0.05, warmup_epochs=0, output=str(out), experiment="run", device="cpu",
                         log_interval=2), progress=False)
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
    epochs = _lines(records, r"Train: (\d) done \(\d of 2\), (\d+) images in \S+, " + NUM + r" img/s; run: about "
                    + ETA + r" left, (1 epoch after this one|the last epoch's evaluation and checkpoints)")
    assert [(int(e), int(n), left[0]) for e, n, _, _, left in epochs] == [(0, 40, "1"), (1, 40, "t")]
    assert all(float(rate) > 0 for _, _, rate, _, _ in epochs)
    assert _seconds(epochs[0][3]) > 0


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


# ------------------------------------------------------------------- one estimate of the time left (issue 37)
def test_durations_and_times_of_day_cannot_be_confused():
    assert [duration_text(s) for s in (4.24, 65, 280, 3725)] == ["4.2s", "1:05", "4:40", "1:02:05"]
    now = 1_800_000_000.0
    today, tomorrow = clock_text(now + 300, now), clock_text(now + 86_400, now)
    assert re.fullmatch(r"\d\d:\d\d \S+", today), today  # a time of day names its zone
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d \S+", tomorrow), tomorrow


def test_run_estimate_leaves_out_one_off_costs():
    """Epoch 0 of 5 steps: its first update also starts the loader (4 s) and 'auto' times for 50 s, its evaluation
    takes 3 s plus 10 s of 'auto'; then 1 s a step. The estimate counts 8 s an epoch (5 s training, 3 s the rest)."""
    now, spent = [0.0], [0.0]
    est = RunEstimate(3, clock=lambda: now[0], one_off=lambda: spent[0], now=lambda: 1e9)
    assert est.begin(0, 5, warmup=1) is est.pace
    now[0] += 55.0  # the first update: 1 s, 4 s of start-up, 50 s of 'auto'
    spent[0] += 50.0
    est.update(8)
    assert est.left(0)[0] == float("inf") and est.text(0) == "measuring"  # no pace yet
    for _ in range(4):
        now[0] += 1.0
        est.update(8)
    assert est.left(0) == (2 * 5.0, False), "training only until an evaluation is timed"
    assert "+ the evaluations, not timed yet (ending after" in est.text(0)
    est.trained()
    now[0] += 13.0
    spent[0] += 10.0
    took = est.finish()
    assert took == dict(wall=72.0, auto=60.0, startup=4.0, steady=8.0)
    assert est.epoch_seconds() == 8.0 and est.left(0) == (16.0, True)  # not 2 * 72 s
    assert est.text(0, " for the 2 epochs after it").startswith(
        "about 16.0s left for the 2 epochs after it (ending near ")
    # epoch 1: every line says 16 s less the time since epoch 0 ended
    est.begin(1, 5, warmup=1)
    for elapsed in range(1, 6):
        now[0] += 1.0
        est.update(8)
        assert est.left(1) == (16.0 - elapsed, True), elapsed
    est.trained()
    now[0] += 3.0
    assert est.finish() == dict(wall=8.0, auto=0.0, startup=0.0, steady=8.0), "no start-up after the first epoch"
    assert est.left(1) == (8.0, True)


@pytest.mark.timeout(300)
def test_train_eta_lines_agree_and_leave_out_auto(tmp_path_factory, monkeypatch):
    """The trainer's lines on a fake clock: 1 s a step, 3 s an evaluation; epoch 0's first update also takes 4 s
    of start-up and 50 s of 'auto' timing, its evaluation 10 s of 'auto'. The 'epoch 0 took' line's estimate leaves
    them out (2 epochs of 8 s, not of 72 s), and every later line says that less the time since."""
    folder = tiny_png_folder(tmp_path_factory)
    now, spent, evals = [0.0], [0.0], []

    def step(run, value):  # once a training step, before its backward
        first = now[0] == 0.0
        now[0] += 1.0 + (54.0 if first else 0.0)
        spent[0] += 50.0 if first else 0.0

    def fake_evaluate(run):
        now[0] += 3.0 + (10.0 if not evals else 0.0)
        spent[0] += 10.0 if not evals else 0.0
        evals.append(now[0])
        return dict(top1=50.0, top5=100.0, loss=1.0, ece=0.1, members=[dict(top1=50.0), dict(top1=45.0)])

    monkeypatch.setattr(tr, "_clock", lambda: now[0])
    monkeypatch.setattr(tr, "_one_off_seconds", lambda: spent[0])
    monkeypatch.setattr(tr, "_check_finite", step)
    monkeypatch.setattr(tr, "_evaluate", fake_evaluate)
    with log_records() as records:
        results = train(train_args(data_dir=folder, model="test_resnet", split=2, img_size=16, epochs=3, batch_size=8,
                                   workers=0, warmup_epochs=0, output=str(tmp_path_factory.mktemp("runs")),
                                   experiment="eta", device="cpu", log_interval=1, execution="loop"), progress=False)
    lines = [r.getMessage() for r in records]
    (took,) = [line for line in lines if line.startswith("epoch 0 (1 of 3) took")]
    assert took.startswith("epoch 0 (1 of 3) took 1:12 with its evaluation and checkpoints (1:00 of 'auto' timing "
                           "its candidates, 4.0s of the first update's start-up (loader, warm-up): one-off, left out "
                           "of the estimate); run: about 16.0s left for the 2 epochs after it (ending near "), took
    left = [(line.split(" ", 3)[:3], _seconds(m.group(1)), "not timed yet" in line)
            for line in lines if line.startswith("Train:")
            for m in [re.search(r"run: (?:about )?" + ETA, line)]]
    assert [x for x in left if x[0][1] == "0"] == [
        (["Train:", "0", "[0/5]"], float("inf"), False), (["Train:", "0", "[1/5]"], 13.0, True),
        (["Train:", "0", "[2/5]"], 12.0, True), (["Train:", "0", "[3/5]"], 11.0, True),
        (["Train:", "0", "[4/5]"], 10.0, True), (["Train:", "0", "done"], 10.0, True)]
    later = [(seconds, timed) for (_, epoch, _), seconds, timed in left if epoch in ("1", "2")]
    # epoch 1's steps at 73..77 s, its evaluation to 80 s, epoch 2's steps at 81..85 s: 16 s less the time since 72 s
    clock = [73, 74, 75, 76, 77, 77, 81, 82, 83, 84, 85, 85]
    assert later == [(16.0 - (t - 72), False) for t in clock]
    assert evals == [72.0, 80.0, 88.0] and results["wall_seconds"] > 0
