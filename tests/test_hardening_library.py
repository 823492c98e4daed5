"""Issue 36, the library's classes (docs/reliability.md, "Round 3: classes"), tested by generators (hypothesis):

1. loads are all-or-nothing: a state dict (in memory or in a checkpoint file) with one value corrupted at random
   is refused with a ValueError, and the model, optimizer and EMA are bit-for-bit as they were;
4. caches and shared state: weight edits through ``.data`` are seen by the packed strategies, and Python threads
   calling one ensemble under every strategy get the loop's results; views of random dtypes and shapes get the
   loop's result or an error under every strategy;
5. normalisation at the door: timm's ``num_classes=-1``, DataParallel / torch.compile wrappers, pruning, models
   whose forward returns a tuple or a dict;
6. second-tier arguments: every option outside its domain is a ValueError where it enters.

Every test here fails on main d3ca403 (the docstrings say how). Tiny models only: the whole file runs in seconds.
"""
import copy
import functools
import json
import threading

import numpy as np
import pytest
import timm
import torch
import torch.nn.utils.prune as prune
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import timm_split
from timm_split import SplitError, load_checkpoint, param_groups, save_checkpoint

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
STRATEGIES = ["loop", "threads", "threads+packed", "packed", "compile"]
OPTIONS = {"compile": dict(backend="eager")}  # torch.compile's own path, without inductor's minute per model


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


@pytest.fixture(scope="module")
def ens():
    e = timm_split.split(tiny(), 2, img_size=16).eval()
    with torch.no_grad():  # running stats away from their init, so a copy is visible
        for b in e.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
    return e


def snapshot(*objs):
    """Every tensor of models (state dicts) and optimizers (state and groups), cloned."""
    out = []
    for o in objs:
        sd = o.state_dict()
        if isinstance(o, torch.optim.Optimizer):
            out.append((json.dumps(sd["param_groups"], sort_keys=True, default=str),
                        {(k, n): v.clone() for k, e in sd["state"].items() for n, v in e.items()
                         if isinstance(v, torch.Tensor)}))
        else:
            out.append({k: v.clone() for k, v in sd.items()})
    return out


def assert_same(before, after):
    for a, b in zip(before, after):
        if isinstance(a, tuple):
            assert a[0] == b[0]
            a, b = a[1], b[1]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- class 1: loads are all-or-nothing

def corrupt(value: torch.Tensor, how: str):
    if how == "numpy":
        return value.numpy()
    if how == "list":
        return value.tolist()
    if how == "number":
        return 1.0
    if how == "none":
        return None
    if how == "extra dim":
        return value.unsqueeze(0)
    if how == "other shape":
        return torch.zeros(value.numel() + 1)
    if how == "dtype kind":
        return value.to(torch.int64) if value.is_floating_point() else value.to(torch.float32)
    if how == "meta":
        return value.to("meta")
    raise AssertionError(how)


KINDS = ["numpy", "list", "number", "none", "extra dim", "other shape", "dtype kind", "meta"]


@settings(max_examples=25, **SETTINGS)
@given(index=st.integers(0, 10 ** 6), how=st.sampled_from(KINDS), strict=st.booleans())
def test_load_state_dict_with_one_corrupted_value_changes_nothing(ens, index, how, strict):
    """On main a numpy array or a float where an int buffer was raised after the values before it were copied
    (or a value of another dtype kind was converted silently)."""
    good = {k: (v + 1 if v.is_floating_point() else v + 2) for k, v in ens.state_dict().items()}  # all differ
    key = sorted(good)[index % len(good)]
    bad = dict(good, **{key: corrupt(good[key], how)})
    before = snapshot(ens)
    with pytest.raises(ValueError, match="nothing was loaded"):
        ens.load_state_dict(bad, strict=strict)
    assert_same(before, snapshot(ens))


@pytest.mark.parametrize("bad", [[1, 2], {1: torch.zeros(1)}, "members.0.weight"])
def test_load_state_dict_of_another_container_is_refused(ens, bad):
    before = snapshot(ens)
    with pytest.raises(ValueError, match="nothing was loaded"):
        ens.load_state_dict(bad)
    assert_same(before, snapshot(ens))


@functools.lru_cache(maxsize=None)
def _split_of(seed: int):
    return timm_split.split(tiny(seed), 2, img_size=16)


