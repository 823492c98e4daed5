"""What the 'packed' strategy's per-call refresh costs (issue 36, class 4; docs/reliability.md, "Round 3").

    python benchmarks/packed_refresh_cost.py

Every inference call of ``'packed'`` copies the members' weights into its kept packed tensors
(``PackedProgram.refresh``), so ``p.data`` edits, which no version counter sees, are never missed. In one process,
interleaved, one intra-op thread, eval, ``no_grad``, S=2: a packed call as it runs now, the program alone on the
kept tensors (what main's version-keyed cache ran when nothing had changed) and the refresh alone; medians of 21
rounds. About a minute on 2 cores.
"""
import time

import timm
import torch

import timm_split

CASES = [("resnet18", 64, 1), ("resnet18", 64, 8), ("resnet50", 64, 1), ("vit_tiny_patch16_224", 224, 1)]


def main() -> None:
    torch.set_num_threads(1)
    for arch, size, batch in CASES:
        e = timm_split.split(timm.create_model(arch), 2).eval().set_execution("packed")
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            e(x)
            ex = e._execution  # the strategy object: its program and kept tensors
            program, kept = ex._cache
            now, alone, refresh = [], [], []
            for _ in range(21):
                t = time.perf_counter()
                e(x)
                now.append(time.perf_counter() - t)
                t = time.perf_counter()
                program(x, kept)
                alone.append(time.perf_counter() - t)
                t = time.perf_counter()
                program.refresh(e.members, kept)
                refresh.append(time.perf_counter() - t)

        def med(v):
            return sorted(v)[len(v) // 2] * 1e3

        print(f"{arch} S=2 {size}px batch {batch}: call {med(now):.1f} ms, program alone {med(alone):.1f} ms, "
              f"refresh {med(refresh):.1f} ms (+{100 * med(refresh) / med(alone):.0f}%)", flush=True)


if __name__ == "__main__":
    main()
