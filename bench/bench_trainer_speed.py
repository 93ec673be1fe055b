"""Issue 16 "Speed": checkpoint time of each integrated trainer vs the stock trainer, same run, interleaved.

    .venv/bin/python bench/bench_trainer_speed.py [--mb 500] [--reps 3] [--trainers lightning,hf,accelerate,dcp]
        [--work DIR] [--warmup 1] [--no-drop]

The state: a GPT-2-small-shaped model (12 layers, vocab 50257, 1024 positions; the width is chosen so
that the fp32 parameters are about ``--mb`` MB: 768 at the default, 124 M parameters) plus its AdamW
state after one optimizer step (exp_avg, exp_avg_sq): about 3 x ``--mb`` MB written per checkpoint.
Lightning, Accelerate and DCP train a plain ``torch.nn.Module`` with those parameters; HF trains a
``GPT2LMHeadModel`` of that shape (its ``lm_head`` is tied to ``wte``: the same tensors).

Per trainer, the variants are timed in one process, interleaved (rep 1 of every variant, then rep 2,
...), median and min of ``--reps``, after ``--warmup`` unmeasured rounds. Before every timed save the
previous output is deleted, ``sync`` is run and (as root, unless ``--no-drop``) the page cache is
dropped, so no save pays for another's write-back.

* Lightning: ``trainer.save_checkpoint(path)`` with the strategy's ``checkpoint_io`` set to the stock
  ``TorchCheckpointIO`` (what ``plugins=[...]`` sets), to ``TensorkeepCheckpointIO()``, and to
  ``AsyncCheckpointIO(TensorkeepCheckpointIO())`` (the stall: until ``save_checkpoint`` returns; the
  write is then awaited outside the timing; ``AsyncCheckpointIO`` clones every tensor on the caller's
  thread first), ``TensorkeepCheckpointIO(async_save=True)``'s stall (its own snapshot into reused
  staging buffers), and ``AsyncCheckpointIO(TorchCheckpointIO())``'s stall. "stock + fsync": stock, then
  fsync of the file (stock does not fsync; a reference, not what stock does).
* HF: ``trainer._save_checkpoint(model, None)`` stock vs ``protect(trainer)`` (the same trainer, its class
  switched back and forth); "stock + sync": stock then fsync of every file and directory written; the
  stall of ``protect(trainer, async_save=True)`` (until ``_save_checkpoint`` returns).
* Accelerate: ``Accelerator.save_state(acc, dir)`` (stock) vs ``acc.save_state(dir)`` after
  ``tk_acc.protect(acc)``; "stock + sync" as for HF; the stall of ``protect(acc, async_save=True)``
  (until ``save_state`` returns; the write is awaited outside the timing).
* DCP (one process, a gloo group of 1): ``dcp.save`` with the default ``FileSystemWriter`` (it fsyncs:
  ``sync_files=True``) vs ``storage_writer=tk_dcp.Writer()``, and ``dcp.async_save`` stalls (until it
  returns) of both.

Each framework is imported lazily: a missing extra skips only its table.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table, timed

VOCAB, N_CTX, LAYERS = 50257, 1024, 12
DROP = True
WARMUP = 1
Variant = tuple[str, Callable[[str], float]]  # (name, run(out_dir) -> measured seconds)


# ---------------------------------------------------------------------------------------------- state


def width_for(mb: float) -> int:
    """The GPT-2 width (a multiple of 64) whose fp32 parameters come closest to ``mb`` MB."""
    params = lambda d: VOCAB * d + N_CTX * d + LAYERS * (12 * d * d + 13 * d) + 2 * d
    return min(range(64, 4097, 64), key=lambda d: abs(params(d) * 4 - mb * 1e6))


def gpt2_shapes(d: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"wte": (VOCAB, d), "wpe": (N_CTX, d)}
    for i in range(LAYERS):
        for name, s in [
            ("ln_1_w", (d,)), ("ln_1_b", (d,)), ("attn_w", (d, 3 * d)), ("attn_b", (3 * d,)),
            ("proj_w", (d, d)), ("proj_b", (d,)), ("ln_2_w", (d,)), ("ln_2_b", (d,)),
            ("fc_w", (d, 4 * d)), ("fc_b", (4 * d,)), ("mlp_proj_w", (4 * d, d)), ("mlp_proj_b", (d,)),
        ]:  # fmt: skip
            shapes[f"h{i}_{name}"] = s
    shapes["ln_f_w"], shapes["ln_f_b"] = (d,), (d,)
    return shapes


class Blob(torch.nn.Module):
    """GPT-2-small-shaped parameters; ``loss()`` touches every one, so AdamW keeps state for all."""

    def __init__(self, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, s in gpt2_shapes(d).items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02))

    def loss(self) -> torch.Tensor:
        return sum((p.float().mean() for p in self.parameters()), torch.zeros(()))


def one_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.loss().backward()  # type: ignore[operator]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    return n


# --------------------------------------------------------------------------------------------- timing


def sync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (and ``path``'s parent)."""
    paths = [path] if os.path.isfile(path) else []
    for root, _dirs, files in os.walk(path):
        paths += [os.path.join(root, f) for f in files] + [root]
    paths.append(os.path.dirname(os.path.abspath(path)))
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def quiesce(*paths: str) -> None:
    """Delete previous outputs, write back dirty pages, drop the page cache (root only)."""
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)
    os.sync()
    if DROP:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass
    gc.collect()


