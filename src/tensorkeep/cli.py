"""The ``tensorkeep`` command: inspect, diff, convert, verify, ls and prune. Uses only the public API."""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import tempfile
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

import tensorkeep as tk
from tensorkeep import inspection
from tensorkeep.checkpoint.policies import Policy
from tensorkeep.core.dtypes import TORCH_BY_NAME


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _hidden(c: str) -> bool:
    """A character a terminal may act on instead of showing: C0/C1 controls, DEL, format characters
    (bidi overrides such as U+202E, zero-width ones), line/paragraph separators, surrogates, unassigned."""
    return not c.isprintable() and unicodedata.category(c) not in ("Zs", "Co")


def _safe(text: object) -> str:
    r"""Untrusted text (names, metadata, paths, messages from a file) made harmless for a terminal:
    every hidden character escaped as ``repr`` writes it.

    >>> print(_safe("w\x1b[2J\u202e.bias"))
    w\x1b[2J\u202e.bias
    """
    s = str(text)
    return s if s.isprintable() else "".join(repr(c)[1:-1] if _hidden(c) else c for c in s)


def _json(obj: Any) -> str:
    r"""Indented JSON, non-ASCII text kept, every hidden character as a JSON escape (``\u202e``)."""
    lines = json.dumps(obj, indent=2, ensure_ascii=False).split("\n")  # raw newlines are the indentation's
    return "\n".join(
        ln if ln.isprintable() else "".join(json.dumps(c)[1:-1] if _hidden(c) else c for c in ln) for ln in lines
    )


def _echo(text: object) -> None:
    click.echo(_safe(text))


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(_safe(c) for c in r) for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


