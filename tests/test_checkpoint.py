"""timm_split.save_checkpoint / load_checkpoint: one file, optimizer optional, tied weights, checksum, strict=False."""
import os

import pytest
import torch
from torch import nn

import timm_split
from timm_split import load_checkpoint, save_checkpoint


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in language-model heads

    def forward(self, x):
        return self.head(torch.relu(self.body(self.embed(x))))


def _step(model, opt):
    loss = model(torch.arange(6)).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_roundtrip_with_optimizer_and_state(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, opt)
    path = save_checkpoint(model, tmp_path / "c.safetensors", opt, state={"epoch": 3, "step": 7})
    assert os.listdir(tmp_path) == ["c.safetensors"]  # the temp file was renamed
    torch.manual_seed(1)
    other = Tied()
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    ckpt = load_checkpoint(other, path, other_opt)
    assert (ckpt.epoch, ckpt.step) == (3, 7) and ckpt.missing_keys == [] == ckpt.unexpected_keys
    assert other.head.weight is other.embed.weight  # still tied after loading
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # the optimizer continues exactly where it was
    _step(model, opt)
    _step(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_file_is_plain_safetensors_with_ties_stored_once(tmp_path):
    from safetensors.torch import load_file

    model = Tied()
    save_checkpoint(model, tmp_path / "c.safetensors")
    keys = set(load_file(tmp_path / "c.safetensors"))
    assert keys == {"embed.weight", "body.weight", "body.bias"}  # head.weight is the same memory as embed.weight


def test_split_with_tied_weights(tmp_path):
    model = Tied()
    ens = timm_split.SplitEnsemble([model, Tied()])
    path = save_checkpoint(ens, tmp_path / "e.safetensors")
    again = timm_split.SplitEnsemble([Tied(), Tied()])
    load_checkpoint(again, path)
    assert torch.equal(again.members[0].head.weight, model.embed.weight)
    assert again.members[0].head.weight is again.members[0].embed.weight


def test_plain_file_of_a_tied_split_loads_with_load_state_dict(tmp_path):
    """timm's loader reads the safetensors file as a plain state dict (tied names stored once) and calls
    ``load_state_dict``: the ensemble fills each tied name from the name it shares memory with."""
    from safetensors.torch import load_file

    ens = timm_split.SplitEnsemble([Tied(), Tied()])
    save_checkpoint(ens, tmp_path / "e.safetensors")
    again = timm_split.SplitEnsemble([Tied(), Tied()])
    again.load_state_dict(load_file(tmp_path / "e.safetensors"))
    for m, src in zip(again.members, ens.members):
        assert torch.equal(m.head.weight, src.embed.weight) and m.head.weight is m.embed.weight


def test_strict_false_returns_the_incompatible_keys(tmp_path):
    model = Tied()
    path = save_checkpoint(model, tmp_path / "c.safetensors")

    class Bigger(Tied):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    ckpt = load_checkpoint(Bigger(), path, strict=False)
    assert ckpt.missing_keys == ["extra.weight", "extra.bias"] and ckpt.unexpected_keys == []
    with pytest.raises(ValueError, match="2 missing keys"):
        load_checkpoint(Bigger(), path)


def test_shape_mismatch_changes_nothing(tmp_path):
    path = save_checkpoint(Tied(), tmp_path / "c.safetensors")

    class Wider(Tied):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.body.bias = nn.Parameter(torch.zeros(9))

    wider = Wider()
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="1 shape mismatches"):
        load_checkpoint(wider, path, strict=False)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_damaged_file_fails_the_checksum(tmp_path):
    path = save_checkpoint(Tied(), tmp_path / "c.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(Tied(), path)


def test_optimizer_state_required_when_asked(tmp_path):
    path = save_checkpoint(Tied(), tmp_path / "c.safetensors")
    model = Tied()
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(model, path, torch.optim.SGD(model.parameters(), lr=0.1))


def test_pth_state_dict(tmp_path):
    model = Tied()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    other = Tied()
    load_checkpoint(other, tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pth"):
        load_checkpoint(other, tmp_path / "bad.pth")


def test_same_file_mode_as_other_files(tmp_path):
    path = save_checkpoint(Tied(), tmp_path / "c.safetensors")
    (tmp_path / "other.txt").write_text("x")
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "other.txt").st_mode & 0o777


# ---------------------------------------------------------------------------------------------------------
# hardening (issue 27): the checksum covers the metadata, loads are all or nothing, writes fail cleanly

def _rewrite(path, edit_meta=None, edit_tensors=None):
    """Rewrite a checkpoint as an editor would: same tensors and metadata but for the edits."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata=meta)


def _tensor_checksum(tensors):
    """The previous format's (timm_split/2) checksum, written out here: the tensors only."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _as_previous_format(path, edit_meta=None):
    """The file as timm_split/2 wrote it: no optimizer type, a checksum over the tensors only."""
    import json

    from safetensors.torch import load_file

    tensors = load_file(str(path))

    def edit(meta):
        meta["format"] = "timm_split/2"
        if "optimizer" in meta:
            opt = json.loads(meta["optimizer"])
            opt.pop("type", None)
            meta["optimizer"] = json.dumps(opt)
        if edit_meta:
            edit_meta(meta)
        meta["sha256"] = _tensor_checksum(tensors)
    _rewrite(path, edit)


def _trained(tmp_path, opt_cls=torch.optim.AdamW, **kw):
    torch.manual_seed(0)
    model = Tied()
    opt = opt_cls(model.parameters(), lr=0.1, **kw)
    _step(model, opt)
    return model, opt, save_checkpoint(model, tmp_path / "c.safetensors", opt, state={"epoch": 2, "step": 5})


def _snapshot(*objs):
    import copy

    return [copy.deepcopy(o.state_dict()) for o in objs]


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("key, old, new", [("state", '"epoch": 2', '"epoch": 9'),
                                           ("optimizer", '"lr": 0.1', '"lr": 123'), ("architecture", "Tied", "Other")])
def test_edited_metadata_fails_the_checksum(tmp_path, key, old, new):
    _, _, path = _trained(tmp_path)

    def edit(meta):
        assert old in meta[key]
        meta[key] = meta[key].replace(old, new)
    _rewrite(path, edit)
    model = Tied()
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(model, path, torch.optim.AdamW(model.parameters(), lr=0.1))


def test_missing_checksum_is_refused_unless_read_as_weights_on_purpose(tmp_path):
    from safetensors.torch import load_file

    _, _, path = _trained(tmp_path)

    def damage(tensors):
        tensors["body.bias"][0] += 1
    _rewrite(path, lambda meta: meta.pop("sha256"), damage)
    with pytest.raises(ValueError, match="without its sha256 checksum.*verify=False"):
        load_checkpoint(Tied(), path)
    other = Tied()
    ckpt = load_checkpoint(other, path, verify=False)  # the weights alone, on purpose
    assert torch.equal(other.body.bias, load_file(path)["body.bias"]) and ckpt.state == {}
    with pytest.raises(ValueError, match="verify=False reads the weights alone"):
        load_checkpoint(other, path, torch.optim.SGD(other.parameters(), lr=0.1), verify=False)


def test_plain_safetensors_without_our_format_loads_as_weights(tmp_path):
    from safetensors.torch import save_file

    model = Tied()
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "p.safetensors"),
              metadata={"format": "pt"})  # what timm / huggingface write
    other = Tied()
    load_checkpoint(other, tmp_path / "p.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_previous_format_is_verified_by_its_own_rule(tmp_path):
    model, opt, path = _trained(tmp_path)
    _as_previous_format(path)
    torch.manual_seed(1)
    other = Tied()
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    assert load_checkpoint(other, path, other_opt).epoch == 2
    _step(model, opt)
    _step(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))

    def damage(tensors):
        tensors["body.bias"][0] += 1
    _rewrite(path, edit_tensors=damage)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(Tied(), path)


