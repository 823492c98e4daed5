"""Stage 5, ensemble: the S members behind timm's model surface."""

import importlib
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from timm.layers import register_notrace_function
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing

from .checkpoint import as_state_dict, check_state_dict, tied_names
from .checks import timm_num_classes
from .engine.plan import SplitPlan
from .ensemble_features import FeatureSurface, Views, cat_members
from .execution import Execution, make_execution

_logger = logging.getLogger(__name__)

__all__ = ["SplitEnsemble", "checkpoint_filter_fn", "checked_state_dict", "member_views", "prefixed", "single"]

Device = Union[str, int, torch.device]
Names = Union[str, Sequence[str], None]


# ---- tensor helpers: leaf functions for torch.fx (their checks read shapes), and TorchScript-compatible
# (the features' helpers, cat_members among them, are in ensemble_features)
@torch.fx.wrap
def _member_view(x: torch.Tensor, i: int, split: int, input_dim: int) -> torch.Tensor:
    """Member ``i``'s input: the batch itself, or view ``i`` of ``[S, B, C, H, W]`` views."""
    if x.dim() == input_dim + 1:
        if x.shape[0] != split:
            raise ValueError("views must be [S, B, ...] with S=" + str(split) + ", got " + str(list(x.shape)))
        return x[i]
    return x


@torch.fx.wrap
def _combine(outs: torch.Tensor, split: int, probs: bool, headless: bool, channels_last: bool) -> torch.Tensor:
    """Average ``[S, B, K]`` member logits (or their probabilities, returned as a log); a headless ensemble's
    member features are concatenated instead."""
    if outs.dim() < 3 or outs.shape[0] != split:
        raise ValueError("combine expects the members' outputs stacked [S, B, ...] with S=" + str(split)
                         + " leading, got shape " + str(list(outs.shape)) + "; use forward_members(x)")
    if headless:
        return cat_members(list(outs.unbind(0)), channels_last)
    if probs:
        return torch.logsumexp(outs.float().log_softmax(-1), 0) - torch.log(
            torch.tensor(float(split), device=outs.device))
    return outs.mean(0)


for _fn in (_member_view, _combine):
    register_notrace_function(_fn)  # timm's fx helpers and torchvision's feature extractor keep them as leaves


def prefixed(names: Names, split: int) -> Names:
    """A member's module name(s) (a cfg's ``first_conv``/``classifier``) as the ensemble's: ``members.<i>.name``
    for every member, in a tuple. Names already prefixed, and None, are returned as they are."""
    if names is None:
        return None
    names = (names,) if isinstance(names, str) else tuple(names)
    if all(n.startswith("members.") for n in names):
        return names
    return tuple(f"members.{i}.{n}" for i in range(split) for n in names)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: "SplitEnsemble") -> Dict[str, torch.Tensor]:
    """timm's checkpoint filter for a split: each member's share of ``state_dict`` (``members.<i>.*``) goes
    through the ``checkpoint_filter_fn`` of that member's timm module, with the member, so a checkpoint saved at
    224 px loads into a split created at another ``img_size`` with its position embeddings and relative-position
    tables resampled, as the base model's does. Keys outside the members, and members whose module has no filter,
    pass unchanged. ``splitnet_<arch>`` uses it for ``pretrained=True``.

    Args:
        state_dict: a split's state dict (not a base model's: see ``timm_split.split(..., init='inherit')``).
        model: the split to load it into.

    Returns:
        The filtered state dict.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith("members.")}
    for i, member in enumerate(model.members):
        prefix = f"members.{i}."
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        fn = getattr(importlib.import_module(type(member).__module__), "checkpoint_filter_fn", None)
        own = fn(own, member) if callable(fn) and own else own
        out.update((prefix + k, v) for k, v in own.items())
    return out


def member_views(x: Views, S: int, input_dim: int, first: nn.Module) -> List[torch.Tensor]:
    """Validated per-member inputs: one batch for all S members, or S views of one batch size (on the device
    the members' parameters say: a meta input for meta members and the other way round is refused)."""
    if isinstance(x, (list, tuple)):
        if len(x) != S:
            raise ValueError(f"got {len(x)} views for {S} members; pass one tensor or exactly {S} views")
        views = list(x)
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"input must be a tensor or a list of {S} views, got {type(x).__name__}")
    elif x.dim() == input_dim + 1:
        if x.shape[0] != S:
            raise ValueError(f"views of shape {tuple(x.shape)} have {x.shape[0]} views for {S} members; "
                             f"pass [S={S}, B, ...] views or one [B, ...] batch")
        views = list(x.unbind(0))
    else:
        views = [x] * S
    for v in views:
        if not isinstance(v, torch.Tensor) or v.dim() != input_dim:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"each view must be a {input_dim}-d batch [B, C, H, W], got {got}")
    # (under torch.jit.trace a shape is a traced tensor: a set of them is never one element)
    if not torch.jit.is_tracing() and len({int(v.shape[0]) for v in views}) > 1:
        raise ValueError(f"views have unequal batch sizes {[v.shape[0] for v in views]}; every member needs "
                         "the same samples (one view of each per member)")
    p = next(first.parameters(), None)
    if p is not None and p.is_meta != views[0].is_meta:
        raise RuntimeError(f"Tensor on device {views[0].device} is not on the expected device {p.device}! "
                           f"(the ensemble's members are on {p.device}; move the input or the model)")
    check_view_dtypes(views, None if p is None else p.dtype, images=input_dim >= 3)
    return views


