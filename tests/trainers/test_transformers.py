"""tensorkeep.transformers with the real Hugging Face Trainer (the pinned transformers), offline, on CPU.

The model is a 1-layer GPT-2 built from a config (tests/trainers/hf_job.py). In-process tests check
the layout, retention, subclasses and resume choices; the kill tests run hf_job.py in subprocesses
(killed with SIGKILL mid-save, resumed, compared bit for bit with an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

if sys.version_info < (3, 11):  # transformers 5 needs Python 3.11
    pytest.skip("tensorkeep[transformers] needs Python >= 3.11", allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hf_job  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback  # noqa: E402

import tensorkeep as tk  # noqa: E402
from tensorkeep.checkpoint.determinism import PINNED_ENV  # noqa: E402
from tensorkeep.checkpoint.intact import latest_intact  # noqa: E402
from tensorkeep.checkpoint.stage import Stage  # noqa: E402
from tensorkeep.transformers import NAMING, CrashProofMixin, protect  # noqa: E402
from tensorkeep.verification import verify  # noqa: E402

JOB = os.path.join(HERE, "hf_job.py")
PICKLES = (".pt", ".pth", ".bin", ".pkl")


def trainer(run: str, max_steps: int, cls: type = Trainer, **kw: Any) -> Any:
    started = hf_job.Started()
    eval_dataset = torch.utils.data.Subset(hf_job.Tokens(), range(8)) if kw.get("eval_strategy") else None
    t = cls(
        model=hf_job.tiny_gpt2(),
        args=hf_job.arguments(run, max_steps, **kw),
        train_dataset=hf_job.Tokens(),
        eval_dataset=eval_dataset,
        callbacks=[started],
    )
    t.started = started
    return protect(t)


def statuses(run: str) -> dict[int, str]:
    """Each committed checkpoint's status after reading every byte ("ok" or "damaged: ...")."""
    return {c.step: c.status for c in tk.list_checkpoints(run, verify=True, naming=NAMING)}


def read_json(*parts: str) -> Any:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def entries(run: str) -> list[str]:
    return sorted(n for n in os.listdir(run) if n != ".tensorkeep.lock")


