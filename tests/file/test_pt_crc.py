"""A damaged ``.pt`` (torch.save zip) raises instead of loading wrong tensors: tensorkeep checks the
CRC-32 the zip stores for every entry, which torch's own reader ignores. Every 4 KiB page zeroed and
bits flipped anywhere, for tk.load (eager and lazy), tk.open and tk.load_into; zip64 and legacy files;
compressed entries refused; hostile directories bounded before anything is allocated."""

import io
import os
import struct
import tracemalloc
import zipfile
import zlib

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import cli, inspection, knobs
from tensorkeep.core.dtypes import byte_view

PAGE = 4096


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, generator=g)
    return {
        "a": a,
        "view": a[10:20],  # shares a's storage
        "w": torch.randn(40, 50, generator=g).to(torch.bfloat16),
        "ids": torch.randint(1, 1 << 40, (900,), generator=g),
        "h": torch.randn(300, generator=g, dtype=torch.float64),
        "step": torch.tensor(7),
        "empty": torch.empty(0, 3),
    }


STATE = _state()


def _same(got: dict, want: dict) -> bool:
    """Same keys, dtypes, shapes and bytes (NaN payloads and -0.0 count)."""
    return set(got) == set(want) and all(
        got[k].dtype == want[k].dtype
        and got[k].shape == want[k].shape
        and bytes(byte_view(got[k].contiguous()).numpy()) == bytes(byte_view(want[k].contiguous()).numpy())
        for k in want
    )


