"""Calibration, selective prediction, diversity and OOD metrics (issue 39): hand-checked small cases, agreement
with scikit-learn / numpy to 1e-6, bad inputs in one line, and ``timm-split validate`` end to end."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from timm_split.training import uncertainty as U
from timm_split.training.uncertainty import Calibration, uncertainty_report

from conftest import fake_fashion_idx


def _from_probs(probs):
    """Logits whose softmax is ``probs`` (rows summing to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log()


def _one_line_value_error(fn, *args, match, **kw):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _random_case(S=3, N=400, K=10, seed=0, scale=2.5):
    rng = np.random.RandomState(seed)
    target = rng.randint(0, K, N)
    logits = rng.randn(S, N, K) * scale
    logits[:, np.arange(N), target] += rng.rand(S, N) * 4  # better than chance, not perfect
    return logits, target


# ----------------------------------------------------------------------------------------------------------
# hand-checked small cases


def test_nll_brier_ece_topk_by_hand():
    logits = torch.zeros(2, 2)
    t = torch.tensor([0, 1])
    assert U.nll(logits, t) == pytest.approx(math.log(2), abs=1e-12)
    assert U.brier_score(logits, t) == pytest.approx(0.5, abs=1e-12)  # (1/2 - 1)^2 + (1/2)^2
    assert U.brier_score(torch.tensor([[50.0, -50.0]]), torch.tensor([0])) == pytest.approx(0, abs=1e-12)
    # confidences .9 (right), .9 (wrong), .6 (right): bins of .9: |.5 - .9| * 2/3, of .6: |1 - .6| * 1/3
    probs = _from_probs([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    assert U.ece(probs, torch.tensor([0, 1, 1])) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3, abs=1e-6)
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5]])
    assert U.topk_accuracy(logits, torch.tensor([0, 0]), 1) == pytest.approx(50)
    assert U.topk_accuracy(logits, torch.tensor([1, 0]), 5) == pytest.approx(50)  # class 0 is 6th of row 2
    assert U.topk_accuracy(logits[:, :3], torch.tensor([2, 0]), 5) == pytest.approx(100)  # k capped at K


def test_the_ece_binning_is_stated_and_is_15_equal_width_bins():
    assert U.ECE_BINS == 15 and "15 equal-width bins" in U.ECE_BINNING
    # conf 0.70 and 0.72 share bin [10/15, 11/15): one bin of accuracy 1/2 and mean confidence .71
    probs = _from_probs([[0.70, 0.30], [0.72, 0.28]])
    assert U.ece(probs, torch.tensor([0, 1])) == pytest.approx(0.71 - 0.5, abs=1e-6)
    # 0.60 and 0.62 straddle 9/15 = 0.6: two bins, each a single sample
    probs = _from_probs([[0.58, 0.42], [0.62, 0.38]])
    assert U.ece(probs, torch.tensor([0, 1])) == pytest.approx((0.42 + 0.62) / 2, abs=1e-6)


def test_temperature_has_the_closed_form_of_a_constant_prediction():
    """60 samples with logits (2, 0), 45 of class 0: the NLL is least where softmax gives 0.75, T = 2 / ln 3."""
    logits = torch.tensor([[2.0, 0.0]]).repeat(60, 1)
    target = torch.tensor([0] * 45 + [1] * 15)
    assert U.fit_temperature(logits, target) == pytest.approx(2 / math.log(3), rel=1e-6)
    # an overconfident model gets T > 1, an underconfident one T < 1
    assert U.fit_temperature(logits * 5, target) == pytest.approx(10 / math.log(3), rel=1e-6)


def test_crossfit_scores_each_half_with_the_other_halfs_temperature():
    logits, target = _random_case(S=1, N=300, K=5, seed=1)
    logits, target = torch.tensor(logits[0]), torch.tensor(target)
    scaled, (t_a, t_b) = U.crossfit_temperature(logits, target, seed=3)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    a, b = order[:150], order[150:]
    assert t_a == pytest.approx(U.fit_temperature(logits[a], target[a]))
    assert t_b == pytest.approx(U.fit_temperature(logits[b], target[b]))
    assert torch.allclose(scaled[b], logits[b] / t_a) and torch.allclose(scaled[a], logits[a] / t_b)
    # half B's scores do not depend on half B's labels (no sample is scored by a fit on itself)
    flipped = target.clone()
    flipped[b] = (flipped[b] + 1) % 5
    assert torch.equal(U.crossfit_temperature(logits, flipped, seed=3)[0][b], scaled[b])


