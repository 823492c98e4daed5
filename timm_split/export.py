"""Export a split ensemble as one deployable file: an ONNX graph or a ``torch.export`` program (``.pt2``).

The file holds all S members and the averaging (:meth:`SplitEnsemble.combine`: the mean of the logits, or the log
of the averaged probabilities for ``averaging='probs'``), one input (``input``, ``[B, C, H, W]``) and one output
(``logits``, ``log_probs``, or ``features`` for a headless ensemble), and the model's pretrained cfg (mean, std,
input size, classes, split factor...) as metadata: ONNX ``metadata_props``, or ``timm_split.json`` among the
``.pt2`` archive's extra files (:func:`export_metadata` reads either).

Two graphs can be exported:

* ``'members'`` (the default): the S members side by side, each its own sub-graph over the shared input, then the
  average. ONNX Runtime can run the branches concurrently (its parallel execution mode).
* ``'packed'``: the packed network of :mod:`timm_split.packing` (grouped convolutions over ``S*C`` channels, one
  batched matmul per linear layer), static batch only. It exports, but ONNX Runtime on CPU runs it slower than the
  members side by side (resnet50 S=2, 224 px, 2 threads: 1.03x the side-by-side latency at batch 1, 1.23x at
  batch 8; see docs/export.md), so it is opt-in.

The export is one pass: ``torch.export`` (non-strict), then the ONNX translation, both on the ensemble's device in
eval mode (the ensemble's flags are restored after). The file is written atomically: with ``check`` the written
file is loaded (onnxruntime on CPU, or ``torch.export.load``) and compared with PyTorch on the same random inputs
before it is put in place, so a failed check, an op that does not export or a full disk leave no file behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .checks import atomic_write, check_writable
from .ensemble import SplitEnsemble

_logger = logging.getLogger(__name__)

__all__ = ["export_ensemble", "export_metadata", "ExportError", "ExportResult", "FORMATS", "GRAPHS", "MIN_OPSET",
           "MAX_OPSET", "DEFAULT_OPSET", "CHECK_TOLERANCE", "METADATA_FILE", "MAX_DYNAMIC_BATCH"]

FORMATS = ("onnx", "pt2")
GRAPHS = ("members", "packed")
# torch.onnx's translation library is written for opset 18; below it a version converter runs that often fails.
# 23 is the highest opset onnxruntime 1.32 (what this was checked with) runs for the tier models; an older
# onnxruntime (the extra allows >= 1.17, opset 20) needs --opset 20 or lower.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18
CHECK_TOLERANCE = 1e-4  # max abs difference of the float32 outputs, exported vs PyTorch
METADATA_FILE = "timm_split.json"  # the .pt2 archive's extra file holding the metadata
MAX_DYNAMIC_BATCH = 4096
_CFG_KEYS = ("architecture", "input_size", "mean", "std", "num_classes", "interpolation", "crop_pct", "crop_mode",
             "first_conv", "classifier", "pool_size", "split_factor", "license", "hf_hub_id", "tag")
_MAX_PROTO = 2 ** 31 - 1  # protobuf's limit on one ONNX file


class ExportError(RuntimeError):
    """The ensemble could not be exported, or the exported file does not match PyTorch.

    The message names the op (``aten.erfinv.default``) and the member layer (``members.0.head.act``) where an op
    or construct does not export, or the difference found by the check.
    """


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_ensemble` wrote.

    Attributes:
        path: the file.
        format: ``'onnx'`` or ``'pt2'``.
        graph: ``'members'`` (side by side) or ``'packed'``.
        input_shape: the example input's shape (batch first; ``-1`` in ``metadata`` where the batch is dynamic).
        metadata: the metadata written into the file (strings; lists and dicts as JSON).
        max_abs_diff: the check's largest absolute difference of the outputs (None without ``check``).
        reference: the PyTorch outputs the check compared (first input; None without ``check``).
        exported: the exported file's outputs for the same input (None without ``check``).
    """

    path: str
    format: str
    graph: str
    input_shape: Tuple[int, ...]
    metadata: Dict[str, str]
    max_abs_diff: Optional[float] = None
    reference: Optional[torch.Tensor] = None
    exported: Optional[torch.Tensor] = None