def run_variants(variants: list[Variant], out: str, reps: int) -> dict[str, list[float]]:
    """Interleaved reps of every variant (rep 1 of each, then rep 2, ...) after ``WARMUP`` unmeasured
    rounds (first-call costs: lazy imports, thread pools): the seconds measured."""
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for rep in range(-WARMUP, reps):
        for name, fn in variants:
            quiesce(out)
            s = fn(out)
            print(f"  {'warm-up' if rep < 0 else f'rep {rep + 1}'} {name}: {s:.3f} s", flush=True)
            if rep >= 0:
                times[name].append(s)
    quiesce(out)
    return times


def report(times: dict[str, list[float]], nbytes: int, stalls: dict[str, str]) -> str:
    """A markdown table: ratios to the first variant (stock); ``stalls`` maps a stall to its sync save."""
    med = {name: statistics.median(xs) for name, xs in times.items()}
    base = next(iter(med.values()))
    rows: list[tuple[str, ...]] = []
    for name, xs in times.items():
        note = f"{100 * med[name] / med[stalls[name]]:.0f}% of `{stalls[name]}`" if name in stalls else ""
        rows.append(
            (
                name,
                f"{med[name]:.3f}",
                f"{min(xs):.3f}",
                f"{nbytes / med[name] / 1e9:.2f}",
                f"{med[name] / base:.2f}",
                note,
            )
        )
    return table(rows, ("variant", "median s", "min s", "GB/s", "x stock", "note"))


# ------------------------------------------------------------------------------------------- trainers


