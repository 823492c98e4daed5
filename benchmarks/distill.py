"""Split a trained model in a tenth of the time? Issue 40's measurement, on the science benchmark's data and recipe.

    python benchmarks/distill.py --estimate             # the full measurement's expected wall time; trains nothing
    python benchmarks/distill.py --jobs 2               # parents, then arm B, seeds 0-4 (resumes: records kept)
    python benchmarks/distill.py --report               # docs/distill.md and docs/distill.json from the records
    python benchmarks/distill.py --dry-run              # the whole pipeline at a tiny size, in a temp folder

The setting is science T1's (``benchmarks/science.py``; docs/results.md): Wide ResNet-10 at k = 2 on the class-
balanced Fashion-MNIST subset of 50 images a class, 300 epochs, batch 64, SGD lr 0.05 cosine, the seed's per-member
views and mixup, all on the CPU as one tensor.

* **Parent**: the single network at k = 2, the full schedule (science's ``single`` arm, trained here with science's
  own ``train_steps`` so its weights exist; its test top-1 is checked against T1's record of the same seed).
* **Arm A**: S = 2 from scratch, the full schedule: T1's records (``docs/science/t1``, s2 k = 2, 20 seeds).
* **Arm B**: S = 2 cut from the parent (``timm_split.split(parent, 2, init='inherit')``) and distilled from it
  (``timm_split.training.distill``: timm's ``DistillationTeacher`` on every member's view, KL at T, timm's
  weights, beside the co-training term) for 10% of the schedule (30 epochs; ``--b-epochs``), same views, optimizer
  and cosine schedule over those epochs.

Each run writes ``<records>/<id>.json`` (config, metrics, costs, wall time) and ``<id>.npz`` (the ensemble's test
logits, float16), atomically; parent weights go to ``--work``. The report gives B - A (Welch 95% interval over
seeds; the paired bootstrap over the seeds both arms have and the test images) and B - parent (paired by seed, t
interval), against the issue's goal: B within 0.3 points of A's top-1, at 10% of A's training compute.
"""
import argparse
import concurrent.futures as cf
import dataclasses
import glob
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import science  # benchmarks/: the folder of this script
from common import write_json
from science_views import BatchViews
from timm_split import CoTrainingLoss, SplitEnsemble, load_checkpoint, param_groups, save_checkpoint, split
from timm_split.training.distill import DistillationLoss, DistillOptions, MemberTeacher
from timm_split.training.metrics import classification_metrics
from timm_split.generated import write_generated

ROOT = science.ROOT
RECORDS = os.path.join(ROOT, "docs", "science", "distill")
WORK = os.path.join(ROOT, "output", "distill")
A_RECORDS = os.path.join(ROOT, "docs", "science", "t1")
DOC_MD, DOC_JSON = os.path.join(ROOT, "docs", "distill.md"), os.path.join(ROOT, "docs", "distill.json")
COMMAND = "python benchmarks/distill.py --jobs 2 && python benchmarks/distill.py --report"


@dataclasses.dataclass(frozen=True)
class ArmB:
    """Arm B's recipe: the distillation phase after the inherit split."""

    epochs: int = 30
    lr: float = 0.05
    temperature: float = 4.0
    task_loss_weight: Optional[float] = None
    distill_loss_weight: Optional[float] = None


def t1_setting(data_dir: str = science.DATA_DIR) -> science.Setting:
    """Science T1's recipe at k = 2 (what arm A's records were trained with)."""
    return science.Setting(arch="resnet10", width=2.0, per_class=50, epochs=300, batch_size=64, lr=0.05,
                           weight_decay=5e-4, cot_weight=0.5, data_dir=data_dir)


def _config(st: science.Setting) -> Dict[str, Any]:
    cfg = dataclasses.asdict(st)
    for k in ("device", "amp", "channels_last", "data_dir", "split_kwargs"):
        cfg.pop(k)
    return cfg