def check_view_dtypes(views: Sequence[torch.Tensor], weight_dtype: Optional[torch.dtype], images: bool = True
                      ) -> None:
    """``ValueError`` for views the members cannot take: images not floating point (int, bool, complex), or a
    floating dtype other than the weights' outside autocast (torch would fail inside the first layer, or, for
    some strategies, after part of the work).

    Args:
        views: The per-member inputs.
        weight_dtype: The members' parameter dtype (``None``: a model without parameters, nothing to match).
        images: The views are images (``[B, C, H, W]``-like); a model of another input (token ids) may take ints.
    """
    for v in views:
        if images and not v.dtype.is_floating_point:
            raise ValueError(f"views must be floating point images, got {v.dtype}: convert and normalise them "
                             "first (e.g. x.float() / 255, then the model's mean and std)")
    if weight_dtype is None or not weight_dtype.is_floating_point:
        return
    odd = sorted({str(v.dtype) for v in views if v.dtype.is_floating_point and v.dtype != weight_dtype})
    if odd and not torch.is_autocast_enabled(views[0].device.type):
        raise ValueError(f"views of dtype {', '.join(odd)} for members of dtype {weight_dtype}: cast the input "
                         f"(x.to({weight_dtype})), the model (ens.to({odd[0]})), or run under torch.autocast")


def _device(d: Any) -> torch.device:
    """``d`` as a ``torch.device`` this machine has, or a ``ValueError`` naming what it has."""
    if isinstance(d, bool) or not isinstance(d, (str, int, torch.device)):
        raise ValueError(f"a device must be a str, int or torch.device (e.g. 'cuda:0', 'cpu'), got {d!r}")
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{d!r} is not a device ({e}); e.g. 'cuda:0' or 'cpu'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index or 0) >= n:
            raise ValueError(f"{d!r}: this machine has {n} CUDA device(s); pass one of "
                             f"{[f'cuda:{i}' for i in range(n)] or ['cpu']}")
    elif dev.type not in ("cpu", "meta", "mps", "xpu"):
        raise ValueError(f"{d!r}: members run on 'cpu' or 'cuda:<i>', got device type {dev.type!r}")
    return dev


