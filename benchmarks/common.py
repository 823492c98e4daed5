"""What the benchmarks share: a random-image ImageFolder, the run header, and an atomic JSON write.

A benchmark run as ``python benchmarks/x.py`` imports it as ``from common import ...`` (the script's own folder is
first on ``sys.path``). torch, timm and the package are imported in the functions that need them, so a benchmark
whose parent process only starts subprocesses (``hostile_train.py``) does not load them.
"""
import json
import os
import platform
import subprocess
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_folder(root: str, splits: Mapping[str, Sequence[str]], per_class: int = 8, size: int = 32,
                 seed: int = 0) -> str:
    """Write an ImageFolder of random RGB PNGs: ``root/<split>/<class>/<i>.png``.

    Args:
        root: the folder to fill (made if missing; files already there with the same names are overwritten).
        splits: split name -> its class folders, e.g. ``{"train": ["a", "b"], "validation": ["a", "b"]}``.
        per_class: images per class folder, named ``0.png`` to ``<per_class - 1>.png``.
        size: the images' height and width in pixels.
        seed: the seed of the pixels (``numpy.random.default_rng``; drawn split by split, class by class).

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, classes in splits.items():
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
    return root


def _git_revision() -> Optional[str]:
    """This checkout's short commit hash, or None (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def run_header(**extra: Any) -> Dict[str, Any]:
    """The facts a benchmark's record starts with: versions, machine, cores, threads, load, git commit.

    Args:
        **extra: the benchmark's own fields (its options...), added after the common ones; a name that is also a
            common field replaces it (e.g. ``threads`` when the measured processes set their own).

    Returns:
        A JSON-ready dict: ``torch``, ``timm``, ``machine`` (``platform.processor()`` or ``platform.machine()``),
        ``host`` (``platform.node()``), ``cpus`` (the cores this process may run on), ``threads`` (torch's
        intra-op threads), ``load_average`` (1, 5, 15 minutes), ``git`` (short commit or None), ``mkldnn``,
        ``OMP_WAIT_POLICY`` and ``GLIBC_TUNABLES`` (the environment's, ``''`` when unset), ``gpu`` and ``cuda``
        (the device name and CUDA version, None without a GPU), then ``extra``.
    """
    import timm
    import torch

    cuda = torch.cuda.is_available()
    header = dict(torch=torch.__version__, timm=timm.__version__, machine=platform.processor() or platform.machine(),
                  host=platform.node(), cpus=len(os.sched_getaffinity(0)), threads=torch.get_num_threads(),
                  load_average=[round(x, 2) for x in os.getloadavg()], git=_git_revision(),
                  mkldnn=torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
                  OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", ""),
                  GLIBC_TUNABLES=os.environ.get("GLIBC_TUNABLES", ""),
                  gpu=torch.cuda.get_device_name() if cuda else None, cuda=torch.version.cuda if cuda else None)
    header.update(extra)
    return header


def write_json(path: str, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` whole or not at all (``timm_split.checks.atomic_write``).

    Args:
        path: the file to write (replaced when it exists).
        obj: anything ``json.dump`` takes.
        indent: ``json.dump``'s indent.

    Raises:
        OSError: the file could not be written (``path`` is left as it was).
        TypeError: ``obj`` is not JSON-serialisable (``path`` is left as it was).
    """
    from timm_split.checks import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)

    atomic_write(path, write)
