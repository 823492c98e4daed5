"""Parameter and MAC counting: the one counting implementation of timm_split.

The engine's parity checks, the sweep tool and ``timm-split compare`` all count through :func:`count`, so a
split model and its original are always measured the same way.

Conventions (those of timm's published ``infer_gmacs``):

* ``params`` is ``sum(p.numel() for p in model.parameters())`` (shared parameters counted once).
* ``gmacs`` is fvcore's ``FlopCountAnalysis(model, x).total() / 1e9`` for one image, with fvcore's default
  handles (conv, linear, matmul, einsum, the norms, upsample, adaptive average pooling, grid sample) plus the
  ops fvcore misses but timm counts: attention (``scaled_dot_product_attention``, fused
  ``nn.MultiheadAttention``), ``padding='same'`` convolutions, ``baddbmm`` and ``addbmm``. One MAC (fused
  multiply-add) counts 1, as in fvcore. Like fvcore, it leaves out the recurrent ops (``aten::lstm`` ...) and
  custom autograd functions (``prim::PythonOp``); those are reported in :attr:`Cost.skipped` with a warning.
* ``gmacs_mac_only`` keeps only conv / linear / addmm / (b)mm / matmul / einsum / attention.

Where the count runs:

* A model on a real device (CPU, CUDA) is traced by fvcore on that device (one real forward pass).
* A model on the ``meta`` device, or any model with ``device='meta'``, is counted without real tensors. fvcore
  cannot trace meta tensors: ``torch.jit`` tracing runs the Python meta kernel of ``aten::convolution`` with
  traced (tensor-valued) sizes, which fails (``cond must be a bool, but got a Tensor``), and even a trace that
  ran would lose the convolutions, whose meta kernel never reaches ``aten::_convolution``. The meta count
  therefore runs the forward pass under :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2)
  plus two small modes that apply fvcore's conventions to what FlopCounterMode does not see as fvcore does:
  the non-MAC ops fvcore counts (norms, upsample, grid sample, adaptive average pooling, with fvcore's
  formulas) and the recurrent ops it skips. ``gmacs`` thus keeps timm's convention and equals the traced
  count; the one known difference is a custom autograd function, skipped by fvcore but counted inside on meta.
  Parameters and buffers are swapped for detached meta tensors with :func:`torch.func.functional_call`: the
  model is never moved, and no ``requires_grad`` flag gets in the counter's way (FlopCounterMode under
  ``no_grad`` fails on parameter views that require grad, e.g. in pit and siglip models).

Published numbers the count does not reproduce, by design: timm's come from stock fvcore, which skips
``aten::_convolution_mode`` (ConvMixer's ``padding='same'`` depthwise convs, about 7%), and its
differential-attention ViTs (``vit_d*``) match the unfused path, which computes ``attn @ v`` once where the
fused path timm runs by default computes it twice (about 5%).

Counting never changes the model: it runs in eval mode and restores every module's ``training`` flag, adds
no lasting hooks, and counts a re-parameterized (deployed) form only on a deep copy.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from collections import Counter
import dataclasses
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .trace import module_device, recurrent_meta_output, size_built_at

with warnings.catch_warnings():  # fvcore.nn scripts a loss at import, and torch.jit.script is deprecated
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import bmm_flop_jit, conv_flop_count, get_shape

__all__ = ["Cost", "count", "count_params", "ensemble_cost", "count_by_module", "fvcore_norm_macs", "FVCORE_PER_OUTPUT",
           "FVCORE_PER_INPUT"]

_logger = logging.getLogger(__name__)

aten = torch.ops.aten

# Relative disagreement with FlopCounterMode above which check=True logs a warning.
_CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Cost:
    """What a model costs for one image.

    Attributes:
        params: Number of parameters, ``sum(p.numel() for p in model.parameters())``.
        gmacs: GMACs per image in timm's published convention: fvcore's total with its default handles
            (norms, upsample and pooling included) plus attention.
        gmacs_mac_only: GMACs per image of conv / linear / addmm / (b)mm / matmul / einsum / attention only.
        img_size: The ``(height, width)`` counted.
        meta: True when counted on the meta device (FlopCounterMode, no real tensors), False when traced by
            fvcore on a real device.
        skipped: Ops the counter skipped, by name and number of calls, that are not on the allow-list of
            zero-MAC elementwise, reduction, pooling and data-movement ops. On meta, only the recurrent ops and
            matmul- or conv-like ops without a formula can show up here.
        counter_check: With ``check=True``, ``|gmacs_mac_only - F / 2| / (F / 2)`` where ``F`` is the FLOP
            count of a stock :class:`~torch.utils.flop_counter.FlopCounterMode` on meta; else None.
    """

    params: int
    gmacs: float
    gmacs_mac_only: float
    img_size: Tuple[int, int]
    meta: bool
    skipped: Dict[str, int]
    counter_check: Optional[float] = None


def count_params(model: nn.Module) -> int:
    """Return the number of parameters of ``model``, each shared parameter counted once.

    Args:
        model: Any module, on any device (meta included).

    Returns:
        ``sum(p.numel() for p in model.parameters())``.
    """
    return sum(p.numel() for p in model.parameters())


def count(
        model: nn.Module,
        img_size: Union[int, Tuple[int, int], None] = None,
        *,
        in_chans: Optional[int] = None,
        batch_size: int = 1,
        check: bool = False,
        device: Union[torch.device, str, None] = None,
        reparam: bool = False,
) -> Cost:
    """Count the parameters and MACs of ``model`` for one ``img_size`` image.

    Args:
        model: The model, on a real device or on ``meta``. It is not changed.
        img_size: ``H`` or ``(H, W)``. None reads ``model.pretrained_cfg['input_size']`` (timm models).
        in_chans: Input channels. None reads ``pretrained_cfg['input_size'][0]``, else 3.
        batch_size: Images in the counted forward pass; counts are divided by it (reported per image).
        check: Also count with a stock ``FlopCounterMode`` on meta and report the relative difference of
            ``gmacs_mac_only`` in :attr:`Cost.counter_check`; warns above 0.1%.
        device: None counts where the model lives (fvcore on a real device, FlopCounterMode on meta);
            ``'meta'`` counts any model on meta without moving it (fast, no memory, no real compute).
        reparam: Count the deployed form produced by timm's ``reparameterize_model`` (RepVGG, MobileOne,
            FastViT, LeViT conv-bn fusion ...), built on a deep copy; timm publishes those models that way.

    Returns:
        The :class:`Cost`.

    Raises:
        ValueError: For a bad argument, e.g. no ``img_size`` for a model without ``pretrained_cfg``.
        RuntimeError: When a meta count is asked for a model whose forward pass cannot run on meta.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}.")
    size, chans = _resolve_input(model, img_size, in_chans)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    on_meta = _resolve_device(model, device)
    target = _reparameterized(model) if reparam else model
    input_shape = (batch_size, chans) + size

    flags = [(m, m.training) for m in target.modules()]
    try:
        target.eval()
        if on_meta:
            counts = _count_meta(target, input_shape)
        else:
            counts = _count_fvcore(target, input_shape)
            if counts is None:  # fvcore could not trace it; the warning names the error
                on_meta = True
                counts = _count_meta(target, input_shape)
        counter_check = _counter_check(target, input_shape, counts.mac_only) if check else None
    finally:
        for m, training in flags:
            m.training = training

    _warn_skipped(counts.skipped, type(model).__name__)
    return Cost(
        params=count_params(target),
        gmacs=counts.total / batch_size / 1e9,
        gmacs_mac_only=counts.mac_only / batch_size / 1e9,
        img_size=size,
        meta=on_meta,
        skipped=dict(sorted(counts.skipped.items())),
        counter_check=counter_check,
    )


