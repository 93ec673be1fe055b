"""Resource bounds of the readers: many tensors and headers near the 100 MB cap either load in
bounded memory and time or are refused with a FormatError naming the file, what it holds, the
limit and the knob to raise (limits: src/tensorkeep/knobs.py, "Limits" in RELIABILITY.md).

Big files are loaded in a child process that reports its peak RSS (ru_maxrss) and wall time. The
bounds are generous (2 GB, 60 s): they catch blow-ups, not small regressions.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from fuzz_inputs import reseal
from tensorkeep import knobs
from tensorkeep.core import format as fmt
from tensorkeep.errors import LimitError

MAX_RSS_MB = 2048
MAX_SECONDS = 60

CHILD = """
import json, resource, sys, time
import tensorkeep as tk
path, how = sys.argv[1], sys.argv[2]
t = time.perf_counter()
try:
    if how == "open":
        with tk.open(path) as f:
            out = {"tensors": len(f.keys()), "metadata": sum(map(len, f.metadata.values()))}
    else:
        obj = tk.load(path)
        out = {"tensors": len(obj) if isinstance(obj, dict) else -1}
except tk.FormatError as e:
    out = {"error": type(e).__name__, "message": str(e)}
out["seconds"] = time.perf_counter() - t
out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def measure(path: str, how: str = "load") -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, path, how], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(os.path.basename(path), how, out)
    assert out["seconds"] < MAX_SECONDS and out["maxrss_mb"] < MAX_RSS_MB, out
    return out


def write_file(path: str, header: Iterable[bytes], data: bytes = b"") -> None:
    """A safetensors file whose header is streamed from ``header`` pieces (no 100 MB string in this process)."""
    with open(path, "wb") as f:
        f.write(bytes(8))
        n = 0
        for piece in header:
            f.write(piece)
            n += len(piece)
        f.write(data)
        f.seek(0)
        f.write(struct.pack("<Q", n))


def joined(parts: Iterator[bytes], sep: bytes = b",", chunk: int = 20_000) -> Iterator[bytes]:
    first = True
    batch: list[bytes] = []
    for p in parts:
        batch.append(p)
        if len(batch) == chunk:
            yield (b"" if first else sep) + sep.join(batch)
            first, batch = False, []
    if batch:
        yield (b"" if first else sep) + sep.join(batch)


def empty_tensors(n: int, name_len: int = 0) -> Iterator[bytes]:
    yield b"{"
    yield from joined(
        b'"%s":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % (b"%08d" % i).ljust(name_len, b"x") for i in range(n)
    )
    yield b"}"


def refused(out: dict, path: str, *words: str) -> None:
    assert out.get("error") in ("FormatError", "LimitError"), out
    for w in (path, *words):
        assert w in out["message"], (w, out["message"])


@pytest.fixture
def big(tmp_path):
    p = str(tmp_path / "big.safetensors")
    yield p
    if os.path.exists(p):
        os.unlink(p)  # pytest keeps recent tmp dirs: do not leave 100 MB files behind


def test_a_million_empty_tensors_is_refused_before_parsing(big):
    write_file(big, empty_tensors(1_000_000))
    for how in ("load", "open"):
        refused(measure(big, how), big, "1000000 tensors", f"limit of {knobs.MAX_TENSORS}", "knobs.MAX_TENSORS")


@pytest.mark.slow
def test_as_many_tensors_as_allowed_load_in_bounded_memory_and_time(big):
    write_file(big, empty_tensors(knobs.MAX_TENSORS))
    assert measure(big)["tensors"] == knobs.MAX_TENSORS
    write_file(big, empty_tensors(knobs.MAX_TENSORS + 1))
    refused(measure(big), big, f"{knobs.MAX_TENSORS + 1} tensors")


