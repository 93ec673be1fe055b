"""torch DCP with tensorkeep's Writer/Reader (tensorkeep.integrations.dcp): what reaches the disk, round
trips in this process, 2 gloo ranks (tests/trainers/dcp_worker.py), kill -9 mid-save and resume, damage.
"""

import gc
import os

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import ranks
import tensorkeep as tk
from tensorkeep.distributed.manifest import read_manifest
from tensorkeep.integrations import dcp as tk_dcp
from tensorkeep.storage import local as _io
from tensorkeep.verification import verify

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dcp_worker.py")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model with tied weights and an Adam that took one step (so its state exists, as a target for loading)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # two names, one memory
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * seed)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def state_of(seed: int) -> dict:
    model, opt = trained(seed)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),  # int keys, step tensors, betas tuple, None and bool flags, params list
        "step": 10 * seed,
        "tag": f"run-α-{seed}",
        "np_rng": ("MT19937", np.arange(4, dtype=np.uint32) + seed, seed, 0, 0.5),  # a tuple holding an array
        "schedule": {"milestones": [1, 2, seed], "gamma": 0.1 * seed},
        "best": np.float32(0.25 * seed),  # a NumPy scalar
    }


def assert_same(a: object, b: object, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def failure(e: CheckpointException) -> BaseException:
    """The exception the (only) failing rank raised, which DCP wraps."""
    (exc, _trace), *_ = e.failures.values()
    return exc


def temps(d: str) -> list[str]:
    return [n for n in os.listdir(d) if _io.temp_of(n)]


def test_round_trip_in_one_process_writes_tensorkeep_files_and_json(tmp):
    path = os.path.join(tmp, "checkpoint-10")
    saved = state_of(1)
    dcp.save(saved, checkpoint_id=path, storage_writer=tk_dcp.Writer())
    assert sorted(os.listdir(path)) == ["distributed.json", "rank-00000-of-00001.tk"] and not temps(tmp)
    manifest, stored = read_manifest(path)  # JSON sealed by a CRC-32, the chunk layout checked
    assert manifest["dcp"]["paths"]["optim.state.0.exp_avg"] == ["optim", "state", "0", "exp_avg"]
    assert manifest["dcp"]["paths"]["optim.param_groups.0.lr"] == ["optim", "param_groups", 0, "lr"]
    assert "model.0.weight" in stored and "model.1.weight" in stored  # tied: stored under both names
    with tk.open(os.path.join(path, "rank-00000-of-00001.tk")) as f:  # a tensorkeep file, every block checksummed
        assert set(f.keys()) == set(stored)

    target = state_of(2)  # same structure, other values
    dcp.load(target, checkpoint_id=path, storage_reader=tk_dcp.Reader())
    assert_same(target, saved)

    plain = tk.load(path)  # also a tensorkeep distributed directory: nested again, DCP's str keys
    assert list(plain["optim"]["state"]) == ["0", "1", "2"] and plain["optim"]["param_groups"][0]["betas"] == (
        0.9,
        0.999,
    )
    assert_same(plain["np_rng"], saved["np_rng"])
    assert torch.equal(plain["model"]["1.weight"], saved["model"]["1.weight"])
    assert verify(path).ok, verify(path).problems


def test_save_over_a_checkpoint_and_refusals(tmp):
    path = os.path.join(tmp, "ck")
    dcp.save(state_of(1), checkpoint_id=path, storage_writer=tk_dcp.Writer())
    dcp.save(state_of(3), checkpoint_id=path, storage_writer=tk_dcp.Writer())  # replaces it whole
    target = state_of(2)
    dcp.load(target, checkpoint_id=path, storage_reader=tk_dcp.Reader())
    assert_same(target, state_of(3))
    assert sorted(os.listdir(path)) == ["distributed.json", "rank-00000-of-00001.tk"] and not temps(tmp)

    with pytest.raises(ValueError, match="use_collectives=True"):  # rank-local commits cannot be all or nothing
        dcp.save(state_of(1), checkpoint_id=path, storage_writer=tk_dcp.Writer(), use_collectives=False)

    with pytest.raises(tk.FormatError, match="tk.load_distributed"):  # not written through DCP
        tk.save_distributed({"w": torch.ones(2)}, os.path.join(tmp, "tkdist"))
        dcp.load({"w": torch.zeros(2)}, checkpoint_id=os.path.join(tmp, "tkdist"), storage_reader=tk_dcp.Reader())


def test_async_save_and_a_value_it_cannot_store(tmp):
    path = os.path.join(tmp, "ck")
    fut = dcp.async_save(state_of(1), checkpoint_id=path, storage_writer=tk_dcp.Writer())
    fut.result()
    target = state_of(2)
    dcp.load(target, checkpoint_id=path, storage_reader=tk_dcp.Reader())
    assert_same(target, state_of(1))

    bad = dict(state_of(4), tags={"a", "b"})  # a set: no JSON, no pickle
    fut = dcp.async_save(bad, checkpoint_id=path, storage_writer=tk_dcp.Writer())
    with pytest.raises(CheckpointException) as e:  # the error of the background save, at result()
        fut.result()
    assert isinstance(failure(e.value), TypeError) and "'tags'" in str(failure(e.value))
    del fut, e
    gc.collect()  # the writer's temporary directory goes with it
    assert not temps(tmp)
    dcp.load(target, checkpoint_id=path, storage_reader=tk_dcp.Reader())  # the previous one, intact
    assert_same(target, state_of(1))


def test_failure_while_committing_publishes_nothing(tmp, monkeypatch):
    path = os.path.join(tmp, "ck")
    dcp.save(state_of(1), checkpoint_id=path, storage_writer=tk_dcp.Writer())

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_io, "replace_dir", broken)
    with pytest.raises(CheckpointException) as e:
        dcp.save(state_of(3), checkpoint_id=path, storage_writer=tk_dcp.Writer())
    assert isinstance(failure(e.value), OSError)
    monkeypatch.undo()
    assert not temps(tmp)
    target = state_of(2)
    dcp.load(target, checkpoint_id=path, storage_reader=tk_dcp.Reader())
    assert_same(target, state_of(1))


