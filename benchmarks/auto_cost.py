"""What ``set_execution('auto')`` costs on its first call, against one plain loop call (issue 28).

    python benchmarks/auto_cost.py                                  # resnet50 S=2 b8 224 px and resnet18 S=2 b8 64 px
    python benchmarks/auto_cost.py --before-rev 50009fa             # adds 'auto' as it was at that commit
    python benchmarks/auto_cost.py --repeats 5 --no-cache           # today's 'auto' with the old defaults' knobs
    python benchmarks/auto_cost.py --case test_resnet:32 --json /tmp/auto_cost.json   # a dry run (seconds)

Every variant runs in its own Python process (so each peak memory is its own): it builds
``timm.create_model('splitnet_<model>', split_factor=S)`` (1000 classes), then times its first call (train mode:
forward of per-member views ``[S, B, 3, H, W]``, cross-entropy, backward; ``--mode infer``: eval, ``torch.no_grad``,
one shared batch), then a second call (steady state), then, for ``auto``, builds the same model again and times
that model's first call (the decision remembered for the process: no trials). ``auto-cached`` is a second
process with the ``auto`` variant's ``TIMM_SPLIT_CACHE_DIR``: its first call reads the decision from disk (issue 41's
goal: at most 15 loop calls). Every case starts with an empty cache folder of its own (a temporary one), so ``auto``
decides afresh whatever the user's cache holds. Trial calls are counted by wrapping each candidate strategy's
``run``; the winner's real call is not counted.

Memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set, Linux: KiB) after the first
call, and the resident set just before it (``/proc/self/statm``); ``call MB`` is their difference, the memory the
first call added on top of the model. ``x loop`` columns divide by the loop's. psutil is not used.

``--before-rev REV`` loads ``timm_split/execution/auto.py`` as it was at git commit ``REV`` (``git show``, from this
checkout) on top of the installed package, for a before/after comparison in one run; 50009fa is the last commit
before issue 28's changes. Results: a table on stdout and a JSON record (``--json``, default
``docs/auto_cost_cpu.json``) with the machine's load average, threads and versions. Run it on a quiet machine.
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from common import run_header, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CASES = ["resnet50:224", "resnet18:64"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _old_auto(rev: str) -> Any:
    """``AutoExecution`` from ``timm_split/execution/auto.py`` at git commit ``rev``, on the installed package."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:timm_split/execution/auto.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("timm_split.execution.auto_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "timm_split.execution"
    exec(compile(src, f"{rev}:timm_split/execution/auto.py", "exec"), module.__dict__)
    return module.AutoExecution


def _count_trials(auto: Any, counts: Dict[str, int]) -> None:
    """Count every call of each candidate ``auto`` runs (wraps the executions ``auto._get`` hands out)."""
    get = auto._get

    def counted(name: str) -> Any:
        ex = get(name)
        if not getattr(ex, "_counted", False):
            def run(members, views, _run=ex.run, _name=name):
                counts[_name] = counts.get(_name, 0) + 1
                return _run(members, views)
            ex.run, ex._counted = run, True
        return ex

    auto._get = counted


def child(opts: Dict[str, Any]) -> Dict[str, Any]:
    """One variant in this process: build, first call, second call (and a rebuilt model's first call)."""
    import timm
    import torch
    import torch.nn.functional as F

    import timm_split  # noqa: F401 - registers splitnet_<model>

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    S, B, size, train = opts["split"], opts["batch"], opts["img_size"], opts["mode"] == "train"
    torch.manual_seed(0)
    views = torch.randn(S, B, 3, size, size)
    target = torch.randint(0, 1000, (B,))
    repeats = {"repeats": opts["repeats"]} if opts["repeats"] else {}  # else each version's default

    def build() -> Any:
        ens = timm.create_model(f"splitnet_{opts['model']}", split_factor=S).train(train)
        if opts["variant"] in ("auto", "auto-cached"):
            ens.set_execution("auto", cache=opts["cache"], **repeats)
        elif opts["variant"] == "auto-before":
            ens._execution = _old_auto(opts["before_rev"])(**repeats)
        return ens

    def call(ens: Any) -> float:
        t = time.perf_counter()
        if train:
            out = ens.forward_members(views)
            F.cross_entropy(out.flatten(0, 1).float(), target.repeat(S)).backward()
        else:
            with torch.no_grad():
                ens(views[0])
        return time.perf_counter() - t

    ens = build()
    counts: Dict[str, int] = {}
    if opts["variant"] != "loop":
        _count_trials(ens._execution, counts)
    rss_before = _rss_mb()
    first = call(ens)
    peak = _peak_mb()
    rec = dict(first_call_s=round(first, 3), rss_before_mb=round(rss_before), peak_rss_mb=round(peak),
               call_mb=round(peak - rss_before))
    if opts["variant"] != "loop":
        choice = sorted(set(ens._execution.choices.values()))
        counts[choice[0]] = counts.get(choice[0], 1) - 1  # the real call
        rec.update(choice=choice[0], trial_calls=sum(counts.values()), trials=dict(counts))
    rec["second_call_s"] = round(call(ens), 3)
    if opts["variant"] == "auto":
        again = build()
        rebuilt: Dict[str, int] = {}
        _count_trials(again._execution, rebuilt)
        rec["rebuilt_first_call_s"] = round(call(again), 3)
        rec["rebuilt_trial_calls"] = sum(rebuilt.values()) - 1
    return rec