def bench_lightning(d: int, work: str, reps: int) -> tuple[str, int]:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from tensorkeep.lightning import TensorkeepCheckpointIO

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Blob(d)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net.loss()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1, 1)), batch_size=1)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
    )
    module = Module()
    trainer.fit(module, data)
    nbytes = state_bytes(module, trainer.optimizers[0])
    strategy = trainer.strategy
    tk_io, async_io = TensorkeepCheckpointIO(), AsyncCheckpointIO(TensorkeepCheckpointIO())

    def save(io: Any, then: Callable[[str], None] = lambda p: None) -> Callable[[str], float]:
        def fn(out: str) -> float:
            strategy.checkpoint_io = io
            path = os.path.join(out, "model.ckpt")
            t = time.perf_counter()
            trainer.save_checkpoint(path)
            then(path)
            return time.perf_counter() - t

        return fn

    def stall(io: Any) -> Callable[[str], float]:
        def fn(out: str) -> float:
            strategy.checkpoint_io = io
            path = os.path.join(out, "model.ckpt")
            s = timed(lambda: trainer.save_checkpoint(path))
            io.teardown()  # waits for the write (outside the timing)
            assert os.path.exists(path), path
            return s

        return fn

    variants: list[Variant] = [
        ("stock TorchCheckpointIO", save(TorchCheckpointIO())),
        ("stock + fsync (reference)", save(TorchCheckpointIO(), sync_tree)),
        ("TensorkeepCheckpointIO", save(tk_io)),
        ("AsyncCheckpointIO(Tensorkeep) stall", stall(async_io)),
        ("TensorkeepCheckpointIO(async_save=True) stall", stall(TensorkeepCheckpointIO(async_save=True))),
        ("AsyncCheckpointIO(stock) stall", stall(AsyncCheckpointIO(TorchCheckpointIO()))),
    ]
    times = run_variants(variants, os.path.join(work, "out"), reps)
    return report(
        times,
        nbytes,
        {
            "AsyncCheckpointIO(Tensorkeep) stall": "TensorkeepCheckpointIO",
            "TensorkeepCheckpointIO(async_save=True) stall": "TensorkeepCheckpointIO",
            "AsyncCheckpointIO(stock) stall": "stock TorchCheckpointIO",
        },
    ), nbytes