def _spans(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of every entry's stored bytes, found with Python's zipfile (not the code under test)."""
    out = []
    for i in zipfile.ZipFile(io.BytesIO(data)).infolist():
        nlen, xlen = struct.unpack_from("<HH", data, i.header_offset + 26)
        start = i.header_offset + 30 + nlen + xlen
        out.append((start, start + i.compress_size))
    return out


def _biggest(data: bytes) -> tuple[int, int]:
    return max(_spans(data), key=lambda s: s[1] - s[0])


def _zip(items: list[tuple[str, bytes]], *, zip64_fields: bool = False, deflate: bool = False) -> bytes:
    """A torch-like zip (64-byte aligned, zip64 end records); zip64_fields puts every size and offset
    of the directory in zip64 extra fields, as torch.save does for files over 4 GiB."""
    out, cen = bytearray(), bytearray()
    for name, raw in items:
        name_b, crc, off = name.encode(), zlib.crc32(raw), len(out)
        body = zlib.compress(raw)[2:-4] if deflate else raw
        pad = -(off + 30 + len(name_b) + 4) % 64
        extra = struct.pack("<HH", 0x4246, pad) + bytes(pad)
        out += (
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                20,
                0,
                8 * deflate,
                0,
                0,
                crc,
                len(body),
                len(raw),
                len(name_b),
                len(extra),
            )
            + name_b
            + extra
            + body
        )
        sizes = (len(body), len(raw), off)
        cx = struct.pack("<HHQQQ", 1, 24, len(raw), len(body), off) if zip64_fields else b""
        if zip64_fields:
            sizes = (0xFFFFFFFF,) * 3
        cen += (
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                45,
                45,
                0,
                8 * deflate,
                0,
                0,
                crc,
                sizes[0],
                sizes[1],
                len(name_b),
                len(cx),
                0,
                0,
                0,
                0,
                sizes[2],
            )
            + name_b
            + cx
        )
    cd_at, n = len(out), len(items)
    out += cen
    at64 = len(out)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(cen), cd_at)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, at64, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(out)


def _entries(data: bytes) -> list[tuple[str, bytes]]:
    z = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, z.read(i)) for i in z.infolist()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """The same state as torch.save writes it, with zip64 fields, and deflated (refused)."""
    d = tmp_path_factory.mktemp("pt")
    torch.save(STATE, d / "x.pt")
    plain = (d / "x.pt").read_bytes()
    return {
        "torch": plain,
        "zip64": _zip(_entries(plain), zip64_fields=True),
        "deflated": _zip(_entries(plain), deflate=True),
    }


KINDS = ["torch", "zip64"]


def _write(tmp, data: bytes, name: str = "d.pt") -> str:
    p = os.path.join(tmp, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def _open_all(p: str) -> dict:
    with tk.open(p) as f:
        return {k: f.get(k) for k in f.keys()}


LOADERS = {"eager": tk.load, "lazy": lambda p: tk.load(p, lazy=True), "open": _open_all}


def _expect(tmp, original: bytes, damaged: bytearray, loaders: dict = LOADERS) -> None:
    """Each load raises, or returns exactly the original tensors; damage to any entry's bytes raises
    ChecksumError (FormatError when it also erased the zip magic, so the file no longer looks like one)."""
    p = _write(tmp, bytes(damaged))
    changed = [i for i, (x, y) in enumerate(zip(original, damaged)) if x != y]
    hits_data = any(a <= i < b for a, b in _spans(original) for i in changed)
    for how, load in loaders.items():
        try:
            got = load(p)
        except tk.FormatError as e:
            if hits_data and damaged[:4] == b"PK\x03\x04":
                assert isinstance(e, tk.ChecksumError), (how, changed[:3], e)
                assert p in str(e) and "damaged" in str(e)
            continue
        assert not hits_data, (how, "damaged tensor data loaded without an error", changed[:3])
        assert _same(got, STATE), (how, "wrong tensors without an error", changed[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_intact_files_load_bit_identical(tmp, files, kind):
    p = _write(tmp, files[kind])
    assert _same(torch.load(p, weights_only=True), STATE)  # the hand-built variant is valid for torch too
    for how, load in LOADERS.items():
        assert _same(load(p), STATE), how


def test_compressed_entries_are_refused(tmp, files):
    """torch.save never compresses; a deflated entry could make torch allocate ~1000x the file's size."""
    p = _write(tmp, files["deflated"])
    assert _same(torch.load(p, weights_only=True), STATE)
    for load in LOADERS.values():
        with pytest.raises(tk.FormatError, match="compressed.*re-save"):
            load(p)
    assert _same(tk.load(p, verify=False), STATE)


@pytest.mark.parametrize("kind", KINDS)
def test_every_zeroed_page_raises_or_loads_exactly(tmp, files, kind):
    data = files[kind]
    assert len(data) > 6 * PAGE
    for at in range(0, len(data), PAGE):
        damaged = bytearray(data)
        damaged[at : at + PAGE] = bytes(len(damaged[at : at + PAGE]))
        _expect(tmp, data, damaged)


def test_zeroed_tensor_page_is_a_checksum_error_naming_the_entry(tmp, files):
    data = files["torch"]
    start, end = _biggest(data)  # a's storage
    damaged = bytearray(data)
    damaged[start + 100 : start + 100 + PAGE] = bytes(PAGE)
    p = _write(tmp, bytes(damaged))
    for load in LOADERS.values():
        with pytest.raises(tk.ChecksumError, match=r"zip entry '.*data/\d+'.*CRC-32 [0-9a-f]{8}.*stores [0-9a-f]{8}"):
            load(p)


@given(pos=st.integers(0, 1 << 30), bit=st.integers(0, 7), kind=st.sampled_from(KINDS))
def test_flipped_bit_raises_or_loads_exactly(tmp_path_factory, files, pos, bit, kind):
    data = files[kind]
    damaged = bytearray(data)
    damaged[pos % len(data)] ^= 1 << bit
    _expect(str(tmp_path_factory.mktemp("flip")), data, damaged)


def test_flipped_bit_in_every_storage_byte_sampled(tmp, files):
    """Deterministic companion of the property: a flip every 151 bytes of every entry."""
    data = files["torch"]
    for a, b in _spans(data):
        for i in range(a, b, 151):
            damaged = bytearray(data)
            damaged[i] ^= 0x10
            _expect(tmp, data, damaged, {"eager": tk.load})


def test_load_into_a_damaged_pt_raises_and_leaves_the_model_alone(tmp):
    net = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 16))
    src = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 16))
    p = os.path.join(tmp, "m.pt")
    torch.save(src.state_dict(), p)
    tk.load_into(net, p)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), src.state_dict().values()))
    with open(p, "rb") as f:
        data = f.read()
    start, end = _biggest(data)
    damaged = bytearray(data)
    damaged[start + 8] ^= 1
    _write(tmp, bytes(damaged), "m.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 16))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(tk.ChecksumError, match="m.pt"):
        tk.load_into(fresh, p)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_verify_reports_a_damaged_pt(tmp, files):
    good = _write(tmp, files["torch"], "good.pt")
    damaged = bytearray(files["torch"])
    damaged[_biggest(files["torch"])[0]] ^= 1
    bad = _write(tmp, bytes(damaged), "bad.pt")
    assert inspection.verify(good).ok
    res = inspection.verify(bad)
    assert not res.ok and "CRC-32" in str(res.problems[0])
    r = CliRunner().invoke(cli.main, ["verify", good, bad])
    assert r.exit_code == 1 and "DAMAGED" in r.output and "bad.pt" in r.output and "CRC-32" in r.output, r.output


def test_verify_false_skips_the_check(tmp, files):
    data = files["torch"]
    start, end = _biggest(data)
    damaged = bytearray(data)
    damaged[start] ^= 1
    p = _write(tmp, bytes(damaged))
    assert not _same(tk.load(p, verify=False), STATE)  # what torch.load alone returns: wrong, silently


def test_object_storage_pt_is_checked(files):
    fsspec = pytest.importorskip("fsspec")
    damaged = bytearray(files["torch"])
    damaged[_biggest(files["torch"])[0]] ^= 1
    fs = fsspec.filesystem("memory")
    fs.pipe("/tk-pt-crc/good.pt", files["torch"])
    fs.pipe("/tk-pt-crc/bad.pt", bytes(damaged))
    assert _same(tk.load("memory://tk-pt-crc/good.pt"), STATE)
    with pytest.raises(tk.ChecksumError, match="bad.pt"):
        tk.load("memory://tk-pt-crc/bad.pt")


def test_legacy_pt_has_no_checksums_and_loads_eagerly_even_when_lazy(tmp):
    p = os.path.join(tmp, "old.pt")
    torch.save(STATE, p, _use_new_zipfile_serialization=False)
    assert _same(tk.load(p), STATE) and _same(tk.load(p, lazy=True), STATE)


def test_truncated_pt_raises(tmp, files):
    data = files["torch"]
    for n in sorted({4, 30, 100, len(data) // 2, len(data) - 200, len(data) - 60, len(data) - 23, len(data) - 1}):
        p = _write(tmp, data[:n])
        for load in LOADERS.values():
            with pytest.raises(tk.FormatError):
                load(p)


# ---------------------------------------------------------------------------------- hostile directories


def _set(data: bytes, at: int, fmt: str, *vals) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, *vals)
    return bytes(b)


def _eocd64(data: bytes) -> int:
    return data.rindex(b"PK\x06\x06")


def _hostile(files) -> dict[str, tuple[bytes, type]]:
    plain = files["torch"]
    at64, cen = _eocd64(plain), plain.index(b"PK\x01\x02")
    items = _entries(plain)
    overlap = _zip(items)  # data.pkl's bytes run on over the entries after it
    overlap = _set(overlap, overlap.index(b"PK\x01\x02") + 20, "<II", 8000, 8000)
    twin = _zip([(n.replace("data/1", "data/0") if n.endswith("data/1") else n, b) for n, b in items])
    bomb = _zip([(items[0][0], items[0][1]), *[(f"{n}x", bytes(1 << 20)) for n, _ in items[1:]]], deflate=True)
    return {
        "entry count 2**60": (_set(plain, at64 + 24, "<QQ", 1 << 60, 1 << 60), tk.ChecksumError),
        "directory of 2**40 bytes": (_set(plain, at64 + 40, "<Q", 1 << 40), tk.ChecksumError),
        "directory past the end": (_set(plain, at64 + 48, "<Q", 1 << 62), tk.ChecksumError),
        "entry of 2**62 bytes": (_zip_sizes(items, 1 << 62), tk.ChecksumError),
        "overlapping entries": (bytes(overlap), tk.ChecksumError),
        "two entries named alike": (twin, tk.ChecksumError),
        "deflated megabytes of zeros": (bomb, tk.FormatError),
        "zip64 record outside the file": (_set(plain, at64 + 56 + 8, "<Q", 1 << 63), tk.ChecksumError),
        "first entry's local header gone": (_set(plain, cen + 42, "<I", 7), tk.ChecksumError),
    }


def _zip_sizes(items, size: int) -> bytes:
    data = bytearray(_zip(items, zip64_fields=True))
    c = data.rindex(b"PK\x01\x02")
    nlen = struct.unpack_from("<H", data, c + 28)[0]
    struct.pack_into("<QQ", data, c + 46 + nlen + 4, size, size)
    return bytes(data)


def test_hostile_directories_end_in_bounded_errors(tmp, files):
    for what, (data, err) in _hostile(files).items():
        p = _write(tmp, data)
        for how, load in LOADERS.items():
            tracemalloc.start()
            try:
                with pytest.raises(err) as info:
                    load(p)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 8 << 20, (what, how, peak)
            assert p in str(info.value), (what, info.value)


def test_entry_count_limit_follows_the_knob(tmp, monkeypatch):
    p = os.path.join(tmp, "many.pt")
    torch.save([torch.zeros(1) for _ in range(100)], p)  # 100 storages, 100 zip entries and a few more
    assert len(tk.load(p)) == 100
    monkeypatch.setattr(knobs, "MAX_TENSORS", 10)
    with pytest.raises(tk.LimitError, match="MAX_TENSORS"):
        tk.load(p)


def test_directory_size_limit_follows_the_knob(tmp, files, monkeypatch):
    p = _write(tmp, files["torch"])
    monkeypatch.setattr(knobs, "MAX_HEADER_BYTES", 100)
    with pytest.raises(tk.LimitError, match="MAX_HEADER_BYTES"):
        tk.load(p)


def test_checked_load_ignores_a_global_mmap_default(tmp, files):
    from torch.utils.serialization import config

    config.load.mmap = True  # torch.load(file object) would refuse it (monkeypatch cannot restore this proxy)
    try:
        assert _same(tk.load(_write(tmp, files["torch"])), STATE)
    finally:
        config.load.mmap = False


def test_doctests():
    import doctest

    from tensorkeep.core import ptzip

    assert doctest.testmod(ptzip).failed == 0