def _trained(seed: int):
    """An ensemble, its SGD after one step, and an EMA copy."""
    torch.manual_seed(seed)
    e = copy.deepcopy(_split_of(seed))
    opt = torch.optim.SGD(e.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    e(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    return e, opt, copy.deepcopy(e)


TAMPER = ["momentum extra dim", "momentum int", "group option list", "group option str", "ema buffer int",
          "model buffer int"]


def _tamper(how: str, e, opt, ema) -> None:
    p = next(iter(opt.state))
    if how == "momentum extra dim":
        opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].unsqueeze(0)
    elif how == "momentum int":
        opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].long()
    elif how == "group option list":
        opt.param_groups[0]["momentum"] = [0.9]
    elif how == "group option str":
        opt.param_groups[0]["lr"] = "0.1"
    else:
        bn = (ema if how.startswith("ema") else e).members[1][1]
        bn.running_mean = bn.running_mean.long()


@settings(max_examples=10, **SETTINGS)
@given(how=st.sampled_from(TAMPER), with_ema=st.booleans())
def test_load_checkpoint_with_one_corrupted_entry_changes_nothing(tmp_path_factory, how, with_ema):
    """A checkpoint written (checksum and all) from a model, optimizer or EMA with one entry of another shape,
    dtype kind or type: the load is refused before anything changes. On main these loaded silently (a momentum
    buffer of another rank or dtype, a string lr: failing at the next step; an int buffer converted)."""
    if how.startswith("ema") and not with_ema:
        with_ema = True
    src, src_opt, src_ema = _trained(0)
    _tamper(how, src, src_opt, src_ema)
    path = tmp_path_factory.mktemp("c") / "c.safetensors"
    save_checkpoint(src, path, src_opt, model_ema=src_ema if with_ema else None, state={"epoch": 1})
    e, opt, ema = _trained(1)
    before = snapshot(e, opt, ema)
    with pytest.raises(ValueError):
        load_checkpoint(e, path, opt, model_ema=ema if with_ema else None)
    assert_same(before, snapshot(e, opt, ema))


# ---- class 4: caches and shared state

@settings(max_examples=6, **SETTINGS)
@given(strategy=st.sampled_from(["packed", "threads+packed"]), factor=st.floats(0.1, 3.0),
       which=st.integers(0, 10 ** 6))