def test_aurc_and_accuracy_at_coverage_by_hand():
    # confidences .9 > .8 > .7 > .6, right/wrong/right/wrong: risks 0, 1/2, 1/3, 1/2
    probs = _from_probs([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    target = torch.tensor([0, 1, 0, 1])
    assert torch.allclose(U.selective_risks(probs, target), torch.tensor([0, 1 / 2, 1 / 3, 1 / 2], dtype=torch.float64))
    assert U.aurc(probs, target) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4, abs=1e-12)
    # a tie of one right and one wrong: whatever the order, the expected risks are 1/2 and 1/2
    tie = _from_probs([[0.8, 0.2], [0.8, 0.2]])
    assert U.aurc(tie, torch.tensor([0, 1])) == pytest.approx(0.5, abs=1e-12)
    assert U.aurc(tie, torch.tensor([1, 0])) == pytest.approx(0.5, abs=1e-12)
    # 10 samples, the least confident one wrong: 100% at 90% coverage (9 kept), 90% at 95% (ceil(9.5) = 10 kept)
    conf = torch.linspace(0.95, 0.55, 10)
    probs = torch.stack([conf, 1 - conf], 1).log()
    target = torch.tensor([0] * 9 + [1])
    assert U.accuracy_at_coverage(probs, target, 0.90) == pytest.approx(100)
    assert U.accuracy_at_coverage(probs, target, 0.95) == pytest.approx(90)
    assert U.accuracy_at_coverage(probs, target, 1.0) == pytest.approx(90)


def test_mutual_information_by_hand_and_zero_for_one_member():
    a, b = _from_probs([[0.9, 0.1]]), _from_probs([[0.1, 0.9]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert float(U.mutual_information(torch.stack([a, b]))[0]) == pytest.approx(math.log(2) - h, abs=1e-12)
    assert float(U.mutual_information(torch.stack([a, a]))[0]) == pytest.approx(0, abs=1e-12)
    one = torch.randn(1, 7, 4)
    assert torch.equal(U.mutual_information(one), torch.zeros(7, dtype=torch.float64))
    assert float(U.predictive_entropy(torch.zeros(1, 4))[0]) == pytest.approx(math.log(4), abs=1e-12)


def test_disagreement_by_hand():
    preds = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 0, 1]])  # members' argmaxes
    logits = torch.nn.functional.one_hot(preds, 2).double() * 5
    # the ensemble (mean logits) says 0, 1, 1, 1: member 0 differs on sample 1, member 2 on sample 2
    assert U.disagreement(logits).tolist() == [0.25, 0.0, 0.25]
    assert U.pairwise_disagreement(logits) == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
    assert U.pairwise_disagreement(logits[:1]) == 0.0 and U.disagreement(logits[:1]).tolist() == [0.0]


def test_ood_auroc_and_fpr95_by_hand():
    """ID (positive) scores .9 .8 .7, OOD .75 .6: 5 of 6 pairs ordered; keeping all three ID (TPR 1 >= .95)
    means a threshold of .7, which accepts the OOD .75: FPR 1/2."""
    auroc, fpr = U.ood_detection(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.75, 0.6]))
    assert auroc == pytest.approx(5 / 6, abs=1e-6) and fpr == pytest.approx(0.5, abs=1e-6)
    auroc, fpr = U.ood_detection(torch.tensor([3.0, 2.0]), torch.tensor([-1.0, -2.0]))  # any range, separable
    assert auroc == pytest.approx(1) and fpr == pytest.approx(0)
    # exactly 95%: 19 of 20 ID scores (11..29) kept at threshold 11, which accepts the OOD 50 but not 10.5
    auroc, fpr = U.ood_detection(torch.arange(10.0, 30.0), torch.tensor([10.5, 50.0]))
    assert fpr == pytest.approx(0.5) and auroc == pytest.approx((19 + 0) / 40)


