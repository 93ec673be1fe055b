"""Distributed save/load: pure plans in one process, then real gloo ranks (tests/dist_worker.py).

The process scenarios run once each, in order, sharing a directory:
A (4 ranks) saves ck4 and fails saves in every way; B (2 ranks) loads ck4 resharded and saves
ck2; C (4 ranks, 2x2 mesh) loads ck2 resharded and saves over it. This process then checks the
files and loads them without any process group.
"""

import json
import os

import numpy as np
import pytest
import torch

import ranks
import tensorkeep as tk
from support import script
from tensorkeep.core.boxes import shard_box
from tensorkeep.distributed import manifest as distributed
from tensorkeep.distributed.load import Checkpoint
from tensorkeep.distributed.manifest import MANIFEST
from tensorkeep.distributed.plan import Chunk, Held, ReadItem, plan_read, plan_save

WORKER = script("dist_worker.py")
SCENARIO_TIMEOUT_S = 120  # each collective also times out after 30 s (init_process_group in the worker)


# ------------------------------------------------------------------------------------ pure plans


def _full(key, shape, dtype="F32"):
    return Held(key, dtype, shape, (0,) * len(shape), shape)


def test_replicated_tensors_are_written_once_and_spread_by_bytes():
    plain = [_full(k, (100,)) for k in "abcd"]  # 400 bytes each, held by all 4 ranks
    plan = plan_save([plain] * 4)
    assert all(len(cs) == 1 for cs in plan.chunks.values())
    assert sorted(plan.chunks[k][0].rank for k in "abcd") == [0, 1, 2, 3]
    assert plan == plan_save([list(reversed(plain))] * 4)  # deterministic: names and sizes only


def test_sharded_boxes_count_before_the_replicated_ones_are_placed():
    rows = [Held("w", "F32", (8, 4), (2 * r, 0), (2, 4)) for r in range(4)]  # 32 bytes per rank
    big = Held("emb", "F32", (64,), (0,), (64,))  # 256 bytes, everyone holds it
    plan = plan_save([[rows[r], big] for r in range(4)])
    assert [c.rank for c in plan.chunks["w"]] == [0, 1, 2, 3]
    assert [c.rank for c in plan.chunks["emb"]] == [0]
    # rank 0 already writes a lot: the next replicated tensor goes elsewhere
    plan = plan_save([[rows[r], big, _full("small", (4,))] for r in range(4)])
    assert plan.chunks["small"][0].rank == 1 and plan.bytes_for(0) == 32 + 256