def ensemble_cost(member: Cost, members: Sequence[nn.Module]) -> Cost:
    """The cost of S members of one architecture from one member's: S times its MACs (averaging S outputs has
    no MACs in fvcore's convention) and the params of all members, counted.

    Args:
        member: ``count(members[0], ...)``.
        members: the S members (a :class:`~timm_split.ensemble.SplitEnsemble`'s ``members``).

    Returns:
        The members' total :class:`Cost`.

    Raises:
        ValueError: the members differ in their parameter shapes (count each one instead).
    """
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in members]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("ensemble_cost needs members of one architecture (equal parameter shapes); count each "
                         "member with count() and add them up instead")
    S = len(members)
    return dataclasses.replace(member, params=sum(count_params(m) for m in members), gmacs=member.gmacs * S,
                               gmacs_mac_only=member.gmacs_mac_only * S)


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def _resolve_input(
        model: nn.Module, img_size: Union[int, Tuple[int, int], None], in_chans: Optional[int],
) -> Tuple[Tuple[int, int], int]:
    """Return ``((H, W), C)`` from the arguments, else the size the model was created at, else its
    ``pretrained_cfg['input_size']`` (as :func:`timm_split.trace.input_shape_for`)."""
    cfg = getattr(model, "pretrained_cfg", None)
    cfg_size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if img_size is None:
        img_size = size_built_at(model)
    if img_size is None:
        if cfg_size is None:
            raise ValueError(
                f"{type(model).__name__} has no pretrained_cfg['input_size']; pass img_size, e.g. "
                "count(model, img_size=224).")
        img_size = tuple(cfg_size[-2:])
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in img_size)):
        raise ValueError(f"img_size must be a positive int H or a pair (H, W); got {img_size!r}.")
    if in_chans is None:
        in_chans = int(cfg_size[0]) if cfg_size is not None and len(cfg_size) == 3 else 3
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an int >= 1; got {in_chans!r}.")
    return (int(img_size[0]), int(img_size[1])), in_chans