class Extras(Trainer):
    """What TRL's trainers do: GRPO writes a file into the checkpoint after super()._save_checkpoint,
    BCO adds a file in _save_optimizer_and_scheduler and reads it back when resuming."""

    loaded_extra: Any = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with open(os.path.join(folder, "entropy_ctrl_state.json"), "w") as f:
            json.dump({"step": self.state.global_step}, f)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        with open(os.path.join(output_dir, "running.json"), "w") as f:
            json.dump({"mean": 0.5}, f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            with open(os.path.join(checkpoint, "running.json")) as f:
                self.loaded_extra = json.load(f)


def test_checkpoints_are_atomic_checksummed_pickle_free_and_loadable(tmp_path: Any) -> None:
    run = str(tmp_path / "run")
    t = trainer(run, 15, cls=Extras, save_total_limit=2)
    assert isinstance(t, Extras) and isinstance(t, CrashProofMixin)
    t.train()
    assert entries(run) == ["checkpoint-10", "checkpoint-15"]  # 5 rotated out after 15 was committed; no leftovers
    ck = os.path.join(run, "checkpoint-15")
    names = sorted(os.listdir(ck))
    assert not [n for n in names if n.endswith(PICKLES)], names
    for n in ("optimizer.tk", "scheduler.tk", "rng_state.tk", "model.safetensors", "training_args.json"):
        assert n in names
    assert "entropy_ctrl_state.json" in names and "running.json" in names  # subclass files, staged with the rest
    manifest = read_json(ck, "manifest.json")
    assert sorted(manifest["files"]) == sorted(n for n in names if n != "manifest.json")
    assert (
        manifest["files"]["config.json"]["kind"] == "file" and manifest["files"]["model.safetensors"]["kind"] != "file"
    )
    assert verify(ck).ok and statuses(run) == {10: "ok", 15: "ok"}
    found = latest_intact(run, naming=NAMING)
    assert found is not None and found.step == 15
    assert read_json(ck, "training_args.json")["output_dir"] == run
    assert read_json(ck, "trainer_state.json")["global_step"] == 15
    assert t.model is not None
    weights = t.model.state_dict()
    loaded = GPT2LMHeadModel.from_pretrained(ck).state_dict()  # a tensorkeep file is a safetensors file
    assert all(torch.equal(v, weights[k]) for k, v in loaded.items())
    plain = safetensors.torch.load_file(os.path.join(ck, "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in plain.items())


class FailsAt10(Trainer):
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.state.global_step == 10:
            raise OSError(28, "No space left on device (injected)")


def test_a_failed_save_publishes_nothing_and_deletes_nothing(tmp_path: Any) -> None:
    run = str(tmp_path / "run")
    t = trainer(run, 10, cls=FailsAt10, save_total_limit=1)
    with pytest.raises(OSError, match="injected"):
        t.train()
    assert entries(run) == ["checkpoint-5"]  # stock deletes checkpoint-5 only after a complete checkpoint-10
    assert verify(os.path.join(run, "checkpoint-5")).ok


@pytest.mark.parametrize("async_save", [False, True, "lazy"], ids=["sync", "async", "lazy"])
def test_save_total_limit_keeps_the_best_checkpoint(tmp_path: Any, async_save: bool | str) -> None:
    run = str(tmp_path / "run")
    t = trainer(  # "best" = the highest loss: an early checkpoint
        run,
        15,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=5,
        metric_for_best_model="loss",
        greater_is_better=True,
        load_best_model_at_end=True,
    )
    protect(t, async_save=async_save)  # async: the best-model load at the end waits for the last write
    t.train()
    evals = {e["step"]: e["eval_loss"] for e in t.state.log_history if "eval_loss" in e}
    best = max(evals, key=lambda s: evals[s])
    assert best < 15, evals  # else this test shows nothing
    assert t.state.best_model_checkpoint == os.path.join(run, f"checkpoint-{best}")
    assert entries(run) == sorted({f"checkpoint-{best}", "checkpoint-15"})  # the best kept, not the 2 newest
    state = read_json(run, "checkpoint-15", "trainer_state.json")
    assert state["best_model_checkpoint"] == os.path.join(run, f"checkpoint-{best}")  # not the staging path
    assert t.model is not None
    weights = t.model.state_dict()  # load_best_model_at_end read the best one's tensorkeep-written weights
    saved = safetensors.torch.load_file(os.path.join(run, f"checkpoint-{best}", "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in saved.items())


def test_resume_skips_damaged_and_half_written_checkpoints(tmp_path: Any) -> None:
    run = str(tmp_path / "run")
    trainer(run, 10, cls=Extras).train()
    opt = tmp_path / "run" / "checkpoint-10" / "optimizer.tk"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0x01  # a flipped bit in the optimizer's tensors
    opt.write_bytes(bytes(data))
    (tmp_path / "run" / "checkpoint-15").mkdir()  # a stock Trainer killed mid-save leaves this
    (tmp_path / "run" / "checkpoint-15" / "config.json").write_text("{}")
    os.makedirs(os.path.join(run, "checkpoint-20"))  # what a kill during stock's end-of-training rmtree may leave
    for n in ("config.json", "trainer_state.json"):
        shutil.copy(os.path.join(run, "checkpoint-5", n), os.path.join(run, "checkpoint-20", n))

    t = trainer(run, 10, cls=Extras)
    with pytest.raises(tk.CheckpointNotFoundError, match="checkpoint-10"):
        t.train(resume_from_checkpoint=os.path.join(run, "checkpoint-10"))  # a named one: never another
    shutil.copytree(os.path.join(run, "checkpoint-5"), str(tmp_path / "copy"))  # verified under any name
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*checkpoint-10"):
        t.train(resume_from_checkpoint=True)
    assert t.started.started_at == 5 and t.loaded_extra == {"mean": 0.5}  # the subclass's own load ran
    assert verify(os.path.join(run, "checkpoint-10")).ok  # saved again: the damaged one was replaced
    assert os.listdir(os.path.join(run, "checkpoint-15")) == ["config.json"]  # not ours: never deleted
    assert sorted(os.listdir(os.path.join(run, "checkpoint-20"))) == ["config.json", "trainer_state.json"]

    t = trainer(str(tmp_path / "other"), 10, cls=Extras)
    t.train(resume_from_checkpoint=str(tmp_path / "copy"))
    assert t.started.started_at == 5 and t.loaded_extra == {"mean": 0.5}

    with pytest.raises(ValueError, match="No valid checkpoint"):
        trainer(str(tmp_path / "empty"), 10).train(resume_from_checkpoint=True)  # stock's error


def test_resume_from_a_stock_checkpoint(tmp_path: Any) -> None:
    run = str(tmp_path / "run")
    stock = Trainer(
        model=hf_job.tiny_gpt2(), args=hf_job.arguments(run, 10, save_steps=10), train_dataset=hf_job.Tokens()
    )
    stock.train()
    assert "optimizer.pt" in os.listdir(os.path.join(run, "checkpoint-10"))
    t = trainer(run, 15)
    with pytest.warns(UserWarning, match="written without tensorkeep"):
        t.train(resume_from_checkpoint=True)
    assert t.started.started_at == 10
    assert verify(os.path.join(run, "checkpoint-15")).ok


def test_import_tensorkeep_does_not_import_transformers() -> None:
    code = "import sys, tensorkeep; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ kill -9, resume, compare


def job(run: str, out: str, *flags: str) -> subprocess.Popen:
    env = {**os.environ, **PINNED_ENV, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, JOB, run, out, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(p: subprocess.Popen) -> tuple[int, str]:
    out, _ = p.communicate(timeout=600)
    return p.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: Any) -> dict[str, torch.Tensor]:
    d = tmp_path_factory.mktemp("reference")
    rc, log = finish(job(str(d / "run"), str(d / "final.tk")))
    assert rc == 0, log
    return tk.load(str(d / "final.tk"))["weights"]


def resume_and_compare(run: str, out: str, reference: dict[str, torch.Tensor], *flags: str) -> int:
    rc, log = finish(job(run, out, "--resume", *flags))
    assert rc == 0, log
    final = tk.load(out)
    assert final["weights"].keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(final["weights"][k], v), k  # bit-identical to the run that was never killed
    assert [n for n in entries(run) if n.startswith(".")] == []  # the crashed save's staging is gone
    return final["started_at"]


def test_kill_between_the_last_file_and_the_commit(tmp_path: Any, reference: dict[str, torch.Tensor]) -> None:
    run = str(tmp_path / "run")
    rc, log = finish(job(run, str(tmp_path / "a.tk"), "--kill-after-chain", "10"))
    assert rc == -signal.SIGKILL, log
    assert "STAGING 10" in log and "SAVED 10" not in log
    names = entries(run)
    assert "checkpoint-5" in names and "checkpoint-10" not in names  # stock: a checkpoint-10 without manifest
    assert any(n.startswith(".checkpoint-10.") for n in names), names  # every file of step 10 was in staging
    assert resume_and_compare(run, str(tmp_path / "b.tk"), reference) == 5


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_sigkill_from_outside_while_the_checkpoint_is_written(
    tmp_path: Any, reference: dict[str, torch.Tensor], mode: list[str]
) -> None:
    """A truly asynchronous kill: as soon as the staging directory of step 10 appears (with
    async_save, while the writer thread writes it and training goes on)."""
    run = str(tmp_path / "run")
    p = job(run, str(tmp_path / "a.tk"), *mode)
    while p.poll() is None and not any(n.startswith(".checkpoint-10.") or n == "checkpoint-10" for n in _listdir(run)):
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    rc, log = finish(p)
    assert rc == -signal.SIGKILL, log
    started = resume_and_compare(run, str(tmp_path / "b.tk"), reference, *mode)
    print(f"the kill landed {'before' if started == 5 else 'after'} the commit of checkpoint-10")
    assert started in (5, 10)  # 10 only if the kill landed after the commit


def test_async_save_commits_every_checkpoint_and_resumes_bit_identically(
    tmp_path: Any, reference: dict[str, torch.Tensor]
) -> None:
    """protect(trainer, async_save=True, and "lazy" for the resumed run): every checkpoint committed and verified (the last one by the
    end of train(), which waits for it) and holding the weights of its step while training went on;
    the run, and a run resumed from one of its checkpoints, end bit-identical to the synchronous one;
    save_total_limit applied after each commit."""
    run = str(tmp_path / "run")
    rc, log = finish(job(run, str(tmp_path / "a.tk"), "--async-save"))
    assert rc == 0, log
    final = tk.load(str(tmp_path / "a.tk"))["weights"]
    assert all(torch.equal(final[k], v) for k, v in reference.items())
    assert (
        statuses(run) == {5: "ok", 10: "ok", 15: "ok", 20: "ok"}
        and [n for n in entries(run) if n.startswith(".")] == []
    )
    saved = safetensors.torch.load_file(f"{run}/checkpoint-20/model.safetensors")
    assert saved and all(torch.equal(v, final[k]) for k, v in saved.items())
    shutil.rmtree(f"{run}/checkpoint-20")
    # resumed with async_save="lazy" (the weights and optimizer state copied by the writer thread)
    assert resume_and_compare(run, str(tmp_path / "b.tk"), reference, "--async-save", "lazy") == 15

    limited = str(tmp_path / "limited")
    t = protect(trainer(limited, 20, save_total_limit=2), async_save=True)
    t.train()
    assert statuses(limited) == {15: "ok", 20: "ok"} and [n for n in entries(limited) if n.startswith(".")] == []
    with pytest.raises(ValueError, match="one process"):
        two = type("Two", (Trainer,), {"__init__": lambda self: None, "args": SimpleNamespace(world_size=2)})
        protect(two(), async_save=True)


class _StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.ends: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ends[state.global_step] = time.monotonic()


class _WritesIntoCheckpoint(TrainerCallback):
    """The common pattern of an on_save callback: a file of its own into checkpoint-N."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        with open(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "note.txt"), "w") as f:
            f.write("from a callback")


def test_async_save_overlaps_training_but_waits_for_an_on_save_callback(tmp_path: Any, monkeypatch: Any) -> None:
    """Training goes on while checkpoint-N is written (the writer is slowed down here); a callback with
    its own on_save finds checkpoint-N committed, as with synchronous saves."""
    committed: dict[int, float] = {}
    real = Stage.finish

    def slow(self: Stage, objs: Any) -> None:
        time.sleep(0.5)
        real(self, objs)
        committed[self.step] = time.monotonic()

    monkeypatch.setattr(Stage, "finish", slow)
    for callback in (_StepTimes(), _WritesIntoCheckpoint()):
        run = str(tmp_path / type(callback).__name__)
        t = Trainer(model=hf_job.tiny_gpt2(), args=hf_job.arguments(run, 10), train_dataset=hf_job.Tokens())
        t.add_callback(callback)
        protect(t, async_save=True).train()
        assert sorted(committed) == [5, 10] and statuses(run) == {5: "ok", 10: "ok"}
        if isinstance(callback, _StepTimes):
            assert callback.ends[6] < committed[5]  # step 6 ran while checkpoint-5 was being written
        else:
            assert open(os.path.join(run, "checkpoint-5", "note.txt")).read() == "from a callback"
        committed.clear()


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------ two processes (DDP, gloo)


def ddp_jobs(run: str, outs: list[str], *flags: str) -> list[tuple[int, str]]:
    """hf_job.py on 2 gloo ranks, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, **PINNED_ENV, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    base.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [
        subprocess.Popen(
            [sys.executable, JOB, run, out, *flags],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r, out in enumerate(outs)
    ]
    return [finish(p) for p in procs]


def test_two_ranks_save_and_resume_bit_identically(tmp_path: Any) -> None:
    """Every checkpoint-N is one commit holding both ranks' RNG files; resumed on 2 ranks from
    checkpoint-10, the final weights are those of the uninterrupted 2-rank run."""
    run = str(tmp_path / "run")
    for rc, log in ddp_jobs(run, [str(tmp_path / f"full{r}.tk") for r in range(2)]):
        assert rc == 0, log
    assert entries(run) == ["checkpoint-10", "checkpoint-15", "checkpoint-20", "checkpoint-5"]
    ck = os.path.join(run, "checkpoint-10")
    names = sorted(os.listdir(ck))
    assert {"rng_state_0.tk", "rng_state_1.tk", "model.safetensors", "optimizer.tk"} <= set(names), names
    assert "rng_state.tk" not in names and not [n for n in names if n.endswith(PICKLES)]
    assert sorted(read_json(ck, "manifest.json")["files"]) == [n for n in names if n != "manifest.json"]
    assert statuses(run) == {5: "ok", 10: "ok", 15: "ok", 20: "ok"}
    full = tk.load(str(tmp_path / "full0.tk"))["weights"]

    for n in ("checkpoint-15", "checkpoint-20"):
        shutil.rmtree(os.path.join(run, n))
    for rc, log in ddp_jobs(run, [str(tmp_path / f"resumed{r}.tk") for r in range(2)], "--resume"):
        assert rc == 0, log
    for r in range(2):
        resumed = tk.load(str(tmp_path / f"resumed{r}.tk"))
        assert resumed["started_at"] == 10  # both ranks resumed from the same checkpoint
        assert all(torch.equal(resumed["weights"][k], v) for k, v in full.items()), r  # bit-identical
    assert statuses(run)[20] == "ok" and [n for n in entries(run) if n.startswith(".")] == []
