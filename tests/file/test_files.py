"""The file API: open/get/slices against memory (hypothesis), the lesson's types, metadata, torch files
read weights-only, teaching refusals. Whole-structure round trips and safetensors cross-checks are in
test_roundtrip.py."""

import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import tensorkeep as tk
from support import TORCH_DTYPES
from tensorkeep.core.dtypes import byte_view


def _raw(x):
    """The exact bytes of a tensor/array (so NaN payloads and -0.0 count)."""
    if isinstance(x, torch.Tensor):
        return byte_view(x.contiguous()).numpy().tobytes()
    return np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()


@st.composite
def tensors(draw):
    dt = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    t = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)
        if n
        else torch.empty(shape, dtype=dt)
    )
    if dt == torch.bool:
        t = t.view(torch.uint8).remainder(2).view(torch.bool) if n else t
    layout = draw(st.sampled_from(["plain", "transposed", "strided"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif layout == "strided" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[::2]
    return t


def _same(a, b, path="obj"):
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and _raw(a) == _raw(b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype.newbyteorder("<") == b.dtype.newbyteorder("<") and a.shape == b.shape, path
        assert _raw(a) == _raw(b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        assert all(type(k) is type(kb) for k, kb in zip(a, b)), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    else:
        assert a == b, path


@given(t=tensors())
def test_open_get_and_slices_match_memory(tmp_path_factory, t):
    p = str(tmp_path_factory.mktemp("open") / "t.tk")
    tk.save({"t": t}, p)
    with tk.open(p) as f:
        assert f.keys() == ["t"]
        _same(t.contiguous(), f.get("t"))
        _same(t.contiguous(), f.get("t", lazy=True))
        if t.dim() >= 1 and t.shape[0] > 0:
            n = t.shape[0]
            for sl in (slice(0, 1), slice(1, n), slice(0, n, 2), slice(-2, None), slice(n, n + 3)):
                _same(t[sl].contiguous(), f.get_slice("t")[sl].contiguous())
            _same(t[n - 1].contiguous(), f.get_slice("t")[-1].contiguous())


def test_lazy_get_maps_one_tensor_copy_on_write(tmp):
    obj = {"w": torch.arange(12.0).reshape(3, 4), "a": np.arange(5, dtype=np.int16), "e": torch.zeros(0, 3)}
    p = os.path.join(tmp, "lazy.tk")
    tk.save(obj, p)
    before = open(p, "rb").read()
    with tk.open(p) as f:
        w, a, e = f.get("w", lazy=True), f.get("a", lazy=True), f.get("e", lazy=True, verify=False)
    # valid after the file is closed, and writes stay in this process
    assert torch.equal(w, obj["w"]) and isinstance(a, np.ndarray) and np.array_equal(a, obj["a"]) and e.shape == (0, 3)
    w += 1
    a[0] = 7
    assert open(p, "rb").read() == before
    assert torch.equal(tk.load(p)["w"], obj["w"])


def test_multi_block_slices_verify_only_what_they_read(tmp, monkeypatch):
    import tensorkeep.knobs as knobs

    monkeypatch.setattr(knobs, "BLOCK_BYTES", 64)
    t = torch.arange(1000, dtype=torch.float32).reshape(100, 10)
    p = os.path.join(tmp, "m.tk")
    tk.save({"t": t}, p)
    with tk.open(p) as f:
        assert torch.equal(f.get_slice("t")[13:57:3], t[13:57:3])
        assert torch.equal(f.get_slice("t")[7, 2:5], t[7, 2:5])
        assert f.get_slice("t").get_shape() == [100, 10]
    assert torch.equal(tk.load(p)["t"], t)


def test_lesson_types_and_keys(tmp):
    obj = {
        "第一个张量": torch.arange(4),
        3: (1, 2.5, None, True, "x"),
        "np": np.arange(3.0),
        "s": np.float32(2.5),
        "size": torch.Size([2, 3]),
        "dt": torch.float16,
        "dev": torch.device("cpu"),
        "od": OrderedDict(b=1, a=2),
    }
    p = os.path.join(tmp, "o.tk")
    tk.save(obj, p)
    back = tk.load(p)
    _same(
        {k: v for k, v in obj.items() if k not in ("size", "dt", "dev", "s")},
        {k: v for k, v in back.items() if k not in ("size", "dt", "dev", "s")},
    )
    assert back["size"] == torch.Size([2, 3]) and type(back["size"]) is torch.Size
    assert back["dt"] is torch.float16 and back["dev"] == torch.device("cpu")
    assert type(back["s"]) is np.float32 and back["s"] == np.float32(2.5)


def test_parameters_and_requires_grad_preserved(tmp):
    p = os.path.join(tmp, "p.tk")
    obj = {"p": torch.nn.Parameter(torch.randn(3)), "g": torch.randn(2, requires_grad=True), "n": torch.randn(2)}
    tk.save(obj, p)
    back = tk.load(p)
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad
    assert back["g"].requires_grad and not isinstance(back["g"], torch.nn.Parameter)
    assert not back["n"].requires_grad


def test_cycle_refused(tmp):
    a = []
    a.append(a)
    with pytest.raises(ValueError, match="cycle"):
        tk.save(a, os.path.join(tmp, "c.tk"))


def test_metadata(tmp):
    p = os.path.join(tmp, "m.tk")
    tk.save({"w": torch.ones(1)}, p, metadata={"author": "me", "数据": "手写数字"})
    with tk.open(p) as f:
        assert f.metadata == {"author": "me", "数据": "手写数字"}
    with pytest.raises(ValueError, match="reserved"):
        tk.save({}, p, metadata={"tensorkeep.x": "1"})
    with pytest.raises(TypeError):
        tk.save({}, p, metadata={"n": 1})


def test_torch_files_weights_only(tmp):
    sd = {"w": torch.randn(2, 2), "n": 3}
    p = os.path.join(tmp, "m.pt")
    torch.save(sd, p)
    back = tk.load(p)
    assert torch.equal(back["w"], sd["w"]) and back["n"] == 3


def test_whole_pickled_model_refused_with_teaching_message(tmp):
    from models_for_tests import MLP

    p = os.path.join(tmp, "net.pt")
    torch.save(MLP(), p)
    with pytest.raises(tk.UnsafePickleError) as e:
        tk.load(p)
    msg = str(e.value)
    assert "models_for_tests.MLP" in msg and "state_dict()" in msg and "weights_only=False" in msg
    assert isinstance(e.value, tk.FormatError)


def test_not_a_tensor_file(tmp):
    p = os.path.join(tmp, "x.txt")
    open(p, "w").write("hello world, not tensors")
    with pytest.raises(tk.FormatError, match="x.txt"):
        tk.load(p)


def test_open_unknown_key_lists_keys(tmp):
    p = os.path.join(tmp, "m.tk")
    tk.save({"alpha": torch.ones(1)}, p)
    with tk.open(p) as f, pytest.raises(KeyError, match="alpha"):
        f.get("beta")


def test_large_file_direct_io_path_round_trip(tmp, monkeypatch):
    import tensorkeep.knobs as knobs

    monkeypatch.setattr(knobs, "DIRECT_IO_MIN_BYTES", 1)
    monkeypatch.setattr(knobs, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 5000)
    sd = {f"w{i}": torch.randn(97 + i, 31) for i in range(5)}
    sd["i8"] = torch.arange(13, dtype=torch.int8)
    p = os.path.join(tmp, "big.tk")
    tk.save(sd, p)
    back = tk.load(p)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(torch.equal(v, sd[k]) for k, v in load_file(p).items())
