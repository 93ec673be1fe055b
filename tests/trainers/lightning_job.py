"""A tiny Lightning run with TensorkeepCheckpointIO, for tests/trainers/test_lightning.py.

Imported by the tests (the model, data and trainer) and run as a script:

``python lightning_job.py train DIR NAME:N``: train from scratch with checkpoints in DIR/checkpoints and
kill this process with SIGKILL just before the N-th rename onto NAME (the temporary file is written
and fsynced, not yet published). It first writes DIR/imports.json: whether ``import tensorkeep``
imported Lightning (it must not).
``python lightning_job.py ddp OUT``: ``fit(ckpt_path="last")`` on OUT/checkpoints with 2 gloo ranks
(Lightning starts rank 1 by running this script again); each rank writes OUT/rank{R}.json.

Checkpoints fall on epoch ends (5 steps an epoch, data in a fixed order), as in ckpt-chaos'
lightning_trainer target, so a resume never replays half an epoch and is bit-exact.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import tensorkeep as tk

LIGHTNING_BEFORE = any(m == "lightning" or m.startswith("lightning.") for m in sys.modules)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from tensorkeep.lightning import TensorkeepCheckpointIO  # noqa: E402
from tensorkeep.storage import local as _io  # noqa: E402

ASYNC = os.environ.get("TK_LIGHTNING_ASYNC") == "1"  # the plugin saves with async_save=True
STEPS_PER_EPOCH = 5
EPOCHS = 4  # 20 steps; the crash tests kill at step 10


class Lit(pl.LightningModule):
    def __init__(self, lr: float = 0.05, **hparams: object) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


class StartedAt(Callback):
    """Records the global step training starts from (already restored when resuming)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def loader(world: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(STEPS_PER_EPOCH * 16 * world, 8, generator=g)  # each rank: STEPS_PER_EPOCH batches an epoch
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, shuffle=False)


def model(**hparams: object) -> Lit:
    pl.seed_everything(0, verbose=False)  # before the model is built: every run starts from the same weights
    return Lit(**hparams)


def trainer(
    run: str, *, epochs: int = EPOCHS, plugin: object = None, callbacks=(), epoch_checkpoints: bool = True, **kw
) -> pl.Trainer:
    """A CPU trainer with the plugin; ``epoch_checkpoints``: a ``ModelCheckpoint`` writing
    ``run/checkpoints/ck-step=N.ckpt`` at every epoch end, and ``last.ckpt``."""
    ck = ModelCheckpoint(
        dirpath=os.path.join(run, "checkpoints"), filename="ck-{step}", every_n_epochs=1, save_top_k=-1, save_last=True
    )
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[*callbacks, ck] if epoch_checkpoints else list(callbacks),
        plugins=[plugin if plugin is not None else TensorkeepCheckpointIO(async_save=ASYNC)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=run,
        **kw,
    )


def kill_before_rename(name: str, nth: int) -> None:
    """SIGKILL this process just before the nth rename of a temporary file onto ``name``."""
    replace, seen = _io.replace, [0]

    def hooked(src: str, dst: str) -> None:
        if os.path.basename(dst) == name:
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    _io.replace = hooked


def main() -> None:
    phase, out = sys.argv[1], sys.argv[2]
    if phase == "train":
        os.makedirs(out)
        with open(os.path.join(out, "imports.json"), "w") as f:
            json.dump({"lightning_imported_by_tensorkeep": LIGHTNING_BEFORE}, f)
        name, nth = sys.argv[3].split(":")
        kill_before_rename(name, int(nth))
        trainer(out).fit(model(), loader())
        sys.exit("the kill hook did not fire")
    if phase == "ddp":
        plugin, cb, m = TensorkeepCheckpointIO(), StartedAt(), model()
        saves: list[str] = []
        save = plugin.save_checkpoint
        plugin.save_checkpoint = lambda ck, path, storage_options=None: (saves.append(path), save(ck, path))  # type: ignore[method-assign]
        t = trainer(out, epochs=3, plugin=plugin, callbacks=[cb], devices=2, strategy="ddp")
        t.fit(m, loader(world=2), ckpt_path="last")
        rank = t.global_rank
        tk.save(m.state_dict(), os.path.join(out, f"final_rank{rank}.tk"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"started": cb.step, "saves": [os.path.basename(p) for p in saves]}, f)


if __name__ == "__main__":
    main()