def test_ood_scores_are_msp_negative_entropy_and_negative_mi():
    members = torch.randn(2, 5, 3, dtype=torch.float64)
    ens = members.mean(0)
    s = U.ood_scores(ens, members)
    assert set(s) == {"msp", "entropy", "mi"}
    assert torch.allclose(s["msp"], ens.softmax(-1).max(-1).values)
    assert torch.allclose(s["entropy"], -U.predictive_entropy(ens))
    assert torch.allclose(s["mi"], -U.mutual_information(members))
    assert set(U.ood_scores(ens, members[:1])) == {"msp", "entropy"} == set(U.ood_scores(ens))


def test_combine_logits_matches_the_ensemble():
    from timm_split import SplitEnsemble

    members = torch.randn(3, 4, 5)
    for averaging in ("logits", "probs"):
        ens = SplitEnsemble([torch.nn.Linear(2, 5) for _ in range(3)], averaging=averaging)
        assert torch.allclose(U.combine_logits(members, averaging).float(), ens.combine(members), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# agreement with independent implementations


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_ece(probs, target, n_bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    out = 0.0
    for b in range(n_bins + 1):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf >= lo) & (conf < hi)
        if m.any():
            out += m.mean() * abs((pred[m] == target[m]).mean() - conf[m].mean())
    return out


def _np_aurc(probs, target):
    order = np.argsort(-probs.max(1), kind="stable")
    errors = (probs.argmax(1) != target)[order]
    return np.mean([errors[:k].mean() for k in range(1, len(errors) + 1)])


def _np_entropy(p):
    return -(p * np.log(p)).sum(-1)


def test_agreement_with_sklearn_and_numpy():
    sk = pytest.importorskip("sklearn.metrics")
    logits, target = _random_case()
    K = logits.shape[-1]
    for z in list(logits) + [logits.mean(0)]:
        p = _np_softmax(z)
        zt, tt = torch.tensor(z), torch.tensor(target)
        assert U.nll(zt, tt) == pytest.approx(sk.log_loss(target, p, labels=list(range(K))), abs=1e-6)
        assert U.brier_score(zt, tt) == pytest.approx(
            sk.brier_score_loss(target, p, labels=list(range(K)), scale_by_half=False), abs=1e-6)
        assert U.brier_score(zt, tt) == pytest.approx(np.mean(((p - np.eye(K)[target]) ** 2).sum(1)), abs=1e-6)
        assert U.ece(zt, tt) == pytest.approx(_np_ece(p, target), abs=1e-6)
        for k in (1, 5):
            assert U.topk_accuracy(zt, tt, k) == pytest.approx(
                100 * sk.top_k_accuracy_score(target, p, k=k, labels=list(range(K))), abs=1e-4)
        assert U.aurc(zt, tt) == pytest.approx(_np_aurc(p, target), abs=1e-6)
    p = _np_softmax(logits)
    mi = _np_entropy(p.mean(0)) - _np_entropy(p).mean(0)
    assert np.allclose(U.mutual_information(torch.tensor(logits)).numpy(), mi, atol=1e-9)


def _np_fpr95(id_scores, ood_scores):
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_scores, ood_scores], drop_intermediate=False)
    return fpr[np.searchsorted(tpr, 0.95, side="left")]


def test_ood_agreement_with_sklearn_on_every_score():
    sk = pytest.importorskip("sklearn.metrics")
    logits, _ = _random_case(S=3, N=300, seed=2)
    ood, _ = _random_case(S=3, N=200, seed=3, scale=1.0)
    id_s = U.ood_scores(torch.tensor(logits.mean(0)), torch.tensor(logits))
    ood_s = U.ood_scores(torch.tensor(ood.mean(0)), torch.tensor(ood))
    for name in ("msp", "entropy", "mi"):
        a, b = id_s[name].numpy(), ood_s[name].numpy()
        auroc, fpr = U.ood_detection(id_s[name], ood_s[name])
        y = np.r_[np.ones(len(a)), np.zeros(len(b))]
        assert auroc == pytest.approx(sk.roc_auc_score(y, np.r_[a, b]), abs=1e-6), name
        assert fpr == pytest.approx(_np_fpr95(a, b), abs=1e-6), name
    # ties (a coarse score) too
    a, b = np.round(id_s["msp"].numpy(), 1), np.round(ood_s["msp"].numpy(), 1)
    auroc, fpr = U.ood_detection(torch.tensor(a), torch.tensor(b))
    assert auroc == pytest.approx(sk.roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]), abs=1e-6)
    assert fpr == pytest.approx(_np_fpr95(a, b), abs=1e-6)