class _SideBySide(nn.Module):
    """The members one after another on the one input, then the ensemble's averaging."""

    def __init__(self, ens: SplitEnsemble):
        super().__init__()
        self.members = ens.members
        self.combine = ens.combine  # a bound method: the ensemble's own averaging (logits, probs or features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(torch.stack([m(x) for m in self.members]))


class _Packed(nn.Module):
    """The packed network of the members (:mod:`timm_split.packing`) for one input shape, then the averaging."""

    def __init__(self, ens: SplitEnsemble, input_shape: Tuple[int, ...]):
        from .execution.packed import pack_members

        super().__init__()
        program = pack_members(ens.members, strict=True, channels_last=False).program(
            torch.empty(input_shape, device=_device(ens)))
        self.program = program.module
        tensors = program.pack(ens.members)
        self.names = [f"packed_{i}" for i in range(len(tensors))]
        for name, t in zip(self.names, tensors):
            self.register_buffer(name, t.detach())
        self.combine = ens.combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.program(x, *[getattr(self, n) for n in self.names]))


def _device(ens: nn.Module) -> torch.device:
    t = next(ens.parameters(), None)
    return t.device if t is not None else torch.device("cpu")


def _check_args(ens: Any, path: Any, format: Any, img_size: Any, batch_size: Any, dynamic_batch: Any, opset: Any,
                graph: Any) -> Tuple[str, int, Tuple[int, int], int]:
    """The checked ``(path, opset, (H, W), example batch)``; ``ValueError`` naming the fix otherwise."""
    if not isinstance(ens, SplitEnsemble):
        raise ValueError(f"ens must be a SplitEnsemble, got {type(ens).__name__}; split the model first: "
                         "export_ensemble(timm_split.split(model, 2), 'model.onnx')")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file name, got {type(path).__name__} (e.g. 'resnet18_s2.onnx')")
    path = os.fspath(path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r} ('members': side by side, the "
                         "default; 'packed': the packed network, static batch only)")
    if not isinstance(dynamic_batch, bool):
        raise ValueError(f"dynamic_batch must be True or False, got {dynamic_batch!r}")
    if dynamic_batch and batch_size is not None:
        raise ValueError("pass batch_size or dynamic_batch=True, not both (a dynamic batch takes any size from 1 "
                         f"to {MAX_DYNAMIC_BATCH})")
    if dynamic_batch and graph == "packed":
        raise ValueError("graph='packed' is built for one input shape: pass a batch_size, or graph='members' for a "
                         "dynamic batch")
    if batch_size is not None and (not _is_int(batch_size) or not 1 <= batch_size <= MAX_DYNAMIC_BATCH):
        raise ValueError(f"batch_size must be an int in [1, {MAX_DYNAMIC_BATCH}], got {batch_size!r} (e.g. 1)")
    if format == "pt2" and opset is not None:
        raise ValueError("opset applies to format='onnx' only; drop it for 'pt2'")
    opset = DEFAULT_OPSET if opset is None else opset
    if not _is_int(opset) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}: torch.onnx writes "
                         f"opset {MIN_OPSET} natively (the default), and {MAX_OPSET} is the highest checked with "
                         "onnxruntime")
    size = _img_size(ens, img_size)
    if any(p.is_meta for p in ens.parameters()):
        raise ValueError("the ensemble is on the meta device (no weights); split a model with weights, or load a "
                         "checkpoint into it, then export")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in ens.parameters()):
        raise ValueError("export writes float32 graphs; convert the ensemble first: ens.float()")
    check_writable(path, "path")
    return path, opset, size, 2 if dynamic_batch else (batch_size or 1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _img_size(ens: SplitEnsemble, img_size: Any) -> Tuple[int, int]:
    if img_size is None:
        size = tuple((ens.pretrained_cfg or {}).get("input_size") or ens.split_plan.input_size)[-2:]
        return int(size[0]), int(size[1])
    if _is_int(img_size) and img_size >= 1:
        return img_size, img_size
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(_is_int(v) and v >= 1 for v in img_size):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be None (the model's), a positive int or (height, width), got {img_size!r} "
                     "(e.g. img_size=224)")


def _in_chans(ens: SplitEnsemble) -> int:
    size = (ens.pretrained_cfg or {}).get("input_size")
    return int(size[0]) if size else int(getattr(ens, "in_chans", 3))


def _output_name(ens: SplitEnsemble) -> str:
    if getattr(ens, "num_classes", None) == 0:
        return "features"
    return "log_probs" if ens.averaging == "probs" else "logits"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _metadata(ens: SplitEnsemble, fmt: str, graph: str, shape: Tuple[int, ...], dynamic: bool,
              opset: Optional[int]) -> Dict[str, str]:
    """The file's metadata: strings, with lists and dicts as JSON."""
    import timm_split

    cfg = dict(ens.pretrained_cfg or {})
    data = {
        "producer": f"timm_split {timm_split.__version__} (torch {torch.__version__})",
        "architecture": cfg.get("architecture", ""),
        "split_factor": ens.split_factor,
        "averaging": ens.averaging,
        "graph": graph,
        "format": fmt,
        "input_name": "input",
        "output_name": _output_name(ens),
        "input_size": list(shape[1:]),
        "batch_size": -1 if dynamic else shape[0],
        "dynamic_batch": dynamic,
        "num_classes": getattr(ens, "num_classes", cfg.get("num_classes")),
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
        "interpolation": cfg.get("interpolation"),
        "crop_pct": cfg.get("crop_pct"),
        "crop_mode": cfg.get("crop_mode"),
        "pretrained_cfg": {k: cfg[k] for k in _CFG_KEYS if k in cfg},
    }
    if opset is not None:
        data["opset"] = opset
    return {k: v if isinstance(v, str) else json.dumps(_jsonable(v)) for k, v in data.items()}


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own training flag restored after."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


@contextlib.contextmanager
def _module_stack(module: nn.Module) -> Iterator[List[str]]:
    """The path of the modules being run (pushed before a forward, popped after): where an exception leaves it,
    the innermost entry is the layer that failed."""
    stack: List[str] = []

    def hooks(name: str) -> Tuple[Any, Any]:
        def push(mod: nn.Module, args: Any) -> None:
            stack.append(name)

        def pop(mod: nn.Module, args: Any, out: Any) -> None:
            if stack:
                stack.pop()
        return push, pop

    handles = []
    for name, m in module.named_modules():
        push, pop = hooks(name)
        handles += [m.register_forward_pre_hook(push), m.register_forward_hook(pop)]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _layer(path: str, module: nn.Module) -> str:
    try:
        kind = type(module.get_submodule(path)).__name__ if path else type(module).__name__
    except AttributeError:
        return path or "(the ensemble)"
    return f"{path or '(the ensemble)'} ({kind})"


def _first_line(e: Union[BaseException, str], limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _failing_node(exc: BaseException) -> Optional[fx.Node]:
    """The fx node a translation failed on: the innermost ``node`` local in the exception chain's frames."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found, tb = None, exc.__traceback__
        while tb is not None:
            node = tb.tb_frame.f_locals.get("node")
            if isinstance(node, fx.Node):
                found = node
            tb = tb.tb_next
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _node_layer(node: fx.Node, module: nn.Module) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return _layer(path, module)


def _op_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else node.format_node()


def _export_program(wrapper: nn.Module, x: torch.Tensor, dynamic: bool) -> "torch.export.ExportedProgram":
    """``torch.export`` (non-strict); a failure names the member layer it happened in."""
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)}} if dynamic else None
    with _module_stack(wrapper) as stack:
        try:
            return torch.export.export(wrapper, (x,), dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            where = _layer(stack[-1] if stack else "", wrapper)
            hint = (" (a dynamic batch: the layer reads or fixes the batch size; export with a fixed batch_size)"
                    if dynamic and "batch" in str(e) else "")
            raise ExportError(f"torch.export failed in member layer {where}: {_first_line(e)}{hint}") from e


def _to_onnx(ep: "torch.export.ExportedProgram", wrapper: nn.Module, x: torch.Tensor, opset: int,
             output_name: str) -> Any:
    """The ONNX program; a failure names the op and the member layer."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # torch.onnx reports its steps on stdout; they go to the log
            program = torch.onnx.export(ep, (x,), None, dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=[output_name], verbose=False)
    except Exception as e:
        _logger.debug("torch.onnx: %s", out.getvalue())
        node = _failing_node(e)
        what = f"op {_op_name(node)} in member layer {_node_layer(node, wrapper)}" if node is not None else "the graph"
        reason = _onnx_reason(e)
        raise ExportError(f"ONNX export failed: {what} does not export ({reason}); export format='pt2', or replace "
                          "that layer") from e
    _logger.debug("torch.onnx: %s", out.getvalue())
    return program


def _onnx_reason(e: BaseException) -> str:
    """torch.onnx's own cause (its "Exception summary"), without the generic next steps around it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))
    m = re.search(r"Exception summary <class '(?:[\w.]+\.)?(\w+)'>: (.*?)(?: ⬆️| While executing| \(Refer|$)", text)
    return _first_line(f"{m.group(1)}: {m.group(2)}" if m else text)


def _name_batch_dim(program: Any, dynamic: bool) -> None:
    """Call the dynamic batch dim ``batch`` on the graph's input and output (torch.onnx names it ``s<N>``)."""
    if not dynamic:
        return
    import onnx_ir as ir

    for value in list(program.model.graph.inputs) + list(program.model.graph.outputs):
        if value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int):
            value.shape = ir.Shape(["batch", *list(value.shape)[1:]])


def _write_onnx(program: Any, metadata: Dict[str, str], tmp: str) -> None:
    program.model.metadata_props.update(metadata)
    program.model.doc_string = (f"timm_split ensemble: {metadata['split_factor']} x {metadata['architecture']} "
                                f"({metadata['graph']}), {metadata['averaging']} averaged")
    program.save(tmp, external_data=False)


def _write_pt2(ep: "torch.export.ExportedProgram", metadata: Dict[str, str], tmp: str) -> None:
    with open(tmp, "wb") as f:
        torch.export.save(ep, f, extra_files={METADATA_FILE: json.dumps(metadata)})


def export_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The metadata :func:`export_ensemble` wrote into an ONNX or ``.pt2`` file.

    Args:
        path: the exported file.

    Returns:
        Key -> string (lists and dicts as JSON): ``architecture``, ``split_factor``, ``averaging``, ``graph``,
        ``input_name``, ``output_name``, ``input_size``, ``batch_size`` (-1: dynamic), ``num_classes``, ``mean``,
        ``std``, ``pretrained_cfg``...

    Raises:
        ValueError: the file is missing or neither an ONNX model nor a ``torch.export`` archive.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no exported file at {path}; pass a file written by export_ensemble / timm-split export")
    import zipfile

    if zipfile.is_zipfile(path):
        import torch.export

        extra = {METADATA_FILE: ""}
        with open(path, "rb") as f:
            torch.export.load(f, extra_files=extra)
        return json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ValueError(f"{path} is neither a torch.export archive nor an ONNX model ({_first_line(e)})") from e
    return {p.key: p.value for p in model.metadata_props}


def _inputs(shape: Tuple[int, ...], dynamic: bool, device: torch.device) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batches = [1, 3] if dynamic else [shape[0]]
    return [torch.randn((b, *shape[1:]), generator=gen).to(device) for b in batches]


def _run_exported(fmt: str, tmp: str, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """The written file's outputs for ``inputs`` (onnxruntime on CPU, or the loaded ``torch.export`` program)."""
    if fmt == "pt2":
        with open(tmp, "rb") as f:
            module = torch.export.load(f).module()
        with torch.no_grad():
            return [module(x).detach().cpu() for x in inputs]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(tmp, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the exported graph: {_ort_reason(e, tmp)}; export with another "
                          f"--opset (in [{MIN_OPSET}, {MAX_OPSET}]) or format='pt2'") from e
    name = session.get_inputs()[0].name
    return [torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]) for x in inputs]


