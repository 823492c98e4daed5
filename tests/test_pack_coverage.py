"""benchmarks/pack_coverage.py without running a check: the rule that builds an over-cap architecture smaller
(on the meta device), the (arch, split) resume of its CSV and the per-S report."""
import csv
import os

import pytest
from conftest import load_benchmark

pc = load_benchmark("pack_coverage")


@pytest.mark.parametrize("arch, cap, built_as", [
    ("vit_tiny_patch16_224", 2e6, "depth=2"),  # an int depth: 12 -> 2
    ("resnet18", 6e6, "layers=(1,1,1,1)"),  # blocks per stage, passed by the entrypoint without a default
    ("naflexvit_base_patch16_gap", 30e6, "depth=2"),  # a field of the dataclass config NaFlexVit takes
])
def test_depth_shortening_builder_on_meta(arch, cap, built_as):
    name, kwargs, params, got = pc.pick_build(arch, cap)
    assert (name, got) == (arch, built_as)
    assert params <= cap < pc._count(pc._meta_model(arch))
    assert pc._count(pc._meta_model(arch, **kwargs)) == params  # what built_as says is what is counted
    if arch.startswith("vit"):
        assert len(pc._meta_model(arch, **kwargs).blocks) == 2


def test_under_the_cap_is_built_as_itself():
    assert pc.pick_build("resnet18", 30e6)[1:] == ({}, 11_181_642, "")  # 10-class head counted, not 1000


def test_shorter_values():
    assert pc._shorter(12) == 2 and pc._shorter(1) == 1 and pc._shorter(True) is None
    assert pc._shorter((3, 4, 0, 3)) == (1, 1, 0, 1)
    assert pc._shorter([[1, 3, 0], [2, 2, 0]]) == [[1, 1, 0], [1, 1, 0]]
    assert pc._shorter((3, 4, 10, 3), halve=1) == (2, 2, 5, 2)
    assert pc._shorter(("a", 2)) is None and pc._shorter(()) is None and pc._shorter(2.0) is None


def test_module_fallback_when_depth_cannot_shorten():
    # IFormer asserts three blocks per attention group, so no shorter depths build; iformer_t is the module's smallest
    assert pc.pick_build("iformer_s", 5e6)[1:] == ({}, 2_632_026, "arch:iformer_t")


def test_too_big_says_why():
    with pytest.raises(pc.TooBig) as e:
        pc.pick_build("vgg11", 30e6)
    assert "VGG.__init__ takes no depth-like" in str(e.value) and "module vgg" in str(e.value)


def _fake_child(conn, arch, options):
    conn.send(dict(arch=arch, module="m", split=options["split"], status="ok", packed_ok=True, fully_packed=True,
                   looped_ops=0, built_as="depth=2", seconds=0.1))


def test_resume_is_keyed_by_arch_and_split_and_reads_old_rows(tmp_path, monkeypatch):
    out = str(tmp_path / "cov.csv")
    old = [f for f in pc.FIELDS if f not in ("built_as", "built_params")]  # a CSV written before the new columns
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow(dict(arch="a", module="m", split=2, status="ok", packed_ok=True, fully_packed=True, seconds=1))
    monkeypatch.setattr(pc, "_child", _fake_child)
    rows = pc.run(["a", "b"], out, splits=[2, 4])
    assert sorted((r["arch"], int(r["split"])) for r in rows) == [("a", 2), ("a", 4), ("b", 2), ("b", 4)]
    with open(out, newline="") as f:
        assert tuple(next(csv.reader(f))) == pc.FIELDS  # the new columns at the end
    back = pc._read(out)
    assert [r["built_as"] for r in back] == ["", "depth=2", "depth=2", "depth=2"]  # the old row reads ''
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(pc.run(["a", "b"], out, splits=[2, 4])) == 4  # all done: nothing runs again
    rows = pc.run(["a", "b"], out, splits=[2, 4], redo=["too_big"])
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)  # no too_big row: none redone


def test_report_per_split():
    rows = [dict(arch="a", split="2", status="ok", packed_ok="True", fully_packed="True", built_as="depth=2"),
            dict(arch="b", split="2", status="ok", packed_ok="True", fully_packed="False", looped_ops="3",
                 failing_op="torch.lstm"),
            dict(arch="a", split="4", status="mismatch", packed_ok="False", fully_packed="False", built_as="depth=2"),
            dict(arch="c", split="4", status="too_big", failing_op="40.0M params as built, over 30M")]
    text = pc.report(rows)
    s2, s4 = text.split("S=4")
    assert s2.startswith("S=2: 2 architectures; of the 2 that split (1 built smaller") and "packed_ok 2/2" in s2
    assert "fully packed (no op run per member) 1/2" in s2
    assert "a (depth=2)" in s2 and "b: ok, packed_ok=True, looped_ops=3: torch.lstm" in s2 and "  a" not in s2
    assert s4.startswith(": 2 architectures, 1 too_big; of the 1 that split") and "packed_ok 0/1" in s4
    assert "a [depth=2]: mismatch, packed_ok=False" in s4 and "c: too_big: 40.0M params as built, over 30M" in s4