def _run_id(kind: str, st: science.Setting, seed: int, b: Optional[ArmB] = None) -> str:
    extra = "" if b is None else f"-b{b.epochs}-T{b.temperature:g}"
    return f"{kind}-{st.arch}-k{st.width:g}-n{st.per_class}-e{st.epochs}{extra}-seed{seed}"


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _evaluate(ens: SplitEnsemble, views: BatchViews, st: science.Setting) -> Tuple[Dict[str, Any], np.ndarray]:
    """Test metrics (ensemble and members) and the ensemble's test logits."""
    test_x, test_y = science.load_data(st)[2:]
    logits = science.member_logits(ens, test_x, views, st)
    combined = ens.combine(logits)
    y = test_y.cpu()
    metrics = {"ensemble": dict(classification_metrics(combined, y)),
               "members": [dict(classification_metrics(m, y)) for m in logits]}
    return metrics, combined.numpy()


def _views(S: int, st: science.Setting) -> BatchViews:
    return BatchViews(S, num_classes=science.NUM_CLASSES, mean=science.MEAN, std=science.STD, pad=st.pad,
                      hflip=st.hflip, ra_ops=st.ra_ops, ra_magnitude=st.ra_magnitude, re_prob=st.re_prob,
                      mixup_alpha=st.mixup_alpha)


def _gmacs(model: torch.nn.Module) -> float:
    from timm_split.count import count
    return count(model, 28, in_chans=1).gmacs


# ----------------------------------------------------------------------------------------------------------
# the runs