def test_unknown_format_names_the_fix(tmp_path):
    path = save_checkpoint(Tied(), tmp_path / "c.safetensors")
    _rewrite(path, lambda meta: meta.update(format="timm_split/9"))
    with pytest.raises(ValueError, match="format 'timm_split/9'.*upgrade timm_split"):
        load_checkpoint(Tied(), path)


@pytest.mark.parametrize("previous_format", [False, True])
def test_sgd_state_into_adamw_changes_nothing(tmp_path, previous_format):
    _, _, path = _trained(tmp_path, torch.optim.SGD, momentum=0.9)
    if previous_format:
        _as_previous_format(path)  # no optimizer type stored: the groups lack AdamW's options
    torch.manual_seed(1)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _step(model, opt)
    before = _snapshot(model, opt)
    named = "AdamW" if previous_format else "SGD optimizer.*AdamW"
    with pytest.raises(ValueError, match=named + ".*--no-resume-opt"):
        load_checkpoint(model, path, opt)
    assert _same(before, _snapshot(model, opt))
    _step(model, opt)  # still a working AdamW


def test_optimizer_over_other_params_changes_nothing(tmp_path):
    _, _, path = _trained(tmp_path)
    model = Tied()
    opt = torch.optim.AdamW(model.body.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="param group 0 has 3 params in the file, 2 here"):
        load_checkpoint(model, path, opt)
    assert _same(before, _snapshot(model, opt))


