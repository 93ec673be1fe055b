"""After any error, load_into leaves the model exactly as it was: a damaged byte anywhere in the
file (one file, a sharded directory, a converting load), an I/O error or an interrupt at any
tensor, a failure inside ``model.to(dtype)``."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep import model as tkm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.norm = nn.BatchNorm1d(4)  # float buffers and an int64 one (num_batches_tracked)
        self.b = nn.Linear(4, 3)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int32))


def new_net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randint(1, 100, t.shape))  # every value differs between seeds
    return net


def with_grads(net: Net) -> Net:
    net.b(net.norm(net.a(torch.randn(6, 5)))).sum().backward()
    return net


def snapshot(net: nn.Module) -> list:
    """Everything load_into may change: tensor objects, dtypes, layouts, bytes; grads too."""

    def raw(t: torch.Tensor) -> bytes:
        return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()

    out = [
        (name, id(t), t.dtype, tuple(t.shape), t.stride(), t.requires_grad, raw(t))
        for name, t in net.state_dict(keep_vars=True).items()
    ]
    out += [(name, id(p.grad), p.grad.dtype, raw(p.grad)) for name, p in net.named_parameters() if p.grad is not None]
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 64)  # several checksum blocks per weight


def flip_each_byte(path: str):
    """Yield after flipping one bit of each byte of ``path`` in turn (restored afterwards)."""
    data = open(path, "rb").read()
    for pos in range(len(data)):
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(bytes([data[pos] ^ (1 << pos % 8)]))
        yield pos
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(data[pos : pos + 1])


def sources(tmp: str, sd: dict) -> dict[str, tuple[str, list[str]]]:
    """name -> (path to load, files to damage)."""
    one = os.path.join(tmp, "one.tk")
    tk.save(sd, one)
    bf16 = os.path.join(tmp, "bf16.tk")  # bf16 into fp32: the converting, chunked read
    tk.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, bf16)
    shards = os.path.join(tmp, "sharded")
    files = tk.save_sharded(sd, shards, max_shard_size=64)
    assert len(files) >= 3
    return {"one": (one, [one]), "bf16": (bf16, [bf16]), "sharded": (shards, [os.path.join(shards, f) for f in files])}


@pytest.mark.parametrize(
    "kind, dtype",
    [
        ("one", None),
        ("one", torch.float64),
        ("bf16", None),
        ("bf16", torch.float64),
        ("sharded", None),
        ("sharded", torch.float64),
    ],
)
def test_a_damaged_byte_anywhere_leaves_the_model_untouched(tmp, small_blocks, kind, dtype):
    path, damage = sources(tmp, new_net(1).state_dict())[kind]
    net = with_grads(new_net(2))
    before = snapshot(net)
    tk.load_into(new_net(3), path, dtype=dtype)  # the undamaged source loads
    flips = 0
    for f in damage:
        for pos in flip_each_byte(f):
            with pytest.raises(tk.FormatError):
                tk.load_into(net, path, dtype=dtype)
            assert snapshot(net) == before, (f, pos)
            flips += 1
    assert flips > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_a_damaged_byte_leaves_a_cuda_model_untouched(tmp, small_blocks, dtype):
    path, [damage] = sources(tmp, new_net(1).state_dict())["one"]
    net = with_grads(new_net(2)).cuda()
    before = snapshot(net)
    for pos in flip_each_byte(damage):
        with pytest.raises(tk.FormatError):
            tk.load_into(net, path, dtype=dtype)
        assert snapshot(net) == before, pos
    tk.load_into(net, path, dtype=dtype)
    assert torch.equal(net.a.weight.cpu(), new_net(1).a.weight.to(dtype or torch.float32))


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["one", "bf16", "sharded", "dict"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_a_failure_at_any_tensor_leaves_the_model_untouched(tmp, monkeypatch, kind, dtype, error):
    sd = new_net(1).state_dict()
    source = sd if kind == "dict" else sources(tmp, sd)[kind][0]
    net = with_grads(new_net(2))
    before = snapshot(net)
    copies = []
    copy_into = {"dict": tkm._DictSource}.get(kind, tkm._FileSource).copy_into

    def failing(self, name, out):
        if len(copies) == fail_at // 2:
            if fail_at % 2:  # after this tensor was written
                copy_into(self, name, out)
            raise error("injected")
        copies.append(name)
        copy_into(self, name, out)

    monkeypatch.setattr({"dict": tkm._DictSource}.get(kind, tkm._FileSource), "copy_into", failing)
    for fail_at in range(2 * len(sd)):
        del copies[:]
        with pytest.raises(error, match="injected"):
            tk.load_into(net, source, dtype=dtype)
        assert snapshot(net) == before, fail_at


def test_a_failure_inside_the_dtype_conversion_is_undone(tmp, monkeypatch):
    p = os.path.join(tmp, "one.tk")
    tk.save(new_net(1).state_dict(), p)
    net = with_grads(new_net(2))
    before = snapshot(net)

    def fail(fn, *a, **kw):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(net.b, "_apply", fail)  # a and norm are converted first
    with pytest.raises(RuntimeError, match="injected"):
        tk.load_into(net, p, dtype=torch.float64)
    assert snapshot(net) == before


def test_only_memory_that_existed_before_is_backed_up(tmp, monkeypatch):
    """A converting load backs up only what to(dtype) left in place; atomic=False backs up nothing."""
    p = os.path.join(tmp, "one.tk")
    tk.save(new_net(1).state_dict(), p)
    saved: list[list] = []
    init = tkm._Undo.__init__

    def spy(self, model):
        init(self, model)
        saved.append(self.saved)

    monkeypatch.setattr(tkm._Undo, "__init__", spy)
    tk.load_into(new_net(2), p, dtype=torch.float64)
    assert sorted(str(t.dtype) for t, _ in saved[-1]) == ["torch.int32", "torch.int64"]
    tk.load_into(new_net(2), p)
    assert len(saved[-1]) == len(new_net(2).state_dict())
    del saved[:]
    net = new_net(2)
    tk.load_into(net, p, atomic=False)
    assert saved == [] and torch.equal(net.a.weight, new_net(1).a.weight)
