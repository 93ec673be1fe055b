"""Strict header parsing: a hand-written corpus of malformed headers, then a fuzz test.

--fuzz-examples (default 10000) sets the number of generated headers thrown at the parser.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from support import sizes
from tensorkeep import knobs
from tensorkeep.core import format as fmt


def st_file(header, data: bytes = b"", *, raw: bool = False, length: int | None = None) -> bytes:
    """A safetensors file from a header object (or raw header bytes with ``raw=True``)."""
    text = header if raw else json.dumps(header).encode()
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def T(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


GOOD = st_file({"a": T(), "b": T("I8", (3,), (8, 11))}, bytes(11))

# (id, file bytes, words the message must contain)
CORPUS = [
    ("empty file", b"", "8-byte"),
    ("short file", b"\x01\x02\x03", "8-byte"),
    ("length past eof", struct.pack("<Q", 1000) + b'{"a":1}', "past the end"),
    ("length over cap", struct.pack("<Q", 100_000_001) + b"{}", "cap"),
    ("length 2**64-1", b"\xff" * 8 + b"{}", "cap"),
    ("length zero", struct.pack("<Q", 0) + b"{}", "too small"),
    ("not utf-8", st_file(b'{"\xff\xfe":1}', raw=True), "UTF-8"),
    ("utf-16", st_file('{"a":1}'.encode("utf-16"), raw=True), "UTF-8"),
    ("json array", st_file(b"[1,2]", raw=True), "JSON object"),
    ("json string", st_file(b'"abc"', raw=True), "JSON object"),
    ("leading garbage", st_file(b"x{}", raw=True), "JSON object"),
    ("broken json", st_file(b'{"a": ', raw=True), "JSON"),
    ("trailing json", st_file(b"{}{}", raw=True), "JSON"),
    (
        "duplicate keys",
        st_file(b'{"a":' + json.dumps(T()).encode() + b',"a":' + json.dumps(T()).encode() + b"}", bytes(8), raw=True),
        "duplicate",
    ),
    (
        "duplicate field",
        st_file(b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), raw=True),
        "duplicate",
    ),
    ("NaN", st_file(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', bytes(8), raw=True), "NaN"),
    ("Infinity", st_file(b'{"__metadata__":{"a":Infinity}}', raw=True), "Infinity"),
    ("-Infinity", st_file(b'{"x":-Infinity}', raw=True), "Infinity"),
    ("missing dtype", st_file({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "dtype"),
    ("missing offsets", st_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "data_offsets"),
    ("unknown field", st_file({"a": {**T(), "extra": 1}}, bytes(8)), "extra"),
    ("tensor not object", st_file({"a": [1, 2]}, bytes(8)), "expected an object"),
    ("unknown dtype", st_file({"a": T("F128")}, bytes(8)), "unknown dtype"),
    ("lowercase dtype", st_file({"a": T("f32")}, bytes(8)), "unknown dtype"),
    ("dtype not str", st_file({"a": T(5)}, bytes(8)), "unknown dtype"),
    ("negative dim", st_file({"a": T(shape=(-2,))}, bytes(8)), "every dimension"),
    ("float dim", st_file({"a": T(shape=(2.0,))}, bytes(8)), "every dimension"),
    ("bool dim", st_file({"a": T(shape=(True, 2))}, bytes(8)), "every dimension"),
    ("str dim", st_file({"a": T(shape=("2",))}, bytes(8)), "every dimension"),
    ("shape not list", st_file({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, bytes(8)), "shape"),
    ("too many dims", st_file({"a": T(shape=(1,) * 65, offs=(0, 4))}, bytes(4)), "shape"),
    ("huge dim", st_file({"a": T(shape=(2**63,), offs=(0, 8))}, bytes(8)), "every dimension"),
    ("overflowing shape", st_file({"a": T(shape=(2**40, 2**40, 2**40), offs=(0, 8))}, bytes(8)), "needs"),
    (
        "overflow to 8 bytes mod 2**64",
        st_file({"a": T("U8", shape=(2**32, 2**32 + 8), offs=(0, 8))}, bytes(8)),
        "needs",
    ),
    ("negative offset", st_file({"a": T(offs=(-8, 0))}, bytes(8)), "data_offsets"),
    ("float offset", st_file({"a": T(offs=(0.0, 8))}, bytes(8)), "data_offsets"),
    ("bool offset", st_file({"a": T("BOOL", (1,), (False, True))}, bytes(1)), "data_offsets"),
    ("three offsets", st_file({"a": T(offs=(0, 8, 8))}, bytes(8)), "data_offsets"),
    (
        "offsets not list",
        st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0,8"}}, bytes(8)),
        "data_offsets",
    ),
    ("huge offset", st_file({"a": T(offs=(2**64, 2**64 + 8))}, bytes(8)), "data_offsets"),
    ("reversed offsets", st_file({"a": T("F32", (0,), (8, 0))}, bytes(8)), "reversed"),
    ("shape/offsets mismatch", st_file({"a": T(shape=(3,))}, bytes(8)), "needs 12 bytes"),
    ("overlap", st_file({"a": T(), "b": T(offs=(4, 12))}, bytes(12)), "overlaps"),
    ("same offsets", st_file({"a": T(), "b": T(offs=(0, 8))}, bytes(8)), "overlaps"),
    ("hole at start", st_file({"a": T(offs=(4, 12))}, bytes(12)), "hole"),
    ("hole between", st_file({"a": T(), "b": T(offs=(12, 20))}, bytes(20)), "hole"),
    ("out of bounds", st_file({"a": T()}, bytes(4)), "truncated"),
    ("trailing bytes", st_file({"a": T()}, bytes(9)), "trailing"),
    ("data without tensors", st_file({}, b"x"), "trailing"),
    ("deep json", st_file(b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", raw=True), "nested"),
    ("deep objects", st_file(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, raw=True), "nested"),
    ("metadata not object", st_file({"__metadata__": ["a"]}), "__metadata__"),
    ("metadata int value", st_file({"__metadata__": {"a": 1}}), "must be a string"),
    ("metadata null value", st_file({"__metadata__": {"a": None}}), "must be a string"),
    ("metadata nested", st_file({"__metadata__": {"a": {"b": "c"}}}), "must be a string"),
    (
        "lone surrogate name",
        st_file(b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), raw=True),
        "surrogate",
    ),
    ("lone surrogate metadata", st_file(b'{"__metadata__":{"k":"\\udfff"}}', raw=True), "surrogate"),
    (
        "int too long",
        st_file(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', bytes(8), raw=True),
        "JSON",
    ),
    ("tensorkeep metadata in a plain file", st_file({"__metadata__": {"tensorkeep": "{}"}}), "tensorkeep"),
    # found by the mutation fuzzer (tests/fuzz_mutation.py): torch.empty raised RuntimeError
    ("empty tensor with huge dims", st_file({"a": T("F32", (0, 2**62, 4), (0, 0))}), "too large"),
    ("huge dims around a zero", st_file({"a": T("U8", (2**32, 2**32, 0), (0, 0))}), "too large"),
]


def _tk_file(obj) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tk.save(obj, os.path.join(d, "f.tk"))
        return open(os.path.join(d, "f.tk"), "rb").read()


def _reencode(data: bytes, edit) -> bytes:
    """A tensorkeep file with its header edited by ``edit(header, record)`` and its header checksum
    recomputed, as a deliberate forger would (the data area and its checksums are unchanged)."""
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + n])
    record = json.loads(head["__metadata__"]["tensorkeep"])
    edit(head, record)
    head["__metadata__"]["tensorkeep"] = fmt.dumps(record)
    text = fmt.dumps(head).encode()
    out = bytearray(struct.pack("<Q", len(text)) + text + data[8 + n :])
    at = 8 + len(fmt.TK_PREFIX)
    out[at : at + 8] = b"%08x" % fmt.header_crc(out[: 8 + len(text)])
    return bytes(out)


def _lookalike() -> bytes:
    """Two flipped bits (in "tensorkeep.crc32" and in the "tensorkeep" key) made a tensorkeep file
    a plain one, loaded without any checksum check."""
    b = bytearray(_tk_file({"w": torch.arange(4.0)}))
    b[b.index(b"tensorkeep.crc32") + 15] ^= 1
    b[b.index(b'"tensorkeep"') + 10] ^= 1
    return bytes(b)


# Refused by the reader, after the header parser accepted them (so parse_header alone is not checked).
def _crcs(edit) -> bytes:
    """The file of {"x": 2 floats} with its checksum list of "x" edited."""
    return _reencode(_tk_file({"x": torch.ones(2)}), lambda h, r: r["crc"].__setitem__("x", edit(r["crc"]["x"])))


CRC_CASES = {
    "checksum in capitals": (_crcs(lambda c: ["ABCDEF12"]), "8 lowercase hex digits"),
    "checksum not a string": (_crcs(lambda c: [12345678]), "8 lowercase hex digits"),
    "checksum of 7 digits": (_crcs(lambda c: [c[0][:7]]), "8 lowercase hex digits"),
    "checksum of 9 digits": (_crcs(lambda c: [c[0] + "0"]), "8 lowercase hex digits"),
    "checksum with a comma": (_crcs(lambda c: [c[0][:4] + "," + c[0][5:]]), "8 lowercase hex digits"),
    "two checksums in one string": (_crcs(lambda c: [c[0] + "," + c[0]]), "8 lowercase hex digits"),
    "checksum missing": (_crcs(lambda c: []), "expected 1 block checksums"),
    "checksums not a list": (_crcs(lambda c: c[0]), "expected 1 block checksums"),
}
READER_LEVEL = {"tensorkeep metadata in a plain file", "tensorkeep lookalike", "tensor and array at once", *CRC_CASES}
CORPUS += [(name, data, words) for name, (data, words) in CRC_CASES.items()]
CORPUS += [
    ("tensorkeep lookalike", _lookalike(), "starts like a tensorkeep header"),
    # found by the mutation fuzzer: one tensor loaded as a NumPy array where the structure says torch
    (
        "tensor and array at once",
        _reencode(
            _tk_file({"x": torch.ones(2), "y": torch.zeros(2)}), lambda h, r: r["tree"]["d"].append(["z", {"n": "x"}])
        ),
        "NumPy array",
    ),
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, (_, data, _) in enumerate(CORPUS):
        (d / f"{i}.safetensors").write_bytes(data)
    return str(d)


def test_good_file_is_accepted(tmp):
    p = os.path.join(tmp, "good.safetensors")
    open(p, "wb").write(GOOD)
    out = tk.load(p)
    assert set(out) == {"a", "b"} and out["a"].dtype == torch.float32 and out["b"].shape == (3,)


def open_and_load(p: str):
    with tk.open(p) as f:
        return f.load()


@pytest.mark.parametrize("i", range(len(CORPUS)), ids=[c[0] for c in CORPUS])
def test_malformed_header_refused(corpus_dir, i):
    _, data, words = CORPUS[i]
    p = os.path.join(corpus_dir, f"{i}.safetensors")
    for attempt in (lambda: tk.load(p), lambda: tk.load(p, lazy=True), lambda: open_and_load(p)):
        with pytest.raises(tk.FormatError) as e:
            attempt()
        assert words.lower() in str(e.value).lower(), str(e.value)
        assert p in str(e.value)
    if CORPUS[i][0] not in READER_LEVEL:
        with pytest.raises(tk.FormatError):
            fmt.parse_header(data, len(data), "x")
    assert isinstance(e.value, ValueError) and isinstance(e.value, tk.TensorkeepError)


def test_safetensors_refuses_what_we_refuse_spot_check(corpus_dir):
    """What safetensors refuses, we refuse (we are stricter still: duplicate keys, unknown fields,
    more than 64 dimensions and misplaced tensorkeep metadata, which safetensors accepts)."""
    from safetensors import SafetensorError, safe_open

    for name in (
        "length past eof",
        "overlap",
        "hole between",
        "trailing bytes",
        "unknown dtype",
        "shape/offsets mismatch",
        "metadata int value",
    ):
        i = [c[0] for c in CORPUS].index(name)
        with pytest.raises(SafetensorError):
            with safe_open(os.path.join(corpus_dir, f"{i}.safetensors"), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


def test_header_cap_is_checked_before_reading(tmp, monkeypatch):
    """An absurd header length is refused from the 8-byte prefix alone, without allocating it."""
    p = os.path.join(tmp, "big.safetensors")
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 200_000_000) + b"{")
        f.truncate(200_000_100)  # sparse: the file really is that long
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    with pytest.raises(tk.FormatError, match="cap"):
        tk.load(p)
    assert max(reads) < 1 << 20


# ----------------------------------------------------------------------------- fuzz


def _field_value(r: random.Random):
    return r.choice(
        [
            lambda: r.randint(-3, 40),
            lambda: r.randint(-(2**70), 2**70),
            lambda: r.uniform(-1e3, 1e3),
            lambda: r.random() < 0.5,
            lambda: None,
            lambda: "".join(r.choice("ab0{\\u00e9") for _ in range(r.randint(0, 3))),
            lambda: r.choice(list(fmt.DTYPE_SIZES) + ["F128", "f32", ""]),
            lambda: [r.randint(-2, 20) for _ in range(r.randint(0, 3))],
            lambda: {"k": r.randint(0, 9)},
        ]
    )()


def structured_header(seed: int) -> bytes:
    """A mostly valid header with a few targeted mutations (seeded, so generating one is cheap)."""
    r = random.Random(seed)
    names = list({"".join(r.choice("abé.~_0") for _ in range(r.randint(0, 4))) for _ in range(r.randint(0, 4))})
    r.shuffle(names)
    header, pos = {}, 0
    for name in names:
        dtype = r.choice(list(fmt.DTYPE_SIZES))
        shape = [r.randint(0, 4) for _ in range(r.randint(0, 3))]
        n = fmt.DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if r.random() < 0.3:
        header["__metadata__"] = {"k": "v", "é": "ü"}
    data_len = pos
    for _ in range(r.randint(0, 3)):
        kind = r.choice(["field", "item", "drop", "add", "meta", "data_len", "swap", "dup"])
        name = r.choice(names) if names else None
        if name is not None and kind == "field":
            header[name][r.choice(["dtype", "shape", "data_offsets"])] = _field_value(r)
        elif name is not None and kind == "item":
            v = header[name].get(r.choice(["shape", "data_offsets"]))
            if type(v) is list and v:
                v[r.randrange(len(v))] = _field_value(r)
        elif name is not None and kind == "drop":
            header[name].pop(r.choice(["dtype", "shape", "data_offsets"]), None)
        elif name is not None and kind == "add":
            header[name][r.choice(["x", "dtype2", ""])] = _field_value(r)
        elif kind == "meta":
            header["__metadata__"] = r.choice([_field_value(r), {"a": _field_value(r)}])
        elif kind == "data_len":
            data_len = max(0, data_len + r.randint(-9, 9))
        elif kind == "swap" and len(names) >= 2:
            a, b = r.sample(names, 2)
            header[a]["data_offsets"], header[b]["data_offsets"] = (
                header[b].get("data_offsets"),
                header[a].get("data_offsets"),
            )
        elif kind == "dup" and name is not None:
            header[name + "2"] = dict(header[name])
    text = json.dumps(header, ensure_ascii=r.random() < 0.5).encode() + b" " * r.randint(0, 9)
    if r.random() < 0.1:
        text = text.replace(b'"dtype"', b'"dtype":"F32","dtype"', 1)  # a duplicate key
    data = r.randbytes(min(data_len, 64)) + bytes(max(0, data_len - 64))
    return struct.pack("<Q", len(text)) + text + data


def byte_mutation(seed: int) -> bytes:
    """A valid file (tensorkeep or plain) with a few bytes set, flipped, inserted, deleted, the length changed."""
    r = random.Random(seed)
    base = bytearray(r.choice(SEEDS))
    for _ in range(r.randint(1, 4)):
        if not base:
            break
        kind = r.choice(["set", "flip", "flip", "insert", "delete", "length", "truncate"])
        i = r.randrange(len(base))
        if kind == "set":
            base[i] = r.randrange(256)
        elif kind == "flip":
            base[i] ^= 1 << r.randrange(8)
        elif kind == "insert":
            base[i:i] = r.randbytes(r.randint(1, 4))
        elif kind == "delete":
            del base[i : i + r.randint(1, 4)]
        elif kind == "length" and len(base) >= 8:
            n = (
                r.randrange(2**64)
                if r.random() < 0.3
                else max(0, struct.unpack("<Q", base[:8])[0] + r.randint(-16, 16))
            )
            base[:8] = struct.pack("<Q", n)
        elif kind == "truncate":
            del base[i:]
    return bytes(base)


def _seed_files():
    out = [GOOD, st_file({}), st_file({"__metadata__": {"k": "v"}, "x": T("BF16", (2, 2), (0, 8))}, bytes(8))]
    with tempfile.TemporaryDirectory() as d:
        for obj in (
            {"w": torch.arange(6.0).reshape(2, 3), "n": np.arange(3, dtype=np.int16), "s": "x"},
            [torch.ones(0), 1.5, None],
        ):
            p = os.path.join(d, "f.tk")
            tk.save(obj, p)
            out.append(open(p, "rb").read())
    return out


SEEDS = _seed_files()

headers = st.one_of(
    st.integers(0, 2**64).map(structured_header),
    st.integers(0, 2**64).map(byte_mutation),
    st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b),
    st.binary(max_size=80),
    st.text(max_size=40).map(lambda s: st_file(s.encode(), raw=True)),
)


def check_accepted(data: bytes, h: fmt.Header) -> None:
    """Invariants of an accepted header: tensors tile the data area exactly and match their shapes."""
    assert h.data_start == 8 + struct.unpack("<Q", data[:8])[0]
    pos = 0
    for t in h.tensors.values():
        assert t.begin == pos and t.dtype in fmt.DTYPE_SIZES
        n = fmt.DTYPE_SIZES[t.dtype]
        for d in t.shape:
            assert type(d) is int and d >= 0
            n *= d
        assert t.end - t.begin == n
        pos = t.end
    assert h.data_start + pos == len(data)
    assert h.metadata is None or all(type(k) is str and type(v) is str for k, v in h.metadata.items())


@pytest.mark.fuzz
@pytest.mark.slow
@settings(
    max_examples=sizes.fuzz_examples,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=headers)
def test_fuzz_parse_header_only_raises_format_error(data):
    try:
        h = fmt.parse_header(data, len(data), "fuzz")
    except tk.FormatError:
        return
    check_accepted(data, h)


@pytest.mark.fuzz
@settings(
    max_examples=max(50, sizes.fuzz_examples // 50),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=headers)
def test_fuzz_files_load_or_raise_format_error(data):
    """Through tk.load / tk.open on real files: FormatError or tensors equal to the data area slices."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.safetensors")
        with open(p, "wb") as f:
            f.write(data)
        try:
            h = fmt.parse_header(data, len(data), "fuzz")
        except tk.FormatError:
            h = None
        try:
            out = tk.load(p)
        except tk.FormatError:
            out = None
        if h is None or out is None:
            for attempt in (lambda: tk.load(p, lazy=True), lambda: tk.open(p).load()):
                try:
                    attempt()
                except tk.FormatError:
                    pass
            return
        with tk.open(p) as f:
            for name, t in h.tensors.items():
                want = data[h.data_start + t.begin : h.data_start + t.end]
                got = f.get(name)
                flat = got.reshape(-1)
                raw = flat.view(torch.uint8).numpy() if isinstance(got, torch.Tensor) else flat.view(np.uint8)
                assert raw.tobytes() == want, name
                assert tuple(got.shape) == t.shape
        if not h.is_tensorkeep:
            assert set(out) == set(h.tensors)


def test_max_header_cap_knob(monkeypatch):
    monkeypatch.setattr(knobs, "MAX_HEADER_BYTES", 10)
    with pytest.raises(tk.FormatError, match="cap"):
        fmt.parse_header(GOOD, len(GOOD), "x")