def bench_hf(d: int, work: str, reps: int) -> tuple[str, int]:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tensorkeep.transformers import protect

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(n_embd=d, n_layer=LAYERS, n_head=max(1, d // 64), vocab_size=VOCAB, n_positions=N_CTX)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.arange(8) % VOCAB
    ds = [{"input_ids": ids, "labels": ids}]
    run_dir = os.path.join(work, "hf-run")
    args = TrainingArguments(
        output_dir=run_dir,
        max_steps=1,
        per_device_train_batch_size=1,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    assert trainer.optimizer is not None
    nbytes = state_bytes(model, trainer.optimizer)
    stock_cls = type(trainer)
    tk_cls = type(protect(trainer))
    ckpt = os.path.join(run_dir, f"checkpoint-{trainer.state.global_step}")

    def save(cls: type, then: Callable[[str], None] = lambda p: None) -> Callable[[str], float]:
        def fn(out: str) -> float:
            quiesce(ckpt)
            trainer.__class__ = cls
            t = time.perf_counter()
            trainer._save_checkpoint(model, None)
            then(ckpt)
            s = time.perf_counter() - t
            assert os.path.isdir(ckpt), ckpt
            return s

        return fn

    def stall(mode: bool | str = True, step: bool = False) -> Callable[[str], float]:
        def fn(out: str) -> float:
            quiesce(ckpt)
            trainer.__class__, trainer.tk_async_save = tk_cls, mode
            opt = trainer.optimizer
            model.zero_grad(set_to_none=True)  # the step only waits: it changes nothing
            s = timed(lambda: (trainer._save_checkpoint(model, None), step and opt is not None and opt.step()))
            trainer._tk_wait()  # the write, outside the timing
            trainer.tk_async_save = False
            assert os.path.isdir(ckpt), ckpt
            return s

        return fn

    batch = {"input_ids": torch.arange(256).unsqueeze(0) % VOCAB}
    batch["labels"] = batch["input_ids"]

    def train_step() -> None:  # a real one: forward and backward of 256 tokens, then the optimizer
        assert trainer.optimizer is not None
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)

    def loop(mode: bool | str) -> Callable[[str], float]:
        """What a checkpoint adds to the training step after it: (save + that step) minus the step
        alone (the median of 3, taken right before). With "lazy" the copy overlaps the step's forward
        and backward pass; its optimizer.step() waits for what is left of it."""

        def fn(out: str) -> float:
            quiesce(ckpt)
            trainer.__class__, trainer.tk_async_save = tk_cls, mode
            alone = statistics.median(timed(train_step) for _ in range(3))
            s = timed(lambda: (trainer._save_checkpoint(model, None), train_step()))
            trainer._tk_wait()  # the write, outside the timing
            trainer.tk_async_save = False
            return s - alone

        return fn

    variants: list[Variant] = [
        ("stock _save_checkpoint", save(stock_cls)),
        ("stock + sync (reference)", save(stock_cls, sync_tree)),
        ("protect(trainer)", save(tk_cls)),
        ("protect(trainer, async_save=True) stall", stall()),
        ('protect(trainer, async_save="lazy") stall', stall("lazy")),
        ('  "lazy" + optimizer.step() at once', stall("lazy", step=True)),
        ("  async_save=True: a training step's extra time", loop(True)),
        ('  "lazy": a training step\'s extra time', loop("lazy")),
    ]
    times = run_variants(variants, os.path.join(work, "unused"), reps)
    quiesce(ckpt)
    lazy = (
        'protect(trainer, async_save="lazy") stall',
        '  "lazy" + optimizer.step() at once',
        "  async_save=True: a training step's extra time",
        '  "lazy": a training step\'s extra time',
    )
    stalls = {"protect(trainer, async_save=True) stall": "protect(trainer)", **dict.fromkeys(lazy, "protect(trainer)")}
    return report(times, nbytes, stalls), nbytes


def bench_accelerate(d: int, work: str, reps: int) -> tuple[str, int]:
    from accelerate import Accelerator

    from tensorkeep import accelerate as tk_acc

    acc = Accelerator(cpu=True)
    model = Blob(d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    acc.backward(model.loss())
    opt.step()
    opt.zero_grad()
    nbytes = state_bytes(model, opt)
    tk_acc.protect(acc)  # acc.save_state is tensorkeep's now; Accelerator.save_state(acc, ...) is stock

    def save(fn_save: Callable[[str], Any], then: Callable[[str], None] = lambda p: None) -> Callable[[str], float]:
        def fn(out: str) -> float:
            ckpt = os.path.join(out, "state")
            t = time.perf_counter()
            fn_save(ckpt)
            then(ckpt)
            return time.perf_counter() - t

        return fn

    def stall(mode: bool | str = True, step: bool = False) -> Callable[[str], float]:
        def fn(out: str) -> float:
            tk_acc.protect(acc, async_save=mode)
            model.zero_grad(set_to_none=True)  # the step only waits: it changes nothing
            s = timed(lambda: (acc.save_state(os.path.join(out, "state")), step and opt.step()))
            tk_acc.wait(acc)  # the write, outside the timing
            tk_acc.protect(acc)
            return s

        return fn

    variants: list[Variant] = [
        ("stock save_state", save(lambda p: Accelerator.save_state(acc, p))),
        ("stock + sync (reference)", save(lambda p: Accelerator.save_state(acc, p), sync_tree)),
        ("protect(acc).save_state", save(lambda p: acc.save_state(p))),
        ("protect(acc, async_save=True) stall", stall()),
        ('protect(acc, async_save="lazy") stall', stall("lazy")),
        ('  "lazy" + optimizer.step() at once', stall("lazy", step=True)),
    ]
    times = run_variants(variants, os.path.join(work, "out"), reps)
    lazy = ('protect(acc, async_save="lazy") stall', '  "lazy" + optimizer.step() at once')
    stalls = {
        "protect(acc, async_save=True) stall": "protect(acc).save_state",
        **dict.fromkeys(lazy, "protect(acc).save_state"),
    }
    return report(times, nbytes, stalls), nbytes


def bench_dcp(d: int, work: str, reps: int) -> tuple[str, int]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict

    try:
        from tensorkeep import dcp as tk_dcp  # type: ignore[attr-defined]
    except ImportError:
        from tensorkeep.integrations import dcp as tk_dcp

    if not dist.is_initialized():
        store = os.path.join(work, "pg-store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    model = Blob(d)
    opt = one_step(model)
    nbytes = state_bytes(model, opt)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    # one stager for every save: torch's StateDictStager then reuses its CPU copies (memory already touched)
    kept = DefaultStager(StagingOptions(False, False, False, False))

    def sync_save(writer: Callable[[], Any] | None) -> Callable[[str], float]:
        def fn(out: str) -> float:
            kw = {} if writer is None else {"storage_writer": writer()}
            return timed(lambda: dcp.save(state, checkpoint_id=out, **kw))

        return fn

    def async_save(writer: Callable[[], Any] | None, stager: Any = None) -> Callable[[str], float]:
        def fn(out: str) -> float:
            kw: dict[str, Any] = {} if writer is None else {"storage_writer": writer()}
            if stager is not None:
                kw["async_stager"] = stager
            t = time.perf_counter()
            fut = dcp.async_save(state, checkpoint_id=out, **kw)
            stall = time.perf_counter() - t
            result = fut.result() if hasattr(fut, "result") else fut.upload_completion.result()
            del result
            return stall

        return fn

    variants: list[Variant] = [
        ("stock dcp.save (FileSystemWriter)", sync_save(None)),
        ("dcp.save(storage_writer=tk_dcp.Writer())", sync_save(tk_dcp.Writer)),
        ("stock dcp.async_save stall", async_save(None)),
        ("tk_dcp.Writer() async_save stall", async_save(tk_dcp.Writer)),
        ("tk_dcp.Writer() + one DefaultStager kept, stall", async_save(tk_dcp.Writer, kept)),
    ]
    times = run_variants(variants, os.path.join(work, "out"), reps)
    stalls = {
        "stock dcp.async_save stall": "stock dcp.save (FileSystemWriter)",
        "tk_dcp.Writer() async_save stall": "dcp.save(storage_writer=tk_dcp.Writer())",
        "tk_dcp.Writer() + one DefaultStager kept, stall": "dcp.save(storage_writer=tk_dcp.Writer())",
    }
    dist.destroy_process_group()
    return report(times, nbytes, stalls), nbytes


BENCHES: dict[str, Callable[[int, str, int], tuple[str, int]]] = {
    "lightning": bench_lightning,
    "hf": bench_hf,
    "accelerate": bench_accelerate,
    "dcp": bench_dcp,
}
TITLES = {"lightning": "Lightning", "hf": "HF Trainer", "accelerate": "Accelerate", "dcp": "torch DCP (1 process)"}


def main() -> None:
    global DROP, WARMUP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=500, help="fp32 parameter MB (the AdamW state adds 2x)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trainers", default=",".join(BENCHES))
    ap.add_argument("--work", default=None, help="directory for the checkpoints (default: a temp dir)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds of every variant first")
    ap.add_argument("--no-drop", action="store_true", help="do not drop the page cache between saves")
    a = ap.parse_args()
    DROP, WARMUP = not a.no_drop, a.warmup
    warnings.filterwarnings("ignore")
    d = width_for(a.mb)
    root = a.work or tempfile.mkdtemp(prefix="tk-trainer-speed-")
    os.makedirs(root, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    drop_ok = DROP and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    print(
        f"width {d}, reps {a.reps}, warm-up rounds {a.warmup}, work {root}, "
        f"page cache dropped between saves: {drop_ok}",
        flush=True,
    )
    out = []
    for name in a.trainers.split(","):
        work = os.path.join(root, name)
        os.makedirs(work, exist_ok=True)
        print(f"== {TITLES[name]}", flush=True)
        try:
            text, nbytes = BENCHES[name](d, work, a.reps)
        except ImportError as e:
            print(f"  skipped: {e}", flush=True)
            continue
        out.append(f"### {TITLES[name]}: {nbytes / 1e6:.1f} MB per checkpoint (model + AdamW state)\n\n{text}\n")
        print(out[-1], flush=True)
        gc.collect()
    if not a.work:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
