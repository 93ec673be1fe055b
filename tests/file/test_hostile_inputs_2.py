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
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep.file import writer
from tensorkeep.inspection import describe_file, verify
from tensorkeep.layouts.sharded import ShardedOpen


def pt_with_pickle(path: str, pkl: bytes, how: int = zipfile.ZIP_STORED) -> str:
    """A torch.save zip archive (right CRCs; stored entries, or ``how``) whose data.pkl is ``pkl``."""
    base = io.BytesIO()
    torch.save({"x": 1}, base)
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(path, "w", how) as z:
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
        out += b"j" + struct.pack("<I", i) + b"\x86r" + struct.pack("<I", i + 1)  # (t, t) of the t on top
    return out + b"Ns."


# ------------------------------------------------------------ one child process for what hung or crashed

CHILD = r"""
import json, signal, sys, torch, tensorkeep as tk
from click.testing import CliRunner
from tensorkeep.file import torchfile
from tensorkeep.cli import main

P = json.loads(sys.argv[1])


def hung(*_):
    raise TimeoutError


def outcome(call):
    signal.alarm(60)  # a hang in Python code (a walk, a blocked open) ends here; one in C needs the child's timeout
    try:
        r = call()
        return f"EXIT {r.exit_code} {r.output.strip()}" if hasattr(r, "exit_code") else "LOADED"
    except TimeoutError:
        return "HUNG"
    except Exception as e:
        return f"{type(e).__name__} {e}"
    finally:
        signal.alarm(0)


def dag():
    x = {"w": torch.zeros(1)}
    for _ in range(40):
        x = {"a": x, "b": x}  # 2**40 paths to the bottom
    return x


def deep():
    x = [torch.zeros(1)]
    for _ in range(100_000):
        x = [x]
    return x


signal.signal(signal.SIGALRM, hung)
lin = lambda: torch.nn.Linear(2, 2, bias=False)
cli, out, fifo = CliRunner(), P["out"], P["fifo"]
loaders = [tk.load, tk.open, lambda p: tk.load(p, verify=False), lambda p: tk.load(p, lazy=True)]
cases = {f"pickle {name}": [lambda p=p, f=f: f(p) for f in loaders] for name, p in P["pickles"].items()}
cases["legacy"] = [lambda: tk.load(P["legacy"])]
cases["deflated"] = [lambda: tk.load(P["deflated"], verify=False), lambda: tk.load(P["deflated"])]
cases["dag.pt"] = [lambda f=f: f(P["dag"]) for f in loaders[:2]] + [
    lambda: tk.load_into(lin(), P["dag"], strict=False), lambda: cli.invoke(main, ["convert", P["dag"], out])]
cases["save"] = [lambda: tk.save({"x": dag()}, out)]
cases["state dicts"] = [lambda x=x: tk.load_into(lin(), {"weight": torch.zeros(2, 2), "x": x()}, strict=False)
                        for x in (dag, deep)]
cases["dcp"] = [lambda: tk.convert_dcp(P["dcp"], out)]
cases["fifo"] = [lambda f=f: f(fifo) for f in loaders] + [
    lambda: tk.convert_dcp(P["fifo_dcp"], out), lambda: torchfile.is_zip(fifo), lambda: torchfile.CheckedFile(fifo)] + [
    lambda a=a: cli.invoke(main, a) for a in (["verify", fifo], ["inspect", fifo], ["diff", fifo, fifo])]
for name, calls in cases.items():
    print(json.dumps({"case": name, "out": [outcome(c) for c in calls]}), flush=True)
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """Every case that hung, crashed or imported in the old code, run once in one child process:
    {case: [what each call did]}. A crash or a hang in C fails every test that uses it."""
    d = tmp_path_factory.mktemp("hostile")
    P = {
        "out": str(d / "out.tk"),
        "fifo": str(d / "fifo"),
        "dag": str(d / "dag.pt"),
        "legacy": str(d / "legacy.pt"),
        "pickles": {name: pt_with_pickle(str(d / f"{name}.pt"), pkl) for name, pkl in PICKLES.items()},
    }
    P["deflated"] = pt_with_pickle(str(d / "deflated.pt"), DEEP_TUPLE_KEY, zipfile.ZIP_DEFLATED)
    os.mkfifo(P["fifo"])
    os.makedirs(d / "fifo_dcp")
    os.mkfifo(d / "fifo_dcp" / ".metadata")
    P["fifo_dcp"] = str(d / "fifo_dcp")
    torch.save({"weight": torch.zeros(2, 2), "x": dag()}, P["dag"])
    assert os.path.getsize(P["dag"]) < 10_000
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    with open(P["legacy"], "wb") as f:
        f.write(head + DEEP_TUPLE_KEY)  # a legacy (non-zip) torch file: four pickles in a row
    blob = io.BytesIO()
    torch.save(dag(), blob)
    from dcp_files import meta, write_dir

    P["dcp"] = write_dir(
        str(d / "dcp"), meta(values=[("v", ("data", 0, len(blob.getvalue())))]), {"data": blob.getvalue()}
    )
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(P)], capture_output=True, text=True, timeout=600)
    out = {j["case"]: j["out"] for j in map(json.loads, r.stdout.splitlines())}
    assert r.returncode == 0 and len(out) == len(PICKLES) + 7, (r.returncode, r.stderr[-3000:])  # -11: a segfault
    return P, out


# ------------------------------------------------------------------ (7) .pt pickles: DAGs and depth


@pytest.mark.slow
def test_a_shared_dag_pt_is_refused_not_walked_forever(child):
    P, out = child
    *lib, cli = out["dag.pt"]
    assert all(o.startswith(f"LimitError {P['dag']}: ") and "MAX_JSON_VALUES" in o for o in lib), lib
    assert cli.startswith("EXIT 2 error: ") and "MAX_JSON_VALUES" in cli and len(cli.splitlines()) == 1, cli
    assert not os.path.exists(P["out"])


def test_a_pt_nested_200k_deep_is_a_format_error_everywhere(tmp_path):
    p = pt_with_pickle(str(tmp_path / "deep.pt"), DEEP_LIST)
    for call in (
        lambda: tk.load(p),
        lambda: tk.open(p),
        lambda: tk.load_into(torch.nn.Linear(2, 2, bias=False), p, strict=False),
    ):
        with pytest.raises(tk.FormatError, match=f"^{p}: .*nested more than {knobs.MAX_DEPTH} levels"):
            call()
    assert not verify(p).ok


DEEP_TUPLE = b")" + b"\x85" * N
PICKLES = {  # each crashed (hash() of a deep tuple), hung, imported a module or allocated 2 GB in torch.load
    "deep-tuple-key": DEEP_TUPLE_KEY,
    "hash-bomb": hash_bomb(),
    "float-key": b"\x80\x02}G?\xf0\0\0\0\0\0\0Ns.",
    "huge-int-key": b"\x80\x02}\x8a\x09" + (1 << 64).to_bytes(9, "little") + b"Ns.",
    "set-of-tuples": b"\x80\x02c__builtin__\nset\n)\x85\x85R.",
    "storage-key": b"\x80\x02(X\x07\0\0\0storagectorch\nFloatStorage\n" + DEEP_TUPLE + b"X\x03\0\0\0cpuK\x01tQ.",
    "layout-name": b"\x80\x02ctorch.serialization\n_get_layout\n" + DEEP_TUPLE + b"\x85R.",
    "ordered-dict-state": b"\x80\x02ccollections\nOrderedDict\n)R" + DEEP_TUPLE + b"N\x86\x85b.",
    "codec-import": b"\x80\x02c_codecs\nencode\nX\x01\0\0\0xX\x04\0\0\0idna\x86R.",
    "bytearray-size": b"\x80\x02c__builtin__\nbytearray\nJ\0\0\0\x7f\x85R.",
    "tensor-constructor": b"\x80\x02ctorch\nFloatTensor\nJ\0\0\0\x7f\x85R.",  # 8 GB, from 40 bytes
}


@pytest.mark.parametrize("name", list(PICKLES))
@pytest.mark.slow
def test_pickles_torch_would_crash_hang_import_or_allocate_on_are_refused_first(child, name):
    P, out = child
    p = P["pickles"][name]
    assert all(o.startswith(f"FormatError {p}: ") for o in out[f"pickle {name}"]), out[f"pickle {name}"]


@pytest.mark.slow
def test_legacy_and_compressed_torch_files_are_scanned_too(child, tmp_path):
    P, out = child
    assert out["legacy"][0].startswith(f"FormatError {P['legacy']}: the pickle has a dict key"), out["legacy"]
    unverified, verified = out["deflated"]  # verify=False still reads a compressed file: its pickle is inflated
    assert unverified.startswith(f"FormatError {P['deflated']}: archive/data.pkl: the pickle has a dict key"), (
        unverified
    )
    assert verified.startswith(f"FormatError {P['deflated']}: zip entry 'archive/data.pkl' is compressed"), verified
    p = str(tmp_path / "legacy.pt")
    torch.save({"w": torch.ones(2), "b": b"x"}, p, _use_new_zipfile_serialization=False)
    assert torch.equal(tk.load(p)["w"], torch.ones(2))


def test_ordinary_pt_files_still_load(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    obj = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "tags": {"a", "b"},
        "b": b"xy",
        "ba": bytearray(b"z"),
        "size": torch.Size([2, 3]),
        "dev": torch.device("cpu"),
        "dt": torch.half,
        "c": 1 + 2j,
        "p": torch.nn.Parameter(torch.ones(2)),
        "n": None,
        "f": 0.5,
        "big": 1 << 70,
        "t": (1, "a"),
        "shared": [net.state_dict()["0.weight"]] * 3,
        "keys": {-1: 1, -2: 2, 1 << 40: 3},
    }
    p = str(tmp_path / "ok.pt")
    torch.save(obj, p)
    back = tk.load(p)
    assert back["tags"] == {"a", "b"} and back["keys"] == obj["keys"] and back["big"] == 1 << 70
    assert torch.equal(back["model"]["0.weight"], net.state_dict()["0.weight"])
    assert back["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    rep = tk.load_into(net, p, rename={"model.": ""}, strict=False)
    assert "0.weight" in rep.loaded


@pytest.mark.slow
def test_save_and_load_into_refuse_a_dag_or_a_deep_state_dict(child):
    P, out = child
    assert out["save"][0].startswith("ValueError cannot save: holds more than") and "MAX_JSON_VALUES" in out["save"][0]
    dag_sd, deep_sd = out["state dicts"]
    assert dag_sd.startswith("LimitError <state dict>: ") and deep_sd.startswith("FormatError <state dict>: "), out


@pytest.mark.slow
def test_a_dcp_value_that_is_a_dag_is_refused(child):
    P, out = child
    assert out["dcp"][0].startswith(f"LimitError {P['dcp']}: 'v': holds more than"), out["dcp"]


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


@pytest.mark.parametrize(
    "node, what",
    [
        ({"S": [10**30]}, "torch.Size"),
        ({"S": [-1]}, "torch.Size"),
        ({"dev": 10**30}, "device"),
        ({"dev": "cuda:99999999999999999999"}, "device"),
        ({"dev": "x" * 10_000}, "device"),
    ],
)
def test_a_structure_record_with_out_of_range_values_is_a_format_error(tmp_path, monkeypatch, node, what):
    p = str(tmp_path / "s.tk")
    monkeypatch.setattr(writer, "flatten", lambda obj: ({"d": [["s", node]]}, []))
    tk.save({}, p)
    monkeypatch.undo()
    with pytest.raises(tk.FormatError, match=f"^{p}: stored structure is invalid: .*{what}"):
        tk.load(p)
    with tk.open(p) as f:  # reading single tensors needs only the names the structure refers to
        assert f.keys() == []
        with pytest.raises(tk.FormatError, match="stored structure is invalid"):
            f.load()  # the whole object needs every node: only then is the rest checked
    fds = len(os.listdir("/proc/self/fd"))
    res = verify(p)
    assert not res.ok and "stored structure is invalid" in str(res.problems)
    assert len(os.listdir("/proc/self/fd")) == fds  # the file was closed
    with pytest.raises(tk.FormatError, match="stored structure is invalid"):
        describe_file(p)  # `tensorkeep inspect`: a FormatError, not a KeyError from walking the tree


def test_sizes_and_devices_still_round_trip(tmp_path):
    obj = {
        "s": torch.Size([0, 2**62]),
        "d": torch.device("cuda", 3),
        "m": torch.device("meta"),
        "c": torch.device("cpu"),
    }
    tk.save(obj, str(tmp_path / "s.tk"))
    assert tk.load(str(tmp_path / "s.tk")) == obj
    with pytest.raises(ValueError, match="torch.Size"):
        tk.save({"s": torch.Size([-1])}, str(tmp_path / "neg.tk"))  # it would not load back


def test_a_dcp_raw_chunk_of_odd_length_is_a_format_error(tmp_path):
    from dcp_files import meta, write_dir

    d = write_dir(str(tmp_path / "d"), meta([("w", (2,), [((0,), (2,), ("data", 0, 9))])]), {"data": bytes(9)})
    with pytest.raises(tk.FormatError, match=r"chunk \[0\] of 'w' is not a \w+ tensor of \[2\]"):
        tk.convert_dcp(d, str(tmp_path / "o.tk"))


# --------------------------------------------------------------------- (14) a FIFO as the path


@pytest.mark.slow
def test_a_fifo_as_the_path_is_refused_not_waited_on(child):
    P, out = child
    *lib, verify_, inspect_, diff_ = out["fifo"]
    assert len(lib) == 7 and all(o.startswith("FormatError ") and "not a regular file" in o for o in lib), lib
    assert verify_.startswith("EXIT 1") and inspect_.startswith("EXIT 2") and diff_.startswith("EXIT 2"), out["fifo"]
    assert all("not a regular file" in o for o in (verify_, inspect_, diff_)), out["fifo"]
