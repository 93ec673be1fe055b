"""A tiny Hugging Face Trainer job for the crash tests: run, get killed, run again, compare.

    python hf_job.py RUN_DIR OUT_FILE [--max-steps 20] [--resume] [--kill-after-chain STEP] [--async-save [lazy]]

A 1-layer GPT-2 built from a config (no download), trained on CPU, pinned (one thread,
deterministic algorithms), checkpointing every 5 steps through ``tensorkeep.transformers.protect``.
Prints "SAVED <step>" after each checkpoint's save returned and "STAGING <step>" when the files of
a save are all in its staging directory. ``--kill-after-chain STEP`` sends itself SIGKILL right there
at that step (every file written, nothing committed). At the end OUT_FILE (a tensorkeep file) holds
the final weights and the step the run started from.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import tensorkeep as tk
from tensorkeep.checkpoint import determinism
from tensorkeep.transformers import protect

SAVE_STEPS = 5


class Tokens(torch.utils.data.Dataset):
    """64 fixed random sequences: item i depends on i only."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x.clone()}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def arguments(run: str, max_steps: int, **kw: Any) -> TrainingArguments:
    """The job's arguments; ``kw`` adds or overrides some (``save_total_limit=2``, ``save_steps=10``)."""
    base: dict[str, Any] = dict(
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        logging_steps=1000,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(output_dir=run, max_steps=max_steps, **{**base, **kw})


class Started(TrainerCallback):
    """Remembers the step training started from (the resumed step, or 0)."""

    started_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started_at = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        print("SAVED", state.global_step, flush=True)


class Job(Trainer):
    """A user's Trainer subclass: its _save_checkpoint runs inside tensorkeep's staged save."""

    kill_at: int | None = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        step = self.state.global_step
        print("STAGING", step, flush=True)
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-after-chain", type=int)
    ap.add_argument(
        "--async-save", nargs="?", const=True, default=False, help="protect(trainer, async_save=True, or 'lazy')"
    )
    a = ap.parse_args()
    determinism.pin()
    started = Started()
    trainer = Job(model=tiny_gpt2(), args=arguments(a.run, a.max_steps), train_dataset=Tokens(), callbacks=[started])
    trainer.kill_at = a.kill_after_chain
    protect(trainer, async_save=a.async_save)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    model = trainer.model
    assert model is not None
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tk.save({"weights": weights, "started_at": started.started_at}, a.out)


if __name__ == "__main__":
    main()