class _Group(click.Group):
    """Turns every error into one readable line and a non-zero exit code (``--debug``: traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():  # warnings may quote a file too: printed escaped
                warnings.showwarning = lambda msg, cat, *_, **__: click.echo(f"{cat.__name__}: {_safe(msg)}", err=True)
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(e).strip().split("\n")[0] if str(e).strip() else type(e).__name__
            click.echo(f"error: {_safe(msg)}", err=True)
            ctx.exit(2)


@contextmanager
def _progress(ctx: click.Context, total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar on stderr for long work; silent when not a terminal or with --quiet."""
    quiet = ctx.obj.get("quiet") or not sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional extra
        quiet = True
    if quiet:
        yield lambda n: None
        return
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, mininterval=0.5, delay=1.0) as bar:
        yield bar.update


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(tk.__version__, prog_name="tensorkeep")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Inspect, compare, convert and verify tensor files and checkpoints."""
    ctx.ensure_object(dict)
    ctx.obj.update(quiet=quiet, debug=debug)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--filter", "pattern", default=None, help="Only tensors whose name matches this glob.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, pattern: str | None, as_json: bool) -> None:
    """Show the tensors, structure and metadata of a file or directory."""
    files = [path] if not os.path.isdir(path) else sorted(inspection.tensor_files(path))
    descs = [inspection.describe_file(f) for f in files]
    for d in descs:
        if pattern:
            d["tensors"] = [t for t in d["tensors"] if fnmatch.fnmatchcase(t["name"], pattern)]
    if as_json:
        click.echo(_json(descs if os.path.isdir(path) else descs[0]))
        return
    for d in descs:
        _echo(f"{d['path']}  ({d['kind']}, {_human(d['size'])}, {len(d['tensors'])} tensors)")
        rows = [
            (t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]", _human(t["bytes"]), t["checksum"])
            for t in d["tensors"]
        ]
        click.echo(_table(rows, ("name", "dtype", "shape", "size", "checksum")))
        totals = inspection.dtype_totals(d["tensors"])
        _echo("totals: " + ", ".join(f"{k} {c} tensors {_human(b)}" for k, (c, b) in totals.items()))
        if d["metadata"]:
            click.echo("metadata:")
            for k, v in d["metadata"].items():
                _echo(f"  {k}: {v if len(v) < 200 else v[:200] + '...'}")
        if d["structure"]:
            click.echo("structure:")
            for ln in d["structure"].split("\n"):
                _echo("  " + ln)
        click.echo()


@main.command()
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("--all", "show_all", is_flag=True, help="Also list equal tensors.")
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, show_all: bool) -> None:
    """Compare two files tensor by tensor. Exit code 0 when equal, 1 when different."""
    rows = []
    differs = False
    for d in inspection.diff(a, b):
        differs |= d.status != "equal"
        if d.status == "equal" and not show_all:
            continue
        detail = d.detail or (f"max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}" if d.status == "values" else "")
        rows.append((d.name, d.status, detail))
    if rows:
        click.echo(_table(rows, ("name", "change", "detail")))
    click.echo("files differ" if differs else "files are equal (every tensor bit-identical)")
    ctx.exit(1 if differs else 0)


_DTYPES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "fp64": "float64",
    "f64": "float64",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
}


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option(
    "--dtype", type=click.Choice(sorted(_DTYPES)), default=None, help="Convert floating-point tensors to this dtype."
)
@click.option("--max-shard-size", default=None, help='Write a sharded directory, e.g. "2GB".')
def convert(src: str, dst: str, dtype: str | None, max_shard_size: str | None) -> None:
    """Convert a .pt/.pth/.bin (weights-only), safetensors file, sharded directory or torch DCP
    (torch.distributed.checkpoint) directory to tensorkeep."""
    if os.path.isfile(os.path.join(src, ".metadata")):  # DCP: whole tensors from every rank's chunks
        if not dtype and not max_shard_size:
            tk.convert_dcp(src, dst)
            click.echo(f"wrote {dst}")
            return
        with tempfile.TemporaryDirectory() as d:
            tk.convert_dcp(src, os.path.join(d, "dcp.tk"))
            obj = tk.load(os.path.join(d, "dcp.tk"))
    else:
        obj = tk.load(src)
    if dtype:
        target = TORCH_BY_NAME[_DTYPES[dtype]]
        obj = _cast(obj, target)
    if max_shard_size:
        if not isinstance(obj, dict):
            raise click.UsageError("--max-shard-size needs a flat dict of tensors (a state dict)")
        tk.save_sharded(obj, dst, max_shard_size=max_shard_size)
    else:
        tk.save(obj, dst)
    click.echo(f"wrote {dst}")


def _cast(obj: Any, dtype: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        out = type(obj)((k, _cast(v, dtype)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--threads", type=int, default=None, help="Threads for reading and hashing (default: all cores).")
@click.pass_context
def verify(ctx: click.Context, paths: tuple[str, ...], threads: int | None) -> None:
    """Check every checksum and the structure. Exit code 1 on any damage."""
    with _progress(ctx, inspection.total_bytes(list(paths)), "verify") as update:
        res = inspection.verify(list(paths), threads=threads, progress=update)
    for note in res.notes:
        _echo(f"note: {note}")
    bad = {p.path for p in res.problems}
    for f in res.files:
        if f not in bad:
            _echo(f"ok       {f}")
    for p in res.problems:
        _echo(f"DAMAGED  {p}")
    if res.ok:
        click.echo(f"OK: {res.checked_files} file(s), {_human(res.checked_bytes)} verified")
    else:
        click.echo(f"{len(bad)} of {len(set(res.files) | bad)} file(s) damaged")
    ctx.exit(0 if res.ok else 1)


def _best_metric(infos: list, spec: str | None) -> tuple[str, str] | None:
    """``val_loss`` / ``val_acc:max`` -> (metric, mode); default: the first metric named like a loss, min."""
    if spec:
        name, _, mode = spec.partition(":")
        return name, mode or "min"
    for c in infos:
        for k in c.metrics:
            if "loss" in k:
                return k, "min"
    return None


@main.command(name="ls")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--best",
    "best_spec",
    default=None,
    metavar="METRIC[:min|max]",
    help="Metric that marks the best checkpoint (default: the first metric named *loss*, min).",
)
@click.option("--verify", "deep", is_flag=True, help="Check every checksum too (reads everything).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw the metrics across steps into this PNG, kept checkpoints marked (needs matplotlib).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(run_dir: str, best_spec: str | None, deep: bool, plot: str | None, as_json: bool) -> None:
    """List the checkpoints of a run: step, time, bytes held and written, metrics, latest/best, damaged or unfinished."""
    import datetime

    infos = tk.list_checkpoints(run_dir, verify=deep)
    good = [c for c in infos if c.ok]
    latest = max((c.step for c in good), default=None)
    best = None
    bm = _best_metric(good, best_spec)
    if bm:
        scored = [c for c in good if isinstance(c.metrics.get(bm[0]), (int, float))]
        if scored:
            pick = min if bm[1] == "min" else max
            best = pick(scored, key=lambda c: c.metrics[bm[0]]).step
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "step": c.step,
                        "path": c.path,
                        "status": c.status,
                        "time": c.time,
                        "bytes_held": c.bytes_held,
                        "bytes_written": c.bytes_written,
                        "metrics": c.metrics,
                        "latest": c.step == latest and c.ok,
                        "best": c.step == best and c.ok,
                    }
                    for c in infos
                ],
                indent=2,
            )
        )
        return
    rows = []
    for c in infos:
        try:
            when = datetime.datetime.fromtimestamp(c.time).strftime("%Y-%m-%d %H:%M:%S") if c.time else "-"
        except (ValueError, OverflowError, OSError):  # a time this platform cannot show
            when = "?"
        tags = [t for t, on in (("latest", c.ok and c.step == latest), ("best", c.ok and c.step == best)) if on]
        status = c.status if c.ok else c.status.split(":")[0].upper()
        metrics = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.metrics.items())
        rows.append((c.step, when, _human(c.bytes_held), _human(c.bytes_written), metrics, " ".join(tags), status))
    if not rows:
        _echo(f"{run_dir}: no checkpoints")
        return
    click.echo(_table(rows, ("step", "time", "holds", "wrote", "metrics", "", "status")))
    for c in infos:
        if not c.ok and c.status != "uncommitted":
            _echo(f"{c.path}: {c.status}")
    if plot:
        _plot(good, plot, latest, best)
        click.echo(f"wrote {plot}")


def _plot(infos: list, out: str, latest: int | None, best: int | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'tensorkeep[plot]'") from None
    names = sorted({k for c in infos for k, v in c.metrics.items() if isinstance(v, (int, float))})
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        pts = [(c.step, c.metrics[n]) for c in infos if isinstance(c.metrics.get(n), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
    for s, label, color in ((latest, "latest", "tab:green"), (best, "best", "tab:red")):
        if s is not None:
            ax.axvline(s, linestyle="--", color=color, alpha=0.6, label=f"{label} (step {s})")
    ax.set_xlabel("step")
    ax.set_title("kept checkpoints")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--keep-last", type=int, default=None, help="Keep the N newest checkpoints.")
@click.option("--keep-best", default=None, metavar="METRIC[:min|max]", help="Keep the best checkpoint by a metric.")
@click.option("--keep-every", type=int, default=None, help="Keep every checkpoint whose step is a multiple of N.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
def prune(run_dir: str, keep_last: int | None, keep_best: str | None, keep_every: int | None, dry_run: bool) -> None:
    """Apply a retention policy by hand. The newest checkpoint is always kept."""
    policies: list[Policy] = []
    if keep_last is not None:
        policies.append(tk.LatestN(keep_last))
    if keep_best:
        name, _, mode = keep_best.partition(":")
        policies.append(tk.BestN(name, mode or "min"))
    if keep_every is not None:
        policies.append(tk.EveryNSteps(keep_every))
    if not policies:
        raise click.UsageError("say what to keep: --keep-last, --keep-best and/or --keep-every")
    with tk.CheckpointManager(run_dir, read_only=dry_run) as mgr:  # a dry run takes no lock and changes nothing
        doomed = mgr.prune(policies, dry_run=dry_run)
        kept = mgr.steps() if not dry_run else [s for s in mgr.steps() if s not in doomed]
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(doomed)} checkpoint(s): {doomed}" if doomed else "nothing to delete")
    click.echo(f"kept: {kept}")


if __name__ == "__main__":  # pragma: no cover
    main()