def test_boxes_held_by_several_ranks_are_written_once():
    # a 2x2 mesh with [Replicate(), Shard(0)]: ranks (0, 0) and (1, 0) hold the same rows
    boxes = [shard_box((6, 4), (2, 2), (r // 2, r % 2), [None, 0]) for r in range(4)]
    plan = plan_save([[Held("x", "F64", (6, 4), *b)] for b in boxes])
    assert [(c.offsets, c.sizes) for c in plan.chunks["x"]] == [((0, 0), (3, 4)), ((3, 0), (3, 4))]
    assert len({c.rank for c in plan.chunks["x"]}) == 2


@pytest.mark.parametrize(
    "shape, mesh, coord, placements, box",
    [
        ((10, 6), (4,), (0,), [0], ((0, 0), (3, 6))),
        ((10, 6), (4,), (3,), [0], ((9, 0), (1, 6))),
        ((6, 4), (4,), (3,), [0], ((6, 0), (0, 4))),  # torch.chunk leaves the last rank empty
        ((5, 12), (4,), (2,), [1], ((0, 6), (5, 3))),
        ((10, 6), (2, 2), (1, 1), [0, 1], ((5, 3), (5, 3))),
        ((10, 6), (2, 2), (1, 1), [0, 0], ((8, 0), (2, 6))),  # a dimension sharded twice
        ((6,), (2, 2), (1, 0), [None, None], ((0,), (6,))),
        ((6,), (2,), None, [0], ((0,), (0,))),  # a rank outside the mesh
    ],
)
def test_shard_box(shape, mesh, coord, placements, box):
    assert shard_box(shape, mesh, coord, placements) == box


def test_ranks_that_disagree_are_named():
    a, b = _full("w", (4,)), _full("w", (5,))
    with pytest.raises(tk.SaveError, match=r"'w' is F32 \[5\] on rank 1 but F32 \[4\] on rank 0"):
        plan_save([[a], [b]])
    with pytest.raises(tk.SaveError, match="rank 1 has no tensor 'w', which rank 0 has"):
        plan_save([[a], []])
    overlap = [Held("w", "F32", (4,), (0,), (3,)), Held("w", "F32", (4,), (2,), (2,))]
    with pytest.raises(tk.SaveError, match="overlapping chunks"):
        plan_save([[overlap[0]], [overlap[1]]])
    gap = [Held("w", "F32", (4,), (0,), (1,)), Held("w", "F32", (4,), (2,), (2,))]
    with pytest.raises(tk.SaveError, match="hold 3 of its 4 elements"):
        plan_save([[gap[0]], [gap[1]]])


def test_plan_read_cuts_boxes():
    chunks = [Chunk((0, 0), (4, 6), 0), Chunk((4, 0), (4, 6), 1)]
    assert plan_read(chunks, ((3, 2), (2, 3))) == [
        ReadItem(0, (3, 2), (0, 0), (1, 3)),
        ReadItem(1, (0, 2), (1, 0), (1, 3)),
    ]
    assert plan_read(chunks, ((0, 0), (0, 6))) == []


# ------------------------------------------------------------------------------- one process


def _state():
    return {
        "w": torch.arange(24.0).reshape(6, 4),
        "n": {"step": 3, "lr": 0.5, "t": (1, "a")},
        "e": torch.zeros(0, 3),
        "s": torch.tensor(7),
    }


def test_single_process_round_trip_and_errors(tmp):
    path = os.path.join(tmp, "ck")
    tk.save_distributed(_state(), path)  # no process group: a group of one
    assert sorted(os.listdir(path)) == [MANIFEST, "rank-00000-of-00001.tk"]
    back = tk.load(path)
    assert torch.equal(back["w"], _state()["w"]) and back["n"] == _state()["n"] and back["e"].shape == (0, 3)
    target = {"w": torch.zeros(6, 4), "n": {}, "e": torch.ones(0, 3), "s": torch.tensor(0)}
    assert tk.load_distributed(target, path) is target
    assert torch.equal(target["w"], back["w"]) and target["n"] == back["n"] and target["s"] == 7
    with pytest.raises(tk.MismatchError, match=r"state\['w'\].*F32 \[6, 5\].*'w' is F32 \[6, 4\]"):
        tk.load_distributed({"w": torch.zeros(6, 5)}, path)
    with pytest.raises(tk.MismatchError, match="has no 'extra'"):
        tk.load_distributed({"extra": torch.zeros(1)}, path)
    os.makedirs(os.path.join(tmp, "mine"))
    open(os.path.join(tmp, "mine", "notes.txt"), "w").close()
    with pytest.raises(tk.SaveError, match="not a checkpoint written by save_distributed"):
        tk.save_distributed(_state(), os.path.join(tmp, "mine"))
    assert os.listdir(os.path.join(tmp, "mine")) == ["notes.txt"]
    assert sorted(os.listdir(tmp)) == ["ck", "mine"]


def test_damaged_or_replaced_shard_is_refused(tmp):
    path = os.path.join(tmp, "ck")
    tk.save_distributed(_state(), path)
    f = os.path.join(path, "rank-00000-of-00001.tk")
    data = bytearray(open(f, "rb").read())
    data[-5] ^= 1
    open(f, "wb").write(data)
    with pytest.raises(tk.ChecksumError):
        tk.load(path)
    tk.save(_state(), f)  # another file under the same name
    with pytest.raises(tk.FormatError, match="not the file this checkpoint wrote"):
        tk.load(path)


def test_a_box_reads_only_the_rows_it_needs(tmp, monkeypatch):
    import tensorkeep.file.reader as files
    from tensorkeep import knobs

    monkeypatch.setattr(knobs, "BLOCK_BYTES", 1024)  # checksum blocks: a read covers whole blocks
    w = torch.arange(256 * 64, dtype=torch.float32).reshape(256, 64)  # 64 KiB, 256 bytes a row
    path = os.path.join(tmp, "ck")
    tk.save_distributed({"w": w}, path)
    read, real = [], files._Reader.read_range
    monkeypatch.setattr(
        files._Reader, "read_range", lambda self, buf, at: (read.append(len(buf)), real(self, buf, at))[1]
    )
    ck = Checkpoint(path)
    out = torch.empty(16, 32)
    ck.read_box("w", ((64, 16), (16, 32)), out)
    ck.close()
    assert torch.equal(out, w[64:80, 16:48]) and sum(read) == 16 * 256


def test_bad_manifests_are_refused(tmp):
    path = os.path.join(tmp, "ck")
    tk.save_distributed(_state(), path)
    mpath = os.path.join(path, MANIFEST)
    good = json.load(open(mpath))

    def refused(edit, match):
        m = json.loads(json.dumps(good))
        m.pop("crc32")
        edit(m)
        with open(mpath, "wb") as f:
            f.write(distributed.sealed_json(m))  # a forged manifest, its checksum made to match
        with pytest.raises(tk.FormatError, match=match):
            tk.load(path)

    raw = open(mpath, "rb").read()
    for at in range(0, len(raw), 7):  # bit rot anywhere: damage, never a wrong load
        bad = bytearray(raw)
        bad[at] ^= 0x10
        with open(mpath, "wb") as f:
            f.write(bad)
        with pytest.raises(tk.FormatError):
            tk.load(path)

    refused(lambda m: m["tensors"]["w"]["chunks"][0].update(sizes=[5, 4]), "hold 20 of its 24 elements")
    refused(lambda m: m["tensors"]["w"]["chunks"].append(m["tensors"]["w"]["chunks"][0]), "two chunks in one file")
    refused(lambda m: m["tensors"]["w"]["chunks"][0].update(file="../x.tk"), "a file the manifest does not list")
    refused(lambda m: m["tensors"]["w"].update(dtype="F99"), "known dtype")
    refused(lambda m: m["tensors"].pop("s"), "does not refer to exactly the manifest's tensors")
    refused(lambda m: m["files"]["rank-00000-of-00001.tk"].update(size=1), "not the file this checkpoint wrote")


def test_doctests():
    import doctest

    from tensorkeep.core import boxes
    from tensorkeep.distributed import comm, load, manifest, plan, save
    from tensorkeep.layouts import dcp

    for m in (boxes, plan, manifest, comm, save, load, dcp):
        assert doctest.testmod(m).failed == 0, m.__name__


# ------------------------------------------------------------------------------- real ranks


def run_ranks(scenario, world, data, exits=None):
    return ranks.run(WORKER, scenario, world, data, exits, SCENARIO_TIMEOUT_S)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def ran_a(data):
    return run_ranks("A", 4, data, exits={3: -9})  # rank 3 SIGKILLs itself in its last save


@pytest.fixture(scope="module")
def ran_b(data, ran_a):
    return run_ranks("B", 2, data, exits={0: 17})  # rank 0 dies (os._exit) in its last save


@pytest.fixture(scope="module")
def ran_c(data, ran_b):
    return run_ranks("C", 4, data)


def _check_full(sd, version):
    """``sd`` (loaded whole, as plain tensors) is exactly version ``version`` of the worker's state."""
    from dist_worker import PLAIN, full

    for k, shape in PLAIN.items():
        assert torch.equal(sd["model"][k.split(".")[1]], full(k, shape, version))
    assert torch.equal(sd["rows"], full("rows", (10, 6), version))
    assert torch.equal(sd["cols"], full("cols", (5, 12), version, torch.float64))
    assert torch.equal(sd["optim"]["state"][1]["exp_avg"], full("exp_avg1", (5, 12), version, torch.float64))
    assert torch.equal(sd["fsdp"]["0.weight"], full("fsdp.0.weight", (12, 8), version))
    assert sd["optim"]["param_groups"] == [{"lr": 0.01 * version, "betas": (0.9, 0.999), "params": [0, 1]}]
    assert sd["step"] == 100 + version and sd["tag"] == f"run-α-{version}"
    assert np.array_equal(sd["np"], np.arange(4.0) + version)


def _hidden(data):
    return sorted(n for n in os.listdir(data) if n.startswith("."))


@pytest.mark.slow
def test_four_ranks_round_trip_and_every_failure_reaches_every_rank(ran_a):
    assert [r["ok"] for r in ran_a] == [True] * 4  # round trips and loads checked inside each rank
    for r in ran_a:
        assert "failed on rank 2 of 4" in r["enospc"] and "No space left on device" in r["enospc"]
        assert "rank 0 has no tensor 'extra', which rank 1 has" in r["mismatch"]
        assert "failed on rank 3 of 4: TypeError: cannot save obj['odd']" in r["unsupported"]
        assert "Nothing was committed" in r["enospc"] + r["mismatch"] + r["unsupported"]
    for r in ran_a[:3]:  # the survivors of rank 3's SIGKILL
        assert "lost contact with the other ranks" in r["killed"] and "Nothing was committed" in r["killed"]


@pytest.mark.slow
def test_killed_rank_leaves_the_previous_checkpoint_whole(data, ran_a):
    path = os.path.join(data, "ck4")
    _check_full(tk.load(path), 2)  # 4 -> 1, no process group
    assert _hidden(data) == []  # rank 0 removed the temporary directory of every failed save
    assert sorted(os.listdir(path)) == [MANIFEST] + [f"rank-0000{r}-of-00004.tk" for r in range(4)]


@pytest.mark.slow
def test_replicated_tensors_are_on_disk_once(data, ran_a):
    path = os.path.join(data, "ck4")
    m = json.load(open(os.path.join(path, MANIFEST)))
    writers = {
        k: [c["file"] for c in m["tensors"][k]["chunks"]] for k in ("model.embed", "model.head", "model.bias", "rep")
    }
    assert all(len(f) == 1 for f in writers.values()) and len({f[0] for f in writers.values()}) > 1
    assert [c["sizes"] for c in m["tensors"]["rows"]["chunks"]] == [[3, 6], [3, 6], [3, 6], [1, 6]]
    stored, unique = 0, 0
    for name in m["files"]:
        with tk.open(os.path.join(path, name)) as f:
            stored += sum(f.info(k).nbytes for k in f.keys())
    for t in m["tensors"].values():
        unique += int(np.prod(t["shape"])) * {"F32": 4, "F64": 8}[t["dtype"]]
    assert stored == unique


@pytest.mark.slow
def test_load_into_plain_tensors_without_process_group(data, ran_a):
    from dist_worker import full

    target = {"rows": torch.zeros(10, 6), "model": {"embed": torch.zeros(64, 32)}, "step": -1}
    tk.load_distributed(target, os.path.join(data, "ck4"))
    assert torch.equal(target["rows"], full("rows", (10, 6), 2)) and target["step"] == 102
    assert torch.equal(target["model"]["embed"], full("model.embed", (64, 32), 2))


@pytest.mark.slow
def test_eight_ranks_read_their_boxes(data, ran_a):
    """8 ranks on a 2x4 mesh with [Shard(1), Shard(0)]: each reads only its box (pure, one process)."""
    from dist_worker import full

    want = full("cols", (5, 12), 2, torch.float64)
    ck = Checkpoint(os.path.join(data, "ck4"))
    try:
        for rank in range(8):
            off, size = shard_box((5, 12), (2, 4), (rank // 4, rank % 4), [1, 0])
            out = torch.empty(size, dtype=torch.float64)
            ck.read_box("cols", (off, size), out)
            assert torch.equal(out, want[off[0] : off[0] + size[0], off[1] : off[1] + size[1]])
    finally:
        ck.close()


@pytest.mark.slow
def test_two_ranks_load_four_and_a_dead_rank_0_commits_nothing(data, ran_b):
    assert [r["ok"] for r in ran_b] == [True, True]  # 4 -> 2 resharded and a 2-rank round trip, inside the ranks
    assert "lost contact with the other ranks" in ran_b[1]["rank0_died"]
    _check_full(tk.load(os.path.join(data, "ck2")), 5)  # the save that rank 0 died in left ck2 as it was
    hidden = _hidden(data)  # rank 0 could not clean up: a hidden temporary directory, never a checkpoint
    assert len(hidden) == 1 and hidden[0].startswith(".ck2.tk-tmp-")


@pytest.mark.slow
def test_four_ranks_on_a_2d_mesh_load_two_and_save_shared_boxes_once(data, ran_c):
    assert [r["ok"] for r in ran_c] == [True] * 4
    path = os.path.join(data, "ck2")
    _check_full(tk.load(path), 7)
    assert _hidden(data) == []  # the next save removed the dead rank 0's temporary directory
    m = json.load(open(os.path.join(path, MANIFEST)))
    assert m["world_size"] == 4
    assert len(m["tensors"]["cols"]["chunks"]) == 2  # [Replicate(), Shard(0)]: 4 holders, 2 boxes
    assert len(m["tensors"]["fsdp.0.weight"]["chunks"]) == 2  # HSDP
    assert len(m["tensors"]["rows"]["chunks"]) == 4


# ------------------------------------------------------------------------------------- DCP


@pytest.fixture
def audited_convert(monkeypatch):
    """convert_dcp run under the loading audit of conftest.py: no pickle.find_class, exec, os.system."""
    import torch.utils.serialization.config  # noqa: F401 - torch.load imports it lazily: not the file's code

    from tensorkeep.file.audit import audited
    from tensorkeep.layouts import dcp as dcp_module

    return audited(dcp_module.convert_dcp)


@pytest.mark.slow
def test_convert_dcp_of_four_ranks(data, ran_a, audited_convert):
    from dist_worker import PLAIN, full

    out = os.path.join(data, "from-dcp.tk")
    audited_convert(os.path.join(data, "dcp4"), out)
    sd = tk.load(out)
    for k, shape in PLAIN.items():
        assert torch.equal(sd["model"][k.split(".")[1]], full(k, shape, 2))
    assert torch.equal(sd["rows"], full("rows", (10, 6), 2))  # 4 Shard(0) chunks
    assert torch.equal(sd["cols"], full("cols", (5, 12), 2, torch.float64))  # 4 Shard(1) chunks
    assert torch.equal(sd["fsdp"]["1.weight"], full("fsdp.1.weight", (4, 12), 2))
    # DCP flattens nested state to dotted names, int keys as strings; lists come back as lists
    assert torch.equal(sd["optim"]["state"]["1"]["exp_avg"], full("exp_avg1", (5, 12), 2, torch.float64))
    assert sd["optim"]["param_groups"] == [{"lr": 0.02, "betas": (0.9, 0.999), "params": [0, 1]}]
    assert sd["step"] == 102 and sd["tag"] == "run-α-2"


def test_convert_dcp_one_process_and_refusals(tmp, audited_convert):
    import warnings

    import torch.distributed.checkpoint as dcp

    d = os.path.join(tmp, "dcp")
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "n": {"step": 5}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, checkpoint_id=d)
        dcp.save({"a": np.arange(3)}, checkpoint_id=os.path.join(tmp, "np"))
    audited_convert(d, os.path.join(tmp, "out.tk"))
    back = tk.load(os.path.join(tmp, "out.tk"))
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["b"], state["b"]) and back["n"] == {"step": 5}
    with pytest.raises(tk.FormatError, match=r"'a' is not readable with torch.load\(weights_only=True\)"):
        audited_convert(os.path.join(tmp, "np"), os.path.join(tmp, "np.tk"))
    # a metadata file that asks for os.system('true'): refused, nothing runs (the audit would fail the test)
    evil = os.path.join(tmp, "evil")
    os.makedirs(evil)
    with open(os.path.join(evil, ".metadata"), "wb") as f:
        f.write(b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.")
    with pytest.raises(tk.FormatError, match="refers to os.system, which is not part of DCP's metadata"):
        audited_convert(evil, os.path.join(tmp, "evil.tk"))
    with open(os.path.join(evil, ".metadata"), "wb") as f:
        f.write(b"\x80\x04c__builtin__\neval\n.")  # GLOBAL: an opcode DCP never writes
    with pytest.raises(tk.FormatError, match="opcode b'c' at byte 2"):
        audited_convert(evil, os.path.join(tmp, "evil.tk"))
    assert not os.path.exists(os.path.join(tmp, "evil.tk"))
