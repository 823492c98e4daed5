"""Where the exported split's time goes: onnxruntime's profiler, time per op type, original against split (issue 42).

    python benchmarks/export_profile.py --model efficientnet_b0 --split 2 --batch 1 --calls 50

Exports the original (the S=1 wrapper) and ``split(model, S)`` as ``benchmarks/export_speed.py`` does, runs each
5 + ``--calls`` times in onnxruntime's sequential mode (``--threads`` intra-op threads) with profiling on, and
prints per op type the kernel time per call (ms, over the calls after the 5 warm-up ones) of both and the
difference; the total is the kernels' sum (the rest of a call's latency is the executor's own overhead).
"""
import argparse
import collections
import json
import os
import tempfile

import timm
import torch

import timm_split
from timm_split.ensemble import single
from timm_split.export import export_ensemble

WARMUP = 5


def profile(path: str, x: torch.Tensor, calls: int, threads: int) -> collections.Counter:
    """Milliseconds per call spent in each op type's kernels, after ``WARMUP`` calls."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = path + ".prof"
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(WARMUP + calls):
        sess.run(None, {"input": x.numpy()})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    since = starts[WARMUP] if len(starts) > WARMUP else 0
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= since:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / calls
    return per_op


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, *base.pretrained_cfg["input_size"])
    with tempfile.TemporaryDirectory() as folder:
        paths = {1: os.path.join(folder, "s1.onnx"), args.split: os.path.join(folder, f"s{args.split}.onnx")}
        export_ensemble(single(base, args.model).eval(), paths[1], dynamic_batch=True, check=False)
        export_ensemble(timm_split.split(base, args.split, seed=0).eval(), paths[args.split], dynamic_batch=True,
                        check=False)
        orig, split = (profile(paths[s], x, args.calls, args.threads) for s in (1, args.split))
    print(f"{args.model} S={args.split} batch {args.batch}: kernel ms per call, onnxruntime sequential, "
          f"{args.threads} threads, {args.calls} calls after {WARMUP}")
    print(f"{'op':<24}{'original':>10}{'split':>10}{'split-orig':>12}")
    for op in sorted(set(orig) | set(split), key=lambda o: -(split[o] - orig[o])):
        print(f"{op:<24}{orig[op]:>10.2f}{split[op]:>10.2f}{split[op] - orig[op]:>+12.2f}")
    print(f"{'total':<24}{sum(orig.values()):>10.2f}{sum(split.values()):>10.2f}"
          f"{sum(split.values()) - sum(orig.values()):>+12.2f}")


if __name__ == "__main__":
    main()