def _ort_reason(e: BaseException, path: str) -> str:
    """onnxruntime's error, with the layer of the node it names where the ONNX file records it."""
    text = _first_line(e)
    m = re.search(r"node with name '([^']+)'", str(e))
    if not m:
        return text
    import onnx

    for node in onnx.load(path).graph.node:
        if node.name == m.group(1):
            meta = {p.key: p.value for p in node.metadata_props}
            scope = meta.get("pkg.torch.onnx.name_scopes") or meta.get("namespace")
            return f"{text} (op {node.op_type}, layer {scope})" if scope else f"{text} (op {node.op_type})"
    return text


def _check(fmt: str, tmp: str, ens: SplitEnsemble, inputs: List[torch.Tensor],
           atol: float) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """Largest abs difference between the ensemble in PyTorch (eval mode) and the written file; ``ExportError``
    above ``atol``."""
    with torch.no_grad():
        reference = [ens(x).detach().float().cpu() for x in inputs]
    exported = _run_exported(fmt, tmp, inputs)
    diff = 0.0
    for x, r, o in zip(inputs, reference, exported):
        if tuple(r.shape) != tuple(o.shape):
            raise ExportError(f"check: the exported file returns {tuple(o.shape)} for input {tuple(x.shape)}, "
                              f"PyTorch {tuple(r.shape)}")
        d = (r - o.float()).abs().max().item()
        diff = max(diff, d if math.isfinite(d) else math.inf)
    runtime = "onnxruntime" if fmt == "onnx" else "torch.export.load"
    _logger.info("check (%s vs PyTorch, inputs %s): max abs diff %.3g (tolerance %.0e); PyTorch %s, %s %s",
                 runtime, [tuple(x.shape) for x in inputs], diff, atol, _head(reference[0]), runtime,
                 _head(exported[0]))
    if not diff <= atol:
        scale = max(r.abs().max().item() for r in reference)
        raise ExportError(f"check failed: {runtime} and PyTorch differ by {diff:.3g} (max abs, tolerance {atol:.0e}) "
                          f"on the same inputs, for outputs up to {scale:.3g} in magnitude; PyTorch "
                          f"{_head(reference[0])}, {runtime} {_head(exported[0])} (float32 rounding is about 1e-6 "
                          "of the magnitude: for large outputs pass a larger atol / --atol)")
    return diff, reference[0], exported[0]