def test_data_edits_are_seen_by_packed_strategies(strategy, factor, which):
    """On main the packed weights were cached under the tensors' version counters, which ``p.data`` edits do not
    bump: the packed output stayed the old one."""
    e = timm_split.split(tiny(), 2, img_size=16).eval().set_execution(strategy, **OPTIONS.get(strategy, {}))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        e(x)  # packs and keeps the weights
        params = list(e.parameters())
        params[which % len(params)].data.mul_(factor)
        params[(which + 1) % len(params)].data.add_(0.25)
        got = e(x)
        want = e.set_execution("loop")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threads_calling_one_ensemble_get_the_loops_results(strategy):
    """Four Python threads, each with its own batch size (so its own packed program), call one ensemble at once.
    On main 'threads+packed' and 'packed' shared their kept tensors without a lock (a channel-count error or
    another call's output)."""
    e = timm_split.split(tiny(), 2, img_size=16).eval()
    xs = [torch.randn(b, 3, 16, 16) for b in (1, 2, 3, 4)]
    with torch.no_grad():
        want = [e(x) for x in xs]
    e.set_execution(strategy, **OPTIONS.get(strategy, {}))
    errors, results = [], {}
    barrier = threading.Barrier(len(xs))

    def call(i):
        try:
            barrier.wait()
            with torch.no_grad():
                results[i] = [e(xs[i]) for _ in range(6)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, outs in results.items():
        for y in outs:
            torch.testing.assert_close(y, want[i], rtol=1e-4, atol=1e-5)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def inputs(draw):
    """One batch or per-member views of random dtypes and shapes, around what the model takes."""
    dtype = draw(st.sampled_from(DTYPES))
    b = draw(st.integers(1, 3))
    c = draw(st.sampled_from([3, 3, 1, 4]))
    h, w = draw(st.integers(4, 20)), draw(st.integers(4, 20))
    layout = draw(st.sampled_from(["batch", "stacked", "list", "list mixed"]))
    x = (torch.randn(b, c, h, w) * 3).to(dtype)
    if layout == "batch":
        return x
    if layout == "stacked":
        return torch.stack([x, x + 1 if dtype != torch.bool else x])
    second = x if layout == "list" else x.to(draw(st.sampled_from(DTYPES)))
    return [x, second]


@settings(max_examples=30, **SETTINGS)
@given(x=inputs(), strategy=st.sampled_from(STRATEGIES[1:]))
def test_views_of_random_dtypes_and_shapes_get_the_loops_result_or_an_error(ens, x, strategy):
    """Every strategy gives what the loop gives for any input: the same output, or an error where the loop has
    one (no other exception kind, no wrong shape)."""
    ens.set_execution("loop")
    try:
        with torch.no_grad():
            want = ens(x)
    except (ValueError, RuntimeError, TypeError):
        want = None
    ens.set_execution(strategy, **OPTIONS.get(strategy, {}))
    try:
        if want is None:
            with pytest.raises((ValueError, RuntimeError, TypeError)):
                with torch.no_grad():
                    ens(x)
        else:
            with torch.no_grad():
                got = ens(x)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    finally:
        ens.set_execution("loop")


# ---- class 5: normalisation at the door

def test_num_classes_minus_one_is_timms_no_head():
    """timm builds no classifier for any num_classes <= 0. On main -1 averaged the members' unrelated features
    into [B, C] while num_features said S*C."""
    x = torch.randn(2, 3, 32, 32)
    e0 = timm.create_model("splitnet_test_resnet", num_classes=0)
    e1 = timm.create_model("splitnet_test_resnet", num_classes=-1)
    assert e1.num_classes == 0 and e1.num_features == e0.num_features
    assert e1(x).shape == e0(x).shape == (2, e0.num_features)
    assert [g.new for g in e1.split_plan.groups] == [g.new for g in e0.split_plan.groups]


@pytest.mark.parametrize("wrap", ["DataParallel", "compile", "DataParallel(compile)"])
def test_wrapped_models_are_split_and_saved_as_the_module_inside(tmp_path, wrap):
    """On main a DataParallel model failed to count on meta (or its members were wrappers), and a wrapped model
    was saved with the wrapper's keys and name."""
    def wrapped(m):
        return {"DataParallel": lambda: nn.DataParallel(m), "compile": lambda: torch.compile(m),
                "DataParallel(compile)": lambda: nn.DataParallel(torch.compile(m))}[wrap]()

    plain = timm_split.split(tiny(), 2, img_size=16)
    e = timm_split.split(wrapped(tiny()), 2, img_size=16)
    assert type(e.members[0]) is type(plain.members[0])
    assert list(e.state_dict()) == list(plain.state_dict())
    path = save_checkpoint(wrapped(plain), tmp_path / "w.safetensors")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(plain.state_dict())
        assert f.metadata()["split_factor"] == "2"


def test_pruned_models_are_refused_with_the_fix(tmp_path):
    m = tiny()
    prune.l1_unstructured(m[0], "weight", 0.5)
    with pytest.raises(SplitError, match=r"prune.remove"):
        timm_split.split(m, 2, img_size=16)
    e = timm_split.split(tiny(), 2, img_size=16)
    prune.random_unstructured(e.members[0][0], "weight", 0.5)
    with pytest.raises(ValueError, match=r"members.0.0.weight.*prune.remove"):
        save_checkpoint(e, tmp_path / "p.safetensors")


class _Pair(nn.Module):
    def __init__(self, out: str):
        super().__init__()
        self.out, self.conv, self.fc = out, nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        y = self.fc(f)
        return {"tuple": (y, f), "dict": {"logits": y, "features": f}, "list": [y]}[self.out]


@pytest.mark.parametrize("out", ["tuple", "dict", "list"])
def test_models_returning_several_outputs_are_refused_clearly(out):
    """On main: 'attempt to get argmin of an empty sequence' from the planner, or an ensemble whose forward fails."""
    with pytest.raises(SplitError, match="not one tensor.*model\\(x\\)\\[0\\]"):
        timm_split.split(_Pair(out), 2, img_size=16)


# ---- class 6: second-tier arguments, each outside its domain where it enters

def _split(**kw):
    return lambda: timm_split.split(tiny(), 2, img_size=16, **kw)


BAD = {
    "split scale_regularization": (lambda v: _split(scale_regularization=v), ["yes", 1, None, np.bool_(True)]),
    "split drop_scale": (lambda v: _split(drop_scale=v), ["s", "SQRT", 2, None]),
    "split plan_at": (lambda v: _split(plan_at=v), ["Model", None, 0]),
    "split averaging": (lambda v: _split(averaging=v), ["mean", None, 1]),
    "split init": (lambda v: _split(init=v), ["inherited", None, True]),
    "plan_split refine": (lambda v: lambda: timm_split.plan_split(tiny(), 2, img_size=16, refine=v),
                          ["no", 0, None]),
    "set_execution compile": (lambda v: lambda: timm_split.split(tiny(), 2, img_size=16).set_execution("compile", **v),
                              [{"mode": "fast"}, {"backend": "nope"}, {"fullgraph": 1}, {"modes": "default"}]),
    "set_execution threads cores": (lambda v: lambda: timm_split.split(tiny(), 2, img_size=16).set_execution(
        "threads", cores=v), [[["0"], [1]], [[True], [0]], [0, 1]]),
    "to_devices": (lambda v: lambda: timm_split.split(tiny(), 2, img_size=16).to_devices(v),
                   [["cuda:7"], ["gpu"], [None], [1.5], ["cpu", "cuda:99"]]),
    "param_groups weight_decay": (lambda v: lambda: param_groups(tiny(), v), [float("nan"), -1.0, "5e-4", True,
                                                                             float("inf")]),
    "param_groups no_weight_decay_list": (lambda v: lambda: param_groups(tiny(), 1e-4, no_weight_decay_list=v),
                                          [[1, 2], "bias", 3]),
    "save_checkpoint state": (lambda v: lambda: save_checkpoint(tiny(), "/tmp/unused-never-written.safetensors",
                                                                state=v),
                              [[1, 2], {"epoch": -1}, {"step": 1.5}, {"epoch": True}, {"x": np.float32(1)},
                               {1: "a"}, {"t": torch.zeros(1)}, {"scaler": 1}, {"scaler": {"scale": -1.0}}]),
}
CASES = [(name, v) for name, (_, values) in BAD.items() for v in values]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}"[:60] for n, v in CASES])
def test_second_tier_arguments_outside_their_domain_are_value_errors(name, value):
    """The whole table, every value. On main many of these were accepted (a truthy 'yes', a string weight decay, a
    state that JSON changes, unknown compile options until the first call, a device this machine lacks moved
    members before failing) or failed later with another error type."""
    make, _ = BAD[name]
    with pytest.raises(ValueError):
        make(value)()


