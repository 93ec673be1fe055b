"""Proof, side by side: ckpt-chaos 0.1.8's built-in targets, stock and with tensorkeep's README lines.

    .venv/bin/python bench/bench_integrations.py [--targets dcp_ddp,...] [--ranks 1,2]
        [--modes before,torn,term] [--variants stock,tensorkeep] [--jobs 1] [--work DIR] [--out FILE]
        [--tensorkeep HEAD|REV|worktree] [--check] [--diff-only]

For each target (``lightning_trainer``, ``hf_trainer``, ``accelerate_loop``, ``dcp_ddp``,
``loop_ddp``) it runs the *stock* target (the installed module, what ``ckpt-chaos bench`` runs) and a
*tensorkeep* copy: the installed source with the lines of :data:`PATCHES` applied (what the README
tells users to add), written under ``--work``. Variant ``copy`` (the source unchanged, run as a copy)
shows that copying changes nothing. The runs import a snapshot of ``src/tensorkeep`` taken at start
(``git archive HEAD`` unless ``--tensorkeep`` says otherwise), so edits made meanwhile change nothing.

Each cell (target x variant x ranks) is ckpt-chaos' own matrix: a reference run, a dry run logging
every file event of the save of step 10, then per crash point one crashed training run and one
resume: every event in mode ``before`` (killed before the operation), every *tornable* event in
``torn`` (a native writer's file cut in half), every event in ``term`` (SIGTERM, a kill 5 s later;
``ckpt-chaos bench`` has no ``term``, so the points go through ``runner._run_point`` here).
Verdicts are ckpt-chaos' ``invariants.classify``: HARD_FAIL (the resume raised), SILENT_DIVERGENCE
(final weights differ from the reference's, or the ranks disagree), LOST_WORK (resumed from older than
the newest complete checkpoint), PASS; CONTROL_FAIL (the run without a crash failed).

NEWEST, the "newest complete checkpoint" LOST_WORK compares with, is measured before each resume. The
stock variants keep ckpt-chaos' definitions. For a tensorkeep copy it is **the highest step whose
checkpoint verifies** with :func:`tensorkeep.verification.verify` (what ``tensorkeep verify`` says:
its table of contents present, every file it lists there with every checksum right, at least one
file checked): for Lightning the ``global_step`` in the header of each verified ``.ckpt``; for HF,
Accelerate and DCP the ``N`` of each verified ``checkpoint-N``; for ``loop_ddp`` the steps
:func:`tensorkeep.list_checkpoints` reports ``ok`` with ``verify=True``. tensorkeep publishes only by
rename, so "under its final name and verifies" is "committed".

ckpt-chaos flags ``[PLAN DRIFT]`` when the event at a crash index differs from the dry run's;
tensorkeep's temporary names (``.NAME.tk-tmp-<pid>-<hex>``) differ in every run, so the drift is
recomputed with them normalised, on the event at the crash index (a ``term`` job may run on).

Uses private functions of ``ckpt_chaos.runner``: needs ckpt-chaos==0.1.8 exactly. About 20-35 s per
crash point on 2 cores; the whole matrix takes 1-1.5 h at ``--jobs 1``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import table


@dataclass(frozen=True)
class Edit:
    """One change to a target's source. ``anchor`` must occur exactly once (a changed ckpt-chaos
    fails loudly). ``op``: "after"/"before" insert ``lines`` on their own lines after/before the
    line(s) holding ``anchor``; "replace" replaces ``anchor`` with ``lines[0]``; "body" replaces the
    body of the function whose ``def`` line is ``anchor`` with ``lines``."""

    op: str
    anchor: str
    lines: tuple[str, ...]


# The patch table: what the README tells users to add, per target (the tensorkeep copy = stock + these).
PATCHES: dict[str, list[Edit]] = {
    "lightning_trainer": [
        Edit("after", "from .common import arm_from_env", ("from tensorkeep.lightning import TensorkeepCheckpointIO",)),
        Edit("after", "        default_root_dir=out,", ("        plugins=[TensorkeepCheckpointIO()],",)),
    ],
    "hf_trainer": [
        Edit("after", "from .common import arm_from_env", ("from tensorkeep.transformers import protect",)),
        Edit(
            "replace",
            "return Trainer(model=model, args=args, train_dataset=DS(), callbacks=[hooks])",
            ("return protect(Trainer(model=model, args=args, train_dataset=DS(), callbacks=[hooks]))",),
        ),
    ],
    "accelerate_loop": [
        Edit("after", "from .common import arm_from_env", ("from tensorkeep import accelerate as tk_acc",)),
        Edit("after", "    acc = Accelerator(cpu=True)", ("    tk_acc.protect(acc)",)),
    ],
    "dcp_ddp": [
        Edit(
            "after",
            "import torch.distributed.checkpoint as dcp",
            ("from tensorkeep.integrations import dcp as tk_dcp",),
        ),
        Edit("replace", 'f"checkpoint-{step}"))', ('f"checkpoint-{step}"), storage_writer=tk_dcp.Writer())',)),
        Edit(
            "replace",
            "dcp.load(state, checkpoint_id=ckpt)",
            ("dcp.load(state, checkpoint_id=ckpt, storage_reader=tk_dcp.Reader())",),
        ),
    ],
    "loop_ddp": [  # design §7.2: a tk.CheckpointManager replaces the hand-written save and resume
        Edit("after", "from .common import arm_from_env", ("import tensorkeep as tk",)),
        Edit(
            "body",
            "def save_checkpoint(out, step, model, opt):",
            ('    MGR.save(step, {"model": model, "optimizer": opt})',),
        ),
        Edit(
            "before", "    model, wrapped, opt = build()", ("    global MGR", "    MGR = tk.CheckpointManager(a.out)")
        ),
        Edit(
            "replace",
            "start = load_checkpoint(latest_checkpoint(a.out), model, opt)",
            ('start = MGR.restore({"model": model, "optimizer": opt}) or 0',),
        ),
    ],
}
TARGETS = list(PATCHES)
NOTES = """

