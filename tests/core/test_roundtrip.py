"""Round-trip properties over random structures, every dtype and layout (hypothesis), exact types,
tied storage, refusals, and cross-checks with safetensors and (malicious) pickles.

Example counts: --property-examples (the hypothesis profile in conftest.py, default 100).
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file
from torch import nn

import tensorkeep as tk
from support import TORCH_DTYPES
from tensorkeep.core.tree import flatten

NUMPY_DTYPES = [
    "?",
    "u1",
    "i1",
    "<i2",
    ">i2",
    "<u2",
    ">u2",
    "<i4",
    ">i4",
    "<u4",
    ">u4",
    "<i8",
    ">i8",
    "<u8",
    ">u8",
    "<f2",
    ">f2",
    "<f4",
    ">f4",
    "<f8",
    ">f8",
    "<c8",
    ">c8",
]
NUMPY_SCALARS = [
    np.bool_,
    np.uint8,
    np.int8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
]

SLOW_OK = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- helpers


def tbytes(x) -> bytes:
    """The raw little-endian bytes of a tensor / array, in C order (NaN payloads included)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().resolve_conj().resolve_neg()
        t = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)  # fresh, truly contiguous
        return t.view(torch.uint8).numpy().tobytes()
    a = np.asarray(x)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).tobytes()


def assert_same(a, b, where="obj"):
    """``b`` (loaded) is ``a`` (saved): same types, keys, key types, order, and bit-identical data."""
    if isinstance(a, torch.Tensor):
        assert type(b) is type(a), f"{where}: {type(b)} != {type(a)}"
        assert b.dtype == a.dtype and b.shape == a.shape, (
            f"{where}: {b.dtype}{list(b.shape)} != {a.dtype}{list(a.shape)}"
        )
        assert tbytes(b) == tbytes(a), f"{where}: data differs"
        assert b.requires_grad == a.requires_grad, where
        return
    if isinstance(a, np.ndarray):
        assert type(b) is np.ndarray, f"{where}: {type(b)}"
        want = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        assert b.dtype == want and b.shape == a.shape and tbytes(b) == tbytes(a), where
        return
    if isinstance(a, np.generic):
        assert type(b) is type(a), f"{where}: {type(b)} != {type(a)}"
        assert tbytes(b) == tbytes(a), where
        return
    assert type(b) is type(a), f"{where}: {type(b).__name__} != {type(a).__name__}"
    if isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), where
        else:
            assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} != {b!r}"  # -0.0 counts
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def no_temp_files(d: str) -> bool:
    return not any(".tk-tmp-" in n for n in os.listdir(d))


# ----------------------------------------------------------------------------- strategies


@st.composite
def shapes(draw, max_numel=48):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    return shape if math.prod(shape) <= max_numel else (1,) * len(shape)


@st.composite
def torch_tensors(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(shapes())
    layout = draw(st.sampled_from(["plain", "transposed", "stepped", "offset"]))
    base_shape = list(shape)
    if layout == "stepped" and base_shape:
        base_shape[0] *= 2
    if layout == "offset":
        base_shape = [*base_shape[:-1], base_shape[-1] + 1] if base_shape else [2]
    n = math.prod(base_shape)
    if dtype == torch.bool:
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    base = flat.view(dtype).reshape(base_shape).clone()
    if layout == "transposed" and base.dim() >= 2:
        x = base.transpose(0, -1)
    elif layout == "stepped" and base.dim() >= 1:
        x = base[::2]
    elif layout == "offset":
        x = base[..., 1:] if shape else base[1]
    else:
        x = base
    if x.is_complex() and draw(st.booleans()):  # lazy bits: the view reads differently from its memory
        x = x.conj() if draw(st.booleans()) else x.conj().imag  # a conjugate / a negative view
    if (x.is_floating_point() or x.is_complex()) and dtype.itemsize >= 2 and draw(st.booleans()):
        if draw(st.booleans()):
            x = nn.Parameter(x, requires_grad=draw(st.booleans()))
        else:
            x = x.clone().requires_grad_(True)
    return x


@st.composite
def numpy_arrays(draw):
    dt = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = draw(shapes())
    numel = math.prod(shape)
    if dt.kind == "b":
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=2 * numel, max_size=2 * numel)))
    else:
        raw = draw(st.binary(min_size=2 * numel * dt.itemsize, max_size=2 * numel * dt.itemsize))
    base = np.frombuffer(raw, dtype=dt).copy()
    layout = draw(st.sampled_from(["plain", "stepped", "transposed"]))
    if layout == "stepped" and shape and shape[0]:
        return base.reshape(2 * shape[0], *shape[1:])[::2]
    x = base[:numel].reshape(shape)
    return x.T if layout == "transposed" else x


