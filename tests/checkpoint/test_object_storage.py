"""Files and checkpoints on object storage, against a real S3 server (moto) on 127.0.0.1 and memory://.

The S3 server runs in a subprocess behind a TCP proxy (tests/s3server.py): cutting the proxy is
the server vanishing mid-upload, with its data intact for when it comes back. Every socket this
module opens is checked to go to 127.0.0.1.
"""

from __future__ import annotations

import sys
import uuid
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep.storage import backend, objects

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")
import fsspec  # noqa: E402

import support  # noqa: E402
from s3server import ENV, S3Server  # noqa: E402

BUCKET = "tk-tests"


@pytest.fixture(scope="module", autouse=True)
def loopback_only() -> Iterator[None]:
    """Every socket these tests open connects to 127.0.0.1, or the test fails."""
    with support.loopback_only():
        yield


@pytest.fixture(scope="module")
def server(loopback_only):
    srv = S3Server()
    mp = pytest.MonkeyPatch()
    for k, v in ENV.items():
        mp.setenv(k, v)
    mp.setitem(fsspec.config.conf, "s3", srv.fsspec_config())
    mp.setattr(s3fs.S3FileSystem, "retries", 2)
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").call_s3("create_bucket", Bucket=BUCKET)
    yield srv
    s3fs.S3FileSystem.clear_instance_cache()
    mp.undo()
    srv.close()


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(objects, "PART_BYTES", 5 << 20)  # S3's smallest part: multipart from 5 MiB on
    monkeypatch.setattr(objects, "THREADS", 4)


@pytest.fixture(params=["s3", "memory"])
def base(request):
    """A fresh URL prefix on S3 (the moto server) or in fsspec's memory store."""
    if request.param == "s3":
        request.getfixturevalue("server")
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    return f"memory://tk-tests/{uuid.uuid4().hex[:8]}"


def _state(seed: int = 0, rows: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(rows, 256, generator=g),
        "b": torch.randn(256, generator=g).to(torch.bfloat16),
        "i": torch.arange(7),
        "arr": np.arange(5, dtype=np.float64),
        "step": seed,
        "name": "x",
    }


def _equal(a: dict, b: dict) -> bool:
    return all(
        torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) if not isinstance(a[k], (int, str)) else a[k] == b[k]
        for k in a
    )


# ----------------------------------------------------------------------------- single files


def test_save_load_open_roundtrip(base):
    obj = _state(1)
    url = f"{base}/model.tk"
    tk.save(obj, url, metadata={"who": "test"})
    back = tk.load(url)
    assert type(back["arr"]) is np.ndarray and _equal(obj, back)
    with tk.open(url) as f:
        assert set(f.keys()) == {"w", "b", "i", "arr"} and f.metadata == {"who": "test"}
        assert torch.equal(f.get("b"), obj["b"])
        assert torch.equal(f.get("w", lazy=True), obj["w"])  # an object cannot be mapped: read
        assert torch.equal(f.get_slice("w")[10:13], obj["w"][10:13])
        assert torch.equal(f.get_slice("w")[5], obj["w"][5])
    net, clone = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    tk.save(net.state_dict(), f"{base}/net.tk")
    assert tk.load_into(clone, f"{base}/net.tk").ok
    assert torch.equal(clone.weight, net.weight) and torch.equal(clone.bias, net.bias)


def test_open_reads_only_the_ranges_it_needs(server, monkeypatch):
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 64 << 10)  # checksum blocks of 64 KiB: a slice reads little
    big = torch.randn(4096, 1024)  # 16 MiB
    url = f"s3://{BUCKET}/ranges/big.tk"
    tk.save({"big": big, "small": torch.ones(3)}, url)
    before = server.proxy.received
    with tk.open(url) as f:
        assert torch.equal(f.get_slice("big")[100:110], big[100:110])
        assert torch.equal(f.get("small"), torch.ones(3))
    fetched = server.proxy.received - before
    assert fetched < 400_000, f"reading 10 rows (40 KB) and 12 bytes fetched {fetched} bytes of a 16 MiB object"


def test_large_object_is_a_parallel_multipart_upload(server, small_parts):
    x = torch.randn(6 << 20)  # 24 MiB: 5 parts of 5 MiB
    url = f"s3://{BUCKET}/multipart/x.tk"
    tk.save(x, url)
    etag = fsspec.filesystem("s3").info(url)["ETag"]
    assert etag.strip('"').endswith("-5"), etag  # S3 names a multipart object's ETag by its part count
    assert torch.equal(tk.load(url), x)


