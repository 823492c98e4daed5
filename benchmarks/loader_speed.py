"""Loader throughput with S member views, and train time per epoch at S=1 vs S=2 (run it on a quiet machine).

    python benchmarks/loader_speed.py                      # Fashion-MNIST (Debian IDX files), --workers 2
    python benchmarks/loader_speed.py --data-dir DIR       # an ImageFolder
    python benchmarks/loader_speed.py --tiny               # a dry run: a few batches, 1 tiny epoch

Part 1 times ``timm_split.training.data.create_member_loader`` (timm's ``create_loader``, prefetcher, the train
transform drawn S times per image) plus the on-device random erasing and shared mixup, in images per second (an image is
one sample, whatever S). Part 2 trains ``--model`` for one epoch of ``--epoch-images`` images with
``timm_split.commands.train.train`` at S=1 and S=2 and reports the seconds of each. Results go to stdout and, with
``--json``, to a file.
"""
import argparse
import tempfile
import time

import torch

from timm_split.training.data import MemberBatchAugment, create_datasets, create_member_loader
from timm_split.commands.train import train, train_args

from common import run_header, write_json


def loader_images_per_second(args: argparse.Namespace, split_factor: int) -> float:
    """Images/s of the train loader with ``split_factor`` views per image (after ``--warmup`` batches)."""
    from timm.data import Mixup

    train_ds, _, classes, data_cfg = create_datasets(args.dataset, args.data_dir)
    size = (data_cfg.get("input_size") or (3,))[0], args.img_size, args.img_size
    cfg = {"input_size": size, "mean": data_cfg.get("mean", (0.5,) * size[0]),
           "std": data_cfg.get("std", (0.5,) * size[0])}
    device = torch.device("cpu")
    loader = create_member_loader(train_ds, split_factor, cfg, args.batch_size, device, num_workers=args.workers,
                                  auto_augment=args.aa, scale=(0.08, 1.0))
    augment = MemberBatchAugment(args.reprob, mixup=Mixup(mixup_alpha=0.2, num_classes=classes), device=device)
    n, t0 = 0, None
    for i, (views, target) in enumerate(loader):
        augment(views, target)
        if i == args.warmup - 1:
            t0 = time.perf_counter()
        elif i >= args.warmup:
            n += len(target)
        if i + 1 >= args.warmup + args.batches:
            break
    return n / (time.perf_counter() - t0)


def epoch_seconds(args: argparse.Namespace, split_factor: int, out: str) -> float:
    """Seconds of one training epoch of ``--epoch-images`` images at S=``split_factor`` (no evaluation timed)."""
    targs = train_args(data_dir=args.data_dir, dataset=args.dataset, model=args.model, split=split_factor,
                       img_size=args.img_size, epochs=1, batch_size=args.batch_size, workers=args.workers,
                       train_subset=args.epoch_images, aa=args.aa, reprob=args.reprob, mixup=0.2, lr=0.1,
                       warmup_epochs=0, output=out, experiment=f"s{split_factor}", device="cpu", seed=0)
    return train(targs, progress=False)["train_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="an ImageFolder (default: Fashion-MNIST's IDX files)")
    p.add_argument("--dataset", default="")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--aa", default="rand-m9-mstd0.5")
    p.add_argument("--reprob", type=float, default=0.25)
    p.add_argument("--batches", type=int, default=40, help="timed batches per S")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epoch-images", type=int, default=5000)
    p.add_argument("--tiny", action="store_true", help="dry run: 2 timed batches of 16, a 64-image epoch")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.tiny:
        args.batches, args.warmup, args.batch_size, args.epoch_images, args.model = 2, 1, 16, 64, "test_resnet"
    header = run_header()
    print(f"torch {header['torch']}, {header['threads']} threads, {header['cpus']} cores; "
          f"--workers {args.workers}, batch {args.batch_size}, {args.img_size} px, --aa {args.aa}", flush=True)
    results = {"loader_images_per_s": {}, "epoch_seconds": {}, "config": vars(args), "header": header}
    for S in args.splits:
        ips = loader_images_per_second(args, S)
        results["loader_images_per_s"][S] = ips
        print(f"loader S={S}: {ips:8.1f} images/s ({ips * S:8.1f} views/s)", flush=True)
    with tempfile.TemporaryDirectory() as out:
        for S in (1, 2):
            sec = epoch_seconds(args, S, out)
            results["epoch_seconds"][S] = sec
            print(f"epoch S={S}: {sec:.1f} s ({args.epoch_images} images, {args.model})", flush=True)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