def _head(t: torch.Tensor, n: int = 4) -> str:
    return "[" + ", ".join(f"{v:.5f}" for v in t.flatten()[:n].tolist()) + ", ...]"


def export_ensemble(ens: SplitEnsemble, path: Union[str, os.PathLike], *, format: str = "onnx",
                    img_size: Union[int, Sequence[int], None] = None, batch_size: Optional[int] = None,
                    dynamic_batch: bool = False, opset: Optional[int] = None, check: bool = True,
                    graph: str = "members", atol: float = CHECK_TOLERANCE) -> ExportResult:
    """Write the ensemble (all S members and their averaging) as one ONNX or ``torch.export`` file.

    Args:
        ens: the split ensemble (float32, with weights; exported in eval mode on its own device, left unchanged).
        path: the file to write (e.g. ``'resnet18_s2.onnx'`` or ``'resnet18_s2.pt2'``); replaced atomically.
        format: ``'onnx'`` or ``'pt2'`` (``torch.export.save``).
        img_size: the input's height and width, an int or ``(H, W)`` (default: the model's ``input_size``).
        batch_size: a fixed batch size (default 1).
        dynamic_batch: a batch dim of any size from 1 to :data:`MAX_DYNAMIC_BATCH` instead of ``batch_size``.
        opset: the ONNX opset, in ``[MIN_OPSET, MAX_OPSET]`` (default :data:`DEFAULT_OPSET`; ONNX only).
        check: load the written file (onnxruntime on CPU, or ``torch.export.load``), run it and PyTorch on the
            same random inputs (batch 1 and 3 for a dynamic batch) and fail above ``atol``; both are logged.
        graph: ``'members'`` (side by side, the default) or ``'packed'`` (the packed network; static batch only,
            slower in onnxruntime on CPU, see the module docstring).
        atol: the check's tolerance on the max absolute difference of the outputs.

    Returns:
        An :class:`ExportResult` (path, metadata, the check's difference and outputs).

    Raises:
        ValueError: a bad argument (the message names the fix), or a path that cannot be written.
        ExportError: an op or construct that does not export (naming the op and member layer), or a failed check.
        ImportError: onnx/onnxruntime/onnxscript are not installed (``pip install timm_split[export]``).
        OSError: the file could not be written (full disk...).
    """
    path, opset_n, (H, W), batch = _check_args(ens, path, format, img_size, batch_size, dynamic_batch, opset, graph)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"atol must be a number >= 0, got {atol!r} (e.g. 1e-4)")
    if format == "onnx":
        _require_onnx()
        if sum(t.numel() * t.element_size() for t in ens.state_dict().values()) >= _MAX_PROTO:
            raise ValueError(f"{path}: the ensemble's weights exceed ONNX's 2 GiB single-file limit; export "
                             "format='pt2'")
    shape = (batch, _in_chans(ens), H, W)
    device = _device(ens)
    meta = _metadata(ens, format, graph, shape, dynamic_batch, opset_n if format == "onnx" else None)
    result = ExportResult(path, format, graph, shape, meta)
    with _eval_mode(ens):
        if graph == "packed":
            from .packing import PackingError
            try:
                wrapper: nn.Module = _Packed(ens, shape)
            except PackingError as e:
                raise ExportError(f"graph='packed': {_first_line(e)}; export graph='members'") from e
        else:
            wrapper = _SideBySide(ens)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        _logger.info("exporting %d x %s (%s) as %s, input %s", ens.split_factor, meta["architecture"] or "model",
                     graph, format, ["batch" if dynamic_batch else batch, *shape[1:]])
        ep = _export_program(wrapper, x, dynamic_batch)
        program = _to_onnx(ep, wrapper, x, opset_n, meta["output_name"]) if format == "onnx" else None
        if program is not None:
            _name_batch_dim(program, dynamic_batch)

        def write(tmp: str) -> None:
            if program is not None:
                _write_onnx(program, meta, tmp)
            else:
                _write_pt2(ep, meta, tmp)
            if check:
                result.max_abs_diff, result.reference, result.exported = _check(
                    format, tmp, ens, _inputs(shape, dynamic_batch, device), atol)

        atomic_write(path, write)
    _logger.info("wrote %s (%.1f MB)", path, os.path.getsize(path) / 1e6)
    return result


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as e:
            raise ImportError(f"exporting to ONNX needs {name}: pip install 'timm_split[export]' "
                              f"(onnx, onnxruntime, onnxscript)") from e
