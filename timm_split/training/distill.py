"""Knowledge distillation into the members: timm ``train.py``'s ``--kd-*`` flags, with timm's teacher wrapper.

timm's logit distillation (``timm.task.LogitDistillationTask``) trains one student on one input::

    kd   = KL(softmax(t / T) || softmax(s / T)) * T^2          (F.kl_div(..., 'batchmean', log_target=True))
    loss = task_weight * task + distill_weight * kd

Here the students are the S members, each on its own view: the teacher (timm's
:class:`~timm.task.DistillationTeacher`, which also maps the student's normalisation to the teacher's) sees every
member's view, and every member distils from the teacher's output on that view, beside the co-training term::

    loss = task_weight * sum_i CE(z_i, y) + distill_weight * sum_i kd(z_i, t(view_i)) + w(epoch) * D(p_1..p_S)

The sums over members match :class:`~timm_split.training.loss.CoTrainingLoss`'s ``ce``; at S=1 the loss is
timm's (the co-training term is 0). The weights follow timm's three modes (:attr:`DistillOptions.weights`).
``LogitDistillationTask`` itself is not used: it runs its one student on one input, where the members run
together on S views through the ensemble's execution strategy.

A teacher is a ``timm-split train`` checkpoint (any S: an ensemble teaches through its averaged output, its EMA
weights when it has them) or a timm model (``--kd-model-name``) with a local state dict (nothing downloads). A
run's checkpoints record the teacher (:class:`TeacherRecord`: name, the file's SHA-256), so ``--resume`` reuses it
and refuses another (:func:`resume_options`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .loss import CoTrainingLoss

_logger = logging.getLogger(__name__)

__all__ = ["DistillOptions", "TeacherRecord", "MemberTeacher", "DistillationLoss", "logit_kd", "file_sha256",
           "load_teacher", "resume_options"]


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """The ``--kd-*`` flags (timm ``train.py``'s names and defaults).

    Attributes:
        model_name: ``--kd-model-name``: the teacher's timm model (optional with a timm-split checkpoint).
        checkpoint: ``--kd-model-checkpoint``: the teacher's local weights file.
        distill_type: ``--kd-distill-type``; only ``'logit'`` is supported.
        loss_type: ``--kd-loss-type``; only ``'kl'``.
        temperature: ``--kd-temperature`` T (> 0).
        distill_loss_weight: ``--distill-loss-weight`` (>= 0), or None.
        task_loss_weight: ``--task-loss-weight`` (>= 0), or None.

    Raises:
        ValueError: a value timm's task would refuse or that cannot work here, naming the flag.
    """

    model_name: Optional[str] = None
    checkpoint: str = ""
    distill_type: str = "logit"
    loss_type: str = "kl"
    temperature: float = 4.0
    distill_loss_weight: Optional[float] = None
    task_loss_weight: Optional[float] = None

    def __post_init__(self) -> None:
        if self.distill_type != "logit":
            raise ValueError(f"--kd-distill-type {self.distill_type}: only 'logit' distillation is supported (timm's "
                             "'feature' and 'token' need one student's features); pass --kd-distill-type logit.")
        if self.loss_type != "kl":
            raise ValueError(f"--kd-loss-type {self.loss_type}: only 'kl' is supported; pass --kd-loss-type kl.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"--kd-temperature must be a finite number > 0 (typical: 1-4); got {self.temperature}.")
        for flag, v in (("--distill-loss-weight", self.distill_loss_weight),
                        ("--task-loss-weight", self.task_loss_weight)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0; got {v}.")
        if self.distill_loss_weight is None and self.task_loss_weight is not None and self.task_loss_weight > 1:
            raise ValueError(f"--task-loss-weight {self.task_loss_weight} alone gives the distillation loss the "
                             f"weight 1 - {self.task_loss_weight} < 0 (timm's complementary mode); pass a weight "
                             "<= 1, or --distill-loss-weight too.")

    @classmethod
    def from_args(cls, args: Any) -> "DistillOptions":
        """The options of a ``timm-split train`` namespace (absent flags take their defaults)."""
        d = cls()
        return cls(**{f.name: getattr(args, _FLAG_DEST[f.name], getattr(d, f.name)) for f in dataclasses.fields(cls)})

    @property
    def enabled(self) -> bool:
        """Whether a teacher was named (``--kd-model-name`` or ``--kd-model-checkpoint``)."""
        return bool(self.model_name or self.checkpoint)

    @property
    def weights(self) -> Tuple[float, float]:
        """``(task_weight, distill_weight)`` by timm's rule: both given: as given; only the task weight: the
        distillation weight is ``1 - task``; only the distillation weight: task 1; neither: 1 and 1."""
        if self.distill_loss_weight is not None:
            return (1.0 if self.task_loss_weight is None else self.task_loss_weight), self.distill_loss_weight
        if self.task_loss_weight is not None:
            return self.task_loss_weight, 1.0 - self.task_loss_weight
        return 1.0, 1.0

    def as_dict(self) -> Dict[str, Any]:
        """JSON-able (checkpoints record it)."""
        return dataclasses.asdict(self)


# DistillOptions field -> the train flag's dest
_FLAG_DEST = {"model_name": "kd_model_name", "checkpoint": "kd_model_checkpoint", "distill_type": "kd_distill_type",
              "loss_type": "kd_loss_type", "temperature": "kd_temperature",
              "distill_loss_weight": "distill_loss_weight", "task_loss_weight": "task_loss_weight"}


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
    """What a checkpoint records of its run's teacher.

    Attributes:
        name: the teacher's timm model name.
        sha256: SHA-256 of its weights file (what identifies the teacher).
        path: the file, as given when the run started.
        split_factor: its members (1 for a single network or a timm state dict).
        source: ``'timm_split'`` (a timm-split checkpoint) or ``'state_dict'`` (a timm model's weights).
    """

    name: str
    sha256: str
    path: str
    split_factor: int = 1
    source: str = "timm_split"

    def as_dict(self) -> Dict[str, Any]:
        """JSON-able (checkpoints record it)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One phrase naming the teacher: model, S, file and the start of its digest."""
        s = f" S={self.split_factor}" if self.split_factor > 1 else ""
        return f"{self.name}{s} ({self.path}, sha256 {self.sha256[:12]})"


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """timm's logit distillation loss summed over members: ``sum_i KL(p_t_i || p_s_i) * T^2``, batch-mean.

    Args:
        student: member logits ``[S, B, K]``.
        teacher: the teacher's logits on each member's view, ``[S, B, K]`` (no gradient flows into them).
        temperature: T.

    Returns:
        A scalar (float32, autocast off): at S=1 equal to ``LogitDistillationTask``'s ``kd_loss``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"the teacher's logits {tuple(teacher.shape)} do not match the members' "
                         f"{tuple(student.shape)}; the teacher must score the students' classes.")
    with torch.autocast(device_type=student.device.type, enabled=False):
        log_s = F.log_softmax(student.float() / temperature, dim=-1)
        log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
        kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / student.shape[1]
    return kl * temperature ** 2


class DistillationLoss(nn.Module):
    """:class:`~timm_split.training.loss.CoTrainingLoss` plus every member's logit distillation.

    Args:
        cotraining: The co-training loss (its ``ce`` is the task loss, its ``cot`` the co-training term).
        options: The ``--kd-*`` options (temperature and timm's weights).

    ``forward(output, target, teacher_logits, epoch)`` returns ``'loss'`` (``task_weight * ce + cot +
    distill_weight * kd``, for backward) and the parts unweighted as they are logged: ``'ce'`` (sum over members),
    ``'cot'`` (the warmed-up co-training term) and ``'kd'`` (sum over members of timm's ``kd_loss``).
    """

    def __init__(self, cotraining: CoTrainingLoss, options: DistillOptions) -> None:
        super().__init__()
        self.cotraining = cotraining
        self.options = options
        self.task_weight, self.distill_weight = options.weights

    def extra_repr(self) -> str:
        return (f"temperature={self.options.temperature}, task_weight={self.task_weight}, "
                f"distill_weight={self.distill_weight}")

    def forward(self, output: Union[torch.Tensor, Sequence[torch.Tensor]], target: torch.Tensor,
                teacher_logits: torch.Tensor, epoch: float) -> Dict[str, torch.Tensor]:
        """The loss and its parts.

        Args:
            output: Member logits ``[S, B, K]`` (or a list of S ``[B, K]``).
            target: Class indices ``[B]`` or soft targets ``[B, K]``.
            teacher_logits: The teacher's logits on each member's view, ``[S, B, K]``.
            epoch: Training progress in epochs (the co-training warm-up).

        Returns:
            ``{'loss', 'ce', 'cot', 'kd'}``, scalar tensors.
        """
        terms = self.cotraining(output, target, epoch=epoch)
        logits = torch.stack(list(output)) if isinstance(output, (list, tuple)) else output
        kd = logit_kd(logits, teacher_logits, self.options.temperature)
        loss = self.task_weight * terms["ce"] + terms["cot"] + self.distill_weight * kd
        return {"loss": loss, "ce": terms["ce"], "cot": terms["cot"], "kd": kd}


class MemberTeacher(nn.Module):
    """The teacher on every member's view: timm's :class:`~timm.task.DistillationTeacher` (eval mode, frozen,
    the student's normalisation mapped to its own) run once on the S views stacked.

    Args:
        teacher: timm's teacher wrapper.
        student_mean: The student's normalisation mean (per channel).
        student_std: Its std.
        same_view: Every member sees one view (``--same-view``): the teacher runs on it once.
    """

    def __init__(self, teacher: nn.Module, student_mean: Sequence[float], student_std: Sequence[float],
                 same_view: bool = False) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("student_mean", torch.tensor(student_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.same_view = same_view

    def train(self, mode: bool = True) -> "MemberTeacher":
        """The teacher stays in eval mode (timm's task keeps it so)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def forward(self, views: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """The teacher's logits on each view.

        Args:
            views: ``[S, B, C, H, W]`` or a list of S ``[B, C, H, W]``, normalised for the student.

        Returns:
            ``[S, B, K]`` float32 logits.
        """
        xs: List[torch.Tensor] = list(views.unbind(0)) if isinstance(views, torch.Tensor) else list(views)
        S = len(xs)
        if self.same_view:
            xs = xs[:1]
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        x = self.teacher.normalize_input(x, self.student_mean, self.student_std)
        out = self.teacher(x).float()
        out = out.view(len(xs), -1, out.shape[-1])
        return out.expand(S, -1, -1) if self.same_view and S > 1 else out


def _file_classes(path: str, model: nn.Module) -> Optional[int]:
    """The class count a state dict's classifier has (None where it has no classifier weight we can find)."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        from timm.models import load_state_dict
        sd = load_state_dict(path, use_ema=False, weights_only=True)
    for h in heads:
        for k in (f"{h}.weight", f"members.0.{h}.weight"):
            if k in sd:
                return int(sd[k].shape[0])
    return None


def _timm_teacher(name: str, path: str, num_classes: int, in_chans: int, data_cfg: Dict[str, Any]) -> nn.Module:
    """A timm model ``name`` with the state dict at ``path`` (its classes checked against the students')."""
    import timm

    from ..checkpoint import load_checkpoint

    if not timm.is_model(name):
        raise ValueError(f"unknown --kd-model-name {name!r}; see timm.list_models().")
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    try:
        load_checkpoint(model, path)
    except ValueError:
        have = _file_classes(path, model)
        if have is not None and have != num_classes:
            raise ValueError(f"--kd-model-checkpoint {path}: the teacher has {have} classes but the students have "
                             f"{num_classes}; distil from a teacher trained on the students' classes.") from None
        raise
    # a state dict records no normalisation: the teacher is fed what the students are (their data's)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    return model


def load_teacher(options: DistillOptions, num_classes: int, data_cfg: Dict[str, Any],
                 class_names: Optional[List[str]] = None, same_view: bool = False,
                 device: Optional[torch.device] = None) -> Tuple[MemberTeacher, TeacherRecord]:
    """Build the run's teacher from local files; check it scores the students' classes on their input.

    Args:
        options: ``--kd-*`` (``enabled``).
        num_classes: The students' classes.
        data_cfg: The students' ``input_size``, ``mean`` and ``std``.
        class_names: The students' class names (a timm-split teacher that records others is refused).
        same_view: ``--same-view`` (the teacher runs once per batch).
        device: Where it runs.

    Returns:
        ``(teacher, record)``.

    Raises:
        ValueError: no local weights, an unknown model, or a teacher of other classes or input channels (one line
            naming the flag and both counts).
    """
    from timm.task import DistillationTeacher

    from .warm_start import checkpoint_split_factor, ensemble_from_checkpoint

    path = options.checkpoint
    if not path:
        raise ValueError(f"--kd-model-name {options.model_name} needs --kd-model-checkpoint FILE, the teacher's "
                         "weights: timm-split train downloads nothing (timm's train.py would fetch the pretrained "
                         "weights).")
    in_chans = int(data_cfg["input_size"][0])
    S = checkpoint_split_factor(path, "--kd-model-checkpoint")
    if S:
        model, state = ensemble_from_checkpoint(path)
        name = state["model"]
        if options.model_name and options.model_name not in (name, f"splitnet_{name}"):
            raise ValueError(f"--kd-model-name {options.model_name} but --kd-model-checkpoint {path} holds a {name}; "
                             f"drop --kd-model-name or pass {name}.")
        if state["num_classes"] != num_classes:
            raise ValueError(f"--kd-model-checkpoint {path}: the teacher has {state['num_classes']} classes but the "
                             f"students have {num_classes}; distil from a teacher trained on the students' classes.")
        saved = state.get("class_names")
        if saved is not None and class_names is not None and list(saved) != list(class_names):
            raise ValueError(f"--kd-model-checkpoint {path}: the teacher was trained on other classes than this "
                             "data's (same count, other names or order); distil from a teacher of these classes.")
        teacher_chans = int(state["data_config"]["input_size"][0])
        if teacher_chans != in_chans:
            raise ValueError(f"--kd-model-checkpoint {path}: the teacher takes {teacher_chans}-channel images, the "
                             f"students' data has {in_chans}; distil from a teacher of this data.")
        source = "timm_split"
    else:
        if not options.model_name:
            raise ValueError(f"--kd-model-checkpoint {path} is a plain state dict: name its model with "
                             "--kd-model-name (e.g. resnet18).")
        name = options.model_name
        model = _timm_teacher(name, path, num_classes, in_chans, data_cfg)
        source = "state_dict"
    wrapped = DistillationTeacher(model.eval(), device=device)
    teacher = MemberTeacher(wrapped, data_cfg["mean"], data_cfg["std"], same_view=same_view)
    if device is not None:
        teacher.to(device)
    _check_output(teacher, num_classes, data_cfg, path, device)
    record = TeacherRecord(name=name, sha256=file_sha256(path), path=os.path.abspath(path),
                           split_factor=max(S, 1), source=source)
    _logger.info("distilling from %s: T=%g, task weight %g, distill weight %g", record.describe(),
                 options.temperature, *options.weights)
    return teacher, record


def _check_output(teacher: MemberTeacher, num_classes: int, data_cfg: Dict[str, Any], path: str,
                  device: Optional[torch.device]) -> None:
    """One image through the teacher: its output must be ``num_classes`` logits."""
    x = torch.zeros(1, 1, *data_cfg["input_size"], device=device)
    try:
        k = teacher(x).shape[-1]
    except RuntimeError as e:
        raise ValueError(f"--kd-model-checkpoint {path}: the teacher does not run on the students' "
                         f"{tuple(data_cfg['input_size'])} images ({e}); distil from a teacher of this data.") from None
    if k != num_classes:
        raise ValueError(f"--kd-model-checkpoint {path}: the teacher outputs {k} classes but the students have "
                         f"{num_classes}; distil from a teacher trained on the students' classes.")


def resume_options(options: DistillOptions, recorded: Optional[Dict[str, Any]], resume: str) -> DistillOptions:
    """The distillation of a resumed run: the one its checkpoint records.

    With no ``--kd-*`` teacher flags the recorded options and teacher are reused; with them, the teacher file must
    be the recorded one (same SHA-256; its path may differ).

    Args:
        options: The command line's ``--kd-*`` options.
        recorded: The checkpoint's ``distill`` state (``options``, ``teacher``), or None for a run without one.
        resume: The ``--resume`` path (for messages).

    Returns:
        The options to build the teacher from.

    Raises:
        ValueError: a teacher for a run trained without one, another teacher, or a recorded teacher file that is
            missing or changed (one line naming both).
    """
    if not recorded:
        if options.enabled:
            raise ValueError(f"--resume {resume}: that run trained without a teacher; drop the --kd-* flags to resume "
                             "it, or start a fresh run to distil.")
        return options
    rec = TeacherRecord(**recorded["teacher"])
    explicit = options.enabled
    if not explicit:
        options = DistillOptions(**dict(recorded["options"], checkpoint=rec.path))
        if not os.path.isfile(rec.path):
            raise ValueError(f"--resume {resume} distils from {rec.describe()}, which is gone; pass "
                             "--kd-model-checkpoint with that file (the same sha256).")
        _logger.info("--resume: distilling from the run's teacher %s", rec.describe())
    elif not options.checkpoint or not os.path.isfile(options.checkpoint):
        raise ValueError(f"--resume {resume} distils from {rec.describe()}; pass --kd-model-checkpoint with that file "
                         "or drop the --kd-* flags to reuse it.")
    sha = file_sha256(options.checkpoint)
    if sha != rec.sha256:
        if not explicit:
            raise ValueError(f"--resume {resume} distils from {rec.describe()}, and that file changed since (sha256 "
                             f"now {sha[:12]}); restore it, or pass --kd-model-checkpoint with the original file.")
        raise ValueError(f"--resume {resume} was distilled from {rec.describe()}; --kd-model-checkpoint "
                         f"{options.checkpoint} (sha256 {sha[:12]}) is another teacher: pass that teacher (or drop the "
                         "--kd-* flags to reuse it), or start a fresh run.")
    return options