class SplitEnsemble(FeatureSurface, nn.Module):
    """S thinner members of one architecture that together cost what the original did.

    ``forward`` averages the members' logits (``averaging='logits'``), or returns the log of their averaged
    probabilities (``averaging='probs'``, so argmax and NLL still work). ``forward_members`` returns every
    member's output, ``[S, B, num_classes]``, for co-training. How the members run (one after another,
    concurrently, compiled or packed into one network) is chosen with :meth:`set_execution`;
    :meth:`to_devices` spreads them over several devices.

    timm's tensor contract holds for the ensemble as one backbone with S times a member's channels:
    ``forward_features(x)`` is ``[B, S*C, H, W]`` (the members' features concatenated on the channel dim, or on
    the last dim for tokens and NHWC), ``num_features == S*C``, ``forward_head`` splits its input back into the
    S members' chunks, ``forward_head(pre_logits=True)`` is ``[B, head_hidden_size]`` (S members' pre-logits
    side by side) and ``forward_intermediates``/``feature_info`` concatenate each level. A headless model
    (``num_classes=0``) returns those features side by side too. ``stacked=True`` gives the per-member view
    ``[S, B, ...]`` instead. Those methods (features, head, intermediates, input size, classifier) are
    :class:`~timm_split.ensemble_features.FeatureSurface`'s, which this class inherits.

    TorchScript: ``torch.jit.script(ens)`` scripts the loop over the members (one batch, no views) for
    ``forward`` and ``forward_intermediates`` (see :class:`_Scripted`); the other execution strategies are eager
    only. torch.fx: the members are traced one after another; the shape checks
    and the combination are leaf functions.

    Attributes:
        members: the S models (``nn.ModuleList``).
        split_factor: S.
        split_plan: the :class:`~timm_split.plan.SplitPlan` the members were built from.
        pretrained_cfg: the base model's cfg with ``architecture='splitnet_<arch>'``, ``split_factor``, and
            ``first_conv``/``classifier`` naming the members' modules (``members.<i>.<name>``).
    """

    __jit_ignored_attributes__ = ["_execution", "split_plan", "pretrained_cfg", "feature_info", "_traits",
                                  "_input_size"]
    __jit_unused_properties__ = ["default_cfg", "execution", "set_input_size"]

    def __init__(self, members: Sequence[nn.Module], split_plan: Optional[SplitPlan] = None,
                 pretrained_cfg: Optional[Dict[str, Any]] = None, averaging: str = "logits"):
        super().__init__()
        if averaging not in ("logits", "probs"):
            raise ValueError(f"averaging must be 'logits' or 'probs', got {averaging!r}")
        self.members = nn.ModuleList(members)
        self.split_factor = len(self.members)
        self.split_plan = split_plan
        self.averaging = averaging
        self._probs = averaging == "probs"
        cfg = dict(pretrained_cfg or {})
        for k in ("first_conv", "classifier"):
            if cfg.get(k):
                cfg[k] = prefixed(cfg[k], self.split_factor)
        self.pretrained_cfg = cfg
        first = self.members[0]
        fmt = getattr(first, "output_fmt", "NCHW")
        self.output_fmt = str(getattr(fmt, "value", fmt))  # timm stores a str or its Format enum
        self._channels_last = self.output_fmt == "NHWC"
        input_size = tuple(split_plan.input_size if split_plan is not None else cfg.get("input_size", (3, 224, 224)))
        self._input_dim = len(input_size) + 1
        self._input_size = input_size
        self.in_chans = getattr(first, "in_chans", input_size[0])
        self.num_classes = timm_num_classes(first)  # timm's num_classes <= 0 (-1 too) is no head: 0
        self._sync_widths()
        info = getattr(first, "feature_info", None)
        if isinstance(info, (list, tuple)) and info:
            # each level: the members' features concatenated; 'module' names each member's own module
            self.feature_info = [dict(d, num_chs=d["num_chs"] * self.split_factor) for d in info]
        if cfg.get("first_conv"):
            self._traits = dict(getattr(first, "_traits", {}), first_conv=cfg["first_conv"])
        # one training flag: a split of an eval-mode model is an eval-mode ensemble
        self.training = self.members.training = first.training
        self._execution: Execution = make_execution("loop")

    # ---- timm surface
    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (older timm name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that checks everything before it changes anything
        (:func:`checked_state_dict`: split factor, keys, value types, shapes, dtype kinds; with ``strict=False``
        only the classifier and an unadaptable first conv may be missing): a load that fails changes nothing."""
        return super().load_state_dict(checked_state_dict(self, state_dict, strict, assign), strict=strict,
                                       assign=assign)

    # ---- inputs
    def _member_inputs(self, x: Views) -> List[torch.Tensor]:
        if is_fx_tracing():
            return [_member_view(x, i, self.split_factor, self._input_dim) for i in range(self.split_factor)]
        return member_views(x, self.split_factor, self._input_dim, self.members[0])

    def forward_members(self, x: Views) -> torch.Tensor:
        """Every member's output, stacked: ``[S, B, ...]``.

        Args:
            x: one batch ``[B, C, H, W]`` for all members, or per-member views: ``[S, B, C, H, W]`` or a list of S
                (validated once, for every execution strategy).
        """
        views = self._member_inputs(x)
        if is_fx_tracing():
            return torch.stack([m(v) for m, v in zip(self.members, views)])
        return self._execution.run(self.members, views)

    # ---- execution
    @property
    def execution(self) -> str:
        """The name of the execution strategy (see :meth:`set_execution`)."""
        return self._execution.name

    def chosen_execution(self, training: bool = True) -> str:
        """The strategy that runs the members in training (or evaluation): the execution's name, or for
        ``'auto'`` what it decided on its first such call (``'auto'`` before it)."""
        chosen = getattr(self._execution, "chosen", None)
        return (chosen(training) if chosen is not None else None) or self.execution

    def set_execution(self, strategy: str = "auto", **options: Any) -> "SplitEnsemble":
        """Choose how ``forward_members`` (and so ``forward``) runs the members.

        Args:
            strategy: one of :data:`timm_split.execution.STRATEGIES` (``'auto'``, ``'loop'``, ``'threads'``,
                ``'threads+packed'``, ``'compile'``, ``'packed'``; see :mod:`timm_split.execution`). All give the
                loop's outputs and gradients.
            **options: the strategy's options, e.g. ``set_execution('threads', cores=[[0], [1]])``,
                ``set_execution('compile', mode='max-autotune')``, ``set_execution('auto', repeats=5)``.

        Several Python threads may call the ensemble at once under any strategy (each gets the loop's result;
        what the calls share is locked, see :class:`~timm_split.execution.Execution`); change the strategy, the
        device or the dtype while none is running.

        Returns:
            ``self``.

        Raises:
            ValueError: unknown strategy or option, or a strategy that cannot run these members (``'packed'``
                needs every member on one device; with ``strict=True`` it names the first op it cannot pack).
        """
        ex = make_execution(strategy, **options)
        ex.check(self.members)
        self._execution.reset()
        self._execution = ex
        _logger.debug("execution: %r", ex)
        return self

    def to_devices(self, devices: Sequence[Device], execution: str = "threads", **options: Any) -> "SplitEnsemble":
        """Place member ``i`` on ``devices[i % len(devices)]`` and run them concurrently.

        Views go to each member's device and outputs are gathered on ``devices[0]`` (autograd follows the
        copies). With the default ``'threads'`` execution each member runs on its own thread (and CUDA stream).

        Args:
            devices: e.g. ``['cuda:0', 'cuda:1']``; ``['cpu', 'cpu']`` works (concurrent threads on one CPU).
            execution: the strategy to run with afterwards (``'threads'`` or ``'loop'`` when devices differ).
            **options: options of that strategy.

        Returns:
            ``self``.

        Raises:
            ValueError: ``devices`` is not a non-empty list of devices this machine has, or ``execution`` or an
                option is unknown; checked before any member moves.
        """
        if isinstance(devices, (str, int, torch.device)) or not isinstance(devices, Sequence) or not devices:
            raise ValueError(f"devices must be a non-empty list, e.g. ['cuda:0', 'cuda:1'], got {devices!r}")
        devs = [_device(d) for d in devices]
        if any(d.type == "meta" for d in devs) and not all(p.is_meta for p in self.parameters()):
            raise ValueError("to_devices: moving members to 'meta' drops their weights; split a meta model for a "
                             "meta ensemble (timm.create_model(..., device='meta'))")
        make_execution(execution, **options)  # names and options checked before anything moves
        before = [next((t.device for t in (*m.parameters(), *m.buffers())), None) for m in self.members]
        for i, m in enumerate(self.members):
            m.to(devs[i % len(devs)])
        try:
            return self.set_execution(execution, **options)
        except ValueError:
            for m, dev in zip(self.members, before):  # the strategy cannot run these placements: as they were
                if dev is not None:
                    m.to(dev)
            raise

    def _apply(self, fn, recurse: bool = True):
        # tensors move or change dtype: cached stacked/packed tensors and compiled code are stale
        self._execution.reset()
        return super()._apply(fn, recurse)

    # ---- outputs
    def combine(self, member_outputs: torch.Tensor) -> torch.Tensor:
        """Average ``[S, B, K]`` member logits the way ``averaging`` says; a headless ensemble
        (``num_classes == 0``) concatenates its members' features instead, ``[B, num_features]`` (pooled) or
        ``[B, S*C, H, W]`` (``global_pool=''``).

        Raises:
            ValueError: the leading dim is not S (e.g. ``[B, K]`` logits: pass ``forward_members(x)``).
        """
        # getattr: distributed.MemberParallel reuses this method on itself (split_factor, averaging, num_classes)
        return _combine(member_outputs, self.split_factor, getattr(self, "averaging", "logits") == "probs",
                        getattr(self, "num_classes", None) == 0, getattr(self, "_channels_last", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's prediction ``[B, num_classes]``.

        Args:
            x: one batch ``[B, C, H, W]``; in eager mode also per-member views (see :meth:`forward_members`).
        """
        return self.combine(self.forward_members(x))

    def extra_repr(self) -> str:
        return f"split_factor={self.split_factor}, averaging={self.averaging!r}, execution={self.execution!r}"

    def __prepare_scriptable__(self) -> "SplitEnsemble":
        """What ``torch.jit.script`` compiles: :class:`_Scripted`, this ensemble's own state (one ``__dict__``)
        with TorchScript's signatures."""
        scripted = _Scripted.__new__(_Scripted)
        scripted.__dict__ = self.__dict__
        return scripted


