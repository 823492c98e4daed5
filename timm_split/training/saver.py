"""A kill-safe checkpoint saver: timm's ``CheckpointSaver`` bookkeeping, our safetensors files.

timm's saver keeps ``last``, ``model_best`` and the best ``--checkpoint-hist`` ``checkpoint-<epoch>`` files. Its
subclassing points are ``_save`` (write one file), ``_replace`` and ``_duplicate`` (move and copy files); this
class overrides those three and nothing else of its logic:

* ``_save`` calls the trainer's ``save`` function (a safetensors file with the training state, the saver's own
  bookkeeping included) and names ``last`` in a write error, not timm's temporary file;
* ``_replace`` is ``os.replace``: timm unlinks the target first (for Windows), so a kill there would lose ``last``;
* ``_duplicate`` links or copies through :func:`~timm_split.checks.atomic_write` (a ``<name>.<pid>.tmp`` file that
  a later run in the folder removes if a kill leaves it).

:meth:`KillSafeSaver.repair` finishes, after a resume, the copies a kill interrupted.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, Optional

from timm.utils import CheckpointSaver

from ..checkpoint import read_metadata, training_state
from ..checks import atomic_write

__all__ = ["KillSafeSaver"]

# save(path, epoch, metric, saver_state): write one checkpoint file
SaveFn = Callable[[str, int, Optional[float], Dict[str, Any]], None]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # a hard link where the filesystem allows, as timm does
    except OSError:
        shutil.copy2(src, dst)


class KillSafeSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` writing ``.safetensors`` files through ``save``, with no moment at which a kill
    loses ``last`` or leaves a half-written file under a checkpoint's name.

    Args:
        save: ``save(path, epoch, metric, saver_state)`` writes one checkpoint (``saver_state`` is
            ``self.state_dict(epoch, metric)``, to be stored in it so a resume continues the bookkeeping).
        **kwargs: timm's ``CheckpointSaver`` arguments (``model``, ``optimizer``, ``checkpoint_dir``, ...).
    """

    def __init__(self, save: SaveFn, **kwargs: Any):
        super().__init__(**kwargs)
        self.extension = ".safetensors"
        self.save_fn = save

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _duplicate(self, src: str, dst: str) -> None:
        atomic_write(dst, lambda tmp: _link_or_copy(src, tmp))

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        try:
            self.save_fn(save_path, epoch, metric, self.state_dict(epoch, metric))
        except OSError as e:  # save_path is the saver's tmp.safetensors: name what it was to become
            raise OSError(e.errno, f"{e.strerror}; the checkpoints already written are intact",
                          os.path.join(self.checkpoint_dir, "last" + self.extension)) from e

    def repair(self, state: Dict[str, Any], resumed: str) -> None:
        """After resuming from ``resumed`` (whose training state is ``state``): where a kill came between writing
        ``last`` and copying it to ``checkpoint-<epoch>``, make that copy now; where it came before
        ``model_best`` was updated, copy the best epoch's checkpoint to it."""
        epoch, metric = (state.get("saver") or {}).get("pending", (None, None))
        last = os.path.join(self.checkpoint_dir, "last" + self.extension)
        if epoch is None or os.path.abspath(resumed) != os.path.abspath(last):
            return
        path = self._checkpoint_path(epoch)
        if path not in [f for f, _ in self.checkpoint_files]:
            self._duplicate(last, path)
            self._track_checkpoint(path, epoch, metric)
            self._cleanup_checkpoints(0)
        self._repair_best()

    def _repair_best(self) -> None:
        if self.best_epoch is None:
            return
        best = os.path.join(self.checkpoint_dir, "model_best" + self.extension)
        src = self._checkpoint_path(self.best_epoch)
        if not os.path.exists(src):
            return
        try:
            epoch = training_state(read_metadata(best)).get("epoch") if os.path.exists(best) else None
        except ValueError:  # a damaged model_best: replace it too
            epoch = None
        if epoch != self.best_epoch + 1:
            self._duplicate(src, best)
