#!/usr/bin/env python
"""Run timm's own tests/test_models.py (timm 1.0.31, unmodified, next to this file) on base architectures and
on their ``splitnet_<arch>`` versions, and tabulate the pass rates per test function.

    python benchmarks/timm_model_tests/run.py                      # the 25 default archs, base + splitnet,
                                                                   # reusing the results already in results/
    python benchmarks/timm_model_tests/run.py --force              # rerun every arch
    python benchmarks/timm_model_tests/run.py --archs resnet18     # one arch
    python benchmarks/timm_model_tests/run.py --table-only         # rebuild results/table.md from the JSONs

One pytest process per (mode, arch) by default: a crash or hang costs one arch, and a rerun resumes (an arch
whose JSON exists is skipped unless --force). Outputs, under --results (default results/ next to this file):

    <mode>/<arch>.json   per-item outcomes, messages, durations, timm's native collection flags (conftest.py)
    <mode>/<arch>.xml    pytest's junit XML
    <mode>/<arch>.log    pytest's output
    table.md             test function x base passed/total x splitnet passed/total, first splitnet failure
    summary.json         the table's numbers, and the runs' metadata

See README.md for how the test selection works and what it cannot make equal.
"""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FILE = os.path.join(HERE, "test_models.py")
INI = os.path.join(HERE, "pytest.ini")
TIMM_TEST_SHA256 = "ffb62c6df02601a96c2fda403723a7f96a806897ee061d1009c1f3135fb64eb7"  # timm-1.0.31 sdist

# one small model per family (the smallest variant timm registers, where it has several)
DEFAULT_ARCHS = [
    "resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "regnetx_002", "densenet121", "mixer_s32_224", "levit_128s", "coat_lite_tiny",
    "poolformer_s12", "edgenext_xx_small", "ghostnet_050", "dla46_c", "hrnet_w18_small", "cspresnet50", "repvgg_a0",
    "mobilevit_xxs", "efficientformer_l1", "maxvit_pico_rw_256", "eva02_tiny_patch14_224", "fastvit_t8",
    "mobilenetv3_small_050", "rexnet_100",
]
MODES = OrderedDict([("base", ""), ("splitnet", "splitnet_")])
PASS = {"passed", "xpassed"}
FAIL = {"failed", "error", "crashed", "timeout"}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fetch():
    """(Re)create test_models.py from the timm 1.0.31 sdist on PyPI (pip download), checking its sha256."""
    import tarfile
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "timm==1.0.31", "--no-binary", ":all:",
                               "--no-deps", "-d", d])
        with tarfile.open(os.path.join(d, "timm-1.0.31.tar.gz")) as tar:
            data = tar.extractfile("timm-1.0.31/tests/test_models.py").read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TIMM_TEST_SHA256:
        raise SystemExit(f"sha256 {digest} != {TIMM_TEST_SHA256}: not the file this harness was written for")
    with open(TEST_FILE, "wb") as f:
        f.write(data)
    print(f"wrote {TEST_FILE} (sha256 {digest})")


