"""Run timm's own tests/test_models.py (copied unmodified next to this file) on a chosen list of base
architectures, or on their ``splitnet_<arch>`` versions, with the SAME test set for both.

Environment (run.py sets these; they can also be set by hand):

    TIMM_SPLIT_ARCHS    comma-separated base architectures, e.g. ``resnet18,efficientnet_b0`` (required)
    TIMM_SPLIT_PREFIX   '' (default): run the base models; ``splitnet_``: run ``splitnet_<arch>``
    TIMM_SPLIT_JSON     where to write the per-item JSON summary (optional)
    TIMM_SPLIT_NETWORK  '1' keeps the tests that download hub weights (deselected by default)
    TIMM_SPLIT_ALL_TAGS '1' keeps every pretrained tag of an include_tags list (default: the arch's default tag)
    TIMM_SPLIT_TIMEOUT  seconds: overrides every test's own ``@pytest.mark.timeout`` (default: timm's own)

How the selection works (nothing in test_models.py is changed):

1. ``import timm_split`` below registers ``splitnet_<arch>`` before test_models.py is imported, so timm's
   import-time ``list_models(...)`` calls see them (this is only used to record whether timm's own filters
   would have collected the splitnet name: the ``native`` flags in the JSON).
2. ``pytest_generate_tests`` (tryfirst, before pytest's own parametrization) rewrites each
   ``@pytest.mark.parametrize`` over ``model_name`` on the test being collected: the values timm computed are
   kept only where the model is one of the wanted BASE archs (timm's own filters decided which tests a base
   arch is in), and in splitnet mode each kept base name is replaced by ``splitnet_<arch>``. The rewritten mark
   replaces the original only on that test's node; shared module lists (``_SWIN_FAMILY`` ...) are not mutated.
3. ``pytest_collection_modifyitems`` deselects everything else: tests with no ``model_name`` parameter
   (naflex/swin unit tests that build their own small models), empty parameter sets, and (unless
   TIMM_SPLIT_NETWORK=1) the tests that need the HF hub.
"""
import json
import os
import time

import pytest
import timm

import timm_split  # noqa: F401 - registers splitnet_<arch> in timm's registry
from _pytest.mark.structures import ParameterSet
from timm.models import _registry

ARG = "model_name"
# tests that download weights from the HF hub (no network here); kept only with TIMM_SPLIT_NETWORK=1
NETWORK_TESTS = {"test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained"}
# branches in test bodies keyed on the model NAME (test_models.py lines 1050 and 1113 at timm 1.0.31): the base
# name takes them, splitnet_<arch> does not. Results of these (test, arch) pairs carry a caveat.
NAME_BRANCHES = {
    "test_forward_after_prune_intermediate_layers":
        (("coat",), "the base is built with img_size=128 (name starts 'coat'), splitnet_ at its default size"),
    "test_prune_intermediate_layers_contract":
        (("coat_", "crossvit", "hrnet"), "the base skips the unused-params check (partial_branches), splitnet_ not"),
}

_ARCHS = [a.strip() for a in os.environ.get("TIMM_SPLIT_ARCHS", "").split(",") if a.strip()]
_PREFIX = os.environ.get("TIMM_SPLIT_PREFIX", "")
_NETWORK = os.environ.get("TIMM_SPLIT_NETWORK", "") == "1"
_ALL_TAGS = os.environ.get("TIMM_SPLIT_ALL_TAGS", "") == "1"
_TIMEOUT = os.environ.get("TIMM_SPLIT_TIMEOUT", "")

_collection = {}  # test -> {arch: {"base_name": timm's param value, "native": splitnet name in timm's list}}
_results = {}  # nodeid -> record
_wanted_names = set()  # the model_name values kept (base names, or splitnet_<arch>)
_native_only = {}  # test -> archs whose splitnet_ name timm's own list has although the base name is not in it


def _default_tag(arch):
    cfgs = _registry._model_default_cfgs.get(arch)
    tags = list(cfgs.tags) if cfgs is not None else []
    return tags[0] if tags else ""


def _base_arch(name):
    """The wanted base arch that timm's param value ``name`` ('arch' or 'arch.tag') stands for, else None."""
    arch, _, tag = str(name).partition(".")
    if arch not in _ARCHS:
        return None
    if tag and not _ALL_TAGS:
        # include_tags lists name each pretrained tag; keep the default one (the cfg splitnet_<arch> copies)
        return arch if tag == _default_tag(arch) else None
    return arch


def _argnames(spec):
    if isinstance(spec, str):
        return [a.strip() for a in spec.split(",") if a.strip()]
    return list(spec)