- PASS counts the control run (no crash). Crash points: per mode, over every rank; tensorkeep's writes
  are never tornable (`os.pwrite` on its own descriptors), so its variants have no `torn` points.
- `term` = SIGTERM, then a kill after 5 s. Only Lightning has a SIGTERM handler: its train phase
  stops after the save of step 10 anyway, so it exits cleanly ("did not crash"); elsewhere `term`
  kills like `before`.
- "newest ok" (what LOST_WORK compares with) of the stock `checkpoint-N` targets is ckpt-chaos' size
  profile of the dry run's `checkpoint-10`: it reads 0 for stock `dcp_ddp` (`.metadata` is one
  byte longer at step 10 than at step 5) and is unreliable for stock `accelerate_loop` (pickled RNG
  states change size), so LOST_WORK cannot show there. tensorkeep copies: the newest checkpoint that
  verifies (see the script's docstring).

"""
ONE_RANK_ONLY = {"accelerate_loop"}  # arms every process and writes only rank 0's outcome (design §1.5)
MODES = ("before", "torn", "term")
VARIANTS = ("stock", "copy", "tensorkeep")
VERDICTS = ("PASS", "HARD_FAIL", "SILENT_DIVERGENCE", "LOST_WORK", "CONTROL_FAIL")
CHAOS_VERSION = "0.1.8"
_TMP_NAME = re.compile(r"\.tk-tmp-\d+-[0-9a-f]+")  # tensorkeep's temporary names: .NAME.tk-tmp-<pid>-<hex>


# ------------------------------------------------------------------------------------- the copies


def apply(source: str, edits: list[Edit]) -> str:
    """``source`` with ``edits`` applied, each anchor found exactly once.

    >>> apply("a\\n    b\\nc\\n", [Edit("after", "b", ("    x",))])
    'a\\n    b\\n    x\\nc\\n'
    """
    for e in edits:
        if source.count(e.anchor) != 1:
            raise ValueError(f"anchor {e.anchor!r} occurs {source.count(e.anchor)} times in the target, expected once")
        i = source.index(e.anchor)
        start = source.rfind("\n", 0, i) + 1
        end = source.find("\n", i + len(e.anchor)) + 1 or len(source)
        new = "".join(line + "\n" for line in e.lines)
        if e.op == "after":
            source = source[:end] + new + source[end:]
        elif e.op == "before":
            source = source[:start] + new + source[start:]
        elif e.op == "replace":
            source = source.replace(e.anchor, e.lines[0])
        elif e.op == "body":
            stop = end
            for m in re.finditer(r".*\n", source[end:]):
                if m.group().strip() and not m.group().startswith((" ", "\t")):
                    break
                stop = end + m.end()
            rest = source[end:stop]
            trailing = rest[len(rest.rstrip("\n")) :]  # the blank lines before the next definition stay
            source = source[:end] + new + trailing[1:] + source[stop:]
        else:
            raise ValueError(f"unknown edit {e.op!r}")
    return source


def stock_source(target: str) -> str:
    spec = importlib.util.find_spec(f"ckpt_chaos.targets.{target}")
    assert spec is not None and spec.origin is not None, target
    return Path(spec.origin).read_text()


def diff(target: str) -> tuple[str, int, int]:
    """The unified diff stock -> tensorkeep copy, its added/changed and its removed line counts."""
    a = stock_source(target)
    b = apply(a, PATCHES[target])
    lines = list(difflib.unified_diff(a.splitlines(True), b.splitlines(True), f"{target}.py", f"{target}_tk.py", n=1))
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    return "".join(lines), added, removed


def snapshot_tensorkeep(src: Path, rev: str) -> str:
    """Puts the ``tensorkeep`` package the runs import into ``src``: ``git archive`` of ``rev``, or
    with ``rev == "worktree"`` a copy of the working tree as it is now (other edits while the bench
    runs then change nothing). Returns what it took (commit id, "+ uncommitted changes" for the tree)."""
    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True).stdout
    if rev == "worktree":
        shutil.copytree(repo / "src" / "tensorkeep", src / "tensorkeep", ignore=shutil.ignore_patterns("__pycache__"))
        dirty = git("status", "--porcelain", "--", "src/tensorkeep").strip()
        return git("rev-parse", "--short", "HEAD").decode().strip() + (" + uncommitted changes" if dirty else "")
    tar = git("archive", "--format=tar", rev, "src/tensorkeep")
    subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(src)], input=tar, check=True)
    return git("rev-parse", "--short", rev).decode().strip()


def write_copies(src: Path, targets: list[str]) -> None:
    """``src/chaos_targets/``: ckpt-chaos' ``common.py``, and per target a verbatim copy and the tensorkeep copy."""
    pkg = src / "chaos_targets"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text(stock_source("common"))
    for t in targets:
        (pkg / f"{t}.py").write_text(stock_source(t))
        (pkg / f"{t}_tk.py").write_text(apply(stock_source(t), PATCHES[t]))


# ------------------------------------------------------------------------ newest verified checkpoint


def _verifies(path: Path) -> bool:
    from tensorkeep.verification import verify

    r = verify(str(path))
    return r.ok and bool(r.files)


def _newest_lightning(out: Path, healthy: dict) -> int:
    import tensorkeep as tk
    from tensorkeep.integrations.lightning import STEP

    steps = []
    for p in (out / "checkpoints").glob("*.ckpt"):
        if p.is_file() and not p.is_symlink() and _verifies(p):
            with tk.open(str(p)) as f:
                steps.append(int(f.metadata.get(STEP, 0)))
    return max(steps, default=0)


def _newest_dirs(out: Path, healthy: dict) -> int:
    """HF, Accelerate, DCP copies: the highest N of a ``checkpoint-N`` directory that verifies."""
    steps = [int(m[1]) for p in out.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and _verifies(p)]
    return max(steps, default=0)


def _newest_manager(out: Path, healthy: dict) -> int:
    import tensorkeep as tk

    return max((c.step for c in tk.list_checkpoints(str(out), verify=True) if c.status == "ok"), default=0)


NEWEST: dict[str, Callable[[Path, dict], int]] = {
    "lightning_trainer": _newest_lightning,
    "hf_trainer": _newest_dirs,
    "accelerate_loop": _newest_dirs,
    "dcp_ddp": _newest_dirs,
    "loop_ddp": _newest_manager,
}


def register(runner, target: str) -> dict[str, str]:
    """Adds the copies of ``target`` to ckpt-chaos' runner; returns variant -> runner target name."""
    runner.TARGETS[f"{target}_copy"] = f"chaos_targets.{target}"
    runner.TARGETS[f"{target}_tk"] = f"chaos_targets.{target}_tk"
    if target in runner.NEWEST:
        runner.NEWEST[f"{target}_copy"] = runner.NEWEST[target]
    runner.NEWEST[f"{target}_tk"] = NEWEST[target]
    return {"stock": target, "copy": f"{target}_copy", "tensorkeep": f"{target}_tk"}


# ------------------------------------------------------------------------------------ one cell


@dataclass
class Cell:
    target: str
    variant: str
    ranks: int
    points: Counter = field(default_factory=Counter)  # mode -> crash points run
    rows: list = field(default_factory=list)  # ((rank, event, mode), runner.Row) per point, control first
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    note: str = ""


def _norm(event: tuple) -> tuple:
    return tuple(_TMP_NAME.sub(".tk-tmp-*", x) if isinstance(x, str) else x for x in event[:3])


def _tail(log: Path, n: int = 3) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " / ".join(lines[-n:])[-300:]


def run_cell(runner, cell: Cell, name: str, work: Path, modes: list[str], jobs: int, check: bool = False) -> None:
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=False)
    base = {"CKPT_CHAOS_STRATEGY": "direct"}
    if cell.ranks > 1 and cell.target == "lightning_trainer":  # the runner does it for the stock name only
        base["TORCHELASTIC_RUN_ID"] = "ckpt-chaos"
    ref = work / "reference" / "out"
    runner._launch(name, "reference", ref, base, cell.ranks)
    if not (ref / "final_rank0.pt").exists():
        cell.note = f"reference run failed: {_tail(ref.parent / 'reference_rank0.log')}"
        cell.wall = time.monotonic() - t0
        return
    if check:
        cell.note = "reference run ok (--check, no crash points)"
        cell.wall = time.monotonic() - t0
        return
    dry = work / "dry" / "out"
    log = work / "dry" / "events.log"
    rc = runner._launch(name, "train", dry, dict(base, CKPT_CHAOS_WATCH=str(dry), CKPT_CHAOS_LOG=str(log)), cell.ranks)
    if rc:
        cell.errors.append(f"dry run exited {rc}: {_tail(dry.parent / 'train_rank0.log')}")
    healthy = {}  # ckpt-chaos' size profile of a complete checkpoint, for targets without a NEWEST function
    if name not in runner.NEWEST:
        ten = next((dry / d for d in ("checkpoint-10", "checkpoint-10.tmp") if (dry / d).is_dir()), None)
        if ten is None:
            cell.errors.append("the dry run left no checkpoint-10: 'newest ok' counts every checkpoint complete")
        else:
            healthy = runner._profile(ten)
    plan = {(r, ev[0]): ev for r in range(cell.ranks) for ev in runner._events(work / "dry" / f"events.log.rank{r}")}
    points: list = [None] + [(r, n, m) for m in modes for (r, n), ev in plan.items() if m != "torn" or ev[3]]
    cell.points = Counter(p[2] for p in points if p)
    print(f"{name}, {cell.ranks} rank(s): {len(plan)} save events -> {len(points)} runs (incl. control)", flush=True)
    cfg = dict(
        work=work,
        target=name,
        ranks=cell.ranks,
        base=base,
        plan=plan,
        healthy=healthy,
        ref_final=ref / "final_rank0.pt",
    )

    def one(ip: tuple) -> tuple:
        order, point = ip
        try:
            rec = runner._run_point(cfg, order, point)
        except Exception as e:  # a harness failure (e.g. a missing final file) is reported, not judged
            cell.errors.append(f"{point}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return point, None
        if point is not None:
            rank, n, mode = point
            wd = work / f"pt_r{rank}_{n}_{mode}"
            seen = {ev[0]: ev for ev in runner._events(wd / f"events.log.rank{rank}")}
            rec["drift"] = n not in seen or _norm(seen[n]) != _norm(plan[(rank, n)])
            (wd / "result.json").write_text(json.dumps(rec))
        row = runner._judge(rec)
        print(f"  {row.label:<60} {row.verdict}", flush=True)
        return point, row

    with ThreadPoolExecutor(jobs) as ex:
        done = list(ex.map(one, enumerate(points)))
    cell.rows = [(p or (0, 0, "control"), row) for p, row in done if row is not None]
    cell.wall = time.monotonic() - t0


# ----------------------------------------------------------------------------------------- report


def summary(cells: list[Cell], modes: list[str]) -> str:
    rows: list[tuple[str, ...]] = []
    for c in cells:
        counts = Counter(row.verdict for _, row in c.rows)
        flags = []
        if c.note:
            flags.append(c.note.split(": ")[0])
        if k := sum(1 for p, r in c.rows if p[2] != "control" and not r.crashed):
            flags.append(f"{k} did not crash")
        if k := sum(1 for _, r in c.rows if r.drift):
            flags.append(f"{k} plan drift")
        if c.errors:
            flags.append(f"{len(c.errors)} harness error(s)")
        pts = " / ".join(str(c.points.get(m, 0)) for m in modes) if not c.note else "-"
        verdicts = [str(counts.get(v, 0)) for v in VERDICTS]
        rows.append((c.target, c.variant, str(c.ranks), pts, *verdicts, f"{c.wall:.0f} s", "; ".join(flags)))
    header = ("target", "variant", "ranks", f"crash points ({'/'.join(modes)})", *VERDICTS, "wall", "notes")
    return table(rows, header)


def details(c: Cell) -> str:
    rows: list[tuple[str, ...]] = []
    for (rank, n, mode), r in c.rows:
        o = r.outcome
        result = f"RAISED {o.raised}" if o.raised else f"resumed from step {o.resumed_from_step}"
        if not o.raised and not o.ranks_agree:
            result += " (ranks differ)"
        flags = ("" if r.crashed or mode == "control" else "did not crash ") + ("plan drift" if r.drift else "")
        wdiff = "-" if o.weights_diff is None else f"{o.weights_diff:.2e}"
        event = "-" if mode == "control" else f"r{rank} #{n}"
        rows.append(
            (event, r.label.replace("|", "/"), str(o.newest_complete_step), result, wdiff, r.verdict, flags.strip())
        )
    out = f"#### {c.target}, {c.variant}, {c.ranks} rank(s)\n\n"
    if rows:
        header = ("event", "crash point", "newest ok", "resume result", "weights diff", "verdict", "flags")
        out += table(rows, header) + "\n"
    notes = [e for e in [c.note, *c.errors] if e]
    return out + ("\n" if rows and notes else "") + "".join(f"- {e}\n" for e in notes)


def lines_changed(targets: list[str]) -> str:
    rows: list[tuple[str, ...]] = []
    blocks = []
    for t in targets:
        text, added, removed = diff(t)
        rows.append((t, str(added), str(removed), "yes" if added <= 5 else "NO"))
        blocks.append(
            f"#### {t}: {added} line(s) added or changed, {removed} removed or changed\n\n```diff\n{text}```\n"
        )
    header = ("integration", "+ lines (added or changed)", "- lines (removed or changed)", "+ lines <= 5")
    return table(rows, header) + "\n\n" + "\n".join(blocks)


# ------------------------------------------------------------------------------------------- main


def _list(s: str, allowed: tuple | list, what: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}: choose from {', '.join(allowed)}")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: all five)")
    ap.add_argument("--ranks", default="1,2", help="comma-separated process counts (2 = gloo ranks)")
    ap.add_argument("--modes", default=",".join(MODES), help="crash modes: before, torn, term")
    ap.add_argument("--variants", default="stock,tensorkeep", help="stock, copy (verbatim copy), tensorkeep")
    ap.add_argument("--jobs", type=int, default=1, help="crash points run at a time")
    ap.add_argument("--work", default=None, help="run directory (default /tmp/tk-bench-integrations-<time>)")
    ap.add_argument("--out", default=None, help="write the markdown tables to this file too")
    ap.add_argument(
        "--tensorkeep",
        default="HEAD",
        help="the tensorkeep the runs import: a git revision of src/tensorkeep (default HEAD), or 'worktree'",
    )
    ap.add_argument("--check", action="store_true", help="run only each cell's reference run (does it work?)")
    ap.add_argument("--diff-only", action="store_true", help="print the diffs and line counts, run nothing")
    a = ap.parse_args()
    targets = _list(a.targets, TARGETS, "target")
    modes = _list(a.modes, MODES, "mode")
    variants = _list(a.variants, VARIANTS, "variant")
    ranks = [int(r) for r in _list(a.ranks, ["1", "2"], "rank count")]
    cmd = "python bench/bench_integrations.py " + shlex.join(sys.argv[1:])
    if a.diff_only:
        print(lines_changed(targets))
        return
    have = importlib.metadata.version("ckpt-chaos")
    if have != CHAOS_VERSION:
        raise SystemExit(f"needs ckpt-chaos=={CHAOS_VERSION} (uses its private runner functions), found {have}")
    from ckpt_chaos import runner

    work = Path(a.work or time.strftime("/tmp/tk-bench-integrations-%Y%m%d-%H%M%S")).resolve()
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty: give a new directory")
    work.mkdir(parents=True, exist_ok=True)
    write_copies(work / "src", targets)
    tk_rev = snapshot_tensorkeep(work / "src", a.tensorkeep)
    sys.path.insert(0, str(work / "src"))  # this process verifies checkpoints with the same tensorkeep
    import tensorkeep

    assert Path(tensorkeep.__file__).is_relative_to(work / "src"), tensorkeep.__file__
    for k in [k for k in os.environ if k.startswith("CKPT_CHAOS_")]:
        del os.environ[k]  # e.g. CKPT_CHAOS_PATCH=skip_incomplete would change the stock hf_trainer
    os.environ["CKPT_CHAOS_PREPEND_PYTHONPATH"] = str(work / "src")

    cells = []
    for t in targets:
        names = register(runner, t)
        for r in ranks:
            for v in variants:
                cell = Cell(t, v, r)
                cells.append(cell)
                if t in ONE_RANK_ONLY and r > 1:
                    cell.note = "not run (the built-in target supports 1 process only)"
                    continue
                run_cell(runner, cell, names[v], work / f"{t}-{v}-r{r}", modes, a.jobs, a.check)
                print(
                    f"{t} {v} {r} rank(s): {dict(Counter(row.verdict for _, row in cell.rows))} in {cell.wall:.0f} s\n",
                    flush=True,
                )

    md = (
        f"### ckpt-chaos {CHAOS_VERSION}: stock vs tensorkeep\n\n`{cmd}`\n\ntensorkeep {tk_rev}, work directory `{work}`\n\n"
        + summary(cells, modes)
        + NOTES
        + "### Lines changed per integration\n\n"
        + lines_changed(targets)
        + "\n### Every crash point\n\n"
        + "\n".join(details(c) for c in cells if c.rows or c.errors or "failed" in c.note)
    )
    print(md)
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
