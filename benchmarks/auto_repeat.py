"""Does ``set_execution('auto')`` ever lose to the loop? ``benchmarks/speed.py`` run N times in fresh processes
(issue 41).

    python benchmarks/auto_repeat.py                      # resnet50 S=2 inference, batch 8 (128 px), 10 runs
    python benchmarks/auto_repeat.py --runs 2 --model resnet18 --img-size 64 --json /tmp/auto_repeat.json  # dry run

Each run is ``python benchmarks/speed.py --model M --split S --mode infer --batch B --strategy auto loop threads``
in a new Python process with an empty ``TIMM_SPLIT_CACHE_DIR`` (a temporary folder), so every run's ``auto``
decides afresh, as a first process would (``--keep-cache`` shares one folder: the later runs then read the first
decision from disk). speed.py times the original model and each strategy interleaved, after warm-up (``auto``
decides during its first warm-up call), and reports each strategy's ratio of medians to the original and the
spread of its per-round ratios (25th-75th percentile). Per run this records ``auto``'s choice, its ratio and the
loop's, ``auto`` over the loop (ratio of their medians), ``auto``'s decision log line (its median ratio, interval,
trial calls and seconds), the load average and the wall time.

A run is **worse** when ``auto``'s ratio exceeds the loop's by more than the spread (the larger of the two
strategies' spreads in that run). The goal (issue 41): no run is worse. Results: a table on stdout, the verdict,
and ``--json`` (default ``docs/auto_repeat_cpu.json``, written whole after every run). Run it on a quiet machine.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from common import ROOT, run_header, write_json

SPEED = os.path.join(ROOT, "benchmarks", "speed.py")
DECISION = re.compile(r"auto: '(?P<winner>[^']+)' for devices .*")
FIELDS = {"median": r"median time / loop (?P<v>[0-9.]+)", "interval": r"interval \[(?P<v>[0-9.]+, [0-9.]+)\]",
          "trial_calls": r"First-call cost: (?P<v>\d+) trial calls", "trial_s": r"trial calls .* in (?P<v>[0-9.]+) s",
          "loop_calls": r"= (?P<v>[0-9.]+) loop calls", "ignored": r"(?P<v>\d+) round\(s\) ignored"}


def speed_command(args: argparse.Namespace, json_path: str) -> List[str]:
    """The speed.py command line of one run."""
    cmd = [sys.executable, SPEED, "--model", args.model, "--split", str(args.split), "--mode", "infer",
           "--batch", str(args.batch), "--strategy", *args.strategy, "--json", json_path,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.img_size:
        cmd += ["--img-size", str(args.img_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def parse_decision(log: str) -> Dict[str, Any]:
    """``auto``'s decision from speed.py's log (stderr): the line, and what it states (None where absent)."""
    lines = [line for line in log.splitlines() if DECISION.search(line)]
    out: Dict[str, Any] = {"decision_log": lines[0].split("auto: ", 1)[1] if lines else None}
    for name, pattern in FIELDS.items():
        m = re.search(pattern, lines[0]) if lines else None
        value = m.group("v") if m else None
        if value is None and name == "ignored" and lines:
            value = "0"
        out[name] = (None if value is None else [float(x) for x in value.split(", ")] if name == "interval"
                     else int(value) if name in ("trial_calls", "ignored") else float(value))
    return out


def one_run(args: argparse.Namespace, index: int, cache: str) -> Dict[str, Any]:
    """One speed.py process; its record (``error`` on failure)."""
    with tempfile.TemporaryDirectory(prefix="auto_repeat_") as tmp:
        out_json = os.path.join(tmp, "speed.json")
        env = dict(os.environ, TIMM_SPLIT_CACHE_DIR=cache or os.path.join(tmp, "cache"))
        start, load = time.monotonic(), round(os.getloadavg()[0], 2)
        rec: Dict[str, Any] = dict(run=index, load_before=load)
        try:
            done = subprocess.run(speed_command(args, out_json), capture_output=True, text=True, env=env,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(rec, error=f"timed out after {args.timeout:.0f} s")
        rec["wall_s"] = round(time.monotonic() - start, 1)
        if done.returncode != 0 or not os.path.exists(out_json):
            return dict(rec, error=(done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
        with open(out_json) as f:
            records = {r["strategy"]: r for r in json.load(f)["records"]}
    if "auto" not in records or "loop" not in records:
        return dict(rec, error=f"speed.py recorded {sorted(records)}, not auto and loop")
    a, loop = records["auto"], records["loop"]
    spread = max(a["spread"], loop["spread"])
    rec.update(choice=", ".join(a.get("chose", [])), auto_ratio=round(a["ratio"], 4),
               loop_ratio=round(loop["ratio"], 4),
               auto_spread=round(a["spread"], 4), loop_spread=round(loop["spread"], 4),
               auto_over_loop=round(a["ms"] / loop["ms"], 4), excess=round(a["ratio"] - loop["ratio"], 4),
               worse=a["ratio"] - loop["ratio"] > spread, original_ms=round(a["original_ms"], 2),
               load=a["load"], others={s: round(r["ratio"], 4) for s, r in records.items() if s not in ("auto",)})
    rec.update(parse_decision(done.stderr))
    return rec


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The verdict over the runs that finished."""
    ok = [r for r in rows if "error" not in r]
    choices: Dict[str, int] = {}
    for r in ok:
        choices[r["choice"]] = choices.get(r["choice"], 0) + 1
    worse = [r["run"] for r in ok if r["worse"]]
    return dict(runs=len(rows), finished=len(ok), choices=choices, worse_runs=worse, goal_met=bool(ok) and not worse,
                max_excess=max((r["excess"] for r in ok), default=None),
                median_auto_over_loop=statistics.median([r["auto_over_loop"] for r in ok]) if ok else None,
                median_trial_calls=statistics.median([r["trial_calls"] for r in ok if r.get("trial_calls") is not None]
                                                     or [float("nan")]),
                median_trial_loop_calls=statistics.median([r["loop_calls"] for r in ok if r.get("loop_calls")]
                                                          or [float("nan")]))


