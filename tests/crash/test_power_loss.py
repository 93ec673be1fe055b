"""Simulated power loss (see tests/crashsim.py for the model): every state a power cut during a
save could leave loads the old or the new version, and the new one once the save returned.
The harness is shown to catch protocols with an fsync removed.

--crash-samples sets how many subsets are sampled per scenario where enumerating them all is
too much (default 2000; bench/reliability.py runs 10,000)."""

from __future__ import annotations

import os
import random

import pytest

import crashsim
from crashsim import Log, Op
from support import ROOT, sizes

pytestmark = pytest.mark.crash


def _run(name: str, **kw) -> tuple[crashsim.Report, Log]:
    kw.setdefault("samples", sizes.crash_samples)
    rep, log = crashsim.run(name, **kw)
    print(f"\n{rep.row()}  outcomes={dict(rep.outcomes)}")
    return rep, log


def _assert_clean(rep: crashsim.Report) -> None:
    assert rep.bad == 0, f"{rep.corrupt} corrupt, {rep.lost} lost, e.g.:\n" + "\n".join(rep.examples)
    # the enumeration really reached both sides of the commit point
    assert rep.outcomes["old"] > 0 and rep.outcomes["new"] > 0, rep.outcomes


# ------------------------------------------------------------------------------ the model itself


def _states(log: Log, k: int) -> set[tuple]:
    return {s for cut, s in crashsim.crash_states(log, 100, random.Random(0)) if cut == k}


def test_model_unsynced_data_may_be_lost_torn_or_extended():
    # one file #1 "f" with durable content "old!"; an unsynced 5000-byte write over it (2 pages)
    log = Log({0: {"f": 1}}, {1: b"old!"}, [Op("write", ino=1, offset=0, data=b"a" * 5000)])
    got = {s[0][1] for s in _states(log, 1)}
    assert got == {
        b"old!",
        b"a" * 4096,
        b"old!" + bytes(4092) + b"a" * 904,
        b"old!" + bytes(4996),
        b"a" * 5000,
        b"a" * 4096 + bytes(904),
    }
    log.ops.append(Op("fsync", ino=1))
    assert {s[0][1] for s in _states(log, 2)} == {b"a" * 5000}


def test_model_directory_ops_persist_in_order_until_a_directory_fsync():
    log = Log(
        {0: {}},
        {},
        [
            Op("create", ino=1, path="a", parents=(0,)),
            Op("fsync", ino=1),
            Op("rename", path="a", dst="b", parents=(0, 0)),
            Op("fsync_dir", ino=0),
        ],
    )
    names = lambda k: {tuple(p for p, _ in s) for s in _states(log, k)}
    assert names(2) == {(), ("a",)}  # a file fsync does not persist its name
    assert names(3) == {(), ("a",), ("b",)}  # a prefix: never "b" without "a" having existed
    assert names(4) == {("b",)}


def test_recorder_follows_files_through_renames(tmp):
    from tensorkeep.storage import local as _io

    rec = crashsim.Recorder(tmp)
    with rec.patched():
        fd = _io.open_new(os.path.join(tmp, "t"))
        _io.replace(os.path.join(tmp, "t"), os.path.join(tmp, "u"))
        _io.pwrite_all(fd, memoryview(b"data"), 0)  # after the rename: still the same file
        _io.fsync(fd)
        os.close(fd)
        _io.fsync_dir(tmp)
    kinds = [op.kind for op in rec.log.ops]
    assert kinds == ["create", "rename", "write", "fsync", "fsync_dir"]
    created = rec.log.ops[0].ino
    assert rec.log.ops[2].ino == created and rec.log.ops[3].ino == created
    final = {s for k, s in crashsim.crash_states(rec.log, 10, random.Random(0)) if k == len(rec.log.ops)}
    assert final == {(("u", b"data"),)}


def test_monkeypatching_reaches_every_caller():
    """The library calls the local I/O layer as ``_io.<name>`` (so the recorder sees every operation)."""
    import pathlib
    import re

    src = pathlib.Path(ROOT) / "src" / "tensorkeep"
    local = src / "storage" / "local.py"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert not re.search(r"from\s+tensorkeep\.storage\.local\s+import", text), f  # names bound early
        if f != local:  # no file-system mutation outside the I/O layer
            assert (
                not re.search(
                    r"\bos\.(pwrite|write|fsync|replace|rename|unlink|remove|mkdir|makedirs|"
                    r"ftruncate|rmdir)\(|shutil\.rmtree\(",
                    text,
                )
                or f.name == "demo.py"
            ), f


# ------------------------------------------------------------------------------ the protocols


def test_tk_save_over_old_file():
    rep, log = _run("tk.save over the old file")
    assert [op.kind for op in log.ops][-3:] == ["fsync", "rename", "fsync_dir"]
    _assert_clean(rep)