class _Scripted(SplitEnsemble):
    """A :class:`SplitEnsemble` as TorchScript compiles it: the loop over the members on one batch, and
    ``forward_intermediates`` with timm's own arguments only (TorchScript compiles neither per-member views nor
    ``**kwargs``). It shares the ensemble's ``__dict__`` (members, attributes, training flag), so it is the same
    model; ``torch.jit.script`` leaves it in place of an ensemble held by a wrapper (timm's
    ``FeatureGetterNet.model``), where eager calls still take views but no member options."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return SplitEnsemble.forward(self, x)
        outs: List[torch.Tensor] = []
        for m in self.members:
            y = m(x)
            if isinstance(y, torch.Tensor):  # refines a member's Union[Tensor, List[Tensor]] (EfficientViM)
                outs.append(y)
            else:
                raise RuntimeError("a member returned several tensors; script it in eval mode")
        headless = False
        num_classes = self.num_classes
        if num_classes is not None:  # None: a model outside timm's surface
            headless = num_classes == 0
        return _combine(torch.stack(outs), self.split_factor, self._probs, headless, self._channels_last)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        if not torch.jit.is_scripting():
            return SplitEnsemble.forward_intermediates(self, x, indices, norm, stop_early, output_fmt,
                                                       intermediates_only)
        finals: List[torch.Tensor] = []
        levels: List[List[torch.Tensor]] = []
        for m in self.members:
            y = m.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                        output_fmt=output_fmt, intermediates_only=intermediates_only)
            if isinstance(y, tuple):
                finals.append(y[0])
                levels.append(y[1])
            else:
                levels.append(y)
        last = output_fmt == "NHWC" or output_fmt == "NLC"
        joined: List[torch.Tensor] = []
        for j in range(len(levels[0])):
            joined.append(cat_members([lv[j] for lv in levels], last))
        if intermediates_only:
            return joined
        return cat_members(finals, self._channels_last), joined


def single(model: nn.Module, arch: str) -> SplitEnsemble:
    """The one-member ensemble around ``model`` itself (not copied, not traced): what ``--split 1`` trains and
    validates, so that every run, S=1 included, has the same checkpoint layout (``members.0.<name>``).

    Args:
        model: the timm model (its ``pretrained_cfg`` is kept).
        arch: its timm architecture name; the cfg's ``architecture`` becomes ``splitnet_<arch>``.

    Returns:
        A :class:`SplitEnsemble` with ``split_factor=1``.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {}, architecture=f"splitnet_{arch}", split_factor=1)
    return SplitEnsemble([model], pretrained_cfg=cfg)