def run_variant(opts: Dict[str, Any], timeout: float, cache_dir: str) -> Dict[str, Any]:
    """``child(opts)`` in a fresh Python process (its own peak memory) with ``TIMM_SPLIT_CACHE_DIR=cache_dir``;
    ``error`` on failure or timeout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(opts)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, TIMM_SPLIT_CACHE_DIR=cache_dir))
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'case':<22} {'variant':<12} {'first s':>8} {'x loop':>7} {'trials':>6} {'choice':<15} "
            f"{'2nd s':>7} {'rebuilt s':>9} {'peak MB':>8} {'call MB':>8} {'x loop':>7}")
    lines = [head, "-" * len(head)]
    loops = {r["case"]: r for r in rows if r["variant"] == "loop" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<22} {r['variant']:<12} error: {r['error']}")
            continue
        loop = loops.get(r["case"])
        t_ratio = f"{r['first_call_s'] / loop['first_call_s']:.1f}" if loop else "-"
        m_ratio = f"{r['call_mb'] / max(loop['call_mb'], 1):.1f}" if loop else "-"
        rebuilt = r.get("rebuilt_first_call_s")
        lines.append(f"{r['case']:<22} {r['variant']:<12} {r['first_call_s']:>8.2f} {t_ratio:>7} "
                     f"{r.get('trial_calls', '-')!s:>6} {r.get('choice', '-'):<15} {r['second_call_s']:>7.2f} "
                     f"{'-' if rebuilt is None else f'{rebuilt:.2f}':>9} {r['peak_rss_mb']:>8} {r['call_mb']:>8} "
                     f"{m_ratio:>7}")
    return "\n".join(lines)


def _header(args: argparse.Namespace) -> Dict[str, Any]:
    """``common.run_header`` with this run's options (``threads``: the variants' own when ``--threads`` set it)."""
    threads = {"threads": args.threads} if args.threads else {}
    return run_header(**threads, mode=args.mode, split=args.split, batch=args.batch, repeats=args.repeats,
                      cache=not args.no_cache, before_rev=args.before_rev,
                      memory="resource.getrusage ru_maxrss (peak RSS) and /proc/self/statm")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="MODEL:IMG_SIZE, repeatable (default: %s)" % DEFAULT_CASES)
    ap.add_argument("--split", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="auto's repeats (default: each version's own, 3 "
                    "today, 5 before issue 28)")
    ap.add_argument("--no-cache", action="store_true", help="auto(cache=False): no decisions shared in the process")
    ap.add_argument("--before-rev", default=None, help="also run auto.py as it was at this git commit")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "auto_cost_cpu.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    variants = ["loop", "auto"] + ([] if args.no_cache else ["auto-cached"]) + (["auto-before"] if args.before_rev
                                                                                 else [])
    rows = []
    for case in args.case or DEFAULT_CASES:
        model, _, size = case.partition(":")
        cache = tempfile.TemporaryDirectory(prefix="auto_cost_cache_")  # this case's own: auto decides afresh
        for variant in variants:
            opts = dict(model=model, img_size=int(size or 224), split=args.split, batch=args.batch, mode=args.mode,
                        threads=args.threads, repeats=args.repeats, cache=not args.no_cache, variant=variant,
                        before_rev=args.before_rev)
            rec = dict(case=f"{model} {size}px b{args.batch} S{args.split}", variant=variant,
                       load=round(os.getloadavg()[0], 2))
            rec.update(run_variant(opts, args.timeout, cache.name))
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        cache.cleanup()
    print(_table(rows))
    write_json(args.json, dict(header=_header(args), rows=rows))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