def _resolve_device(model: nn.Module, device: Union[torch.device, str, None]) -> bool:
    """Return True to count on meta, False to trace with fvcore where the model lives."""
    here = module_device(model)
    if device is None:
        return here.type == "meta"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be None, 'meta' or the model's device; got {device!r}.") from e
    if device.type == "meta":
        return True
    if here.type == "meta":
        raise ValueError(
            f"the model is on meta and cannot be counted on {device}; pass device=None or 'meta' "
            "(the meta count has the same convention).")
    if device.type != here.type or (device.index is not None and device != here):
        raise ValueError(
            f"count() never moves a model: it is on {here}, not {device}. Move it yourself, or pass "
            "device=None (count where it lives) or device='meta'.")
    return False


def _reparameterized(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in its deployed (re-parameterized) form; ``model`` itself is untouched.

    The fusing code builds new modules and tensors with default factories, so it runs with the model's device
    as the default device: on meta, everything stays on meta.
    """
    from timm.utils.model import reparameterize_model

    with torch.device(module_device(model)):
        return reparameterize_model(model, inplace=False)


# ---------------------------------------------------------------------------------------------------------------
# fvcore on a real device

_Handle = Callable[[List[Any], List[Any]], Union[int, float, Counter]]


def _sdpa_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev])``: QK^T plus AV."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    out = get_shape(outputs[0])
    return math.prod(out[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _conv_mode_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """``_convolution_mode`` (``padding='same'`` / ``'valid'``): counted like any convolution."""
    x, w, out = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    return Counter({"conv": conv_flop_count(x, w, out, transposed=False)})


def _batched_addmm_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm`` / ``addbmm(self, batch1, batch2, ...)``: the MACs of ``bmm(batch1, batch2)``."""
    return bmm_flop_jit(inputs[1:3], outputs)


def _native_mha_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Fused ``nn.MultiheadAttention`` (``query [B, Lq, E]``, ``key``/``value [B, Lk, E]``, batch first).

    q / k / v / out projections plus QK^T and AV, as the unfused path counts them.
    """
    b, lq, e = get_shape(inputs[0])
    lk = get_shape(inputs[1])[-2]
    return b * (2 * lq + 2 * lk) * e * e + b * lq * lk * 2 * e


# Handles added to fvcore's defaults: ops fvcore skips but that do multiply-accumulates.
_JIT_HANDLES: Dict[str, _Handle] = {
    "aten::scaled_dot_product_attention": _sdpa_jit,
    "aten::_convolution_mode": _conv_mode_jit,
    "aten::baddbmm": _batched_addmm_jit,
    "aten::addbmm": _batched_addmm_jit,
    "aten::_native_multi_head_attention": _native_mha_jit,
}

# fvcore's by_operator() names of the MAC ops (its defaults and ours).
_JIT_MAC_OPS = frozenset({
    "conv", "linear", "addmm", "mm", "matmul", "bmm", "einsum", "baddbmm", "addbmm",
    "scaled_dot_product_attention", "_native_multi_head_attention",
})

# Ops fvcore skips that cost no MACs: elementwise math and activations, reductions, pooling, comparisons and
# data movement. In-place variants (trailing '_') are folded in. Anything else fvcore skips lands in
# Cost.skipped.
_ALLOWED_SKIPS = frozenset({
    # elementwise arithmetic
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "neg", "abs", "pow", "sqrt", "rsqrt",
    "square", "exp", "log", "log2", "log1p", "expm1", "reciprocal", "sign", "ceil", "round", "trunc", "frac",
    "fmod", "maximum", "minimum", "clamp_min", "clamp_max", "clip", "where", "lerp", "addcmul", "addcdiv", "erf",
    "erfinv", "sin", "cos", "atan2", "nan_to_num", "fill", "zero",
    # activations
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "softplus", "softsign", "prelu", "glu", "tanh", "sigmoid", "log_sigmoid", "threshold",
    "softmax", "log_softmax", "softmin",
    # reductions
    "mean", "sum", "amax", "amin", "min", "argmax", "argmin", "norm", "linalg_vector_norm", "frobenius_norm",
    "var", "std", "var_mean", "std_mean", "prod", "cumsum", "cumprod", "logsumexp", "topk", "sort", "argsort",
    "any", "all",
    # pooling (adaptive_avg_pool2d is counted by fvcore)
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices", "lp_pool2d",
    # comparisons and logic
    "lt", "le", "ne", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "isnan", "isinf", "isfinite",
    # data movement, creation, randomness
    "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d", "repeat",
    "repeat_interleave", "tile", "flip", "unfold", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "clone", "expand_as", "view_as", "reshape_as", "unflatten", "movedim", "swapaxes",
    "tensor_split", "index_select", "index_add", "scatter", "scatter_add", "masked_select", "embedding", "diag",
    "tril", "triu", "eye", "meshgrid", "linspace", "ones_like", "empty_like", "new_ones", "rand", "randn",
    "rand_like", "randn_like", "bernoulli", "uniform", "normal", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "one_hot", "bucketize",
    "searchsorted",
})

# A skipped op whose name says it multiplies-accumulates (resampling ops named *linear* excepted): worth a warning.
_MAC_LIKE = re.compile(r"^(?!_?upsample)\w*(mm|mv|matmul|einsum|linear|conv(?!ert)|attention|dot|lstm|gru|rnn)")


def _base_name(kind: str) -> str:
    """``'aten::relu_'`` -> ``'relu'``; ``'prim::PythonOp.Fn'`` -> ``'PythonOp.Fn'``."""
    name = kind.split("::", 1)[-1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _is_allowed_skip(kind: str) -> bool:
    """True for an op that fvcore skips and that costs no MACs (see ``_ALLOWED_SKIPS``)."""
    return kind.startswith("aten::") and _base_name(kind) in _ALLOWED_SKIPS


class _Counts:
    """Raw MACs of one forward pass (whole batch), split into MAC ops and the rest, plus skipped ops."""

    def __init__(self, mac_only: float, total: float, skipped: Mapping[str, int]) -> None:
        self.mac_only = mac_only
        self.total = total
        self.skipped = dict(skipped)


def _example_input(model: nn.Module, shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``torch.ones`` of ``shape`` in the model's floating dtype (as timm's benchmark profiles)."""
    dtype = next((t.dtype for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()),
                 torch.get_default_dtype())
    return torch.ones(shape, dtype=dtype, device=device)


def _count_fvcore(model: nn.Module, input_shape: Tuple[int, ...]) -> Optional[_Counts]:
    """Trace ``model`` with fvcore where it lives; None (after a warning) when the trace fails."""
    x = _example_input(model, input_shape, module_device(model))
    analysis = (FlopCountAnalysis(model, x)
                .set_op_handle(**_JIT_HANDLES)
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
                .tracer_warnings("none"))
    try:
        with torch.no_grad():
            by_op = analysis.by_operator()
    except Exception as e:  # noqa: BLE001 - any tracing failure: count on meta instead
        _logger.warning("fvcore could not trace %s (%s: %s); counting it on meta instead.",
                        type(model).__name__, type(e).__name__, e)
        return None
    skipped = {k: n for k, n in analysis.unsupported_ops().items() if not _is_allowed_skip(k)}
    return _Counts(
        mac_only=sum(v for k, v in by_op.items() if k in _JIT_MAC_OPS),
        total=sum(by_op.values()),
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------------------------
# FlopCounterMode on meta


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


# fvcore's default handles for the non-MAC ops it counts, in MACs per element: per output element of upsampling
# and grid sampling, per input element of adaptive average pooling and the norms (fvcore_norm_macs). The
# planner's cost model (timm_split.engine.rules) reads the same table, so the two cannot drift apart.
FVCORE_PER_OUTPUT = {"upsample_nearest2d": 1, "upsample_bilinear2d": 4, "grid_sampler_2d": 4, "grid_sampler_3d": 4}
FVCORE_PER_INPUT = {"_adaptive_avg_pool2d": 1}


def fvcore_norm_macs(kind: str, affine: bool, training: bool = False) -> int:
    """fvcore's MACs per input element of a norm: ``batch_norm`` in eval 1 (2 with an affine weight), any norm in
    training and ``layer_norm``/``group_norm`` always 4 (5 with an affine weight).

    Args:
        kind: ``'batch_norm'``, ``'layer_norm'`` or ``'group_norm'``.
        affine: whether the norm has a weight.
        training: batch norm in training mode (fvcore's ``norm_flop_counter`` then applies).

    Returns:
        MACs per element of the norm's input.
    """
    if kind == "batch_norm" and not training:
        return 2 if affine else 1
    return 5 if affine else 4


def _batch_norm_macs(args: Tuple[Any, ...], out: Any) -> int:
    # native_batch_norm / _native_batch_norm_legit(input, weight, bias, [running_mean, running_var,] training,
    # ...); _native_batch_norm_legit_no_training has no training flag.
    training = next((a for a in args[3:] if isinstance(a, bool)), False)
    return _numel(args[0]) * fvcore_norm_macs("batch_norm", args[1] is not None, training)


# fvcore's default non-MAC handles, as rules on the (post-autograd) aten ops seen on meta:
# op -> f(args, out) -> MACs. adaptive_avg_pool2d is counted by _FvcoreFunctionsMode (at 1x1 it becomes aten.mean).
_META_FVCORE_RULES: Dict[Any, Callable[[Tuple[Any, ...], Any], int]] = {
    aten.native_batch_norm: _batch_norm_macs,
    aten._native_batch_norm_legit: _batch_norm_macs,
    aten._native_batch_norm_legit_no_training: _batch_norm_macs,
    aten.native_layer_norm: lambda a, out: _numel(a[0]) * fvcore_norm_macs("layer_norm", a[2] is not None),
    aten.native_group_norm: lambda a, out: _numel(a[0]) * fvcore_norm_macs("group_norm", a[1] is not None),
    **{getattr(aten, name): (lambda k: lambda a, out: k * _numel(_first(out)))(k)
       for name, k in FVCORE_PER_OUTPUT.items()},
}


def _addbmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None,
                 **kwargs: Any) -> int:
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[-1]


# FLOP formulas (FlopCounterMode's unit: 2 per MAC) for MAC ops that torch's registry lacks.
_META_MAC_FORMULAS: Dict[Any, Callable[..., int]] = {aten.addbmm: _addbmm_flop}


class _FvcoreRulesMode(TorchDispatchMode):
    """Counts ``_META_FVCORE_RULES`` ops and records MAC-like ops without a formula.

    Entered inside :class:`FlopCounterMode`, so it sees each op before FlopCounterMode decomposes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.macs: Counter = Counter()
        self.skipped: Counter = Counter()
        self._mac_ops = set(flop_registry) | set(_META_MAC_FORMULAS)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "_overloadpacket", None)
        rule = _META_FVCORE_RULES.get(packet)
        if rule is not None:
            self.macs[packet.__name__] += rule(args, out)
        elif (packet is not None and packet not in self._mac_ops and _MAC_LIKE.search(packet.__name__)
              and not _decomposes(func)):
            self.skipped[f"aten::{packet.__name__}"] += 1
        return out


def _decomposes(func: Any) -> bool:
    """True when FlopCounterMode will break ``func`` into smaller (countable) ops."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return key in getattr(func, "py_kernels", {}) or torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), key)


# Functions that aten lowers before a dispatch mode sees them, handled as fvcore handles the traced op.
_ADAPTIVE_AVG_POOL_2D = frozenset({F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d})
_RECURRENT = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu,
                        torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell})