def run_one(args, mode, archs, stem):
    """One pytest process for ``archs`` in ``mode``; returns (rc, seconds)."""
    out = os.path.join(args.results, mode)
    os.makedirs(out, exist_ok=True)
    js, xml, log = (os.path.join(out, f"{stem}.{ext}") for ext in ("json", "xml", "log"))
    env = dict(os.environ)
    env.pop("GITHUB_ACTIONS", None)  # timm's file switches to its CI model lists under GitHub Actions
    env.update(TIMM_SPLIT_ARCHS=",".join(archs), TIMM_SPLIT_PREFIX=MODES[mode], TIMM_SPLIT_JSON=js,
               TIMM_SPLIT_NETWORK="1" if args.network else "", TIMM_SPLIT_ALL_TAGS="1" if args.all_tags else "",
               TIMM_SPLIT_TIMEOUT=str(args.timeout_override or ""))
    if not args.network:
        env.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "pytest", "-c", INI, "--rootdir", HERE, "-p", "no:cacheprovider", "-q", "-rfEs",
           f"--junitxml={xml}", TEST_FILE]
    if args.timeout:
        cmd.append(f"--timeout={args.timeout}")  # for tests timm left without a timeout mark
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.pytest_args
    if os.path.exists(js):
        os.remove(js)
    t0 = time.time()
    print(f"[{mode}] {stem}: {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as f:
        f.write(f"# TIMM_SPLIT_ARCHS={env['TIMM_SPLIT_ARCHS']} TIMM_SPLIT_PREFIX={env['TIMM_SPLIT_PREFIX']}\n"
                f"# {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=args.arch_timeout or None)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    dt = time.time() - t0
    if not os.path.exists(js):  # crashed (segfault, OOM kill) or killed: record it so that the table shows it
        with open(js, "w") as f:
            json.dump({"archs": archs, "prefix": MODES[mode], "exitstatus": rc, "crashed": True, "collection": {},
                       "results": [{"nodeid": f"<{mode} {a}>", "test": "<pytest process>", "arch": a,
                                    "model_name": MODES[mode] + a,
                                    "outcome": "timeout" if rc == "timeout" else "crashed",
                                    "message": f"pytest exit {rc} after {dt:.0f}s, see {log}", "duration": dt}
                                   for a in archs]}, f, indent=1)
    with open(js) as f:
        data = json.load(f)
    data["wall_s"] = dt
    with open(js, "w") as f:
        json.dump(data, f, indent=1)
    counts = {}
    for r in data["results"]:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"[{mode}] {stem}: rc={rc} {dt:.0f}s {counts}", flush=True)
    return rc, dt


def load(results, mode, archs):
    """{arch: json} for the archs that have a result in ``mode`` (per-arch files, or one 'all' file)."""
    out = {}
    d = os.path.join(results, mode)
    for stem in ["all"] + list(archs):
        path = os.path.join(d, f"{stem}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        for a in archs:
            if a in data.get("archs", []) and (stem == a or a not in out):
                out[a] = data
    return out


def _cell(recs):
    if not recs:
        return "-"
    n = len(recs)
    passed = sum(r["outcome"] in PASS for r in recs)
    skipped = sum(r["outcome"] == "skipped" for r in recs)
    ran = n - skipped
    s = f"{passed}/{ran}" + (f" ({100 * passed / ran:.0f}%)" if ran else "")
    return s + (f", {skipped} skipped" if skipped else "")


def _md(s, n=160):
    s = " ".join(str(s).split())
    s = s if len(s) <= n else s[:n - 1] + "…"
    return s.replace("|", "\\|")


def build_table(args, archs):
    data = {m: load(args.results, m, archs) for m in MODES}
    recs = {m: [r for a in archs if a in data[m] for r in data[m][a]["results"] if r["arch"] == a] for m in MODES}
    tests = list(OrderedDict.fromkeys(r["test"] for m in MODES for r in recs[m]))
    native = {}
    for a, d in data["splitnet"].items():
        for t, per in d.get("collection", {}).items():
            if a in per:
                native.setdefault(t, {})[a] = per[a]["native"]

    lines = ["# timm's tests/test_models.py: base architectures vs splitnet_<arch>", ""]
    meta = next((d for m in MODES for d in data[m].values() if "timm" in d), {})
    lines += [f"timm {meta.get('timm', '?')}, torch {meta.get('torch', '?')}, pytest {meta.get('pytest', '?')}; "
              f"test_models.py sha256 `{_sha256(TEST_FILE)[:16]}…` (timm-1.0.31 sdist: "
              f"{'identical' if _sha256(TEST_FILE) == TIMM_TEST_SHA256 else 'DIFFERENT'}).", ""]
    for m in MODES:
        have = [a for a in archs if a in data[m]]
        wall = sum(data[m][a].get("wall_s", 0) for a in set(have))
        lines.append(f"- {m}: {len(have)}/{len(archs)} archs run, {len(recs[m])} test items, "
                     f"{wall / 60:.1f} min of pytest wall time")
    missing = {m: [a for a in archs if a not in data[m]] for m in MODES}
    for m, miss in missing.items():
        if miss:
            lines.append(f"- {m}: not run yet: {', '.join(miss)}")
    lines += ["", "Cells: passed/ran (pass rate), skipped items not counted in `ran` (timm skips them itself, e.g. "
              "input size over its limit). `native`: archs for which timm's own import-time model lists already "
              "named splitnet_<arch> (the rest run only because conftest.py maps the base's items, see README.md).",
              "", "| test | base | splitnet | native | first splitnet failure |", "|---|---|---|---|---|"]
    summary = {"archs": archs, "tests": {}}
    for t in tests:
        b = [r for r in recs["base"] if r["test"] == t]
        s = [r for r in recs["splitnet"] if r["test"] == t]
        fails = [r for r in s if r["outcome"] in FAIL]
        first = ""
        if fails:
            dag = " †" if fails[0].get("caveat") else ""
            first = f"`{fails[0]['arch']}`{dag}: {_md(fails[0]['message'])}"
            if len(fails) > 1:
                first += f" (+{len(fails) - 1} more)"
        nat = native.get(t, {})
        nat_s = f"{sum(nat.values())}/{len(nat)}" if nat else "-"
        lines.append(f"| `{t}` | {_cell(b)} | {_cell(s)} | {nat_s} | {first} |")
        summary["tests"][t] = {m: {o: sum(r["outcome"] == o for r in rs) for o in
                                   sorted({r["outcome"] for r in rs})}
                               for m, rs in (("base", b), ("splitnet", s))}
        summary["tests"][t]["native"] = nat
    tot = {m: _cell(recs[m]) for m in MODES}
    lines.append(f"| **all** | {tot['base']} | {tot['splitnet']} | | |")

    lines += ["", "## Per architecture", "", "| arch | base | splitnet | base failures | splitnet failures |",
              "|---|---|---|---|---|"]
    summary["archs_detail"] = {}
    for a in archs:
        b = [r for r in recs["base"] if r["arch"] == a]
        s = [r for r in recs["splitnet"] if r["arch"] == a]
        bf = sorted({r["test"] for r in b if r["outcome"] in FAIL})
        sf = sorted({r["test"] for r in s if r["outcome"] in FAIL})
        lines.append(f"| `{a}` | {_cell(b)} | {_cell(s)} | {', '.join(bf)} | {', '.join(sf)} |")
        summary["archs_detail"][a] = {"base": {r["test"]: r["outcome"] for r in b},
                                      "splitnet": {r["test"]: r["outcome"] for r in s}}

    fail_lines = []
    for r in recs["splitnet"]:
        if r["outcome"] in FAIL:
            note = f" † {r['caveat']}" if r.get("caveat") else ""
            fail_lines.append(f"| `{r['arch']}` | `{r['test']}` | {r['outcome']} | {_md(r['message'], 300)}{note} |")
    if fail_lines:
        lines += ["", "## Every splitnet failure", "", "† the test body branches on the model name (README.md).",
                  "", "| arch | test | outcome | message |", "|---|---|---|---|"]
        lines += fail_lines
    native_only = {}
    for a, d in data["splitnet"].items():
        for t, per in d.get("native_only", {}).items():
            if a in per:
                native_only.setdefault(t, []).append(a)
    if native_only:
        lines += ["", "## Not run: tests timm's own lists would give splitnet_<arch> but not <arch>", "",
                  "timm's name filters (`'vit_*'`, `'hrnet*'` ...) do not match the `splitnet_` prefix, so its "
                  "import-time lists put these splitnet names in tests their base is kept out of. They are not run "
                  "(the base's test set is run instead, see README.md).", "", "| test | archs |", "|---|---|"]
        lines += [f"| `{t}` | {', '.join(sorted(a))} |" for t, a in native_only.items()]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines[:len(tests) + 20]))
    print(f"\nwrote {os.path.join(args.results, 'table.md')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated base archs (default: the 25)")
    ap.add_argument("--modes", default="base,splitnet", help="base, splitnet or both (default)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--single-process", action="store_true", help="one pytest process per mode for all archs")
    ap.add_argument("--force", action="store_true", help="rerun archs that already have a result")
    ap.add_argument("--table-only", action="store_true", help="only rebuild table.md from existing results")
    ap.add_argument("--fetch", action="store_true", help="(re)create test_models.py from timm 1.0.31's sdist")
    ap.add_argument("--timeout", type=int, default=600,
                    help="pytest-timeout for tests that timm left without a timeout mark (default 600 s)")
    ap.add_argument("--timeout-override", type=int, default=0,
                    help="override every test's own timeout mark (default: timm's 120/240/360 s)")
    ap.add_argument("--arch-timeout", type=int, default=3600, help="kill one pytest process after this (s)")
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads for the pytest processes")
    ap.add_argument("--network", action="store_true", help="keep the tests that download hub weights")
    ap.add_argument("--all-tags", action="store_true",
                    help="base: every pretrained tag of include_tags lists (default: the arch's default tag only)")
    ap.add_argument("-k", default="", help="pytest -k expression, e.g. 'forward and not fx'")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; use {list(MODES)}")
    if args.fetch or not os.path.exists(TEST_FILE):
        fetch()
    if _sha256(TEST_FILE) != TIMM_TEST_SHA256:
        print(f"WARNING: {TEST_FILE} differs from timm-1.0.31's tests/test_models.py", file=sys.stderr)

    if not args.table_only:
        t0 = time.time()
        ran, reused = 0, 0
        for mode in modes:
            groups = [("all", archs)] if args.single_process else [(a, [a]) for a in archs]
            for stem, group in groups:
                if not args.force and os.path.exists(os.path.join(args.results, mode, f"{stem}.json")):
                    print(f"[{mode}] {stem}: have a result, skipped (--force reruns)")
                    reused += 1
                    continue
                run_one(args, mode, group, stem)
                ran += 1
        print(f"total {time.time() - t0:.0f}s: ran {ran} pytest process(es), reused {reused} cached result(s)"
              + (" (pass --force to rerun those)" if reused else ""))
    build_table(args, archs)


if __name__ == "__main__":
    main()
