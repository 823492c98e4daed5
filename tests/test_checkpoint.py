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