def test_temperature_agrees_with_a_scalar_minimiser():
    optimize = pytest.importorskip("scipy.optimize")
    logits, target = _random_case(S=1, N=500, seed=4, scale=4.0)
    z, t = logits[0], target

    def nll_at(log_t):
        p = _np_softmax(z / np.exp(log_t))
        return -np.log(p[np.arange(len(t)), t]).mean()

    best = optimize.minimize_scalar(nll_at, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10})
    assert U.fit_temperature(torch.tensor(z), torch.tensor(t)) == pytest.approx(math.exp(best.x), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# the report


def test_report_rows_for_an_ensemble_and_for_one_member():
    logits, target = _random_case(S=2, N=300)
    ood, _ = _random_case(S=2, N=100, seed=5, scale=1.0)
    r = uncertainty_report(torch.tensor(logits), torch.tensor(target), torch.tensor(ood),
                           calib=Calibration.crossfit(seed=1))
    assert r["split"] == 2 and r["n"] == 300 and r["n_ood"] == 100 and r["calibration"] == "crossfit"
    e = r["ensemble"]
    assert {"top1", "top5", "nll", "brier", "ece", "temperature", "nll_ts", "ece_ts", "aurc", "acc_cov90",
            "acc_cov95", "disagreement", "pairwise_disagreement", "mutual_info", "ood_auroc_msp", "ood_fpr95_msp",
            "ood_auroc_entropy", "ood_fpr95_entropy", "ood_auroc_mi", "ood_fpr95_mi"} <= set(e)
    assert e["nll_ts"] <= e["nll"] + 0.05  # a fitted temperature rarely hurts out of fold
    assert len(r["members"]) == 2 and "ood_auroc_mi" not in r["members"][0] and "ood_auroc_msp" in r["members"][0]
    assert r["members"][1]["nll"] == pytest.approx(U.nll(torch.tensor(logits[1]), torch.tensor(target)))
    json.dumps(r)  # a plain dict
    one = uncertainty_report(torch.tensor(logits[0]), torch.tensor(target), torch.tensor(ood[0]))
    assert one["split"] == 1 and one["ensemble"]["mutual_info"] == 0 and one["ensemble"]["disagreement"] == 0
    assert "ood_auroc_mi" not in one["ensemble"] and any("S=1" in n for n in one["notes"])
    assert one["ensemble"]["top1"] == one["members"][0]["top1"]


def test_the_report_takes_stored_numpy_logits_as_they_are():
    """benchmarks/science.py keeps numpy records: float32 arrays in, the same numbers as torch tensors."""
    logits, target = _random_case(S=2, N=200, seed=8)
    logits = logits.astype(np.float32)
    a = uncertainty_report(logits, target, logits[:, :50] + 1, calib=Calibration.crossfit())
    b = uncertainty_report(torch.from_numpy(logits), torch.from_numpy(target), torch.from_numpy(logits[:, :50] + 1),
                           calib=Calibration.crossfit())
    assert a == b


def test_heldout_calibration_fits_on_the_split_and_scores_only_the_rest():
    logits, target = _random_case(S=2, N=400, seed=6, scale=5.0)
    calib = Calibration.heldout(torch.tensor(logits[:, :100]), torch.tensor(target[:100]))
    r = uncertainty_report(torch.tensor(logits[:, 100:]), torch.tensor(target[100:]), calib=calib)
    assert r["n"] == 300 and r["n_calib"] == 100
    t = U.fit_temperature(torch.tensor(logits[0, :100]), torch.tensor(target[:100]))
    m0 = r["members"][0]
    assert m0["temperature"] == pytest.approx(t)
    assert m0["nll_ts"] == pytest.approx(U.nll(torch.tensor(logits[0, 100:]) / t, torch.tensor(target[100:])))
    fixed = uncertainty_report(torch.tensor(logits), torch.tensor(target), calib=Calibration.fixed(2.0))
    assert fixed["ensemble"]["temperature"] == 2.0 and "temperature" not in fixed["members"][0]


def _linear_ensemble(S=2):
    from torch import nn

    from timm_split import SplitEnsemble

    torch.manual_seed(0)
    return SplitEnsemble([nn.Sequential(nn.Flatten(), nn.Linear(12, 3)) for _ in range(S)])


def test_evaluate_adds_the_uncertainty_metrics_the_trainer_logs():
    from timm_split.training.metrics import collect_member_logits, evaluate

    ens = _linear_ensemble()
    loader = [(torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])) for _ in range(3)]
    members, target = collect_member_logits(ens, loader)
    assert members.shape == (2, 24, 3) and target.shape == (24,)
    m = evaluate(ens, loader, uncertainty=True)
    rep = uncertainty_report(members, target)
    for k in ("brier", "aurc", "acc_cov90", "acc_cov95", "disagreement", "pairwise_disagreement", "mutual_info"):
        assert m[k] == pytest.approx(rep["ensemble"][k]), k
    assert m["members"][1]["brier"] == pytest.approx(rep["members"][1]["brier"])
    assert "brier" not in evaluate(ens, loader) and m["loss"] == pytest.approx(rep["ensemble"]["nll"], rel=1e-5)


