"""timm_split: divide any timm model into S thinner, co-trained copies of itself (SplitNet)."""
from .environment import check_torchvision as _check_torchvision

_check_torchvision()  # a torch/torchvision pair that does not load together: one line naming both and the fix
from . import splitnet  # noqa: F401 - registers splitnet_<arch> with timm
from .checkpoint import load_checkpoint, save_checkpoint
from .core import plan_split, split
from .engine.plan import ChannelGroup, SplitPlan
from .ensemble import SplitEnsemble
from .errors import SplitError
from .training.loss import CoTrainingLoss
from .training.optim import param_groups, scaled_weight_decay

__version__ = "0.1.0"

__all__ = [
    "split", "plan_split", "SplitEnsemble", "SplitPlan", "ChannelGroup", "SplitError", "CoTrainingLoss",
    "param_groups", "scaled_weight_decay", "save_checkpoint", "load_checkpoint",
]