NEAR_CAP = {  # ~90-99 MB headers; (header pieces, expected: number of tensors, or the words of the refusal)
    "one 99 MB metadata string": (lambda: [b'{"__metadata__":{"k":"', *[b"x" * 1_000_000] * 99, b'"}}'], 0),
    "40k tensors with 2.4 KB names": (lambda: empty_tensors(40_000, 2_400), 40_000),
    "2.4M metadata entries (near the value limit)": (
        lambda: [b'{"__metadata__":{', *joined(b'"k%09d":"%s"' % (i, b"v" * 22) for i in range(2_400_000)), b"}}"],
        0,
    ),
    "1.6M empty tensors": (lambda: empty_tensors(1_600_000), ("1600000 tensors", "MAX_TENSORS")),
    "33M empty lists in a shape": (
        lambda: [b'{"a":{"dtype":"F32","shape":[', *[b"[]," * 1_000_000] * 33, b'[]],"data_offsets":[0,0]}}'],
        ("JSON values", "MAX_JSON_VALUES"),
    ),
    "19M short strings in a shape": (
        lambda: [b'{"a":{"dtype":"F32","shape":[', *[b'"ab",' * 1_000_000] * 19, b'0],"data_offsets":[0,0]}}'],
        ("JSON values", "MAX_JSON_VALUES"),
    ),
    "6M metadata entries": (
        lambda: [b'{"__metadata__":{', *joined(b'"k%09d":""' % i for i in range(6_000_000)), b"}}"],
        ("JSON values", "MAX_JSON_VALUES"),
    ),
}


@pytest.mark.parametrize("kind", list(NEAR_CAP))
def test_header_near_the_cap(big, kind):
    pieces, expected = NEAR_CAP[kind]
    write_file(big, pieces())
    assert os.path.getsize(big) > 85_000_000
    out = measure(big)
    if isinstance(expected, int):
        assert out.get("tensors") == expected, out
    else:
        refused(out, big, *expected)


def saved_record(p: str) -> tuple[dict, dict, bytes]:
    """Save a small file at ``p``; return its parsed header, its tensorkeep record and the data after the header."""
    tk.save({"w": torch.ones(2)}, p)
    data = open(p, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + n])
    return head, json.loads(head["__metadata__"]["tensorkeep"]), data[8 + n :]


def test_structure_record_near_the_cap_is_refused(big, tmp):
    """A tensorkeep file with a valid header checksum whose structure record is 66 MB of '[]'."""
    p = os.path.join(tmp, "small.tk")
    head, record, rest = saved_record(p)
    record["tree"] = {"l": "BOMB"}
    head["__metadata__"]["tensorkeep"] = fmt.dumps(record)
    text = fmt.dumps(head).encode().replace(b'\\"BOMB\\"', b"[" + b"[]," * 22_000_000 + b"[]]")
    b = bytearray(struct.pack("<Q", len(text)) + text + rest)
    assert reseal(b)
    with open(big, "wb") as f:
        f.write(b)
    del b, text
    out = measure(big)
    refused(out, big, "tensorkeep metadata holds", "MAX_JSON_VALUES")
    assert out["error"] == "LimitError"


# ----------------------------------------------------------------------------- the limits, with small knobs


def plain_file(path: str, n: int, meta: dict | None = None) -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    if meta is not None:
        header["__metadata__"] = meta
    write_file(path, [json.dumps(header).encode()], bytes(range(n)))