class _FvcoreFunctionsMode(TorchFunctionMode):
    """fvcore's view of ops that are lowered before :class:`_FvcoreRulesMode` can see them.

    ``adaptive_avg_pool2d`` counts 1 MAC per input element (at 1x1 output aten lowers it to ``mean``). The
    recurrent ops (``aten::lstm``, ``aten::gru`` ...) have no fvcore handle, so their MACs are taken out of the
    count and the op is reported as skipped, as in the traced count.
    """

    def __init__(self, flops: FlopCounterMode, rules: _FvcoreRulesMode) -> None:
        super().__init__()
        self.flops = flops
        self.rules = rules
        self.excluded_flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADAPTIVE_AVG_POOL_2D and args:
            self.rules.macs["adaptive_avg_pool2d"] += FVCORE_PER_INPUT["_adaptive_avg_pool2d"] * _numel(args[0])
        elif func in _RECURRENT:
            self.rules.skipped[f"aten::{func.__name__}"] += 1
            out = recurrent_meta_output(func, args) if not kwargs else None
            if out is not None:  # on meta, from shapes: no per-step decomposition, no FLOPs to take out
                return out
            before = self.flops.get_total_flops()
            out = func(*args, **kwargs)
            self.excluded_flops += self.flops.get_total_flops() - before
            return out
        return func(*args, **kwargs)