def test_to_devices_checks_before_moving_members():
    e = timm_split.split(tiny(), 2, img_size=16)
    with pytest.raises(ValueError):
        e.to_devices(["cpu", "meta"], execution="packed")  # 'packed' needs one device: refused, members stay
    assert {p.device.type for p in e.parameters()} == {"cpu"}


def test_packed_input_gradients_of_frozen_members_survive_the_next_call():
    """The kept packed tensors are refreshed in place; a call whose input needs a gradient packs its own, so an
    earlier call's graph still holds the values it saved (frozen members, input gradients: adversarial examples)."""
    e = timm_split.split(tiny(), 2, img_size=16).eval().requires_grad_(False)
    xs = [torch.randn(2, 3, 16, 16, requires_grad=True) for _ in range(2)]
    e.set_execution("packed")
    first = e(xs[0])
    e(xs[1])
    first.sum().backward()
    got = xs[0].grad.clone()
    xs[0].grad = None
    e.set_execution("loop")(xs[0]).sum().backward()
    torch.testing.assert_close(got, xs[0].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "threads", "packed", "threads+packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64])
def test_views_of_a_dtype_the_members_cannot_take_are_one_value_error(ens, strategy, dtype):
    """Class 8 in the ensemble: an int/bool/complex image or a float dtype other than the weights' (outside autocast)
    is a ValueError naming the fix under every strategy, never torch's error from inside the first layer."""
    ens.set_execution(strategy, **OPTIONS.get(strategy, {}))
    try:
        with pytest.raises(ValueError, match="floating point images|cast the input"), torch.no_grad():
            ens(torch.ones(2, 3, 16, 16).to(dtype))
    finally:
        ens.set_execution("loop")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast casts: allowed
        assert ens(torch.ones(2, 3, 16, 16)).shape[0] == 2


def test_the_model_as_its_own_ema_saves_and_loads(ens, tmp_path):
    """save_checkpoint(m, path, model_ema=m): the EMA's tensors share the model's memory; they are copied."""
    path = save_checkpoint(ens, str(tmp_path / "c.safetensors"), model_ema=ens)
    other = copy.deepcopy(ens)
    ema = copy.deepcopy(ens)
    with torch.no_grad():
        for p in list(other.parameters()) + list(ema.parameters()):
            p.zero_()
    load_checkpoint(other, path, model_ema=ema)
    for a, b, c in zip(ens.state_dict().values(), other.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("strategy", ["loop", "threads", "packed", "compile"])
def test_an_unknown_execution_option_is_named_with_the_known_ones(ens, strategy):
    e = copy.deepcopy(ens)
    want = "unknown torch.compile option" if strategy == "compile" else f"execution '{strategy}' has no option"
    with pytest.raises(ValueError, match=f"{want}.*'bogus'"):
        e.set_execution(strategy, bogus=1)
