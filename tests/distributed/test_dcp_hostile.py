"""Hostile DCP directories for convert_dcp / read_metadata, and dist_plan.check_cover at scale.

The hostile ``.metadata`` files are written opcode by opcode, or pickled from torch's own DCP
dataclasses with values no DCP save would write. Cases that crashed or hung the old reader run in
a child process under a timeout, so a regression fails instead of killing or stalling the suite.
"""

import io
import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorkeep as tk
from dcp_files import meta, write_dir
from tensorkeep import knobs
from tensorkeep.core import boxes as dist_plan
from tensorkeep.layouts.dcp import read_metadata

EXE = os.path.join(os.path.dirname(sys.executable), "tensorkeep")
MD = "torch.distributed.checkpoint.metadata"
HEAD = b"\x80\x04"


def text(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def glob(module: str, name: str) -> bytes:
    return text(module) + text(name) + b"\x93"


def get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


def in_child(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------- the metadata reader

DEEP_KEY = HEAD + b"}" + b")" + b"\x85" * 200_000 + b"Ns."  # {((((),),),...): None}, 200,000 deep


def hash_bomb(doublings: int = 100) -> bytes:
    """{t: None} where t = (t', t'), t' = (t'', t''), ...: 300 bytes, hashing it takes 2**100 steps."""
    out = HEAD + b"})\x94"
    for i in range(doublings):
        out += get(i) + get(i) + b"\x86\x94"
    return out + b"Ns."


def hash_flood(bits: int = 17) -> bytes:
    """A dict of 2**bits different tuple keys that all hash alike (hash(-1) == hash(-2))."""
    keys = [
        b"(" + b"".join(b"J" + struct.pack("<i", -1 - (k >> j & 1)) for j in range(bits)) + b"tNs"
        for k in range(1 << bits)
    ]
    return HEAD + b"}" + b"".join(keys) + b"."


def test_deep_tuple_key_ends_in_one_error_line_not_a_segfault(tmp):
    d = write_dir(os.path.join(tmp, "deep"), DEEP_KEY)
    r = subprocess.run([EXE, "convert", d, os.path.join(tmp, "out.tk")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "nested more than" in r.stderr
    assert not os.path.exists(os.path.join(tmp, "out.tk"))


PROBES = ["_inductor", "onnx", "_dynamo", "export", "compiler", "_export", "testing", "float32_"]


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """One child process (one torch import) runs what crashed, hung or imported in the old code:
    the reader on names torch imports lazily, a hash bomb, a hash flood, a FIFO as data file,
    check_cover on 100,000 chunks. Under a timeout of minutes, so a regression fails, never stalls."""
    tmp = str(tmp_path_factory.mktemp("child"))
    probes = [write_dir(os.path.join(tmp, n), HEAD + glob("torch", n) + b".") for n in PROBES]
    hostile = [
        write_dir(os.path.join(tmp, "bomb"), hash_bomb()),
        write_dir(os.path.join(tmp, "flood"), hash_flood()),
        write_dir(os.path.join(tmp, "fifo"), meta(w_with(*W))),
    ]
    os.mkfifo(os.path.join(tmp, "fifo", "data"))
    r = in_child(
        f"""
        import json, sys, warnings
        import tensorkeep as tk
        from tensorkeep.core.boxes import check_cover

        def convert(d):
            try:
                tk.convert_dcp(d, d + ".tk")
                return "converted"
            except Exception as e:
                return type(e).__name__ + ": " + str(e)

        before = set(sys.modules)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probes = [convert(d) for d in {probes!r}]
        res = {{"new_modules": sorted(set(sys.modules) - before), "warnings": [str(w.message) for w in caught],
                "probes": probes, "hostile": [convert(d) for d in {hostile!r}]}}
        n = 317  # 100,489 chunks on a grid
        grid = [((i * 3, j * 5), (3, 5)) for i in range(n) for j in range(n)]
        P = 2**61 - 1  # ints that all hash alike: a set or dict of them would be quadratic
        line = [((k * P,), (P,)) for k in range(100_000)]
        res["cover"] = [check_cover("w", (3 * n, 5 * n), grid, "f"),
                        check_cover("w", (3 * n, 5 * n), grid + [((1, 1), (1, 1))], "f"),
                        check_cover("w", (100_000 * P,), line, "f")]
        print(json.dumps(res))
    """,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_hash_bomb_hash_flood_and_a_fifo_end_in_format_errors(child):
    """Each of these killed or stalled the old reader (exponential hash, quadratic dict, blocking open)."""
    bomb, flood, fifo = child["hostile"]
    assert bomb.startswith("LimitError: ") and "more than" in bomb and "MAX_JSON_VALUES" in bomb
    assert flood.startswith("FormatError: ") and "a dict key that is a tuple" in flood
    assert fifo.startswith("FormatError: ") and "data is not a regular file; the metadata stores 'w' in it" in fifo


@pytest.mark.slow
def test_reader_never_imports_what_a_file_names(child):
    """getattr(torch, name) imported torch._inductor / onnx / _dynamo on a name from the file."""
    assert [m for m in child["new_modules"] if m.startswith("torch")] == []
    assert child["warnings"] == []
    for n, e in zip(PROBES, child["probes"]):
        assert e.startswith("FormatError: ") and f"refers to torch.{n}, which is not part of DCP's metadata" in e


@pytest.mark.slow
def test_check_cover_of_100k_chunks_is_not_quadratic(child):
    """Comparing every pair of 100,000 chunks takes hours; the child has minutes for it all."""
    grid, overlap, line = child["cover"]
    assert grid is None and line is None
    assert overlap.endswith("overlapping chunks at offsets [0, 0] and [1, 1]")


def test_reader_still_resolves_dtypes():
    raw = HEAD + glob(MD, "Metadata") + b")\x81}" + text("d") + glob("torch", "bfloat16") + b"sb."
    assert read_metadata(raw, "f").state == {"d": torch.bfloat16}


@pytest.mark.parametrize(
    "raw, match",
    [
        (HEAD + b"]" * 500 + b"a" * 499 + b".", "nested more than 100 deep"),  # [[[[...]]]]
        (HEAD + b"]\x94" + get(0) + b"a.", "put inside itself"),  # L.append(L)
        (HEAD + b"]\x94" + get(0) + b"\x85a.", "changed after it was put inside another"),  # L.append((L,))
        (HEAD + glob(MD, "Metadata") + b")\x81\x94" + get(0) + b"b.", "put inside itself"),  # m.state = m
        (HEAD + b"\x8c\x01\xff.", "is not UTF-8"),
        (HEAD + b"X" + struct.pack("<I", 2 << 20) + b"a" * (2 << 20) + b".", "a string of 2097152 bytes"),
        (
            HEAD + glob(MD, "_MEM_FORMAT_ENCODING") + b"G" + struct.pack(">d", float("inf")) + b"\x85R.",
            "bad arguments for .*_MEM_FORMAT_ENCODING",
        ),
        (
            HEAD + glob("pathlib", "PosixPath") + b"]" * 50 + b"a" * 49 + b"\x85R.",
            "bad arguments for pathlib.PosixPath",
        ),
        (HEAD + glob("torch", "Size") + text("abc") + b"\x85R.", "bad arguments for torch.Size"),
        (HEAD + b"}K\x07Ns.", "a dict key that is a int"),
        (HEAD + b"}(" + text("a") + b"u.", "SETITEMS of an odd number of items"),
        (HEAD + b"}" + b"(" * 3 + b")" + b"t" * 3 + b"Ns.", "a dict key that is a tuple"),
        (HEAD + b")" + glob("torch", "Size") + b"\x93.", "STACK_GLOBAL of a tuple and a torch.Size, not two names"),
        (HEAD + glob(MD, "Metadata") + b"(" + b"K\x01" * 50 + b"t\x81.", "NEWOBJ of torch.distributed"),
    ],
)
def test_hostile_metadata_is_a_format_error(raw, match):
    with pytest.raises(tk.FormatError, match=match):
        read_metadata(raw, "f")


def test_opcodes_and_sizes_are_bounded(tmp, monkeypatch):
    monkeypatch.setattr(knobs, "MAX_JSON_VALUES", 1000)
    with pytest.raises(tk.LimitError, match="more than 1000 pickle opcodes"):
        read_metadata(HEAD + b"N" + b"\x94" * 2000 + b".", "f")  # a memo of 2000 entries
    with pytest.raises(tk.LimitError, match="more than 1000 parts"):
        read_metadata(hash_bomb(12), "f")  # 60 opcodes, 2**12 parts
    monkeypatch.setattr(knobs, "MAX_HEADER_BYTES", 100)
    with pytest.raises(tk.LimitError, match="larger than 100 bytes"):
        tk.convert_dcp(write_dir(os.path.join(tmp, "big"), b"N" * 200), os.path.join(tmp, "big.tk"))


# ------------------------------------------------------------------------------ convert_dcp

DATA = torch.arange(4.0).numpy().tobytes()  # the raw bytes of DCP's safetensors format
W = [((0,), (2,), ("data", 0, 8)), ((2,), (2,), ("data", 8, 8))]


@pytest.fixture
def no_alloc(monkeypatch):
    """Allocating a tensor fails the test: hostile directories must be refused before that."""

    def boom(*a, **kw):
        raise AssertionError("allocated a tensor before the directory was checked")

    for name in ("zeros", "empty", "full", "frombuffer"):
        monkeypatch.setattr(torch, name, boom)


def test_a_checked_directory_still_converts(tmp):
    blob = io.BytesIO()
    torch.save(5, blob)
    g = torch.arange(24.0).reshape(4, 6)
    grid = [((r, c), (2, 3), ("g", (r + c // 3) * 24, 24)) for r in (0, 2) for c in (0, 3)]
    gdata = b"".join(g[r : r + 2, c : c + 3].contiguous().numpy().tobytes() for r in (0, 2) for c in (0, 3))
    tensors = [("w", (4,), W + [((4,), (0,), None)]), ("g", (4, 6), grid), ("e", (0, 3), [])]
    planner = {"w": ("model", "w"), "g": ("model", "g"), "s": ("hist", 2)}
    d = write_dir(
        os.path.join(tmp, "ok"),
        meta(tensors, [("s", ("data", 16, len(blob.getvalue())))], planner),
        {"data": DATA + blob.getvalue(), "g": gdata},
    )
    tk.convert_dcp(d, os.path.join(tmp, "ok.tk"))
    back = tk.load(os.path.join(tmp, "ok.tk"))
    assert torch.equal(back["model"]["w"], torch.arange(4.0)) and torch.equal(back["model"]["g"], g)
    assert back["hist"] == [None, None, 5] and back["e"].shape == (0, 3)


def w_with(*chunks):
    return [("w", (4,), list(chunks))]


WV = w_with(*W) + [("v", (0,), [])]
HOSTILE = [  # (tensors, planner, what the error says)
    ([("w", (3_000_000_000,), [])], None, r"tensor 'w' hold 0 of its 3000000000 elements \(shape \[3000000000\]\)"),
    (
        w_with(((-2,), (2,), ("data", 0, 8)), *W),
        None,
        r"'w' has chunk offsets \[-2\] sizes \[2\] outside its shape \[4\]",
    ),
    (w_with(W[0]), None, r"the chunks of tensor 'w' hold 2 of its 4 elements"),
    (w_with(((0,), (3,), ("data", 0, 12)), W[1]), None, r"'w' has overlapping chunks at offsets \[0\] and \[2\]"),
    (w_with(W[0], ((2,), (2,), None)), None, r"'w' at offsets \[2\] needs one storage entry .* found none"),
    (
        [("w", (1 << 28,), [((0,), (1 << 28,), ("data", 0, 1 << 30))])],
        None,
        r"data is truncated: 'w' needs bytes 0..1073741824, the file has 16",
    ),
    (
        w_with(W[0], ((2,), (2,), ("data", 8, 4))),
        None,
        r"\[2\] of tensor 'w' .* needs 8 bytes, its storage entry holds 4",
    ),
    (w_with(W[0], ((2,), (2,), ("data", 4, 8))), None, r"'w' and 'w' are stored in overlapping bytes of data"),
    (w_with(W[0], ((2,), (2,), ("nodata", 0, 8))), None, r"nodata is missing; the metadata stores 'w' in it"),
    (w_with(W[0], ((2,), (2,), ("da\0ta", 0, 8))), None, r"\[2\] of 'w' is stored in 'da\\x00ta', which is not a file"),
    (w_with(W[0], ((2,), (2,), ("..", 0, 8))), None, r"is stored in '..', which is not a file"),
    (w_with(W[0], ((2,), (2,), ("data", -8, 8))), None, r"chunk \[2\] of 'w' has a bad byte range -8 \+ 8"),
    ([("w", (1 << 63,), [])], None, r"tensor 'w' has size \[9223372036854775808\]: dimensions must be 0 .. 2\*\*62"),
    ([("w", (1 << 40, 1 << 40), [])], None, r"their non-zero product times the item size at most 2\*\*62"),
    ([("w", ("a",), [])], None, r"the size of tensor 'w' must be a tuple of at most 64 ints, found a tuple"),
    (w_with(((0, 0), (2, 2), ("data", 0, 16))), None, r"offsets of 'w' must be a tuple of 1 ints, found a tuple of 2"),
    (w_with(*W), {"w": ("w", 1 << 40)}, r"entry 'w': list index 1099511627776 in planner_data leaves more empty slots"),
    (WV, {"w": ("x",), "v": ("x",)}, r"entry 'v': its path in planner_data leads where another"),
    (WV, {"w": ("x",), "v": ("x", "y")}, r"entry 'v': its path in planner_data runs through another"),
    (WV[::-1], {"v": ("x", "y"), "w": ("x",)}, r"entry 'w': its path in planner_data leads where another"),
    (WV, {"w": ("x", 0), "v": ("x", "k")}, r"entry 'v': item 1 of a path .* a str where a list needs an index"),
    (
        w_with(*W),
        {"w": ("x", -1)},
        r"entry 'w': item 1 of a path in planner_data is a int where a list needs an index >= 0",
    ),
    (w_with(*W), {"w": (0,)}, r"entry 'w': item 0 of a path in planner_data is a int where a dict needs a name"),
    (w_with(*W), {"w": "w"}, r"entry 'w': a path in planner_data must be a tuple"),
]


@pytest.mark.parametrize("tensors, planner, match", HOSTILE)
def test_hostile_directory_is_refused_before_anything_is_allocated(tmp, no_alloc, tensors, planner, match):
    d = write_dir(os.path.join(tmp, "d"), meta(tensors, planner=planner), {"data": DATA})
    out = os.path.join(tmp, "out.tk")
    with pytest.raises(tk.FormatError, match=match) as e:
        tk.convert_dcp(d, out)
    assert str(e.value).startswith(d)
    assert not os.path.exists(out)


def test_a_directory_as_data_file_a_value_without_data_a_dtype_tensorkeep_lacks(tmp, no_alloc):
    d = write_dir(os.path.join(tmp, "d"), meta(w_with(W[0], ((2,), (2,), ("sub", 0, 8)))), {"data": DATA})
    os.mkdir(os.path.join(d, "sub"))
    with pytest.raises(tk.FormatError, match="sub is not a regular file; the metadata stores 'w' in it"):
        tk.convert_dcp(d, os.path.join(tmp, "out.tk"))
    d = write_dir(os.path.join(tmp, "v"), meta(values=[("t", None)]), {"data": DATA})
    with pytest.raises(tk.FormatError, match="entry 't' needs one storage entry, found 0"):
        tk.convert_dcp(d, os.path.join(tmp, "out.tk"))
    d = write_dir(os.path.join(tmp, "c"), meta(w_with(*W), dtype=torch.complex128), {"data": DATA})
    with pytest.raises(tk.FormatError, match="tensor 'w' is torch.complex128, which a tensorkeep file cannot hold"):
        tk.convert_dcp(d, os.path.join(tmp, "out.tk"))


# ------------------------------------------------------------------------------ check_cover


def pairwise(key, shape, boxes, where):
    """The former check_cover, comparing every pair of chunks: the reference the fast one must agree with."""
    for off, sz in boxes:
        if len(off) != len(shape) or len(sz) != len(shape):
            return f"{where}: tensor {key!r} has a chunk with {len(sz)} dimensions, the tensor has {len(shape)}"
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(off, sz, shape)):
            return (
                f"{where}: tensor {key!r} has chunk offsets {list(off)} sizes {list(sz)} "
                f"outside its shape {list(shape)}"
            )
    full = [b for b in boxes if dist_plan.volume(b[1])]
    for i, a in enumerate(full):
        for b in full[i + 1 :]:
            if dist_plan.intersect(a, b) is not None:
                return f"{where}: tensor {key!r} has overlapping chunks at offsets {list(a[0])} and {list(b[0])}"
    got, want = sum(dist_plan.volume(b[1]) for b in full), dist_plan.volume(shape)
    if got != want:
        return f"{where}: the chunks of tensor {key!r} hold {got} of its {want} elements (shape {list(shape)})"
    return None


def kind(why):
    return None if why is None else next(k for k in ("dimensions", "outside", "overlapping", "hold") if k in why)


@st.composite
def layouts(draw):
    """A grid tiling of a small shape, some neighbours merged (not a grid any more), then damaged a little."""
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    cuts = [sorted(draw(st.sets(st.integers(1, d - 1)))) if d > 1 else [] for d in shape]
    spans = [list(zip([0, *c], [*c, d])) for c, d in zip(cuts, shape)]
    boxes = [(tuple(a for a, _ in cell), tuple(b - a for a, b in cell)) for cell in itertools.product(*spans)]
    for _ in range(draw(st.integers(0, 4))):  # merge a box with its neighbour along one dimension
        if not boxes or not shape:
            break
        i, k = draw(st.integers(0, len(boxes) - 1)), draw(st.integers(0, len(shape) - 1))
        (off, sz) = boxes[i]
        for j, (o2, s2) in enumerate(boxes):
            if o2[k] == off[k] + sz[k] and all(o2[m] == off[m] and s2[m] == sz[m] for m in range(len(shape)) if m != k):
                boxes[i] = (off, sz[:k] + (sz[k] + s2[k],) + sz[k + 1 :])
                del boxes[j]
                break
    box = st.tuples(
        st.tuples(*(st.integers(-1, d + 1) for d in shape)), st.tuples(*(st.integers(0, d + 1) for d in shape))
    )
    for op in draw(st.lists(st.sampled_from(["drop", "copy", "add", "grow", "move", "flat"]), max_size=2)):
        if op == "add" or not boxes:
            boxes.append(draw(box))
        elif op == "flat":
            boxes.append(((0,) * (len(shape) + 1), (1,) * (len(shape) + 1)))
        else:
            i = draw(st.integers(0, len(boxes) - 1))
            off, sz = boxes[i]
            if op == "drop":
                del boxes[i]
            elif op == "copy":
                boxes.append(boxes[i])
            elif shape:
                k, by = draw(st.integers(0, len(shape) - 1)), draw(st.sampled_from([-1, 1]))
                if op == "grow":
                    boxes[i] = (off, sz[:k] + (max(sz[k] + by, 0),) + sz[k + 1 :])
                else:
                    boxes[i] = (off[:k] + (off[k] + by,) + off[k + 1 :], sz)
    return shape, draw(st.permutations(boxes))


@given(layouts())
def test_check_cover_agrees_with_comparing_every_pair(layout):
    shape, boxes = layout
    fast, slow = dist_plan.check_cover("w", shape, boxes, "f"), pairwise("w", shape, boxes, "f")
    assert kind(fast) == kind(slow), (fast, slow)
    if kind(fast) != "overlapping":  # which pair is reported first may differ
        assert fast == slow


def test_irregular_layouts_are_checked_within_a_budget(monkeypatch):
    n = 40  # n full-width rows over n full-height columns: a tiling, but not a grid (n * n + n cells)
    strips = [((i, 0), (1, n)) for i in range(n)] + [((n, j), (n, 1)) for j in range(n)]
    assert dist_plan.check_cover("w", (2 * n, n), strips, "f") is None
    assert "overlapping" in dist_plan.check_cover("w", (2 * n, n), strips + [((5, 5), (n, 1))], "f")
    monkeypatch.setattr(dist_plan, "CELL_BUDGET", 0)
    assert "tensor 'w' has 80 chunks that do not form a grid (they span 1640 cells" in dist_plan.check_cover(
        "w", (2 * n, n), strips, "f"
    )
    assert "hold 3120 of its 3200 elements" in dist_plan.check_cover("w", (2 * n, n), strips[2:], "f")


def test_torch_save_blobs_are_checked_before_torch_reads_them(tmp):
    """torch's zip reader ignores CRC-32s and inflates compressed entries: a flipped bit was a silently
    wrong tensor, and a small compressed blob could make torch allocate gigabytes."""
    import warnings
    import zipfile

    import torch.distributed.checkpoint as dcp

    d = os.path.join(tmp, "flip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save({"w": torch.arange(64.0)}, checkpoint_id=d)
    name = next(n for n in os.listdir(d) if n.endswith(".distcp"))
    raw = open(os.path.join(d, name), "rb").read()
    at = raw.index(torch.arange(64.0).numpy().tobytes())
    with open(os.path.join(d, name), "r+b") as f:
        f.seek(at + 100)
        f.write(bytes([raw[at + 100] ^ 1]))
    with pytest.raises(tk.ChecksumError, match=f"{d}: 'w'"):
        tk.convert_dcp(d, os.path.join(tmp, "flip.tk"))

    plain = io.BytesIO()
    torch.save(torch.zeros(1 << 16), plain)
    packed = io.BytesIO()
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    blob = packed.getvalue()
    assert len(blob) < 4096  # 256 KiB of zeros in a few hundred bytes
    d = write_dir(os.path.join(tmp, "deflated"), meta(values=[("s", ("data", 0, len(blob)))]), {"data": blob})
    with pytest.raises(tk.FormatError, match=f"{d}: 's': zip entry .* is compressed"):
        tk.convert_dcp(d, os.path.join(tmp, "deflated.tk"))