def train_parent(seed: int, st: science.Setting, records: str, work: str) -> Dict[str, Any]:
    """The single network at the full schedule, with science's own loop (its T1 ``single`` arm); weights kept."""
    rid = _run_id("parent", st, seed)
    weights = os.path.join(work, rid + ".safetensors")
    done = _done(records, rid)
    if done is not None and os.path.isfile(weights):
        return done
    t0 = time.perf_counter()
    spec = science.Spec(stage="distill", arm="single", width=st.width, seed=seed, kind="parent")
    ens, views, last = science.train_steps(spec, st)
    seconds = time.perf_counter() - t0
    os.makedirs(work, exist_ok=True)
    save_checkpoint(ens, weights, state={"seed": seed, "id": rid})
    metrics, logits = _evaluate(ens, views, st)
    rec = {"id": rid, "kind": "parent", "seed": seed, "config": _config(st), "test": metrics,
           "train_last_epoch": last, "train_seconds": seconds, "gmacs": _gmacs(ens.members[0]),
           "weights": os.path.relpath(weights, ROOT), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": science.provenance()}
    _save(records, rec, logits)
    return rec


def load_parent(seed: int, st: science.Setting, work: str) -> SplitEnsemble:
    """The parent's trained network (a one-member ensemble), as science builds it."""
    net = science.ARCHS[st.arch](st.width)
    ens = SplitEnsemble([net], pretrained_cfg=net.pretrained_cfg)
    load_checkpoint(ens, os.path.join(work, _run_id("parent", st, seed) + ".safetensors"))
    return ens


def train_b(seed: int, st: science.Setting, b: ArmB, records: str, work: str) -> Dict[str, Any]:
    """Arm B: S = 2 inherited from the parent of this seed and distilled from it for ``b.epochs`` epochs."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.task import DistillationTeacher

    rid = _run_id("b", st, seed, b)
    done = _done(records, rid)
    if done is not None:
        return done
    parent = load_parent(seed, st, work).to(st.device)
    torch.manual_seed(seed)
    ens = split(parent.members[0], 2, seed=seed * 2, img_size=28, init="inherit").to(st.device)
    S = ens.split_factor
    teacher = MemberTeacher(DistillationTeacher(parent.eval()), science.MEAN, science.STD).to(st.device)
    opts = DistillOptions(model_name=f"{st.arch}_k{st.width:g}", temperature=b.temperature,
                          task_loss_weight=b.task_loss_weight, distill_loss_weight=b.distill_loss_weight)
    loss_fn = DistillationLoss(CoTrainingLoss(cot_weight=st.cot_weight, warmup_epochs=b.epochs * 40 / 300, mode="js"),
                               opts)
    train_x, train_y = science.load_data(st)[:2]
    n, bs = len(train_x), st.batch_size
    steps = math.ceil(n / bs)
    views = _views(S, st)
    opt = create_optimizer_v2(param_groups(ens, st.weight_decay, S), opt="sgd", lr=b.lr, momentum=0.9)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=b.epochs, step_on_epochs=False,
                                   updates_per_epoch=steps)
    order_gen = torch.Generator().manual_seed(seed + 1_000_003)  # another data order than the parent's
    aug_gen = torch.Generator(device=st.device).manual_seed(seed + 7919)
    t0, teacher_s, step = time.perf_counter(), 0.0, 0
    ens.train()
    for epoch in range(b.epochs):
        order = torch.randperm(n, generator=order_gen).to(st.device)
        sums = {k: 0.0 for k in ("loss", "ce", "cot", "kd")}
        for i in range(steps):
            idx = order[i * bs:(i + 1) * bs]
            x, soft = views(train_x[idx], train_y[idx], aug_gen)
            t1 = time.perf_counter()
            teacher_logits = teacher(x)
            teacher_s += time.perf_counter() - t1
            losses = loss_fn(ens.forward_members(x), soft, teacher_logits, epoch=epoch + i / steps)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            sched.step_update(step)
            for k in sums:
                sums[k] += float(losses[k].detach())
        if not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"{rid}: loss {sums['loss']} in epoch {epoch + 1}; lower --b-lr.")
    seconds = time.perf_counter() - t0
    metrics, logits = _evaluate(ens, views, st)
    m_ens, m_parent = sum(_gmacs(m) for m in ens.members), _gmacs(parent.members[0])
    rec = {"id": rid, "kind": "b", "seed": seed, "config": _config(st), "arm_b": dataclasses.asdict(b),
           "test": metrics, "train_last_epoch": {k: v / steps for k, v in sums.items()}, "train_seconds": seconds,
           "teacher_seconds": teacher_s, "gmacs": m_ens, "parent_gmacs": m_parent,
           # training compute against A's (MACs): fwd + bwd ~ 3 x forward, plus the teacher's forward on S views
           "compute_vs_a": b.epochs * (3 * m_ens + S * m_parent) / (st.epochs * 3 * m_ens),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": science.provenance()}
    _save(records, rec, logits)
    return rec


def train_a(seed: int, st: science.Setting, records: str) -> Dict[str, Any]:
    """Arm A trained here (the dry run, or a setting without T1 records): science's ``s2`` arm."""
    rid = _run_id("a", st, seed)
    done = _done(records, rid)
    if done is not None:
        return done
    t0 = time.perf_counter()
    ens, views, _ = science.train_steps(science.Spec(stage="distill", arm="s2", width=st.width, seed=seed), st)
    seconds = time.perf_counter() - t0
    metrics, logits = _evaluate(ens, views, st)
    rec = {"id": rid, "kind": "a", "seed": seed, "config": _config(st), "test": metrics, "train_seconds": seconds}
    _save(records, rec, logits)
    return rec


def _done(records: str, rid: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(records, rid + ".json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(records, rid + ".npz")):
        with open(path) as f:
            return json.load(f)
    return None


def _save(records: str, rec: Dict[str, Any], logits: np.ndarray) -> None:
    os.makedirs(records, exist_ok=True)
    _write_npz(os.path.join(records, rec["id"] + ".npz"), ensemble_logits=logits.astype(np.float16))
    write_json(os.path.join(records, rec["id"] + ".json"), rec)


def _line(rec: Dict[str, Any]) -> str:
    return (f"{rec['id']}: top-1 {rec['test']['ensemble']['top1']:.2f}% in {rec['train_seconds']:.0f}s"
            + (f" (teacher {rec['teacher_seconds']:.0f}s)" if "teacher_seconds" in rec else ""))


def _work(fn, *a) -> Dict[str, Any]:
    torch.set_num_threads(_THREADS[0])
    return fn(*a)


_THREADS = [1]


def run_all(seeds: Sequence[int], st: science.Setting, b: ArmB, records: str, work: str, jobs: int,
            threads: int, with_a: bool = False) -> None:
    """Parents first (B needs them), then B (and A with ``with_a``), ``jobs`` runs at a time."""
    _THREADS[0] = threads
    phases = [[(train_parent, s, st, records, work) for s in seeds]]
    phases.append([(train_b, s, st, b, records, work) for s in seeds]
                  + ([(train_a, s, st, records) for s in seeds] if with_a else []))
    for phase in phases:
        if jobs <= 1:
            torch.set_num_threads(threads)
            for fn, *a in phase:
                print(_line(fn(*a)), flush=True)
            continue
        with cf.ProcessPoolExecutor(jobs) as pool:
            for fut in cf.as_completed([pool.submit(_work, fn, *a) for fn, *a in phase]):
                print(_line(fut.result()), flush=True)


# ----------------------------------------------------------------------------------------------------------
# the report

def _load(records: str, pattern: str) -> List[Dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(os.path.join(records, pattern + ".json"))):
        with open(path) as f:
            rec = json.load(f)
        rec["npz"] = path[:-5] + ".npz"
        out.append(rec)
    return sorted(out, key=lambda r: r["seed"])


def _a_records(st: science.Setting, a_records: str, records: str) -> List[Dict[str, Any]]:
    """Arm A: T1's s2 records of this setting, else arm A trained here."""
    want = _config(st)
    recs = [r for r in _load(a_records, f"s2-{st.arch}-k{st.width:g}-n{st.per_class}-e{st.epochs}-seed*")
            if all(r["config"].get(k) == v for k, v in want.items())]
    return recs or _load(records, _run_id("a", st, 0).replace("seed0", "seed*"))


def _correct(recs: Sequence[Dict[str, Any]], labels: np.ndarray) -> np.ndarray:
    rows = []
    for r in recs:
        with np.load(r["npz"]) as z:
            rows.append(z["ensemble_logits"].astype(np.float32).argmax(-1) == labels)
    return np.stack(rows)


def _top1(recs: Sequence[Dict[str, Any]]) -> List[float]:
    return [r["test"]["ensemble"]["top1"] for r in recs]


def _paired_t(d: Sequence[float]) -> Tuple[float, float, float]:
    m = statistics.mean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = science.t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def _ci(t: Sequence[float]) -> str:
    return f"{t[0]:+.2f} [{t[1]:+.2f}, {t[2]:+.2f}]" if not math.isnan(t[1]) else f"{t[0]:+.2f} (one seed)"


def report(st: science.Setting, b: ArmB, records: str, a_records: str, md: str, js: str) -> Dict[str, Any]:
    """The table: parent, A, B (mean ± sd, seeds, train seconds), B - A and B - parent with 95% intervals."""
    parents = _load(records, _run_id("parent", st, 0).replace("seed0", "seed*"))
    arm_b = _load(records, _run_id("b", st, 0, b).replace("seed0", "seed*"))
    arm_a = _a_records(st, a_records, records)
    if not arm_b or not arm_a or not parents:
        raise SystemExit(f"no records to report in {records} (parents {len(parents)}, B {len(arm_b)}, A "
                         f"{len(arm_a)}); run the measurement first.")
    labels = science.load_data(st)[3].cpu().numpy()
    welch = science.welch_ci(_top1(arm_b), _top1(arm_a))
    a_by = {r["seed"]: r for r in arm_a}
    both = [r for r in arm_b if r["seed"] in a_by]
    boot = science.paired_bootstrap_ci(_correct(both, labels), _correct([a_by[r["seed"]] for r in both], labels))
    p_by = {r["seed"]: r for r in parents}
    vs_parent = _paired_t([r["test"]["ensemble"]["top1"] - p_by[r["seed"]]["test"]["ensemble"]["top1"]
                           for r in arm_b if r["seed"] in p_by])
    compute = statistics.mean(r["compute_vs_a"] for r in arm_b)
    seconds_vs_a = statistics.mean(r["train_seconds"] for r in arm_b) / statistics.mean(
        r["train_seconds"] for r in arm_a)
    lo = min(welch[1], boot[0])
    goal = ("met" if lo > -0.3 else "missed" if max(welch[2], boot[1]) < -0.3 else "inconclusive")
    t1_single = {r["seed"]: r for r in _load(a_records, f"single-{st.arch}-k{st.width:g}-n{st.per_class}-"
                                                        f"e{st.epochs}-seed*")}
    same = [abs(p["test"]["ensemble"]["top1"] - t1_single[p["seed"]]["test"]["ensemble"]["top1"]) < 1e-6
            for p in parents if p["seed"] in t1_single]
    out = {"setting": _config(st), "arm_b": dataclasses.asdict(b),
           "parent": _top1(parents), "a": _top1(arm_a), "b": _top1(arm_b),
           "b_minus_a_welch": welch, "b_minus_a_paired_bootstrap": boot, "b_minus_parent_paired_t": vs_parent,
           "b_compute_vs_a_macs": compute, "b_seconds_vs_a": seconds_vs_a, "goal_within_0.3_of_a": goal,
           "parents_equal_t1_single": f"{sum(same)}/{len(same)}" if same else "no T1 single records of this setting"}

    def row(name: str, recs: Sequence[Dict[str, Any]], cost: str) -> str:
        t = _top1(recs)
        sd = f" ± {statistics.stdev(t):.2f}" if len(t) > 1 else ""
        secs = statistics.mean(r["train_seconds"] for r in recs)
        return f"| {name} | {len(t)} | {statistics.mean(t):.2f}{sd} | {secs:.0f} | {cost} |"

    lines = [
        "# Split a trained model: inherit + distil (issue 40)", "",
        f"Reproduce: `{COMMAND}` (arm A: `docs/science/t1`). Setting: science T1 "
        f"({st.arch} k = {st.width:g}, {st.per_class} images a class, {st.epochs} epochs, batch {st.batch_size}, "
        f"lr {st.lr:g}); arm B: `split(parent, 2, init='inherit')` distilled from the parent for {b.epochs} epochs "
        f"(T = {b.temperature:g}, timm's weights {DistillOptions(temperature=b.temperature, task_loss_weight=b.task_loss_weight, distill_loss_weight=b.distill_loss_weight).weights}, co-training weight {st.cot_weight:g}).", "",
        "| arm | seeds | test top-1 % (mean ± sd) | train s (mean) | training compute vs A |", "|---|---|---|---|---|",
        row("parent: single k = 2, full schedule", parents, "~1 (already spent: the model a user has)"),
        row("A: S = 2 from scratch, full schedule", arm_a, "1"),
        row(f"B: S = 2 inherited + distilled, {b.epochs} epochs", arm_b, f"{compute:.3f} (MACs, teacher included); "
            f"{seconds_vs_a:.3f} (seconds)"), "",
        f"- B - A (points): Welch {_ci(welch)}; paired bootstrap over {len(both)} shared seeds and the test images "
        f"[{boot[0]:+.2f}, {boot[1]:+.2f}].",
        f"- B - parent (points, paired by seed): {_ci(vs_parent)}.",
        f"- Goal (B within 0.3 points of A, both lower bounds > -0.3): **{goal}**; B's training compute is "
        f"{compute:.1%} of A's (MACs) and took {seconds_vs_a:.1%} of A's seconds (A's from its records: same "
        "machine class and threads only if so stated there).",
        f"- Parents equal to T1's single records of the same seed: {out['parents_equal_t1_single']}.", ""]
    os.makedirs(os.path.dirname(md) or ".", exist_ok=True)
    # only the generated section: notes written by hand in docs/distill.md stay (timm_split.generated)
    write_generated(md, {"report": "\n".join(lines[2:])}, title=lines[0].lstrip("# "), source=COMMAND)
    write_json(js, out)
    print("\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------------------------
# estimate, dry run, CLI

def estimate(st: science.Setting, b: ArmB, seeds: Sequence[int], jobs: int, a_records: str) -> float:
    """Expected wall time from T1's records (single and s2 seconds per epoch on their machine, 1 thread), the
    teacher's forward on S views counted at 2/3 of a training step's compute."""
    single = _load(a_records, f"single-{st.arch}-k{st.width:g}-n{st.per_class}-e{st.epochs}-seed*")
    s2 = _a_records(st, a_records, RECORDS)
    if not single or not s2:
        raise SystemExit(f"no T1 records of this setting in {a_records} to estimate from.")
    parent_s = statistics.mean(r["train_seconds"] for r in single)
    b_s = statistics.mean(r["train_seconds"] for r in s2) * b.epochs / st.epochs * (1 + 2 / 3)
    total = len(seeds) * (parent_s + b_s + 60)  # + evaluation and the split
    wall = total / max(1, min(jobs, 2))
    print(f"parents {len(seeds)} x {parent_s:.0f}s, arm B {len(seeds)} x {b_s:.0f}s (+~60s each for evaluation): "
          f"{total / 60:.0f} core-minutes, ~{wall / 60:.0f} min with --jobs {jobs} on an idle 2-core CPU", flush=True)
    return wall


def dry_run(args: argparse.Namespace) -> None:
    """Everything at a tiny size (4 epochs, 10 images a class, 2 seeds; A trained too) in a temp folder."""
    out = tempfile.mkdtemp(prefix="distill_dry_")
    st = dataclasses.replace(t1_setting(args.data_dir), per_class=10, epochs=4, batch_size=32)
    b = ArmB(epochs=1, lr=args.b_lr, temperature=args.temperature)
    records, work = os.path.join(out, "records"), os.path.join(out, "work")
    print(f"dry run in {out}", flush=True)
    t0 = time.perf_counter()
    run_all([0, 1], st, b, records, work, args.jobs, args.threads, with_a=True)
    run_all([0, 1], st, b, records, work, args.jobs, args.threads, with_a=True)  # resumes: nothing left to run
    report(st, b, records, os.path.join(out, "no_t1"), os.path.join(out, "distill.md"),
           os.path.join(out, "distill.json"))
    print(f"dry run done in {time.perf_counter() - t0:.0f}s", flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--seeds", type=int, nargs="+", default=list(range(5)), help="seeds of the parents and of arm B (default 0-4)")
    a("--b-epochs", type=int, default=None, help="arm B's epochs (default: 10%% of the schedule, 30)")
    a("--b-lr", type=float, default=0.05, help="arm B's peak lr (cosine over its epochs)")
    a("--temperature", type=float, default=4.0, help="--kd-temperature (timm's default 4)")
    a("--task-loss-weight", type=float, default=None, help="timm's --task-loss-weight (default: 1)")
    a("--distill-loss-weight", type=float, default=None, help="timm's --distill-loss-weight (default: 1)")
    a("--data-dir", default=science.DATA_DIR)
    a("--records", default=RECORDS)
    a("--work", default=WORK, help="where the parents' weights go")
    a("--a-records", default=A_RECORDS, help="arm A's records (science T1)")
    a("--jobs", type=int, default=1)
    a("--threads", type=int, default=1, help="torch threads per run (T1's records: 1)")
    a("--estimate", action="store_true", help="print the expected wall time; train nothing")
    a("--report", action="store_true", help="write docs/distill.md and docs/distill.json from the records")
    a("--dry-run", action="store_true", help="the pipeline at a tiny size in a temp folder")
    a("--keep", action="store_true", help="keep the dry run's folder")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dry_run:
        return dry_run(args)
    st = t1_setting(args.data_dir)
    b = ArmB(epochs=args.b_epochs or round(0.1 * st.epochs), lr=args.b_lr, temperature=args.temperature,
             task_loss_weight=args.task_loss_weight, distill_loss_weight=args.distill_loss_weight)
    if args.estimate:
        estimate(st, b, args.seeds, args.jobs, args.a_records)
        return None
    if args.report:
        report(st, b, args.records, args.a_records, DOC_MD, DOC_JSON)
        return None
    t0 = time.perf_counter()
    run_all(args.seeds, st, b, args.records, args.work, args.jobs, args.threads)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; records in {args.records}. Next: "
          "python benchmarks/distill.py --report", flush=True)
    return None


if __name__ == "__main__":
    main()