def test_a_torch_file_on_object_storage_loads_weights_only(base, tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    fs, path = fsspec.core.url_to_fs(f"{base}/w.pt")
    fs.pipe_file(path, (tmp_path / "w.pt").read_bytes())
    assert torch.equal(tk.load(f"{base}/w.pt")["w"], torch.ones(2))


def test_missing_object_and_missing_extra(server, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nope.tk"):
        tk.load(f"s3://{BUCKET}/nope.tk")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if tensorkeep[s3] was not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(ImportError, match=r"tensorkeep\[s3\]"):
        tk.save(torch.ones(1), "s3://somewhere/x.tk")


# ----------------------------------------------------------------------------- checkpoints


def _train_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    return net, opt, {"model": net, "optimizer": opt, "epoch": 0}


def _train(net, opt, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()


def _snapshot(net, opt) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_manager_save_list_restore_retention(base):
    net, opt, state = _train_state()
    run = f"{base}/run"
    saved = {}
    with tk.CheckpointManager(run, keep_last=2, keep_best=("loss", "min")) as mgr:
        assert mgr.restore(state) is None
        for step in range(1, 6):
            _train(net, opt)
            state["epoch"] = step
            mgr.save(step, state, metrics={"loss": 0.1 if step == 2 else 1.0 / step})
            saved[step] = _snapshot(net, opt)
        assert mgr.steps() == [2, 4, 5] and mgr.best_step() == 2 and mgr.latest_step() == 5
        assert mgr.path(5) == f"{run}/step_00000005"
    infos = tk.list_checkpoints(run, verify=True)
    assert [(c.step, c.status) for c in infos] == [(2, "ok"), (4, "ok"), (5, "ok")]
    assert infos[0].metrics == {"loss": 0.1} and infos[0].bytes_held > 0
    listing = backend(run).list("")
    assert {k.split("/")[0] for k in listing} == {
        ".tensorkeep.owner",
        "step_00000002",
        "step_00000004",
        "step_00000005",
    }

    net2, opt2, state2 = _train_state()
    with tk.CheckpointManager(run, keep_last=2, keep_best=("loss", "min")) as mgr:
        assert mgr.steps() == [2, 4, 5]
        assert mgr.restore(state2) == 5 and state2["epoch"] == 5
        assert all(torch.equal(v, saved[5][k]) for k, v in net2.state_dict().items())
        assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
        assert mgr.restore(state2, step=2) == 2 and state2["epoch"] == 2
        assert all(torch.equal(v, saved[2][k]) for k, v in net2.state_dict().items())
        with pytest.raises(tk.CheckpointNotFoundError, match="Steps that exist: \\[2, 4, 5\\]"):
            mgr.restore(state2, step=3)
        assert mgr.prune([tk.LatestN(1)]) == [2, 4]
        assert mgr.steps() == [5]
    assert [c.step for c in tk.list_checkpoints(run)] == [5]


def test_resaving_a_step_replaces_it_whole(base):
    net, opt, state = _train_state()
    run = f"{base}/resave"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, state)
        _train(net, opt)
        after = _snapshot(net, opt)
        mgr.save(1, state)  # the old objects stay until the new manifest is in place
        names = {k.split("/")[-1] for k in backend(run).list("step_00000001/")}
        assert len(names) == 5  # manifest + the 4 objects it lists, none of the first save's
    net2, opt2, state2 = _train_state()
    with tk.CheckpointManager(run) as mgr:
        assert mgr.restore(state2) == 1
    assert all(torch.equal(v, after[k]) for k, v in net2.state_dict().items())


@pytest.mark.parametrize("one_file", [False, True], ids=["files", "one-file"])
def test_async_save(base, one_file):
    net, opt, state = _train_state()
    run = f"{base}/async-{one_file}"
    with tk.CheckpointManager(run, async_save=True, keep_last=2, one_file=one_file) as mgr:
        for step in range(1, 4):
            _train(net, opt)
            mgr.save(step, state)
        mgr.wait()
        assert mgr.steps() == [2, 3]
        names = backend(run).list(mgr.path(3).rsplit("/", 1)[-1] + "/")
    stems = sorted(n.split("/")[-1].split(".")[0] for n in names)  # object names carry the save's token
    assert stems == (["manifest", "state"] if one_file else ["manifest", "model", "optimizer", "rng", "values"])
    last = _snapshot(net, opt)
    net2, opt2, state2 = _train_state()
    with tk.CheckpointManager(run) as mgr:
        assert mgr.restore(state2) == 3
    assert all(torch.equal(v, last[k]) for k, v in net2.state_dict().items())


def test_incremental_checkpoints(base):
    net, opt, state = _train_state()
    run = f"{base}/inc"
    with tk.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        for step in range(1, 4):
            if step > 1:
                _train(net, opt)
            mgr.save(step, {"model": net, "frozen": {"emb": torch.ones(1000, 64)}})
        assert mgr.steps() == [2, 3]
    infos = tk.list_checkpoints(run, verify=True)
    assert [c.status for c in infos] == ["ok", "ok"] and infos[1].bytes_written < infos[1].bytes_held
    packs = backend(run).list("packs/")
    assert len(packs) == 3  # the first save's pack still holds the frozen tensor both kept steps need
    net2, _, _ = _train_state()
    state2 = {"model": net2, "frozen": None}
    with tk.CheckpointManager(run, incremental=True) as mgr:
        assert mgr.restore(state2) == 3
    assert torch.equal(state2["frozen"]["emb"], torch.ones(1000, 64))
    assert all(torch.equal(a, b) for a, b in zip(net2.state_dict().values(), net.state_dict().values()))


def test_prefix_without_manifest_is_not_a_checkpoint_and_is_cleaned(base):
    net, opt, state = _train_state()
    run = f"{base}/leftover"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, state)
    tk.save(torch.ones(3), f"{run}/step_00000002/model.0badf00d.tk")  # an upload that never got its manifest
    store = backend(run)
    tk.save(torch.ones(3), f"{run}/step_00000001/model.deadbeef.tk")  # an orphan beside a committed one
    assert [(c.step, c.status) for c in tk.list_checkpoints(run)] == [(1, "ok"), (2, "uncommitted")]
    with pytest.warns(UserWarning, match="step_00000002"):
        mgr = tk.CheckpointManager(run)
    assert mgr.steps() == [1]
    assert not store.list("step_00000002/") and "step_00000001/model.deadbeef.tk" not in store.list("")
    mgr.close()


def test_the_newest_manager_owns_the_run(base):
    net, opt, state = _train_state()
    run = f"{base}/owner"
    first = tk.CheckpointManager(run)
    first.save(1, state)
    second = tk.CheckpointManager(run)
    with pytest.raises(tk.LockedError, match="another CheckpointManager opened this run after this one"):
        first.save(2, state)
    second.save(2, state)
    assert second.steps() == [1, 2]
    first.close()
    second.close()


# ----------------------------------------------------------------------------- the server goes away


def test_server_stopped_mid_upload_commits_nothing(server, small_parts):
    net, opt, state = _train_state()
    run = f"s3://{BUCKET}/outage"
    with tk.CheckpointManager(run, keep_last=3) as mgr:
        mgr.save(1, state)
        committed = _snapshot(net, opt)
        _train(net, opt, 3)
        big = dict(state, big=torch.randn(6 << 20))  # a 24 MiB value: a 5-part upload
        server.proxy.cut_after(8 << 20)  # the server vanishes once 8 MiB of it went out
        try:
            with pytest.raises(tk.SaveError) as e:
                mgr.save(2, big)
        finally:
            server.proxy.restore()
        assert server.proxy.cut_done.is_set()
        assert run in str(e.value) and "step 2 was not saved" in str(e.value)
        assert mgr.steps() == [1]
        assert [c.step for c in tk.list_checkpoints(run) if c.ok] == [1]

    net2, opt2, state2 = _train_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed upload's leftovers are removed
        mgr = tk.CheckpointManager(run)
    with mgr:
        assert mgr.steps() == [1]
        assert mgr.restore(state2) == 1
        assert all(torch.equal(v, committed[k]) for k, v in net2.state_dict().items())
        store = backend(run)
        assert not store.list("step_00000002/")
        bucket_uploads = fsspec.filesystem("s3").call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="outage/")
        assert not bucket_uploads.get("Uploads")
        mgr.save(2, big)  # the same save works once the server is back
        assert mgr.steps() == [1, 2]


def test_server_unreachable_async_save_and_restore(server):
    net, opt, state = _train_state()
    run = f"s3://{BUCKET}/outage-async"
    with tk.CheckpointManager(run, async_save=True) as mgr:
        mgr.save(1, state)
        mgr.wait()
        server.proxy.cut()
        try:
            mgr.save(2, state)
            with pytest.raises(tk.SaveError, match=run):
                mgr.wait()
            net2, opt2, state2 = _train_state()
            with pytest.raises(OSError, match=run):  # unreachable is not "damaged": nothing is skipped
                mgr.restore(state2)
        finally:
            server.proxy.restore()
        assert mgr.restore(state2) == 1