def pytest_configure(config):
    if not _ARCHS:
        raise pytest.UsageError("set TIMM_SPLIT_ARCHS=arch1,arch2 (base timm architectures); see README.md")
    registered = set(timm.list_models())
    unknown = [a for a in _ARCHS if a not in registered]
    if unknown:
        raise pytest.UsageError(f"not timm architectures: {unknown}")
    if _PREFIX and any(f"{_PREFIX}{a}" not in registered for a in _ARCHS):
        raise pytest.UsageError(f"{_PREFIX}<arch> is not registered for some of {_ARCHS}")


def _values(v, n):
    """(values tuple, is pytest.param) of one parametrize entry over ``n`` argnames."""
    if isinstance(v, ParameterSet):
        return tuple(v.values), True
    return ((v,) if n == 1 else tuple(v)), False


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    own = metafunc.definition.own_markers
    test = metafunc.definition.originalname
    for i, mark in enumerate(own):
        if mark.name != "parametrize" or len(mark.args) < 2:
            continue
        names = _argnames(mark.args[0])
        if ARG not in names:
            continue
        k = names.index(ARG)
        original = list(mark.args[1])
        timm_names = {str(_values(v, len(names))[0][k]) for v in original}
        kept, seen = [], set()
        for v in original:
            vals, is_param = _values(v, len(names))
            arch = _base_arch(vals[k])
            if arch is None:
                continue
            info = _collection.setdefault(test, {}).setdefault(arch, {"base_names": [], "native": False})
            info["base_names"].append(str(vals[k]))
            info["native"] = info["native"] or f"splitnet_{arch}" in timm_names
            if _PREFIX:
                vals = tuple(f"{_PREFIX}{arch}" if j == k else x for j, x in enumerate(vals))
                if repr(vals) in seen:  # several tags of one arch map to the one splitnet name
                    continue
                seen.add(repr(vals))
            _wanted_names.add(vals[k])
            if is_param:
                kept.append(pytest.param(*vals, marks=v.marks, id=v.id))
            else:
                kept.append(vals[0] if len(names) == 1 else vals)
        for arch in _ARCHS:
            if f"splitnet_{arch}" in timm_names and arch not in _collection.get(test, {}):
                _native_only.setdefault(test, []).append(arch)
        # a new mark on this test's node only: the module's lists (shared by several tests) stay as timm made them
        own[i] = pytest.mark.parametrize(mark.args[0], kept, *mark.args[2:], **mark.kwargs).mark


def pytest_collection_modifyitems(session, config, items):
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get(ARG) if callspec is not None else None
        ok = isinstance(name, str) and name in _wanted_names
        if ok and not _NETWORK and item.originalname in NETWORK_TESTS:
            ok = False
        (keep if ok else drop).append(item)
        if ok and _TIMEOUT:
            item.add_marker(pytest.mark.timeout(int(_TIMEOUT)), append=False)  # the closest mark wins
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _arch_of(name):
    name = str(name)
    if _PREFIX and name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    return name.partition(".")[0]


def _message(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:  # skips: (path, line, reason)
        return str(report.longrepr[2])
    return str(report.longrepr or "")


def pytest_runtest_logreport(report):
    rec = _results.get(report.nodeid)
    if rec is None:
        return
    rec["duration"] += report.duration
    if report.passed and not hasattr(report, "wasxfail"):
        if report.when == "call" and rec["outcome"] is None:
            rec["outcome"] = "passed"
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    else:
        outcome = "skipped"
    if rec["outcome"] in (None, "passed"):  # the first problem wins (a teardown error after a pass counts)
        rec.update(outcome=outcome, when=report.when, message=_message(report))


def pytest_collection_finish(session):
    for item in session.items:
        name = item.callspec.params[ARG]
        arch = _arch_of(name)
        caveat = ""
        prefixes, why = NAME_BRANCHES.get(item.originalname, ((), ""))
        if _PREFIX and arch.startswith(prefixes):
            caveat = why
        _results[item.nodeid] = {
            "nodeid": item.nodeid, "test": item.originalname, "model_name": name, "arch": arch,
            "outcome": None, "when": None, "message": "", "duration": 0.0, "caveat": caveat,
        }


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TIMM_SPLIT_JSON")
    if not path:
        return
    import torch
    out = {
        "archs": _ARCHS, "prefix": _PREFIX, "network": _NETWORK, "all_tags": _ALL_TAGS,
        "timeout_override": _TIMEOUT or None, "timm": timm.__version__, "torch": torch.__version__,
        "pytest": pytest.__version__, "exitstatus": int(exitstatus), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "collection": _collection, "native_only": _native_only, "results": list(_results.values()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)
