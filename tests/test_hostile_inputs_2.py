"""Hostile inputs found by the second adversarial review (issue 14): a .pt whose pickle is a DAG
of shared containers or nested 200,000 deep, or has a dict key that takes forever (or a crash) to
hash; structure records with out-of-range sizes and devices; DCP raw chunks of odd length; reads
that fail half way (``read_into``, ``load_distributed``) and must leave their target untouched;
a FIFO given as the path.

Cases that hung or crashed the old code run in a child process under a timeout, so a regression
fails the test instead of stalling or killing the suite.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import knobs, writer
from tensorkeep.inspection import verify
from tensorkeep.sharded import ShardedOpen

EXE = os.path.join(os.path.dirname(sys.executable), "tensorkeep")


def in_child(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def pt_with_pickle(path: str, pkl: bytes) -> str:
    """A torch.save zip archive (stored entries, right CRCs) whose data.pkl is ``pkl``."""
    base = io.BytesIO()
    torch.save({"x": 1}, base)
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in zin.infolist():
            z.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else zin.read(info.filename))
    return path


def dag(levels: int = 40) -> dict:
    x: dict = {"w": torch.zeros(1)}
    for _ in range(levels):
        x = {"a": x, "b": x}  # 2**levels paths to the bottom, a few hundred bytes pickled
    return x


N = 200_000
DEEP_LIST = b"\x80\x02}q\x00X\x01\x00\x00\x00xq\x01" + b"]" * N + b"a" * (N - 1) + b"s."  # {"x": [[[...]]]}
DEEP_TUPLE_KEY = b"\x80\x02}" + b")" + b"\x85" * N + b"Ns."  # {((((),),),...): None}: hash() recursed in C


def hash_bomb(doublings: int = 100) -> bytes:
    """{t: None}, t = (t', t'), t' = (t'', t''), ...: hashing t takes 2**100 steps."""
    out = b"\x80\x02})q\x00"
    for i in range(doublings):
        out += b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i) + b"\x86r" + struct.pack("<I", i + 1)
    return out + b"Ns."


# ------------------------------------------------------------------ (7) .pt pickles: DAGs and depth


