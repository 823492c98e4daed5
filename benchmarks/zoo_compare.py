"""Compare two sweep CSVs (``timm-split sweep --out``): per (arch, S), the same status and params/MACs ratios
within a tolerance? Prints the counts and every differing row::

    python benchmarks/zoo_compare.py docs/zoo.csv zoo_after.csv            # tolerance 0.001
"""
import argparse
import csv
from typing import Dict, Tuple

Row = Dict[str, str]


def load(path: str) -> Dict[Tuple[str, str], Row]:
    """The rows of a sweep CSV by (arch, split)."""
    with open(path, newline="") as f:
        return {(r["arch"], r["split"]): r for r in csv.DictReader(f)}


def differs(a: Row, b: Row, tol: float) -> bool:
    """Whether two rows of one (arch, S) differ in status or in a ratio by more than ``tol``."""
    return a["status"] != b["status"] or any(
        a[c] and b[c] and abs(float(a[c]) - float(b[c])) > tol for c in ("params_ratio", "gmacs_ratio"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--tol", type=float, default=0.001)
    args = ap.parse_args()
    ref, new = load(args.before), load(args.after)
    common = sorted(set(ref) & set(new))
    bad = [k for k in common if differs(ref[k], new[k], args.tol)]
    print(f"rows: before {len(ref)}, after {len(new)}, common {len(common)}; same status and ratios within "
          f"{args.tol}: {len(common) - len(bad)}; differing: {len(bad)} ({len({k[0] for k in bad})} architectures)")
    for k in bad:
        a, b = ref[k], new[k]
        print(f"{k[0]} S={k[1]}: {a['status']} -> {b['status']}, params {a['params_ratio']} -> {b['params_ratio']}, "
              f"MACs {a['gmacs_ratio']} -> {b['gmacs_ratio']}")


if __name__ == "__main__":
    main()