def test_checkpoint_sync():
    rep, _ = _run("CheckpointManager.save (sync)")
    _assert_clean(rep)


def test_checkpoint_async():
    rep, log = _run("CheckpointManager.save (async_save=True, then wait())")
    assert any(op.kind == "rename" and op.dst == "step_00000002" for op in log.ops)  # the writer thread's I/O
    _assert_clean(rep)


def test_retention_cleanup():
    rep, log = _run("retention cleanup (keep_last=1)")
    renamed = [op.dst for op in log.ops if op.kind == "rename" and op.path == "step_00000001"]
    assert len(renamed) == 1 and renamed[0].startswith(".step_00000001.tk-tmp-")  # first out of sight
    removed = [op.path for op in log.ops if op.kind in ("unlink", "rmdir")]
    assert f"{renamed[0]}/manifest.json" in removed and renamed[0] in removed
    _assert_clean(rep)


def test_incremental_checkpoint_and_pack_cleanup():
    rep, log = _run("incremental checkpoint + pack cleanup (keep_last=1)")
    packs_written = [op.dst for op in log.ops if op.kind == "rename" and op.dst.startswith("packs/")]
    assert len(packs_written) == 1  # step 2 wrote one pack, without the tensor step 1's pack holds
    removed = [op.path for op in log.ops if op.kind in ("unlink", "rmdir")]
    assert any(p.startswith(".step_00000001.tk-tmp-") and p.endswith("/manifest.json") for p in removed)
    assert not any(p.startswith("packs/00000001-") for p in removed)  # step 2 still needs it
    _assert_clean(rep)


# ------------------------------------------------------------------------------ the harness catches bugs


@pytest.mark.parametrize(
    "name",
    [
        "bug variant: tk.save without the file fsync",
        "bug variant: tk.save without the directory fsync",
        "bug variant: checkpoint without the file fsyncs",
        "bug variant: checkpoint without the directory fsyncs",
    ],
)
def test_harness_catches_a_missing_fsync(name):
    rep, log = _run(name, samples=min(200, sizes.crash_samples), enum_limit=256)
    fs = "fsync_dir" if "directory" in name else "fsync"
    assert not any(op.kind == fs for op in log.ops), "the variant still fsyncs"
    assert rep.bad > 0, f"{name}: the harness found no bad state in {rep.explored}"


def test_tk_save_direct_io_path():
    rep, log = _run("tk.save over the old file, O_DIRECT path")
    if not any(op.kind == "truncate" for op in log.ops):
        pytest.skip("this file system refuses O_DIRECT: the buffered path ran instead")
    _assert_clean(rep)


@pytest.mark.parametrize("name", [n for n in crashsim.SCENARIOS if n.startswith("tk.save_sharded")])
def test_save_sharded_replaces_only_the_weights(name):
    rep, log = _run(name)
    kinds = {op.kind for op in log.ops}
    if "same names" in name:
        assert ("link" in kinds) != ("no hard links" in name), kinds  # the old index pointed at copies first
    assert not any(op.path.endswith("config.json") for op in log.ops if op.kind != "write")
    _assert_clean(rep)


@pytest.mark.parametrize("name", [n for n in crashsim.STRICT if "bug" not in n])
def test_new_directories_survive_under_strict_posix(name):
    rep, _ = _run(name, samples=50)
    assert rep.bad == 0, f"{rep.corrupt} corrupt, {rep.lost} lost, e.g.:\n" + "\n".join(rep.examples)
    assert rep.outcomes["new"] > 0 and rep.outcomes["none"] > 0, rep.outcomes


def test_harness_catches_a_new_directory_whose_parent_is_not_fsynced():
    rep, log = _run("strict POSIX bug variant: new directories' parents not fsynced", samples=50)
    assert rep.lost > 0, f"the strict model found no lost state in {rep.explored}"


def test_strict_model_lets_an_unsynced_directory_vanish_with_its_contents():
    # mkdir "d" in the root (#0), a durable file "d/f" (#2) in it, "d" fsynced but the root never
    log = Log(
        {0: {}},
        {},
        [
            Op("mkdir", ino=1, path="d", parents=(0,)),
            Op("create", ino=2, path="d/f", parents=(1,)),
            Op("write", ino=2, data=b"x"),
            Op("fsync", ino=2),
            Op("fsync_dir", ino=1),
        ],
    )
    states = {s for k, s in crashsim.strict_crash_states(log, 20, random.Random(0)) if k == 5}
    assert states == {(("d", None), ("d/f", b"x")), ()}  # the file is durable, yet unreachable without "d"
    log.ops.append(Op("fsync_dir", ino=0))
    states = {s for k, s in crashsim.strict_crash_states(log, 20, random.Random(0)) if k == 6}
    assert states == {(("d", None), ("d/f", b"x"))}