def _may_be_missing(ens: "SplitEnsemble", key: str) -> bool:
    """Whether timm's loader may drop ``key`` from a file: the classifier (for another ``num_classes``) and a
    first conv's weight it cannot adapt to another ``in_chans`` (NaFlexViT's linear patch embedding)."""
    cfg = ens.pretrained_cfg
    heads = tuple(f"{n}." for n in prefixed(cfg.get("classifier"), ens.split_factor) or ())
    stems = {f"{n}.weight" for n in prefixed(cfg.get("first_conv"), ens.split_factor) or ()}
    return key.startswith(heads) or key in stems


def checked_state_dict(ens: "SplitEnsemble", state_dict: Dict[str, torch.Tensor], strict: bool = True,
                       assign: bool = False) -> Dict[str, torch.Tensor]:
    """``state_dict`` checked against the ensemble before anything is loaded, with tied names filled in.

    A split-factor mismatch, and everything :func:`~timm_split.checkpoint.check_state_dict` checks (keys, value
    types, shapes, dtype kinds), is a ``ValueError`` naming the cause (with ``strict=False`` too: nothing is loaded
    then). With ``strict=False`` only what timm's loader drops may be missing: the classifier
    (``pretrained_cfg['classifier']``) for another ``num_classes``, and a first conv's weight it cannot adapt to
    another ``in_chans``; a missing backbone tensor is refused.
    """
    state_dict = as_state_dict(state_dict, "checkpoint")
    ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("members.") and k.split(".")[1].isdigit()}
    arch = ens.pretrained_cfg.get("architecture", type(ens.members[0]).__name__)
    if ids and len(ids) != ens.split_factor:
        raise ValueError(f"checkpoint has {len(ids)} members but this {arch} has split_factor="
                         f"{ens.split_factor}; create the model with split_factor={len(ids)}")
    own = ens.state_dict()
    # a file holds tied tensors once (safetensors; timm's loader does not restore the other names)
    tied = {k: a for k, a in tied_names(own).items() if k not in state_dict and a in state_dict}
    if tied:
        state_dict = {**state_dict, **{k: state_dict[a] for k, a in tied.items()}}
    check_state_dict(own, state_dict, strict=True, unexpected_ok=not strict, assign=assign, where="checkpoint",
                     optional=(lambda k: False) if strict else (lambda k: _may_be_missing(ens, k)),
                     target=f"{arch} (split_factor={ens.split_factor})",
                     hint="Was it saved from another architecture, split factor, num_classes or in_chans? (only the "
                          "classifier and an unadaptable first conv may be missing)")
    return state_dict
