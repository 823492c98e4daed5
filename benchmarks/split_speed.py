"""How long timm_split.split() takes (issue 2 goal: resnet50 at S=4 in <= 1 s on a 2-core CPU).

    python benchmarks/split_speed.py --model resnet50 --split 4 --repeat 5

Times the whole split (trace, analyse, plan, meta check, S members built and initialised) after one warm-up
call, on CPU and on the meta device, and prints the median, min and max, plus each stage once.
"""
import argparse
import statistics
import time

import timm
import torch

import timm_split
from timm_split.engine.analyse import analyse
from timm_split.engine.plan import plan
from timm_split.trace import input_shape_for, meta_copy, trace


def _times(fn, repeat):
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--split", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}")
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = timm.create_model(args.model)
        ts = _times(lambda: timm_split.split(model, args.split), args.repeat)
        print(f"{args.model} S={args.split} on {device}: median {statistics.median(ts):.3f}s "
              f"(min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})")
    with torch.device("meta"):
        model = timm.create_model(args.model)
    t0 = time.perf_counter()
    mc = meta_copy(model)
    t1 = time.perf_counter()
    tr = trace(mc, input_shape_for(model))
    t2 = time.perf_counter()
    cg = analyse(tr)
    t3 = time.perf_counter()
    plan(cg, args.split)
    t4 = time.perf_counter()
    print(f"stages: copy {t1 - t0:.3f}s, trace {t2 - t1:.3f}s, analyse {t3 - t2:.3f}s, plan {t4 - t3:.3f}s")


if __name__ == "__main__":
    main()