def table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'run':>3} {'choice':<15} {'auto':>6} {'loop':>6} {'spread':>6} {'auto/loop':>9} {'worse':>5} "
            f"{'median':>6} {'interval':>13} {'trials':>6} {'trial s':>7} {'load':>5} {'wall s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['run']:>3} error: {r['error']}")
            continue
        interval = "-" if not r.get("interval") else "%.3f-%.3f" % tuple(r["interval"])
        median = "-" if r.get("median") is None else f"{r['median']:.3f}"
        lines.append(f"{r['run']:>3} {r['choice']:<15} {r['auto_ratio']:6.3f} {r['loop_ratio']:6.3f} "
                     f"{max(r['auto_spread'], r['loop_spread']):6.3f} {r['auto_over_loop']:9.3f} "
                     f"{'YES' if r['worse'] else 'no':>5} {median:>6} {interval:>13} "
                     f"{r.get('trial_calls') if r.get('trial_calls') is not None else '-'!s:>6} "
                     f"{r.get('trial_s') if r.get('trial_s') is not None else '-'!s:>7} {r['load']:5.2f} "
                     f"{r['wall_s']:6.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--split", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=None, help="default: speed.py's (128 px at batch 8 on a CPU)")
    ap.add_argument("--strategy", nargs="+", default=["auto", "loop", "threads"],
                    help="speed.py --strategy (must include auto and loop)")
    ap.add_argument("--warmup", type=int, default=2, help="speed.py --warmup")
    ap.add_argument("--repeats", type=int, default=7, help="speed.py --repeats (timed rounds)")
    ap.add_argument("--threads", type=int, default=0, help="speed.py --threads (default: torch's)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="one TIMM_SPLIT_CACHE_DIR for every run (the later runs read the first decision)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "auto_repeat_cpu.json"))
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if not {"auto", "loop"} <= set(args.strategy):
        ap.error(f"--strategy must include auto and loop, got {args.strategy}")
    header = run_header(runs=args.runs, model=args.model, split=args.split, batch=args.batch, img_size=args.img_size,
                        strategies=args.strategy, speed_warmup=args.warmup, speed_repeats=args.repeats,
                        keep_cache=args.keep_cache, command=" ".join(speed_command(args, "OUT.json")[1:]),
                        worse="auto's ratio - the loop's > max(auto's spread, the loop's spread) in that run")
    print(f"auto_repeat: {args.runs} runs of: {header['command']}", flush=True)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="auto_repeat_cache_") as shared:
        for i in range(1, args.runs + 1):
            rec = one_run(args, i, shared if args.keep_cache else "")
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            write_json(args.json, dict(header=header, summary=summary(rows), runs=rows))
    result = summary(rows)
    print(table(rows))
    print(f"choices: {result['choices']}; auto over the loop, median of runs: {result['median_auto_over_loop']}; "
          f"trial calls, median: {result['median_trial_calls']} ({result['median_trial_loop_calls']} loop calls)")
    if not result["finished"]:
        print("no run finished")
    elif result["goal_met"]:
        print(f"goal met: in none of {result['finished']} runs was auto's ratio worse than the loop's by more than "
              f"the spread (largest excess {result['max_excess']:+.3f})")
    else:
        print(f"goal MISSED: auto was worse than the loop by more than the spread in runs {result['worse_runs']} "
              f"of {result['finished']} (largest excess {result['max_excess']:+.3f})")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