def test_optimizer_state_of_swapped_params_changes_nothing(tmp_path):
    _, _, path = _trained(tmp_path)
    model = Tied()
    params = list(model.parameters())
    opt = torch.optim.AdamW([params[1], params[0], params[2]], lr=0.1)  # same count, other order
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="exp_avg of param 0 is"):
        load_checkpoint(model, path, opt)
    assert _same(before, _snapshot(model, opt))


def test_foreign_model_leaves_the_ema_unchanged(tmp_path):
    path = save_checkpoint(nn.Linear(3, 2), tmp_path / "c.safetensors", model_ema=nn.Linear(3, 2))
    model, ema = nn.Sequential(nn.Linear(3, 2)), nn.Linear(3, 2)  # another model: keys "0.weight", "0.bias"
    before = _snapshot(model, ema)
    with pytest.raises(ValueError, match="2 missing keys"):
        load_checkpoint(model, path, model_ema=ema)
    assert _same(before, _snapshot(model, ema))


def test_ema_of_a_tied_model_roundtrips(tmp_path):
    src, ema = Tied(), Tied()
    path = save_checkpoint(Tied(), tmp_path / "c.safetensors", model_ema=src)
    load_checkpoint(Tied(), path, model_ema=ema)  # the EMA's tied weights are stored once and restored
    assert _same(src.state_dict(), ema.state_dict()) and ema.head.weight is ema.embed.weight


def test_metadata_that_is_not_json_names_the_file(tmp_path):
    from timm_split.checkpoint import read_metadata

    path = save_checkpoint(Tied(), tmp_path / "c.safetensors", state={"epoch": 1})
    _as_previous_format(path, lambda meta: meta.update(state="{garbage"))  # its checksum covers the tensors only
    for load in (lambda: load_checkpoint(Tied(), path), lambda: read_metadata(path)):
        with pytest.raises(ValueError, match=r"c\.safetensors: its 'state' metadata is not JSON .*another checkpoint"):
            load()


def test_save_into_a_missing_folder_names_the_folder(tmp_path):
    import re

    with pytest.raises(ValueError, match=f"the folder {re.escape(str(tmp_path / 'nope'))} does not exist"):
        save_checkpoint(Tied(), tmp_path / "nope" / "c.safetensors")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   Exception("Error while serializing: I/O error: No space left on device "
                                             "(os error 28) at path \"x\"")])  # safetensors' own error type
def test_disk_full_during_a_save_keeps_the_old_file(tmp_path, monkeypatch, error):
    import errno

    import safetensors.torch

    path = save_checkpoint(Tied(), tmp_path / "c.safetensors")
    good = open(path, "rb").read()

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise error
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(Tied(), path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["c.safetensors"]