def test_evaluate_of_a_diverged_model_says_nan_and_does_not_raise():
    from timm_split.training.metrics import evaluate

    ens = _linear_ensemble()
    with torch.no_grad():
        ens.members[1][1].weight.fill_(float("nan"))
    m = evaluate(ens, [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))], uncertainty=True)
    assert math.isnan(m["ece"]) and math.isnan(m["brier"]) and math.isnan(m["members"][1]["aurc"])


# ----------------------------------------------------------------------------------------------------------
# bad inputs: one line each, never a number


def test_nan_logits_are_one_line():
    logits = torch.randn(2, 60, 3)
    logits[1, 7, 2] = float("nan")
    msg = _one_line_value_error(uncertainty_report, logits, torch.zeros(60, dtype=torch.long), match="NaN")
    assert "sample 7" in msg
    _one_line_value_error(U.nll, torch.tensor([[0.0, float("inf")]]), torch.tensor([0]), match="NaN or inf")


def test_an_empty_ood_set_is_one_line():
    logits = torch.randn(2, 60, 3)
    _one_line_value_error(uncertainty_report, logits, torch.zeros(60, dtype=torch.long), torch.zeros(2, 0, 3),
                          match="OOD set is empty")
    _one_line_value_error(U.ood_detection, torch.rand(5), torch.rand(0), match="OOD set is empty")


def test_the_evaluation_set_as_ood_is_one_line():
    logits, target = torch.randn(2, 60, 3), torch.randint(0, 3, (60,))
    _one_line_value_error(uncertainty_report, logits, target, logits.clone(), match="OOD data is the evaluation")


def test_a_calibration_split_too_small_or_of_one_class_is_one_line():
    logits, target = torch.randn(49, 3), torch.randint(0, 3, (49,))
    _one_line_value_error(U.fit_temperature, logits, target, match="49 samples.*at least 50")
    _one_line_value_error(U.fit_temperature, torch.randn(80, 3), torch.ones(80, dtype=torch.long),
                          match="single class")
    _one_line_value_error(uncertainty_report, torch.randn(2, 99, 3), torch.randint(0, 3, (99,)),
                          calib=Calibration.crossfit(), match="half A.*at least 50")
    calib = Calibration.heldout(torch.randn(2, 10, 3), torch.randint(0, 3, (10,)))
    _one_line_value_error(uncertainty_report, torch.randn(2, 99, 3), torch.randint(0, 3, (99,)), calib=calib,
                          match="10 samples")