def _meta_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached meta stand-ins for every parameter and buffer, for ``functional_call``."""
    def meta(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if t.is_meta else torch.empty_like(t, device="meta")

    return {name: meta(t) for name, t in chain(model.named_parameters(), model.named_buffers())}


def _run_meta(model: nn.Module, input_shape: Tuple[int, ...], *modes: Any) -> None:
    """One forward pass on meta inside ``modes`` (entered in order), the model's tensors swapped for meta ones."""
    state = _meta_state(model)
    x = _example_input(model, input_shape, torch.device("meta"))
    entered: List[Any] = []
    try:
        with torch.no_grad():
            for mode in modes:
                mode.__enter__()
                entered.append(mode)
            torch.func.functional_call(model, state, (x,))
    except Exception as e:
        raise RuntimeError(
            f"counting {type(model).__name__} on meta failed ({type(e).__name__}: {e}). A forward pass that "
            "needs real values (.item(), data-dependent shapes) or makes tensors on a fixed device cannot run on "
            "meta: count a real-device model with device=None.") from e
    finally:
        for mode in reversed(entered):
            mode.__exit__(None, None, None)


def _count_meta(model: nn.Module, input_shape: Tuple[int, ...]) -> _Counts:
    """fvcore's convention on meta: FlopCounterMode for the MAC ops plus fvcore's rules for the rest."""
    flops = FlopCounterMode(display=False, custom_mapping=_META_MAC_FORMULAS)
    rules = _FvcoreRulesMode()
    functions = _FvcoreFunctionsMode(flops, rules)
    _run_meta(model, input_shape, flops, rules, functions)
    mac_only = (flops.get_total_flops() - functions.excluded_flops) / 2
    return _Counts(mac_only=mac_only, total=mac_only + sum(rules.macs.values()), skipped=rules.skipped)