def test_damaged_rank_file_raises_checksum_error(tmp):
    path = os.path.join(tmp, "ck")
    dcp.save(state_of(1), checkpoint_id=path, storage_writer=tk_dcp.Writer())
    f = os.path.join(path, "rank-00000-of-00001.tk")
    with tk.open(f) as opened:
        assert opened.keys()
    with open(f, "r+b") as fh:  # flip a bit of the last tensor's data
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)[0] ^ 0x40
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte]))
    with pytest.raises(CheckpointException) as e:
        dcp.load(state_of(2), checkpoint_id=path, storage_reader=tk_dcp.Reader())
    err = failure(e.value)
    assert isinstance(err, tk.ChecksumError) and "rank-00000-of-00001.tk" in str(err), err
    with pytest.raises(tk.ChecksumError):
        tk.load(path)


def test_stock_dcp_directory_is_refused_with_the_fix(tmp):
    path = os.path.join(tmp, "stock")
    dcp.save({"w": torch.arange(4.0), "step": 3}, checkpoint_id=path)  # torch's FileSystemWriter: a pickle
    with pytest.raises(tk.FormatError, match="convert_dcp") as e:  # raised by dcp.load itself, not wrapped
        dcp.load({"w": torch.zeros(4), "step": 0}, checkpoint_id=path, storage_reader=tk_dcp.Reader())
    assert "pickle" in str(e.value)
    tk.convert_dcp(path, os.path.join(tmp, "converted.tk"))  # the fix the message gives
    assert torch.equal(tk.load(os.path.join(tmp, "converted.tk"))["w"], torch.arange(4.0))


