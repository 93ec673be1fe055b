"""The ``tensorkeep`` command: inspect, diff, convert, verify, ls and prune. Uses only the public API."""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import click

import tensorkeep as tk
from tensorkeep import inspection


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


class _Group(click.Group):
    """Turns every error into one readable line and a non-zero exit code (``--debug``: traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the whole point: no traceback for users
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"error: {msg}", err=True)
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
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, mininterval=0.5,
              delay=1.0) as bar:
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
    files = [path] if not os.path.isdir(path) else sorted(inspection._tensor_files(path))
    descs = [inspection.describe_file(f) for f in files]
    for d in descs:
        if pattern:
            d["tensors"] = [t for t in d["tensors"] if fnmatch.fnmatchcase(t["name"], pattern)]
    if as_json:
        click.echo(json.dumps(descs if os.path.isdir(path) else descs[0], indent=2, ensure_ascii=False))
        return
    for d in descs:
        click.echo(f"{d['path']}  ({d['kind']}, {_human(d['size'])}, {len(d['tensors'])} tensors)")
        rows = [(t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]", _human(t["bytes"]), t["checksum"])
                for t in d["tensors"]]
        click.echo(_table(rows, ("name", "dtype", "shape", "size", "checksum")))
        totals = inspection.dtype_totals(d["tensors"])
        click.echo("totals: " + ", ".join(f"{k} {c} tensors {_human(b)}" for k, (c, b) in totals.items()))
        if d["metadata"]:
            click.echo("metadata:")
            for k, v in d["metadata"].items():
                click.echo(f"  {k}: {v if len(v) < 200 else v[:200] + '...'}")
        if d["structure"]:
            click.echo("structure:\n" + "\n".join("  " + ln for ln in d["structure"].splitlines()))
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


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32",
           "fp64": "float64", "f64": "float64", "bfloat16": "bfloat16", "float16": "float16",
           "float32": "float32", "float64": "float64"}


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default=None,
              help="Convert floating-point tensors to this dtype.")
@click.option("--max-shard-size", default=None, help='Write a sharded directory, e.g. "2GB".')
def convert(src: str, dst: str, dtype: str | None, max_shard_size: str | None) -> None:
    """Convert a .pt/.pth/.bin (weights-only), safetensors file or sharded directory to tensorkeep."""
    obj = tk.load(src)
    if dtype:
        target = getattr(__import__("torch"), _DTYPES[dtype])
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
        click.echo(f"note: {note}")
    for p in res.problems:
        click.echo(f"DAMAGED {p}")
    if res.ok:
        click.echo(f"OK: {res.checked_files} file(s), {_human(res.checked_bytes)} verified")
    ctx.exit(0 if res.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