def test_bad_shapes_and_targets_are_one_line():
    _one_line_value_error(U.nll, torch.randn(3), torch.tensor([0, 1, 2]), match=r"\[N, K\]")
    _one_line_value_error(U.nll, torch.randn(3, 4), torch.tensor([0, 1, 4]), match="outside")
    _one_line_value_error(uncertainty_report, torch.randn(2, 0, 4), torch.zeros(0, dtype=torch.long),
                          match="no samples")
    _one_line_value_error(U.accuracy_at_coverage, torch.randn(3, 4), torch.tensor([0, 1, 2]), 0.0, match="coverage")
    _one_line_value_error(Calibration.fixed, 0.0, match="> 0")


# ----------------------------------------------------------------------------------------------------------
# export-fashion-mnist --holdout-classes, the OOD folder


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return fake_fashion_idx(tmp_path_factory.mktemp("idx"), 12, 40)


@pytest.fixture(scope="module")
def held_out(idx_dir, tmp_path_factory):
    from timm_split.training.data import export_fashion_mnist

    out = tmp_path_factory.mktemp("png") / "fm"
    counts = export_fashion_mnist(str(out), idx_dir=idx_dir, holdout_classes=(8, 9))
    assert counts == {"train": 96, "validation": 320, "holdout": 80}
    return str(out)


def test_export_holds_out_classes_into_their_own_folder(held_out):
    train = sorted(os.listdir(os.path.join(held_out, "train")))
    assert train == sorted(os.listdir(os.path.join(held_out, "validation"))) and len(train) == 8
    assert not any(c.startswith(("8_", "9_")) for c in train)
    assert sorted(os.listdir(os.path.join(held_out, "holdout"))) == ["8_bag", "9_ankle_boot"]
    marker = json.load(open(os.path.join(held_out, ".timm_split_export.json")))
    assert marker["complete"] and marker["holdout_classes"] == [8, 9]


@pytest.mark.parametrize("bad, match", [((10,), "labels 0-9"), ((3, 3), "twice"), (tuple(range(9)), "at most 8")])
def test_export_refuses_bad_holdout_classes(idx_dir, tmp_path, bad, match):
    from timm_split.training.data import export_fashion_mnist

    _one_line_value_error(export_fashion_mnist, str(tmp_path / "x"), idx_dir=idx_dir, holdout_classes=bad,
                          match=match)
    assert not os.path.exists(tmp_path / "x")


def test_export_cli_holdout_option(idx_dir, tmp_path, capsys):
    from timm_split.commands.main import main

    assert main(["export-fashion-mnist", str(tmp_path / "f"), "--per-class", "2", "--val-per-class", "3",
                 "--idx-dir", idx_dir, "--holdout-classes", "0", "5"]) == 0
    assert "wrote 16 train and 24 validation PNGs and 6 held-out-class PNGs" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "f" / "holdout")) == ["0_t_shirt_top", "5_sandal"]
    assert len(os.listdir(tmp_path / "f" / "holdout" / "5_sandal")) == 3


def test_ood_folder_flat_or_classes_empty_or_the_validation_set(held_out, tmp_path):
    from PIL import Image

    from timm_split.training.data import check_ood_distinct_files, create_eval_dataset, create_ood_dataset

    val = create_eval_dataset("", held_out, "validation")[0]
    ood = create_ood_dataset(os.path.join(held_out, "holdout"))
    assert len(ood) == 80
    check_ood_distinct_files(ood, val, "holdout")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (28, 28), i * 50).save(flat / f"{i}.png")
    img, _ = create_ood_dataset(str(flat), in_chans=1)[0]
    assert len(create_ood_dataset(str(flat))) == 3 and img.mode == "L"
    (tmp_path / "empty").mkdir()
    _one_line_value_error(create_ood_dataset, str(tmp_path / "empty"), match="holds no images")
    same = create_ood_dataset(os.path.join(held_out, "validation"))
    _one_line_value_error(check_ood_distinct_files, same, val, "v", match="validation set itself")