def test_a_shared_dag_pt_is_refused_not_walked_forever(tmp_path):
    p = str(tmp_path / "dag.pt")
    torch.save({"weight": torch.zeros(2, 2), "x": dag()}, p)
    assert os.path.getsize(p) < 10_000
    r = in_child(f"""
        import torch, tensorkeep as tk
        for call in (lambda: tk.load({p!r}), lambda: tk.open({p!r}),
                     lambda: tk.load_into(torch.nn.Linear(2, 2, bias=False), {p!r}, strict=False)):
            try:
                call()
                print("LOADED")
            except tk.LimitError as e:
                print("LIMIT", str(e)[:300])
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(ln.startswith(f"LIMIT {p}") and "MAX_JSON_VALUES" in ln for ln in lines), r.stdout
    c = subprocess.run([EXE, "convert", p, str(tmp_path / "o.tk")], capture_output=True, text=True, timeout=240)
    assert c.returncode == 2 and "MAX_JSON_VALUES" in c.stderr and len(c.stderr.strip().splitlines()) == 1, c.stderr
    assert not os.path.exists(tmp_path / "o.tk")


def test_a_pt_nested_200k_deep_is_a_format_error_everywhere(tmp_path):
    p = pt_with_pickle(str(tmp_path / "deep.pt"), DEEP_LIST)
    for call in (lambda: tk.load(p), lambda: tk.open(p),
                 lambda: tk.load_into(torch.nn.Linear(2, 2, bias=False), p, strict=False)):
        with pytest.raises(tk.FormatError, match=f"^{p}: .*nested more than {knobs.MAX_DEPTH} levels"):
            call()
    assert not verify(p).ok


DEEP_TUPLE = b")" + b"\x85" * N
PICKLES = {  # each crashed (hash() of a deep tuple), hung, imported a module or allocated 2 GB in torch.load
    "deep-tuple-key": DEEP_TUPLE_KEY, "hash-bomb": hash_bomb(), "float-key": b"\x80\x02}G?\xf0\0\0\0\0\0\0Ns.",
    "huge-int-key": b"\x80\x02}\x8a\x09" + (1 << 64).to_bytes(9, "little") + b"Ns.",
    "set-of-tuples": b"\x80\x02c__builtin__\nset\n)\x85\x85R.",
    "storage-key": b"\x80\x02(X\x07\0\0\0storagectorch\nFloatStorage\n" + DEEP_TUPLE + b"X\x03\0\0\0cpuK\x01tQ.",
    "layout-name": b"\x80\x02ctorch.serialization\n_get_layout\n" + DEEP_TUPLE + b"\x85R.",
    "ordered-dict-state": b"\x80\x02ccollections\nOrderedDict\n)R" + DEEP_TUPLE + b"N\x86\x85b.",
    "codec-import": b"\x80\x02c_codecs\nencode\nX\x01\0\0\0xX\x04\0\0\0idna\x86R.",
    "bytearray-size": b"\x80\x02c__builtin__\nbytearray\nJ\0\0\0\x7f\x85R.",
    "tensor-constructor": b"\x80\x02ctorch\nFloatTensor\nJ\0\0\0\x7f\x85R.",  # 8 GB, from 40 bytes
}


@pytest.mark.parametrize("pkl", list(PICKLES.values()), ids=list(PICKLES))
def test_pickles_torch_would_crash_hang_import_or_allocate_on_are_refused_first(tmp_path, pkl):
    p = pt_with_pickle(str(tmp_path / "k.pt"), pkl)
    r = in_child(f"""
        import tensorkeep as tk
        for call in (lambda: tk.load({p!r}), lambda: tk.open({p!r}), lambda: tk.load({p!r}, verify=False),
                     lambda: tk.load({p!r}, lazy=True)):
            try:
                call()
                print("LOADED")
            except tk.FormatError as e:
                print("REFUSED", str(e)[:300])
    """, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -11 was a segfault in hash()
    assert r.stdout.count(f"REFUSED {p}: ") == 4, r.stdout


def test_a_legacy_torch_file_is_scanned_too(tmp_path):
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    p = str(tmp_path / "legacy.pt")
    with open(p, "wb") as f:
        f.write(head + DEEP_TUPLE_KEY)
    r = in_child(f"""
        import tensorkeep as tk
        try:
            tk.load({p!r})
        except tk.FormatError as e:
            print("REFUSED", e)
    """, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"REFUSED {p}: the pickle has a dict key"), (r.returncode, r.stdout)
    torch.save({"w": torch.ones(2), "b": b"x"}, p, _use_new_zipfile_serialization=False)
    assert torch.equal(tk.load(p)["w"], torch.ones(2))


def test_ordinary_pt_files_still_load(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    obj = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "tags": {"a", "b"}, "b": b"xy",
           "ba": bytearray(b"z"), "size": torch.Size([2, 3]), "dev": torch.device("cpu"), "dt": torch.half,
           "c": 1 + 2j, "p": torch.nn.Parameter(torch.ones(2)), "n": None, "f": 0.5, "big": 1 << 70,
           "t": (1, "a"), "shared": [net.state_dict()["0.weight"]] * 3, "keys": {-1: 1, -2: 2, 1 << 40: 3}}
    p = str(tmp_path / "ok.pt")
    torch.save(obj, p)
    back = tk.load(p)
    assert back["tags"] == {"a", "b"} and back["keys"] == obj["keys"] and back["big"] == 1 << 70
    assert torch.equal(back["model"]["0.weight"], net.state_dict()["0.weight"])
    assert back["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    rep = tk.load_into(net, p, rename={"model.": ""}, strict=False)
    assert "0.weight" in rep.loaded


def test_save_refuses_a_dag_of_shared_containers_quickly(tmp_path):
    r = in_child(f"""
        import torch, tensorkeep as tk
        L = {{"w": torch.zeros(1)}}
        for _ in range(40):
            L = {{"a": L, "b": L}}
        try:
            tk.save({{"x": L}}, {str(tmp_path / "o.tk")!r})
            print("SAVED")
        except ValueError as e:
            print("REFUSED", str(e)[:300])
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("REFUSED cannot save") and "MAX_JSON_VALUES" in r.stdout, r.stdout


def test_load_into_from_a_dag_or_deep_state_dict_is_an_error_not_a_hang(tmp_path):
    r = in_child("""
        import torch, tensorkeep as tk
        L = {"w": torch.zeros(1)}
        for _ in range(40):
            L = {"a": L, "b": L}
        deep = [torch.zeros(1)]
        for _ in range(100_000):
            deep = [deep]
        for sd in ({"weight": torch.zeros(2, 2), "x": L}, {"weight": torch.zeros(2, 2), "x": deep}):
            try:
                tk.load_into(torch.nn.Linear(2, 2, bias=False), sd, strict=False)
                print("LOADED")
            except ValueError as e:
                print("REFUSED", type(e).__name__, str(e)[:200])
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("REFUSED") == 2, r.stdout


def test_a_dcp_value_that_is_a_dag_is_refused(tmp_path):
    blob = io.BytesIO()
    torch.save(dag(), blob)
    from test_dcp_hostile import meta, write_dir

    d = write_dir(str(tmp_path / "d"), meta(values=[("v", ("data", 0, len(blob.getvalue())))]),
                  {"data": blob.getvalue()})
    r = in_child(f"""
        import tensorkeep as tk
        try:
            tk.convert_dcp({d!r}, {str(tmp_path / "o.tk")!r})
            print("CONVERTED")
        except tk.FormatError as e:
            print("REFUSED", str(e)[:300])
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"REFUSED {d}") and "MAX_JSON_VALUES" in r.stdout, r.stdout


# ---------------------------------------------------------------- (11) loads that fail leave no trace


def damage(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("block", [None, 512])
def test_read_into_leaves_out_unchanged_after_a_checksum_error(tmp_path, monkeypatch, block):
    if block:
        monkeypatch.setattr(knobs, "BLOCK_BYTES", block)  # several checksum blocks: the damage is in the last
    p = str(tmp_path / "w.tk")
    tk.save({"w": torch.ones(1000)}, p)
    damage(p, os.path.getsize(p) - 2)
    out = torch.zeros(1000)
    with tk.open(p) as f, pytest.raises(tk.ChecksumError, match="tensor 'w' is damaged"):
        f.read_into("w", out)
    assert torch.equal(out, torch.zeros(1000))
    d = str(tmp_path / "sharded")
    tk.save_sharded({"w": torch.ones(1000), "b": torch.ones(3)}, d, max_shard_size=1000)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = os.path.join(d, json.load(f)["weight_map"]["w"])
    damage(shard, os.path.getsize(shard) - 2)
    with ShardedOpen(d) as f, pytest.raises(tk.ChecksumError):
        f.read_into("w", out)
    assert torch.equal(out, torch.zeros(1000))


def test_read_into_still_reads_and_refuses_a_wrong_shape(tmp_path):
    p = str(tmp_path / "w.pt")
    torch.save({"w": torch.arange(4.0)}, p)
    out = torch.zeros(4, 4)
    with tk.open(p) as f, pytest.raises(ValueError, match="'w' is"):
        f.read_into("w", out)  # a .pt tensor used to be broadcast into a larger out
    assert not out.any()
    tk.save({"w": torch.arange(6.0)}, str(tmp_path / "w.tk"))
    with tk.open(str(tmp_path / "w.tk")) as f:
        assert torch.equal(f.read_into("w", torch.zeros(6)), torch.arange(6.0))


SAVED = {"a": torch.arange(8.0), "b": torch.arange(8.0) + 100, "l": [torch.ones(3), 4], "step": 7, "extra": 5}


@pytest.fixture(scope="module")
def dist_ckpt(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("dist") / "ck")
    tk.save_distributed(SAVED, p)
    name = [n for n in os.listdir(p) if n.endswith(".tk")][0]
    with open(os.path.join(p, name), "rb") as f:
        return p, name, f.read()


def fresh_state() -> dict:
    return {"a": torch.zeros(8), "b": torch.zeros(8), "l": [torch.zeros(3), 0], "step": 0}


def same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(map(same, x, y))
    return x == y


def test_load_distributed_is_all_or_nothing_after_damage_in_the_last_tensor(dist_ckpt, tmp_path):
    p, name, raw = dist_ckpt
    d = str(tmp_path / "ck")
    os.mkdir(d)
    with open(os.path.join(d, "distributed.json"), "wb") as f:
        f.write(open(os.path.join(p, "distributed.json"), "rb").read())
    bad = bytearray(raw)
    bad[-3] ^= 1  # the last tensor's bytes
    with open(os.path.join(d, name), "wb") as f:
        f.write(bad)
    state = fresh_state()
    lst, a = state["l"], state["a"]
    with pytest.raises(tk.ChecksumError):
        tk.load_distributed(state, d)
    assert same(state, fresh_state()) and state["l"] is lst and state["a"] is a


@settings(max_examples=60)
@given(at=st.integers(0, 10**9))
def test_load_distributed_with_any_byte_damaged_loads_all_or_nothing(dist_ckpt, tmp_path_factory, at):
    p, name, raw = dist_ckpt
    d = str(tmp_path_factory.mktemp("ck"))
    with open(os.path.join(d, "distributed.json"), "wb") as f:
        f.write(open(os.path.join(p, "distributed.json"), "rb").read())
    bad = bytearray(raw)
    bad[at % len(bad)] ^= 0x10
    with open(os.path.join(d, name), "wb") as f:
        f.write(bad)
    state = fresh_state()
    try:
        out = tk.load_distributed(state, d)
    except tk.TensorkeepError:
        assert same(state, fresh_state())
    else:
        assert out is state and same(state, SAVED)


def test_load_distributed_mismatch_in_a_later_tensor_changes_nothing(dist_ckpt):
    p = dist_ckpt[0]
    state = fresh_state()
    state["b"] = torch.zeros(9)
    with pytest.raises(tk.MismatchError, match=r"state\['b'\]"):
        tk.load_distributed(state, p)
    want = fresh_state()
    want["b"] = torch.zeros(9)
    assert same(state, want)
    state = fresh_state()
    assert tk.load_distributed(state, p) is state and same(state, SAVED)
    t = (torch.zeros(8), torch.zeros(8))
    with pytest.raises(tk.MismatchError):
        tk.load_distributed({"a": t[0], "b": t[1], "l": (torch.zeros(3), 0)}, p)  # a tuple where a list was saved
    assert not t[0].any()


# ------------------------------------------------- (13) out-of-range values in a structure record


@pytest.mark.parametrize("node, what", [({"S": [10**30]}, "torch.Size"), ({"S": [-1]}, "torch.Size"),
                                        ({"dev": 10**30}, "device"), ({"dev": "cuda:99999999999999999999"}, "device"),
                                        ({"dev": "x" * 10_000}, "device")])
def test_a_structure_record_with_out_of_range_values_is_a_format_error(tmp_path, monkeypatch, node, what):
    p = str(tmp_path / "s.tk")
    monkeypatch.setattr(writer, "flatten", lambda obj: ({"d": [["s", node]]}, []))
    tk.save({}, p)
    monkeypatch.undo()
    with pytest.raises(tk.FormatError, match=f"^{p}: stored structure is invalid: .*{what}"):
        tk.load(p)
    with pytest.raises(tk.FormatError, match="stored structure is invalid"):
        tk.open(p)
    res = verify(p)
    assert not res.ok and "stored structure is invalid" in str(res.problems)


def test_sizes_and_devices_still_round_trip(tmp_path):
    obj = {"s": torch.Size([0, 2**62]), "d": torch.device("cuda", 3), "m": torch.device("meta"), "c": torch.device("cpu")}
    tk.save(obj, str(tmp_path / "s.tk"))
    assert tk.load(str(tmp_path / "s.tk")) == obj
    with pytest.raises(ValueError, match="torch.Size"):
        tk.save({"s": torch.Size([-1])}, str(tmp_path / "neg.tk"))  # it would not load back


def test_a_dcp_raw_chunk_of_odd_length_is_a_format_error(tmp_path):
    from test_dcp_hostile import meta, write_dir

    d = write_dir(str(tmp_path / "d"), meta([("w", (2,), [((0,), (2,), ("data", 0, 9))])]), {"data": bytes(9)})
    with pytest.raises(tk.FormatError, match=r"chunk \[0\] of 'w' is not a \w+ tensor of \[2\]"):
        tk.convert_dcp(d, str(tmp_path / "o.tk"))


# --------------------------------------------------------------------- (14) a FIFO as the path


def test_a_fifo_as_the_path_is_refused_not_waited_on(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    os.mkfifo(dcp / ".metadata")
    r = in_child(f"""
        import signal, tensorkeep as tk
        from tensorkeep import ptzip

        def hung(*_):
            raise TimeoutError("blocked")

        signal.signal(signal.SIGALRM, hung)
        calls = [lambda: tk.load({fifo!r}), lambda: tk.open({fifo!r}), lambda: tk.load({fifo!r}, lazy=True),
                 lambda: tk.convert_dcp({str(dcp)!r}, {str(tmp_path / "o.tk")!r}), lambda: ptzip.is_zip({fifo!r}),
                 lambda: ptzip.CheckedFile({fifo!r})]
        for call in calls:
            signal.alarm(30)
            try:
                call()
                print("OPENED")
            except tk.FormatError as e:
                print("REFUSED", e)
            except TimeoutError:
                print("HUNG")
            signal.alarm(0)
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 6 and all(ln.startswith("REFUSED") and "not a regular file" in ln for ln in lines), r.stdout
    for args in (["verify", fifo], ["inspect", fifo], ["diff", fifo, fifo]):
        c = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)
        assert c.returncode in (1, 2) and "not a regular file" in c.stdout + c.stderr, (args, c.stdout, c.stderr)
