"""`timm-split compare` (issue 5): outputs and errors."""
import csv
import io
import json

import pytest

from timm_split.commands.main import main
from timm_split.count import count_by_module


def _run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.timeout(300)
def test_json_schema_and_ratios(capsys):
    out = _run(capsys, "compare", "resnet18", "--split", "2", "4", "--format", "json", "--img-size", "64")
    rows = json.loads(out)
    assert [r["split"] for r in rows] == [1, 2, 4]
    keys = {"model", "split", "img_size", "params", "gmacs", "gmacs_mac_only", "params_ratio", "gmacs_ratio",
            "members", "counter_check", "width_factor", "meta"}
    assert all(keys <= set(r) for r in rows)
    base = rows[0]
    assert base["params_ratio"] == 1.0 and len(base["members"]) == 1 and base["img_size"] == 64
    for r in rows[1:]:
        assert len(r["members"]) == r["split"]
        assert r["params"] == sum(m["params"] for m in r["members"])
        assert abs(r["params_ratio"] - 1) <= 0.02 and abs(r["gmacs_ratio"] - 1) <= 0.04
        assert r["counter_check"] is not None and r["counter_check"] < 1e-3
    assert base["params"] == 11689512  # timm resnet18


@pytest.mark.timeout(300)
def test_table_csv_md_and_per_member(capsys):
    table = _run(capsys, "compare", "resnet18", "--split", "2", "--img-size", "64", "--per-member")
    assert "params_ratio" in table and "member 1" in table and table.count("resnet18") == 2
    rows = list(csv.DictReader(io.StringIO(_run(capsys, "compare", "resnet18", "--split", "2", "--img-size",
                                                "64", "--format", "csv"))))
    assert [r["split"] for r in rows] == ["1", "2"] and float(rows[1]["width_factor"]) == pytest.approx(2 ** -0.5)
    md = _run(capsys, "compare", "resnet18", "--split", "2", "--img-size", "64", "--format", "md")
    assert md.splitlines()[0].startswith("| model | split") and md.splitlines()[1].startswith("|---")


@pytest.mark.timeout(300)
def test_plot_writes_png(capsys, tmp_path):
    png = tmp_path / "cost.png"
    _run(capsys, "compare", "resnet18", "--split", "2", "4", "--img-size", "64", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "resnet5"])
    assert "unknown model 'resnet5'; did you mean: resnet50" in capsys.readouterr().err
    for bad in (["--split", "0"], ["--split", "x"], ["--img-size", "-3"], ["--img-size", "big"]):
        with pytest.raises(SystemExit):
            main(["compare", "resnet18", *bad])
        assert "must be an int >=" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_by_module(capsys):
    import timm
    m = timm.create_model("resnet18")
    parts = count_by_module(m, 64, depth=1)
    assert parts[""][0] == sum(p.numel() for p in m.parameters())
    assert sum(v[0] for k, v in parts.items() if k) == parts[""][0]
    assert sum(v[1] for k, v in parts.items() if k) == pytest.approx(parts[""][1], rel=1e-6)
    out = _run(capsys, "compare", "resnet18", "--split", "2", "--img-size", "64", "--by-module", "1")
    assert "by module (depth 1)" in out and "layer4" in out and "fc" in out