def test_two_gloo_ranks_save_load_reshard_async(tmp):
    from dcp_worker import model_and_optimizer, rows  # pytest puts tests/trainers on sys.path (no __init__.py)

    model, _ = model_and_optimizer(seed=1)
    dcp.save({"rows": rows(1), "model": model.state_dict(), "step": 1}, checkpoint_id=os.path.join(tmp, "ck1"),
             storage_writer=tk_dcp.Writer())  # fmt: skip
    out = ranks.run(WORKER, "ranks", 2, tmp)
    for r in out:  # 1 process -> 2 ranks; 2 ranks -> 2 ranks resharded (Shard(0) -> Shard(1))
        assert r["ck1_rows"] and r["ck1_local_rows"] == 3 and r["ck1_model"] and r["ck1_step"] == 1
        assert (
            r["ck2_rows"]
            and r["ck2_one_row"]
            and r["ck2_model"]
            and r["ck2_momentum"]
            and r["ck2_values"] == [2, "two ranks", 0.9]
        )
    for name in ("ck2", "ck2async"):  # 2 ranks -> this one process, into plain tensors
        path = os.path.join(tmp, name)
        assert sorted(os.listdir(path)) == ["distributed.json", "rank-00000-of-00002.tk", "rank-00001-of-00002.tk"]
        model2, _ = model_and_optimizer(seed=2)
        target = {"rows": torch.zeros(6, 4), "one_row": torch.zeros(1, 4), "model": nn.Linear(4, 3).state_dict()}
        target["step"] = 0
        dcp.load(target, checkpoint_id=path, storage_reader=tk_dcp.Reader())
        assert torch.equal(target["rows"], rows(2)) and torch.equal(target["one_row"], rows(2)[:1])
        assert target["step"] == 2
        assert_same(target["model"], model2.state_dict())
        assert torch.equal(tk.load(path)["rows"], rows(2)) and verify(path).ok
    assert not temps(tmp)


def test_fsdp2_sharded_model_saves_resumes_bit_identically_and_reshards_to_one_process(tmp):
    """FSDP2 (``fully_shard``) on 2 gloo ranks: the sharded model and optimizer state go through
    tensorkeep's Writer; a fresh sharded model resumes from it and continues bit-identically; one
    process reads the same checkpoint into a plain model and Adam (2 shards -> 1)."""
    from dcp_worker import fsdp_model  # pytest puts tests/trainers on sys.path (no __init__.py)
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = ranks.run(WORKER, "fsdp", 2, tmp)
    assert out[0]["resumed_same"]
    for r in out:
        assert r["sharded"] and r["step"] == 3, r
    path = os.path.join(tmp, "fsdp")
    assert sorted(os.listdir(path)) == ["distributed.json", "rank-00000-of-00002.tk", "rank-00001-of-00002.tk"]
    assert verify(path).ok
    model, opt = fsdp_model(None)
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd, "step": 0}
    dcp.load(state, checkpoint_id=path, storage_reader=tk_dcp.Reader())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = tk.load(os.path.join(tmp, "fsdp_full.tk"))
    assert_same(dict(model.state_dict()), dict(full["model"]))
    _, opt_sd = get_state_dict(model, opt)
    assert_same(opt_sd["state"], full["optim"]["state"])