@st.composite
def numpy_scalars(draw):
    t = draw(st.sampled_from(NUMPY_SCALARS))
    if t is np.bool_:
        return np.bool_(draw(st.booleans()))
    size = np.dtype(t).itemsize
    return np.frombuffer(draw(st.binary(min_size=size, max_size=size)), dtype=t)[0]


plain = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**200), 2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([-0.0, math.nan, math.inf, -math.inf])
    | st.text(max_size=8)
)
leaves = plain | torch_tensors() | numpy_arrays() | numpy_scalars()
keys = (
    st.text(max_size=6)
    | st.integers(-(2**70), 2**70)
    | st.sampled_from(["第一个张量", "第二个张量", "a.b", "__metadata__", "", "é", "0", "1"])
)


def containers(children):
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
        | st.dictionaries(keys, children, max_size=4).map(OrderedDict)
    )


structures = st.recursive(leaves, containers, max_leaves=10)


# ----------------------------------------------------------------------------- round trips


@SLOW_OK
@given(obj=structures, data=st.data())
def test_round_trip_property(obj, data):
    """load, lazy load, open().get and open().get_slice all give back exactly what was saved."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "obj.tk")
        tk.save(obj, p, durable=False)
        assert_same(obj, tk.load(p))
        assert_same(obj, tk.load(p, lazy=True))
        _, arrays = flatten(obj)
        with tk.open(p) as f:
            assert sorted(f.keys()) == sorted(n for n, _ in arrays)
            for name, x in arrays:
                got = f.get(name)
                assert isinstance(got, torch.Tensor) == isinstance(x, torch.Tensor), name
                assert tuple(got.shape) == tuple(x.shape) and tbytes(got) == tbytes(x), name
                if np.ndim(x) >= 1 and x.shape[0] > 0:
                    n0 = x.shape[0]
                    i = data.draw(st.integers(-n0, n0 - 1), label="index")
                    a = data.draw(st.integers(-n0 - 1, n0 + 1), label="start")
                    b = data.draw(st.integers(-n0 - 1, n0 + 1), label="stop")
                    s = data.draw(st.integers(1, 3), label="step")
                    src = x.detach() if isinstance(x, torch.Tensor) else x
                    for key in (i, slice(a, b, s), (slice(a, b), ...)):
                        want = src[key]
                        got = f.get_slice(name)[key]
                        assert tuple(got.shape) == tuple(want.shape), (name, key)
                        assert tbytes(got) == tbytes(want), (name, key)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_dtype_all_layouts(tmp, dtype):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6 * 8 * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    base = raw.view(dtype).reshape(6, 8)
    obj = {
        "plain": base,
        "t": base.T,
        "step": base[::2, 1::3],
        "zero": base[:0],
        "scalar": base[1, 2],
        "one": base[1:2, ::5][:, :1],
        "empty3d": torch.empty(0, 3, 0, dtype=dtype),
    }
    p = os.path.join(tmp, "d.tk")
    tk.save(obj, p)
    for lazy in (False, True):
        assert_same(obj, tk.load(p, lazy=lazy))
    with safe_open(p, "pt") as f:
        for k in obj:
            assert tbytes(f.get_tensor(k)) == tbytes(obj[k])


def test_none_and_plain_values_at_top_level(tmp):
    p = os.path.join(tmp, "v.tk")
    for obj in (None, 0, "s", 1.5, True, [], (), {}, OrderedDict()):
        tk.save(obj, p)
        assert_same(obj, tk.load(p))
        assert_same(obj, tk.load(p, lazy=True))


def test_nan_payloads_and_special_floats(tmp):
    bits = torch.tensor([0x7FC00001, -0x400000, 0x7F800001, -0x80000000, 0x7F800000], dtype=torch.int32)
    x = bits.view(torch.float32)
    plain = [math.nan, -0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, 0.1]
    p = os.path.join(tmp, "n.tk")
    tk.save({"x": x, "plain": plain, "big": 2**1000 + 1, "neg": -(2**64)}, p)
    out = tk.load(p)
    assert tbytes(out["x"]) == tbytes(x)
    assert_same(plain, out["plain"])
    assert out["big"] == 2**1000 + 1 and out["neg"] == -(2**64)


def test_types_are_kept(tmp):
    obj = OrderedDict(
        [
            (1, (torch.ones(2), np.arange(3))),
            ("第一个张量", [None, True, 0, 1.5, "s"]),
            (-7, {2**70: np.float32(1.5), "n": np.int64(-3)}),
        ]
    )
    p = os.path.join(tmp, "t.tk")
    tk.save(obj, p)
    out = tk.load(p)
    assert type(out) is OrderedDict and list(out) == [1, "第一个张量", -7]
    assert type(out[1]) is tuple and type(out[1][1]) is np.ndarray
    assert type(out[-7][2**70]) is np.float32 and type(out[-7]["n"]) is np.int64
    assert_same(obj, out)


def test_lone_surrogate_strings(tmp):
    obj = {"\ud800key": "value\udfff", "w": {"\udc80": torch.ones(1)}}
    p = os.path.join(tmp, "s.tk")
    tk.save(obj, p)
    assert_same(obj, tk.load(p))
    with safe_open(p, "pt") as f:
        assert len(list(f.keys())) == 1


def test_tied_weights_stored_once_and_shared(tmp):
    w = torch.randn(256, 64)
    emb = nn.Embedding(256, 64)
    head = nn.Linear(64, 256, bias=False)
    head.weight = emb.weight
    sd = {"emb": emb.state_dict(), "head": head.state_dict(), "alias": w, "again": w, "view": w.view(256, 64)}
    p, q = os.path.join(tmp, "tied.tk"), os.path.join(tmp, "untied.tk")
    tk.save(sd, p)
    tk.save(
        {
            "emb": emb.state_dict(),
            "head": {"weight": emb.weight.detach().clone()},
            "alias": w,
            "again": w.clone(),
            "view": w.clone(),
        },
        q,
    )
    # three 64 KiB tensors are written twice in the untied file, once in the tied one
    assert os.path.getsize(q) - os.path.getsize(p) >= 3 * w.nbytes - 4096
    for lazy in (False, True):
        out = tk.load(p, lazy=lazy)
        assert out["emb"]["weight"].data_ptr() == out["head"]["weight"].data_ptr()
        assert out["alias"].data_ptr() == out["again"].data_ptr() == out["view"].data_ptr()
        assert torch.equal(out["alias"], w) and torch.equal(out["head"]["weight"], emb.weight.detach())
    with tk.open(p) as f:
        assert len(f.keys()) == 2


def test_conjugate_and_negative_views_are_not_their_base(tmp):
    # c.conj() and c.conj().imag share c's memory (a lazy bit, not a copy): same address, shape
    # and strides as c and c.imag, different values; each must be stored as what it reads as
    c = torch.tensor([1 + 2j, -3 + 0.5j, 4 - 1j], dtype=torch.complex64)
    obj = {
        "c": c,
        "conj": c.conj(),
        "imag": c.imag,
        "neg_imag": c.conj().imag,
        "conj_t": torch.stack([c, c]).t().conj(),
    }
    assert obj["conj"].is_conj() and obj["neg_imag"].is_neg()
    p = os.path.join(tmp, "views.tk")
    tk.save(obj, p)
    for lazy in (False, True):
        out = tk.load(p, lazy=lazy)
        for k, v in obj.items():
            assert torch.equal(out[k], v.resolve_conj().resolve_neg()), k
            assert not out[k].is_conj() and not out[k].is_neg()
    assert torch.equal(out["neg_imag"], torch.tensor([-2.0, -0.5, 1.0]))


def test_tied_parameters_keep_vars(tmp):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    net = Tied()
    p = os.path.join(tmp, "m.tk")
    tk.save(net.state_dict(keep_vars=True), p)
    out = tk.load(p)
    assert isinstance(out["emb.weight"], nn.Parameter) and out["emb.weight"].requires_grad
    assert out["emb.weight"].data_ptr() == out["out.weight"].data_ptr()
    clone = Tied()
    clone.load_state_dict(tk.load(p))
    assert torch.equal(clone.out.weight, net.out.weight)


def test_requires_grad_is_per_reference(tmp):
    b = nn.Parameter(torch.randn(3), requires_grad=False)
    c = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    d = torch.randn(3, requires_grad=True)
    p = os.path.join(tmp, "p.tk")
    tk.save({"b": b, "c": c, "d": d, "d_detached": d.detach(), "e": torch.ones(2)}, p)
    for lazy in (False, True):
        out = tk.load(p, lazy=lazy)
        assert type(out["b"]) is nn.Parameter and not out["b"].requires_grad
        assert out["c"].requires_grad and out["d"].requires_grad
        assert not out["d_detached"].requires_grad, "a detached alias must not come back requiring grad"
        assert not out["e"].requires_grad
        assert out["d"].data_ptr() == out["d_detached"].data_ptr()


def test_numpy_big_endian_and_non_contiguous(tmp):
    a = np.arange(24, dtype=">f8").reshape(4, 6)
    obj = {
        "be": a,
        "be_t": a.T,
        "step": np.arange(20, dtype="<i4")[::3],
        "fortran": np.asfortranarray(a),
        "s": np.float16(2.5),
        "b": np.bool_(True),
        "c": np.complex64(1 - 2j),
        "u": np.uint64(2**64 - 1),
    }
    p = os.path.join(tmp, "np.tk")
    tk.save(obj, p)
    out = tk.load(p)
    assert_same(obj, out)
    np.testing.assert_array_equal(out["be"], a)
    np.testing.assert_array_equal(out["be_t"], a.T)


# ----------------------------------------------------------------------------- refusals


class Custom:
    pass


@pytest.mark.parametrize(
    "bad, what",
    [
        (lambda: 1, "function"),
        ({1, 2}, "set"),
        (Custom(), "Custom"),
        (frozenset(), "frozenset"),
        (b"bytes", "bytes"),
        (torch.ones(2).to_sparse(), "sparse"),
        (np.array(["a"]), "<U1"),
    ],
)
def test_refuses_unsupported_values_naming_the_path(tmp, bad, what):
    p = os.path.join(tmp, "ckpt.tk")
    tk.save({"old": torch.arange(3)}, p)
    before = open(p, "rb").read()
    obj = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: 1, 3: bad}}}
    with pytest.raises(TypeError) as e:
        tk.save(obj, p)
    assert "obj['optimizer']['state'][3]" in str(e.value)
    assert what in str(e.value)
    assert open(p, "rb").read() == before
    assert no_temp_files(tmp)


@pytest.mark.parametrize("key", [1.5, (1, 2), True, None, b"k"])
def test_refuses_bad_dict_keys(tmp, key):
    p = os.path.join(tmp, "ckpt.tk")
    with pytest.raises(TypeError) as e:
        tk.save({"optimizer": {"state": [0, 1, 2, {key: 1}]}}, p)
    assert "obj['optimizer']['state'][3]" in str(e.value) and repr(key) in str(e.value)
    assert not os.path.exists(p) and no_temp_files(tmp)


def test_refuses_subclasses_and_unstorable_dtypes(tmp):
    class MyDict(dict):
        pass

    p = os.path.join(tmp, "c.tk")
    with pytest.raises(TypeError, match=r"obj\['x'\]"):
        tk.save({"x": MyDict()}, p)
    with pytest.raises(TypeError, match="safetensors cannot store"):
        tk.save({"x": np.zeros(2, np.complex128)}, p)
    with pytest.raises(TypeError, match="safetensors cannot store"):
        tk.save({"x": torch.zeros(2, dtype=torch.complex128)}, p)
    assert not os.path.exists(p) and no_temp_files(tmp)


# ----------------------------------------------------------------------------- cross-checks


def test_safetensors_reads_every_tensor_of_our_files(tmp):
    obj = {
        "model": {"w": torch.randn(4, 3).T, "b": torch.arange(5, dtype=torch.int16)},
        "opt": [{"m": torch.zeros(2, dtype=torch.bfloat16)}],
        "np": np.arange(6, dtype=">u4"),
        "f8": torch.ones(3).to(torch.float8_e4m3fn),
        7: np.float64(2.5),
        "step": 3,
    }
    p = os.path.join(tmp, "x.safetensors")
    tk.save(obj, p, metadata={"who": "me"})
    _, arrays = flatten(obj)
    flat = st_load_file(p)
    assert set(flat) == {n for n, _ in arrays} == {"model.w", "model.b", "opt.0.m", "np", "f8", "7"}
    for name, x in arrays:
        assert tbytes(flat[name]) == tbytes(x)
    with safe_open(p, "pt") as f:
        assert f.metadata()["who"] == "me"
        assert torch.equal(f.get_slice("model.w")[1:3], obj["model"]["w"][1:3])


def test_we_read_safetensors_files_with_metadata(tmp):
    p = os.path.join(tmp, "hf.safetensors")
    sd = {
        "a.weight": torch.randn(3, 4),
        "a.bias": torch.arange(3, dtype=torch.float16),
        "e": torch.zeros(0, 2),
        "f8": torch.ones(4).to(torch.float8_e5m2),
        "u": torch.arange(3).to(torch.uint16),
    }
    st_save_file(sd, p, metadata={"format": "pt"})
    for lazy in (False, True):
        out = tk.load(p, lazy=lazy)
        assert type(out) is dict and set(out) == set(sd)
        for k in sd:
            assert tbytes(out[k]) == tbytes(sd[k]) and out[k].dtype == sd[k].dtype
    with tk.open(p) as f:
        assert f.metadata == {"format": "pt"}
        assert torch.equal(f.get_slice("a.weight")[1:], sd["a.weight"][1:])
    q = os.path.join(tmp, "np.safetensors")
    arrays = {"x": np.arange(10, dtype=np.int32), "y": np.ones((2, 2), np.float64)}
    np_save_file(arrays, q, metadata={"k": "v"})
    out = tk.load(q)
    assert set(out) == {"x", "y"}
    for k in arrays:
        assert tbytes(out[k]) == arrays[k].tobytes()
    with tk.open(q) as f:
        assert f.metadata == {"k": "v"}


def test_pt_state_dict_loads_lazily_too(tmp):
    sd = nn.Linear(3, 2).state_dict()
    p = os.path.join(tmp, "net.pt")
    torch.save(sd, p)
    for lazy in (False, True):
        out = tk.load(p, lazy=lazy)
        assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    with tk.open(p) as f:
        assert torch.equal(f.get("bias"), sd["bias"])


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.open, (self.marker, "w"))


class _Subprocess:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", f"open({self.marker!r}, 'w')"],))


@pytest.mark.parametrize("evil", [_System, _Open, _Subprocess])
@pytest.mark.parametrize("how", ["pickle0", "pickle2", "pickle5", "torch_zip", "torch_legacy"])
def test_malicious_pickles_never_run(tmp, evil, how):
    marker = os.path.join(tmp, "PWNED")
    p = os.path.join(tmp, "evil.pt")
    obj = {"w": torch.ones(2), "x": evil(marker)}
    if how.startswith("pickle"):
        with open(p, "wb") as f:
            f.write(pickle.dumps(obj, protocol=int(how[-1])))
    else:
        torch.save(obj, p, _use_new_zipfile_serialization=how == "torch_zip")
    assert not os.path.exists(marker)
    for attempt in (lambda: tk.load(p), lambda: tk.load(p, lazy=True), lambda: tk.open(p)):
        with pytest.raises(tk.FormatError):
            attempt()
    assert not os.path.exists(marker)
