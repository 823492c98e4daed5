"""benchmarks/science.py's analysis: the Student t quantile and Welch interval without scipy, and amendment 1's
report (a verdict per budget, the statement over budgets, the budget plot) on fake run records."""
import functools
import json
import math
import os
from typing import Any, Dict, List

import numpy as np
import pytest
from conftest import load_benchmark

load_benchmark("science_views")
sci = load_benchmark("science")

N = 10_000  # test images
LABELS = np.random.default_rng(0).integers(0, 10, N)
PARAMS = {0.5: 78_270, 1.0: 310_226, 2.0: 1_235_226}  # the unsplit width-k networks (the gate records)


# ----------------------------------------------------------------------------------------------------------
# t quantile and Welch interval


@pytest.mark.parametrize("df, want", [(1, 12.7062), (10, 2.2281), (38, 2.0244), (1000, 1.9623)])
def test_t_quantile_known_values(df: float, want: float) -> None:
    assert sci.t_quantile(0.975, df) == pytest.approx(want, abs=5e-5)


def test_t_quantile_non_integer_df() -> None:
    t37, t375, t38 = (sci.t_quantile(0.975, df) for df in (37, 37.5, 38))
    assert t38 < t375 < t37
    assert t375 == pytest.approx(2.025281, abs=1e-6)  # scipy.stats.t.ppf(0.975, 37.5)
    assert sci.t_quantile(0.025, 37.5) == pytest.approx(-t375, abs=1e-12)
    assert sci.t_quantile(0.5, 3.3) == pytest.approx(0.0, abs=1e-12)