# ----------------------------------------------------------------------------------------------------------
# timm-split validate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """S=1 and S=2 state dicts of ``splitnet_test_resnet`` for the 8 kept classes, as ``validate`` flags (no
    training: the tests check what is reported, not how good it is; test_train.py validates trained runs)."""
    import timm

    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for S in (1, 2):
        torch.manual_seed(S)
        ens = timm.create_model("splitnet_test_resnet", split_factor=S, num_classes=8)
        torch.save(ens.state_dict(), out / f"s{S}.pth")
        paths[S] = [str(out / f"s{S}.pth"), "--model", "splitnet_test_resnet", "--split", str(S), "--img-size", "28"]
    return paths


@pytest.mark.timeout(600)
@pytest.mark.parametrize("S", [1, 2])
def test_validate_reports_calibration_selective_and_ood(runs, held_out, tmp_path, capsys, S):
    from timm_split.commands.main import main

    res = tmp_path / "r.csv"
    assert main(["validate", "--checkpoint", *runs[S], "--data-dir", held_out, "-j", "0", "--calibrate",
                 "--calib-split-fraction", "0.25", "--ood-data", os.path.join(held_out, "holdout"),
                 "--results-file", str(res), "--log-freq", "0"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "80 held-out images (seed 0), not scored" in out and "OOD AUROC, MSP" in out and "Brier" in out
    rows = list(csv.DictReader(open(res, newline="")))
    assert [r["member"] for r in rows] == ["ensemble"] + [str(i) for i in range(S)]
    e = rows[0]
    assert e["n"] == "240" and e["n_calib"] == "80" and e["calibration"] == "heldout" and e["ece_bins"] == "15"
    for k in ("brier", "temperature", "nll_ts", "ece_ts", "aurc", "acc_cov90", "acc_cov95", "ood_auroc_msp",
              "ood_fpr95_entropy", "mutual_info"):
        assert e[k] != "", k
    assert (e["ood_auroc_mi"] != "") == (S > 1)
    if S == 1:
        assert float(e["mutual_info"]) == 0 and "0 by definition" in out
        assert e["top1"] == rows[1]["top1"]
    assert rows[-1]["mutual_info"] == "" and rows[-1]["temperature"] != ""


@pytest.mark.timeout(600)
def test_validate_crossfit_json_and_the_plain_report(runs, held_out, tmp_path, capsys):
    from timm_split.commands.main import main

    res = tmp_path / "r.json"
    assert main(["validate", "--checkpoint", *runs[2], "--data-dir", held_out, "-j", "0", "--calibrate", "crossfit",
                 "--results-file", str(res), "--log-freq", "0"]) == 0, capsys.readouterr().err
    rows = json.load(open(res))
    assert rows[0]["calibration"] == "crossfit" and rows[0]["n"] == 320 and rows[0]["temperature_fold_b"] > 0
    assert rows[0]["ood_auroc_msp"] is None
    assert main(["validate", "--checkpoint", *runs[2], "--data-dir", held_out, "-j", "0", "--results-file",
                 str(res), "--log-freq", "0"]) == 0
    rows = json.load(open(res))
    assert rows[0]["n"] == 320 and rows[0]["temperature"] is None and rows[0]["brier"] > 0


def _one_line(capsys, argv, *needles):
    from timm_split.commands.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.timeout(600)
def test_validate_bad_uncertainty_input_is_one_line(runs, held_out, tmp_path, capsys):
    base = ["validate", "--checkpoint", *runs[2], "--data-dir", held_out, "-j", "0", "--log-freq", "0"]
    _one_line(capsys, base + ["--ood-data", os.path.join(held_out, "validation")], "validation set itself")
    (tmp_path / "empty").mkdir()
    _one_line(capsys, base + ["--ood-data", str(tmp_path / "empty")], "holds no images")
    _one_line(capsys, base + ["--ood-data", str(tmp_path / "none")], "does not exist")
    _one_line(capsys, base + ["--calibrate", "--calib-split-fraction", "0.1"], "holds out 32", "at least 50")
    _one_line(capsys, base + ["--calib-split-fraction", "0.3"], "--calibrate")
    _one_line(capsys, base + ["--calibrate", "--calib-split-fraction", "1.5"], "(0, 1)")