def test_tensor_count_limit(tmp, monkeypatch):
    monkeypatch.setattr(knobs, "MAX_TENSORS", 5)
    p = os.path.join(tmp, "f.safetensors")
    plain_file(p, 5)
    assert len(tk.load(p)) == 5
    plain_file(p, 6)
    with pytest.raises(
        tk.FormatError, match=r"header lists 6 tensors, more than the limit of 5 \(tensorkeep.knobs.MAX_TENSORS"
    ):
        tk.open(p)
    # a key spelled with an escape escapes the cheap count before parsing, not the exact one after
    data = open(p, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    write_file(p, [data[8 : 8 + n].replace(b"data_offsets", b"data\\u005foffsets")], data[8 + n :])
    with pytest.raises(tk.FormatError, match="header lists 6 tensors"):
        tk.load(p)


def test_json_value_limit(tmp, monkeypatch):
    p = os.path.join(tmp, "f.safetensors")
    plain_file(p, 2, {"k": "x" * 100_000})  # one long string is one value
    monkeypatch.setattr(knobs, "MAX_JSON_VALUES", 40)
    assert len(tk.load(p)) == 2
    plain_file(p, 2, {f"k{i}": "" for i in range(30)})
    with pytest.raises(
        tk.FormatError,
        match=r"header holds \d+ JSON values, more than the limit of 40 "
        r"\(tensorkeep.knobs.MAX_JSON_VALUES",
    ) as e:
        tk.load(p)
    assert p in str(e.value)
    monkeypatch.setattr(knobs, "MAX_JSON_VALUES", 5_000)
    q = os.path.join(tmp, "f.tk")
    tk.save({"w": torch.ones(2), "plain": list(range(2_000))}, q)
    monkeypatch.setattr(knobs, "MAX_JSON_VALUES", 1_000)
    with pytest.raises(LimitError, match="tensorkeep metadata holds") as e:  # not reported as damage
        tk.load(q)
    assert not isinstance(e.value, tk.ChecksumError) and "damaged" not in str(e.value)


def test_save_refuses_what_load_would_refuse(tmp, monkeypatch):
    p = os.path.join(tmp, "x.tk")
    cases = [
        ("MAX_TENSORS", 2, [torch.ones(1)] * 1 + [torch.ones(2), torch.ones(3)]),
        ("MAX_HEADER_BYTES", 1_000, {"w": torch.ones(2), "s": "x" * 2_000}),
        ("MAX_JSON_VALUES", 500, {"w": torch.ones(2), "plain": list(range(1_000))}),
    ]
    for knob, limit, obj in cases:
        with monkeypatch.context() as m:
            m.setattr(knobs, knob, limit)
            with pytest.raises(ValueError, match=f"more than the limit of {limit} .*tensorkeep.knobs.{knob}"):
                tk.save(obj, p)
        assert os.listdir(tmp) == []  # nothing written, not even a temp file
        tk.save(obj, p)
        os.unlink(p)


def test_deep_structure_record_is_refused(tmp):
    p = os.path.join(tmp, "deep.tk")
    head, record, rest = saved_record(p)
    depth = knobs.MAX_DEPTH + 5
    record["tree"] = "DEEP"
    head["__metadata__"]["tensorkeep"] = fmt.dumps(record).replace(
        '"DEEP"', '{"l":[' * depth + '{"d":[["w",{"t":"w"}]]}' + "]}" * depth
    )
    text = fmt.dumps(head).encode()
    b = bytearray(struct.pack("<Q", len(text)) + text + rest)
    assert reseal(b)
    open(p, "wb").write(b)
    with pytest.raises(tk.FormatError, match=f"nested more than {knobs.MAX_DEPTH} levels"):
        tk.load(p)


def count_built(o) -> int:
    """Values and keys json.loads built for ``o``."""
    if isinstance(o, dict):
        return 1 + sum(1 + count_built(v) for v in o.values())
    if isinstance(o, list):
        return 1 + sum(count_built(v) for v in o)
    return 1


tricky = st.text(alphabet='ab,:[]{}"\\\u00e9 \n', max_size=8)
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(tricky, c, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(doc=json_docs, scan=st.booleans(), indent=st.sampled_from([None, 1]))
def test_json_values_is_an_upper_bound(doc, scan, indent):
    """The count that guards json.loads never undercounts, with or without the scan that skips strings."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    old = knobs.MAX_JSON_VALUES
    knobs.MAX_JSON_VALUES = 0 if scan else old
    try:
        assert fmt.json_values(text) >= count_built(json.loads(text))
    finally:
        knobs.MAX_JSON_VALUES = old


def test_json_values_skips_strings():
    knobs_before = knobs.MAX_JSON_VALUES
    knobs.MAX_JSON_VALUES = 0
    try:
        assert fmt.json_values(b'{"a,b:[{": "\\\\", "c\\",": [1]}') == count_built({"a,b:[{": "\\", 'c",': [1]})
        assert fmt.json_values(np.zeros(0, np.uint8).tobytes()) == 1
    finally:
        knobs.MAX_JSON_VALUES = knobs_before