def test_kill_9_mid_save_then_resume_is_bit_identical(tmp):
    ref, run = os.path.join(tmp, "ref"), os.path.join(tmp, "run")
    os.makedirs(ref)
    os.makedirs(run)
    ckpts = os.path.join(run, "ckpts")
    assert ranks.run(WORKER, "train", 1, ref)[0]["resumed_from"] == 0  # uninterrupted: 16 steps

    ranks.run(WORKER, "kill_write", 1, run, exits={0: -9})  # killed writing checkpoint-8's rank file
    assert sorted(n for n in os.listdir(ckpts) if not _io.temp_of(n)) == ["checkpoint-4"] and len(temps(ckpts)) == 1
    partial = os.path.join(ckpts, temps(ckpts)[0])
    assert os.listdir(partial) == ["rank-00000-of-00001.tk"]
    assert os.path.getsize(os.path.join(partial, "rank-00000-of-00001.tk")) == 100  # the kill landed mid-write
    tk.load(os.path.join(ckpts, "checkpoint-4"))  # the previous one, intact

    out = ranks.run(WORKER, "kill_commit", 1, run, exits={0: -9})  # resumed, then killed at checkpoint-12's rename
    assert out[0]["resumed_from"] == 4
    assert sorted(n for n in os.listdir(ckpts) if not _io.temp_of(n)) == ["checkpoint-4", "checkpoint-8"]
    (left,) = temps(ckpts)  # checkpoint-8's stale one was removed by the save that replaced it
    assert left.startswith(".checkpoint-12.") and "distributed.json" in os.listdir(os.path.join(ckpts, left))

    assert ranks.run(WORKER, "train", 1, run)[0]["resumed_from"] == 8
    assert sorted(os.listdir(ckpts)) == ["checkpoint-12", "checkpoint-16", "checkpoint-4", "checkpoint-8"]
    assert_same(tk.load(os.path.join(run, "final.tk")), tk.load(os.path.join(ref, "final.tk")))


def flip(path: str, at: int) -> None:
    """Flip one bit of the file ``path`` at byte ``at`` (negative: from the end)."""
    with open(path, "r+b") as fh:
        fh.seek(at, os.SEEK_END if at < 0 else os.SEEK_SET)
        byte = fh.read(1)[0] ^ 0x40
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte]))


def test_latest_is_the_newest_intact_checkpoint_of_a_run(tmp):
    run = os.path.join(tmp, "run")
    assert tk_dcp.latest(run) is None and tk_dcp.latest(os.path.join(tmp, "nothing-here")) is None
    for step in (5, 10, 20):  # named as DCP loops name them: 20 is newer than 5 although "20" < "5"
        dcp.save(state_of(1), checkpoint_id=os.path.join(run, f"checkpoint-{step}"), storage_writer=tk_dcp.Writer())
    dcp.save({"w": torch.ones(2)}, checkpoint_id=os.path.join(run, "checkpoint-99"))  # stock DCP: not a candidate
    os.makedirs(os.path.join(run, ".checkpoint-98.tk-tmp-1-0a1b2c3d"))  # an unfinished save's temporary directory
    os.symlink(os.path.join(run, "checkpoint-5"), os.path.join(run, "checkpoint-97"))  # an alias, not a checkpoint
    os.makedirs(os.path.join(run, "logs-1000"))  # the user's own directory
    assert tk_dcp.latest(run) == os.path.join(run, "checkpoint-20")
    with pytest.raises(ValueError, match="is a checkpoint, not a run"):
        tk_dcp.latest(os.path.join(run, "checkpoint-20"))

    flip(os.path.join(run, "checkpoint-20", "rank-00000-of-00001.tk"), 12)  # its header: the cheap check sees it
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*checkpoint-20"):
        assert tk_dcp.latest(run) == os.path.join(run, "checkpoint-10")
    flip(os.path.join(run, "checkpoint-10", "rank-00000-of-00001.tk"), -3)  # its data: only verify=True reads it
    with pytest.warns(UserWarning, match="checkpoint-20"):
        assert tk_dcp.latest(run) == os.path.join(run, "checkpoint-10")
    with pytest.warns(UserWarning, match="checkpoint-10"):
        assert tk_dcp.latest(run, verify=True) == os.path.join(run, "checkpoint-5")
    state = state_of(2)
    dcp.load(state, checkpoint_id=tk_dcp.latest(run, verify=True), storage_reader=tk_dcp.Reader())
    assert_same(state, state_of(1))
    assert sorted(os.listdir(run)) == sorted(  # nothing was deleted
        [".checkpoint-98.tk-tmp-1-0a1b2c3d", "checkpoint-10", "checkpoint-20", "checkpoint-5"]
        + ["checkpoint-97", "checkpoint-99", "logs-1000"]
    )