def count_by_module(model: nn.Module, img_size: Union[int, Tuple[int, int], None] = None, depth: int = 1, *,
                    in_chans: Optional[int] = None) -> Dict[str, Tuple[int, float]]:
    """Params and MAC-only GMACs per submodule, down to ``depth`` levels of module path.

    The MACs come from the same meta count as :func:`count` (``FlopCounterMode`` with the same formulas), split
    by the counter's module tracking; norms and other non-MAC ops are not broken down.

    Args:
        model: the model, on any device (it is counted on meta, never moved or changed).
        img_size: ``H`` or ``(H, W)``; None reads the model's ``pretrained_cfg``.
        depth: how many path components to keep (``layer1`` is depth 1, ``layer1.0`` depth 2).
        in_chans: input channels; None reads the cfg.

    Returns:
        Module path -> (params, GMACs of MAC ops); ``''`` is the whole model.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1; got {depth!r}.")
    size, chans = _resolve_input(model, img_size, in_chans)
    flops = FlopCounterMode(display=False, custom_mapping=_META_MAC_FORMULAS)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        _run_meta(model, (1, chans) + size, flops)
    finally:
        for m, training in flags:
            m.training = training
    macs: Dict[str, float] = {}
    for name, ops in flops.get_flop_counts().items():
        if name != "Global":  # the first component is the root module's class name
            macs[".".join(name.split(".")[1:])] = sum(ops.values()) / 2e9
    out: Dict[str, Tuple[int, float]] = {"": (count_params(model), flops.get_total_flops() / 2e9)}
    for path, sub in model.named_modules():
        if path and path.count(".") == depth - 1:
            out[path] = (count_params(sub), macs.get(path, 0.0))
    return out


def _counter_check(model: nn.Module, input_shape: Tuple[int, ...], mac_only: float) -> float:
    """Relative difference of ``mac_only`` from a stock FlopCounterMode on meta; warns above 0.1%."""
    flops = FlopCounterMode(display=False)
    _run_meta(model, input_shape, flops)
    reference = flops.get_total_flops() / 2
    diff = abs(mac_only - reference) / reference if reference else float(mac_only != 0)
    if diff > _CHECK_TOLERANCE:
        _logger.warning("%s: MAC-only count %.6g differs from FlopCounterMode's %.6g by %.3g%%.",
                        type(model).__name__, mac_only, reference, 100 * diff)
    return diff


def _warn_skipped(skipped: Mapping[str, int], name: str) -> None:
    """Warn about skipped ops that probably hold MACs (matmul-/conv-like or custom autograd functions)."""
    suspicious = sorted(k for k in skipped if "PythonOp" in k or _MAC_LIKE.search(_base_name(k)))
    if suspicious:
        _logger.warning("%s: the MAC count skips %s (matmul-/conv-like or custom autograd ops); it may be low.",
                        name, ", ".join(f"{k} x{skipped[k]}" for k in suspicious))