def test_welch_ci_by_hand() -> None:
    # equal variances (1) and sizes (3): se^2 = 1/3 + 1/3, df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4; t_0.975(4) = 2.7764
    d, lo, hi = sci.welch_ci([3, 4, 5], [1, 2, 3])
    half = 2.776445 * math.sqrt(2 / 3)
    assert (d, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    # unequal: b var 3.729/4, a var 1/3; Welch-Satterthwaite df 4.769 (scipy's ttest_ind interval below)
    b, a = [3, 5, 7, 6.5], [1, 2, 3]
    vb, va = np.var(b, ddof=1) / 4, np.var(a, ddof=1) / 3
    assert (vb + va) ** 2 / (vb ** 2 / 3 + va ** 2 / 2) == pytest.approx(4.769233, abs=1e-6)
    assert sci.welch_ci(b, a) == pytest.approx((3.375, 0.589177, 6.160823), abs=1e-6)
    assert all(math.isnan(v) for v in sci.welch_ci([1.0], [1.0, 2.0])[1:])


# ----------------------------------------------------------------------------------------------------------
# the statement over budgets


def test_budget_statement() -> None:
    k1, k2, k4 = (1.0, 310_226), (2.0, 1_235_226), (4.0, 4_900_000)
    st = sci.budget_statement
    assert "splitting does not pay up to 1,235,226 params" in st([(*k1, "no"), (*k2, "no")])
    assert "the crossover lies between 310,226 and 1,235,226 params" in st([(*k1, "no"), (*k2, "yes")])
    assert "the crossover lies between 1,235,226 and 4,900,000 params" in st([(*k1, "no"), (*k2, "no"), (*k4, "yes")])
    for vs in (("yes", "no"), ("no", "inconclusive"), ("yes", "yes"), ("no", "yes", "no")):
        assert "Statement: unresolved." in st([(*b, v) for b, v in zip((k1, k2, k4), vs)])
    text = st([(*k1, "incomplete: 5 of 20 seeds"), (2.0, None, "incomplete: 0 of 20 seeds")])
    assert "k=1 (310,226 params): incomplete: 5 of 20 seeds; k=2: incomplete: 0 of 20 seeds" in text
    assert "Statement: pending" in text


def test_power_law_fits_recover_the_exponent() -> None:
    law = [(p, 1e3 * p ** -0.25, 0.1, 20) for p in (78_270, 310_226, 1_235_226)]  # error = 1000 * params^-0.25
    lines = sci.power_law_lines({"single": law, "s2": law[1:], "s4": [(p, e, h, 3) for p, e, h, _ in law]})
    text = "\n".join(lines)
    assert "* single: error = 1e+03 x params^-0.250 (3 budgets, 78,270-1,235,226 params; largest residual 0.0%" in text
    assert "* s2: error = 1e+03 x params^-0.250 (2 budgets, 310,226-1,235,226 params; the line passes" in text
    assert "s4" not in text  # incomplete cells (3 of 20 seeds) are not fitted
    assert sci.power_law_lines({"single": law[:1]}) == []


# ----------------------------------------------------------------------------------------------------------
# fake records (the keys run_one writes) and the report


def _metrics(top1: float, S: int) -> Dict[str, Any]:
    m = {"top1": top1, "top5": 99.0, "ece": 0.02, "nll": 0.5}
    return {"ensemble": m, "members": [dict(m, top1=top1 - 0.5)] * S}


def _record(records: str, stage: str, arm: str, k: float, seed: int, acc: float) -> None:
    """Write one run's .npz and .json: random logits whose argmax is the label on about ``acc`` % of LABELS."""
    rng = np.random.default_rng([seed, int(100 * acc), int(10 * k)])
    logits = rng.normal(size=(N, 10)).astype(np.float32)
    wrong = (LABELS + 1 + rng.integers(0, 9, N)) % 10
    logits[np.arange(N), np.where(rng.random(N) < acc / 100, LABELS, wrong)] += 10
    st, spec, S = sci.Setting(width=k, per_class=50, epochs=300), sci.Spec(stage, arm, k, seed), sci.ARMS[arm]["S"]
    base, params = PARAMS[k], PARAMS[k] + 1_000 * (S - 1)
    folder = os.path.join(records, stage)
    os.makedirs(folder, exist_ok=True)
    np.savez_compressed(os.path.join(folder, spec.run_id(st) + ".npz"), ensemble_logits=logits.astype(np.float16),
                        member_pred=np.stack([logits.argmax(1)] * S).astype(np.uint8))
    rec = {"id": spec.run_id(st), "stage": stage, "kind": "grid", "arm": arm, "arch": st.arch, "width": k,
           "seed": seed, "split": S, "config": sci._record_config(spec, st), "params": params, "gmacs": 0.004 * k,
           "member_params": [params // S] * S, "member_gmacs": [0.004 * k / S] * S, "base_params": base,
           "base_gmacs": 0.004 * k, "params_ratio": params / base, "gmacs_ratio": 1.0, "plan_ratios": None,
           "test": _metrics(float((logits.argmax(1) == LABELS).mean() * 100), S), "train_clean": _metrics(95.0, S),
           "train_last_epoch": {"loss": 0.8 * S, "ce": 0.8 * S, "cot": 0.0, "ce_per_member": 0.8},
           "train_images": 500, "train_seconds": 60.0, "wall_seconds": 61.0, "device": "cpu", "amp": False,
           "channels_last": False, "torch": "fake", "threads": 1, "finished_utc": "2026-12-05T00:00:00Z"}
    with open(os.path.join(folder, spec.run_id(st) + ".json"), "w") as f:
        json.dump(rec, f)


def _runs(records: str, stage: str, k: float, accs: Dict[str, float], seeds: int) -> None:
    for seed in range(seeds):
        noise = 0.3 * np.sin(seed + 1)
        for arm, acc in accs.items():
            _record(records, stage, arm, k, seed, acc + noise)


@pytest.fixture(autouse=True)
def _quick_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 bootstrap replicates instead of 10,000: these cases are far from the rule's bounds."""
    monkeypatch.setattr(sci, "paired_bootstrap_ci", functools.partial(sci.paired_bootstrap_ci, reps=400))


def _block_of(lines: List[str], head: str) -> str:
    text = "\n".join(lines)
    start = text.index(head)
    return text[start:text.find("\n### ", start + 1)]


def test_amendment_verdicts_no_then_yes(tmp_path) -> None:
    records = str(tmp_path / "records")
    _runs(records, "t1", 1.0, {"single": 80.0, "s2": 78.0}, 20)  # s2 two points worse on every seed: no
    _runs(records, "t1", 2.0, {"single": 80.0, "s2": 85.0}, 20)  # s2 five points better on every seed: yes
    lines = sci.amendment_report(sci.load_records(records), LABELS)
    assert lines[0] == "## Amendment 1: a verdict per budget"
    assert "**Verdict (amendment 1 rule): no.**" in _block_of(lines, "### t1: resnet10 k=1,")
    assert "**Verdict (amendment 1 rule): yes.**" in _block_of(lines, "### t1: resnet10 k=2,")
    assert "(20 paired seeds)" in _block_of(lines, "### t1: resnet10 k=2,")
    assert ("k=1 (310,226 params): no; k=2 (1,235,226 params): yes. **Statement: the crossover lies between "
            "310,226 and 1,235,226 params.**") in "\n".join(lines)
    i = next(i for i, line in enumerate(lines) if line.startswith("**Power-law fits**"))
    assert lines[i + 2].startswith("* single: error = ")
    assert lines[-2].startswith("**Crossover (extrapolation, decides nothing):** the power laws of s2 and single")


def test_report_incomplete_t3_grid_and_plot(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    records, md, png = str(tmp_path / "records"), str(tmp_path / "results.md"), str(tmp_path / "budget.png")
    _runs(records, "t1", 1.0, {"single": 80.0, "s2": 81.0}, 3)
    _runs(records, "t1", 2.0, {"single": 82.0}, 3)
    _runs(records, "t3", 2.0, {"s4": 83.0}, 3)
    _runs(records, "t3", 0.5, {"single": 78.0}, 2)
    _runs(records, "grid", 1.0, {"single": 80.0, "s2": 81.0}, 2)
    with open(md, "w") as f:
        f.write("# x\n<!-- tables:begin (generated by benchmarks/science.py --report) -->\nold\n<!-- tables:end -->\n")
    monkeypatch.setattr(sci, "_idx", lambda data_dir, name: LABELS)
    sci.write_report(records, md, "unused", png)
    text = open(md).read()
    assert "old" not in text and text.index("## Amendment 1: a verdict per budget") < text.index("### t1: ")
    assert "**Verdict (amendment 1 rule): incomplete: 3 of 20 seeds.**" in text
    assert ("k=1 (310,226 params): incomplete: 3 of 20 seeds; k=2 (1,235,226 params): incomplete: 0 of 20 seeds. "
            "**Statement: pending") in text
    t3 = text[text.index("### t3: resnet10 k=2,"):]
    assert "| single (t1) | 1 | 3 |" in t3 and "(3 paired seeds)" in t3
    assert "**Decision rule applied (secondary): incomplete: 3 of 20 seeds.**" in t3
    assert "### t3: resnet10 k=0.5," in text
    grid = text[text.index("## Stage 2: the grid"):]
    assert "### grid: resnet10 k=1," in grid and "**Verdict (pre-registered rule): " in grid
    assert "### t1" not in grid and "### t3" not in grid and "amendment 1" not in grid
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_report_refuses_to_pool_records_of_different_code(tmp_path) -> None:
    """Amendment 2: records of one setting made by different code (hash), or with and without provenance, are
    never pooled; one code gives one line naming its revision."""
    records = str(tmp_path / "records")
    _runs(records, "t2", 2.0, {"single": 80.0, "s2": 81.0}, 2)
    folder = os.path.join(records, "t2")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    for n in names:
        path = os.path.join(folder, n)
        rec = json.load(open(path))
        rec["provenance"] = {"git_rev": "abcdef0123456789", "git_dirty": False, "code_sha256": "a" * 64}
        json.dump(rec, open(path, "w"))
    line = sci.code_line(sci.load_records(records))
    assert line == "Code: revision abcdef0123 (clean); code hash aaaaaaaaaaaaaaaa (all 4 records)."
    rec = json.load(open(os.path.join(folder, names[0])))
    rec["provenance"]["code_sha256"] = "b" * 64
    json.dump(rec, open(os.path.join(folder, names[0]), "w"))
    with pytest.raises(SystemExit, match="records of different code in one setting"):
        sci.code_line(sci.load_records(records))
    rec.pop("provenance")
    json.dump(rec, open(os.path.join(folder, names[0]), "w"))
    with pytest.raises(SystemExit, match="no provenance"):
        sci.code_line(sci.load_records(records))


def test_crossover_of_two_power_laws() -> None:
    """error = 100 p^-0.1 (single) and 1000 p^-0.3 (s2) meet where p^0.2 = 10: p = 10^5."""
    fits = {"single": (2.0, -0.1), "s2": (3.0, -0.3)}
    assert math.isclose(sci.crossover(fits), 1e5, rel_tol=1e-9)
    assert math.isnan(sci.crossover({"single": (2.0, -0.1), "s2": (3.0, -0.1)}))
    la, b = sci.power_fit([1e3, 1e4, 1e5], [100 * p ** -0.1 for p in (1e3, 1e4, 1e5)])
    assert math.isclose(la, 2.0, abs_tol=1e-9) and math.isclose(b, -0.1, abs_tol=1e-9)


def _add_member_logits(records: str, stage: str, scale: float, arm: str) -> None:
    """Give the ``arm`` records of ``stage`` amendment 2's arrays: member logits (the ensemble's times ``scale``,
    plus noise per member) and OOD logits (flat: low confidence)."""
    folder = os.path.join(records, stage)
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".npz") and n.startswith(arm + "-")):
        path = os.path.join(folder, name)
        with np.load(path) as z:
            ens, pred = z["ensemble_logits"].astype(np.float32) * scale, z["member_pred"]
        rng = np.random.default_rng(len(name))
        members = np.stack([ens + rng.normal(0, 0.5, ens.shape) for _ in range(len(pred))]).astype(np.float32)
        ood = rng.normal(0, 1, (len(pred), 300, 10)).astype(np.float32)
        np.savez_compressed(path, ensemble_logits=members.mean(0).astype(np.float16), member_pred=members.argmax(-1)
                            .astype(np.uint8), member_logits=members.astype(np.float16),
                            ood_member_logits=ood.astype(np.float16), ood_ensemble_logits=ood.mean(0).astype(np.float16))


def test_secondary_endpoints_from_stored_logits(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Amendment 2's table: each endpoint equals an independent computation on the stored logits, and the rule
    (applied here at 3 seeds per arm; "interim" below the required seeds) calls an over-confident arm worse in NLL."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    records = str(tmp_path / "records")
    _runs(records, "t2", 2.0, {"single": 80.0, "s2": 80.0}, 3)
    _add_member_logits(records, "t2", 0.35, "single")  # about calibrated
    _add_member_logits(records, "t2", 3.0, "s2")  # far over-confident: worse NLL, Brier, ECE
    recs = sci.load_records(records)
    rec = next(r for r in recs if r["arm"] == "s2")
    m = sci.secondary_metrics(rec, LABELS)
    with np.load(rec["npz"]) as z:
        logits, ood = z["ensemble_logits"].astype(np.float64), z["ood_ensemble_logits"].astype(np.float64)
        members = z["member_logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    shifted = logits - logits.max(1, keepdims=True)  # log-softmax without sklearn's clipping of p at eps
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert math.isclose(m["nll"], float(-log_p[np.arange(N), LABELS].mean()), rel_tol=1e-6)
    assert math.isclose(m["brier"], float(((p - np.eye(10)[LABELS]) ** 2).sum(1).mean()), rel_tol=1e-5)
    q = np.exp(ood - ood.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    msp = np.concatenate([p.max(1), q.max(1)])
    auroc = sklearn_metrics.roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(q))], msp)
    assert math.isclose(m["ood_auroc_msp"], 100 * auroc, abs_tol=1e-3)
    assert m["disagreement"] == pytest.approx(100 * float((members[0].argmax(1) != members[1].argmax(1)).mean()))
    assert m["temperature"] > 1.5 and m["nll_ts"] < m["nll"]  # scaling undoes the over-confidence
    interim = "\n".join(sci.secondary_lines(recs, LABELS))
    assert next(line for line in interim.splitlines() if line.startswith("| NLL |")).endswith(
        "| interim: 3 of 20 seeds |")
    monkeypatch.setattr(sci, "SEEDS_PER_ARM", 3)
    text = "\n".join(sci.secondary_lines(recs, LABELS))
    assert "### t2: s2 vs single (t2), k=2 (3 and 3 seeds)" in text
    row = next(line for line in text.splitlines() if line.startswith("| NLL |"))
    assert row.endswith("| **s2 worse** |")
    assert "| OOD AUROC, mutual info (%) | - |" in text and "descriptive |" in text
