"""Mutation fuzzer for ``tk.load`` / ``tk.open``: valid tensorkeep and safetensors files, damaged.

Shared by ``tests/crash/test_mutation_fuzz.py`` (N inputs in worker processes, each under a memory limit
and a per-input alarm) and ``fuzz/fuzz_load.py`` (atheris). The inputs, valid files with a few
mutations, come from ``tests/fuzz_inputs.py``.

The oracle. A loader may refuse an input only with a tensorkeep error. If it accepts one:

* safetensors must accept it as well, and every tensor tensorkeep reads (name, dtype, shape, bytes)
  must equal what ``safetensors.safe_open`` reads;
* if it is a tensorkeep file: its header and block checksums, recomputed here with zlib, must
  match; a file that was not forged must be byte-identical to a seed and load exactly as that seed
  (checksums mean damage is caught); a forged one must equal the structure its record describes,
  rebuilt here from the tensors safetensors read;
* a plain file must not be a damaged tensorkeep file (within one bit of its first bytes), and
  loads as safetensors' tensors;
* ``tk.load``, ``tk.load(lazy=True)`` and ``tk.open`` (get, get_slice, load) must all agree;
* no audited event (pickle, exec, subprocess) fires while loading.

Run by hand: ``python tests/fuzz_mutation.py --inputs 1000000``; ``--repro STREAM:INDEX`` re-runs one
generated input, ``--check FILE`` one saved file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

import tensorkeep as tk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script, or from fuzz/
from fuzz_inputs import TK_PREFIX, Case, Seed, header_len, make_case, make_seeds

NUMPY = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
    "C64": "<c8",
}
WATCHED = {"pickle.find_class", "exec", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"}
FAILURES = ("uncaught", "hang", "memory", "wrong", "audit", "harness")


# ----------------------------------------------------------------------------- oracle


def _raw(x: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, bytes) of a tensor or NumPy array, for comparisons."""
    if isinstance(x, np.ndarray):  # named as torch names the same dtype, so arrays compare with tensors
        return str(torch.from_numpy(np.empty(0, x.dtype)).dtype), x.shape, np.ascontiguousarray(x).tobytes()
    t = x.detach().contiguous()
    return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def reference_tensors(path: str) -> dict[str, torch.Tensor]:
    """What safetensors reads, copied byte for byte out of its mapping of the file (``clone()``
    would rewrite a BOOL byte 2 as 1)."""
    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            copy = torch.empty(t.shape, dtype=t.dtype)
            copy.reshape(-1).view(torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
            out[k] = copy
    return out


def _as_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    return np.frombuffer(_raw(t)[2], np.dtype(NUMPY[dtype])).reshape(t.shape).copy()


def ref_build(tree: Any, tensors: dict[str, torch.Tensor], dtypes: dict[str, str]) -> Any:
    """The object a structure record describes (see tensorkeep/tree.py's docstring), built from
    the tensors safetensors read."""

    def build(n: Any) -> Any:
        if n is None or type(n) in (bool, int, str):
            return n
        tag, v = next(iter(n.items()))
        if tag == "f":
            return float(v)
        if tag == "t":
            x = tensors[v]
            grad = bool(n.get("g")) and (x.is_floating_point() or x.is_complex())
            if n.get("p"):
                return torch.nn.Parameter(x, requires_grad=grad)
            return x.detach().requires_grad_(True) if grad else x
        if tag == "n":
            a = _as_numpy(tensors[v], dtypes[v])
            return a[()] if n.get("s") else a
        if tag in ("d", "o"):
            pairs = [(k, build(x)) for k, x in v]
            out = dict(pairs) if tag == "d" else OrderedDict(pairs)
            if "m" in n:
                out._metadata = build(n["m"])  # type: ignore[attr-defined]
            return out
        if tag in ("l", "u"):
            seq = [build(x) for x in v]
            return seq if tag == "l" else tuple(seq)
        if tag == "S":
            return torch.Size(v)
        if tag == "dt":
            return getattr(torch, v)
        if tag == "dev":
            return torch.device(v)
        raise ValueError(f"unknown tag {tag!r}")

    return build(tree)


def deep_diff(a: Any, b: Any, where: str = "obj", ordered: bool = True) -> str | None:
    """Where ``a`` and ``b`` differ (types, keys, dtypes, shapes, bytes, grad flags), or None."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if a.requires_grad != b.requires_grad:
            return f"{where}: requires_grad {a.requires_grad} != {b.requires_grad}"
        ra, rb = _raw(a), _raw(b)
        return None if ra == rb else f"{where}: {ra[:2]} {ra[2][:16]!r} != {rb[:2]} {rb[2][:16]!r}"
    if isinstance(a, (np.ndarray, np.generic)):
        ra, rb = _raw(np.asarray(a)), _raw(np.asarray(b))
        return None if ra == rb else f"{where}: {ra[:2]} != {rb[:2]} or bytes differ"
    if type(a) is float:
        return None if struct.pack("<d", a) == struct.pack("<d", b) else f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        ka, kb = list(a), list(b)
        if (ka != kb) if ordered else (sorted(map(str, ka)) != sorted(map(str, kb))):
            return f"{where}: keys {ka[:8]} != {kb[:8]}"
        if getattr(a, "_metadata", None) != getattr(b, "_metadata", None):
            return f"{where}: _metadata differs"
        return next((d for k in ka if (d := deep_diff(a[k], b[k], f"{where}[{k!r}]", ordered))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := deep_diff(x, y, f"{where}[{i}]", ordered))), None)
    return None if a == b else f"{where}: {a!r:.60} != {b!r:.60}"


def _near_tk_prefix(data: bytes) -> bool:
    got = data[8 : 8 + len(TK_PREFIX)]
    if len(got) < len(TK_PREFIX):
        return False
    return sum(bin(x ^ y).count("1") for x, y in zip(got, TK_PREFIX)) <= 1


def _checksum_problem(data: bytes, header: dict, ref: dict[str, torch.Tensor]) -> str | None:
    """Recompute the header checksum and every block checksum of an accepted tensorkeep file."""
    n = header_len(data)
    at = 8 + len(TK_PREFIX)
    zeroed = data[:at] + b"00000000" + data[at + 8 : 8 + n]
    if "%08x" % zlib.crc32(zeroed) != data[at : at + 8].decode("latin-1"):
        return "accepted a tensorkeep file whose header checksum does not match"
    info = json.loads(header["__metadata__"]["tensorkeep"])
    block = info["block"]
    for name, t in ref.items():
        raw = _raw(t)[2]
        want = ["%08x" % zlib.crc32(raw[i : i + block]) for i in range(0, max(len(raw), 1), block)]
        if info["crc"][name] != want:
            return f"accepted tensor {name!r} whose block checksums do not match its bytes"
    return None


def _open_all(path: str) -> Any:
    """tk.open: every tensor by get(), a few rows by get_slice(), then load(); all must agree."""
    with tk.open(path) as f:
        whole = f.load()
        for k in f.keys():
            x = f.get(k)
            if len(x.shape) and x.shape[0] >= 2:
                part = f.get_slice(k)[1:2]
                if deep_diff(torch.as_tensor(part), torch.as_tensor(x[1:2])):
                    raise AssertionError(f"get_slice({k!r})[1:2] differs from get({k!r})[1:2]")
        return whole


LOADERS: dict[str, Callable[[str], Any]] = {
    "load": lambda p: tk.load(p),
    "lazy": lambda p: tk.load(p, lazy=True),
    "open": _open_all,
}


def verify_accepted(case: Case, got: Any, how: str, path: str, seeds: list[Seed]) -> tuple[str, str | None]:
    """(what kind of acceptance, problem or None) for an input a loader accepted."""
    data = case.data
    if data[8:9] != b"{" and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        return "torch-file", None  # handed to torch.load(weights_only=True): only crash-freedom is checked
    try:
        ref = reference_tensors(path)
    except Exception as e:  # safetensors raises its own error types
        return "plain", f"tensorkeep accepted a file safetensors refuses ({type(e).__name__}: {e})"
    with tk.open(path) as f:
        flat = {k: f.get(k) for k in f.keys()}
    if sorted(flat) != sorted(ref):
        return "plain", f"tensor names {sorted(flat)[:6]} != safetensors' {sorted(ref)[:6]}"
    for k, x in flat.items():
        if _raw(x) != _raw(ref[k]):
            return "plain", f"tensor {k!r}: {_raw(x)[:2]} != safetensors' {_raw(ref[k])[:2]} (or bytes differ)"
    header = json.loads(data[8 : 8 + header_len(data)])
    meta = header.get("__metadata__") or {}
    if "tensorkeep" in meta:
        label = "tk-forged" if case.forged else "tk-seed"
        problem = _checksum_problem(data, header, ref)
        if problem:
            return label, problem
        if case.forged:
            info = json.loads(meta["tensorkeep"])
            dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
            expected, ordered = ref_build(info["tree"], ref, dtypes), True
        else:
            same = [s for s in seeds if s.data == data]
            if not same:
                return label, "accepted a damaged tensorkeep file (checksums should have caught it)"
            expected, ordered = same[0].obj, True
    else:
        label = "plain"
        if _near_tk_prefix(data):
            return label, "a damaged tensorkeep file was accepted as a plain safetensors file"
        expected, ordered = ref, False
    for other, load in LOADERS.items():
        try:
            value = got if other == how else load(path)
        except Exception:  # a tensorkeep error too: the loaders must agree
            return label, f"{other} raised what {how} accepted: {traceback.format_exc(limit=-6)}"
        diff = deep_diff(value, expected, "obj", ordered)
        if diff:
            return label, f"{other}: loaded object differs from the reference: {diff}"
    return label, None


# ----------------------------------------------------------------------------- running inputs


class InputTimeout(BaseException):
    """Raised by the per-input alarm (a BaseException, so no ``except Exception`` swallows it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise InputTimeout


_auditing = [False]
_audit_events: list[str] = []


def _audit(event: str, args: Any) -> None:
    if _auditing[0] and event in WATCHED:
        _audit_events.append(f"{event} {args!r:.100}")


def setup_process() -> None:
    """Per-input alarm and loading audit for the calling process (a worker, or atheris)."""
    signal.signal(signal.SIGALRM, _on_alarm)
    sys.addaudithook(_audit)
    torch.set_num_threads(1)  # inputs are tiny; two workers share two cores


def write_input(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def check_case(case: Case, path: str, seeds: list[Seed], how: str, timeout: float) -> tuple[str, str]:
    """Run one input: (outcome, detail). Outcomes: accepted:<kind>, refused:<error>, or a FAILURES kind."""
    write_input(path, case.data)
    stage = "loading"
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        del _audit_events[:]
        _auditing[0] = True
        try:
            got = LOADERS[how](path)
        except tk.TensorkeepError as e:
            if any(case.data == s.data for s in seeds):
                return "wrong", f"{how}: the unmodified seed was refused: {e}"
            return f"refused:{type(e).__name__}", str(e)[:200]
        finally:
            _auditing[0] = False
        if _audit_events:
            return "audit", f"{how}: code ran while loading: {_audit_events}"
        stage = "checking"
        label, problem = verify_accepted(case, got, how, path, seeds)
        return ("wrong", problem) if problem else (f"accepted:{label}", "")
    except InputTimeout:
        return "hang", f"{how}: no answer within {timeout} s ({stage})"
    except MemoryError:
        return "memory", f"{how} ({stage}): {traceback.format_exc(limit=-6)}"
    except Exception as e:  # anything else is the finding
        kind = "harness" if stage == "checking" else "memory" if "allocate" in str(e) else "uncaught"
        return kind, f"{how} ({stage}): {traceback.format_exc(limit=-8)}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def generate(stream: int, index: int, seeds: list[Seed]) -> Case:
    return make_case(random.Random((stream << 40) + index), seeds)


def how_for(index: int) -> str:
    return ("load", "lazy", "open")[index % 3]


def _save_failure(out: str, name: str, case: Case, outcome: str, detail: str, seeds: list[Seed]) -> str:
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, f"{outcome}-{name}.safetensors")
    with open(p, "wb") as f:
        f.write(case.data)
    with open(p + ".txt", "w") as f:
        f.write(f"seed file: {seeds[case.seed].name}\nmutations: {case.ops}\nforged: {case.forged}\n\n{detail}\n")
    return p


def limit_memory(extra_bytes: int) -> None:
    """Let this process map at most ``extra_bytes`` more than it has now (RLIMIT_AS): a larger
    allocation raises MemoryError instead of exhausting the machine."""
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, resource.RLIM_INFINITY))


def worker(
    wid: int, stream: int, start: int, count: int, input_path: str, out: str, timeout: float, mem_bytes: int
) -> dict:
    """Run inputs ``start .. start+count-1`` of ``stream`` in this process; a summary of outcomes."""
    setup_process()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(input_path)) as d:
        seeds = make_seeds(d)
    for i, s in enumerate(seeds):  # the seeds themselves must load exactly
        outcome, detail = check_case(Case(s.data, i, [], False), input_path, seeds, "load", timeout * 10)
        assert outcome.startswith("accepted"), (s.name, outcome, detail)
    limit_memory(mem_bytes)
    outcomes: Counter[str] = Counter()
    saved: list[str] = []
    t0 = time.perf_counter()
    for index in range(start, start + count):
        case = generate(stream, index, seeds)
        outcome, detail = check_case(case, input_path, seeds, how_for(index), timeout)
        outcomes[outcome] += 1
        if outcome in FAILURES and outcomes[outcome] <= 20:
            saved.append(_save_failure(out, f"{stream}-{index}", case, outcome, detail, seeds))
    return {
        "worker": wid,
        "inputs": count,
        "seconds": time.perf_counter() - t0,
        "outcomes": dict(outcomes),
        "saved": saved,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _scratch_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _start_worker(
    w: int, scratch: str, out: str, stream: int, per: int, inputs: int, timeout: float, mem_mb: int
) -> tuple[int, str, subprocess.Popen]:
    start, count = w * per, max(0, min(per, inputs - w * per))
    inp = os.path.join(scratch, f"input-{w}.safetensors")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        str(w),
        "--stream",
        str(stream),
        "--start",
        str(start),
        "--inputs",
        str(count),
        "--input-path",
        inp,
        "--out",
        out,
        "--timeout",
        str(timeout),
        "--mem-mb",
        str(mem_mb),
    ]
    with open(inp + ".out", "w") as log:  # a file, not a pipe: a chatty worker must not block on a full pipe
        return w, inp, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)


def run(
    inputs: int,
    out: str,
    *,
    workers: int = 2,
    stream: int = 0,
    timeout: float = 2.0,
    mem_mb: int = 1024,
    stall_s: float = 60.0,
) -> dict:
    """Fuzz ``inputs`` inputs in ``workers`` processes; a summary with failures saved under ``out``.

    A worker that dies (a crash, or killed after ``stall_s`` seconds without finishing an input:
    a hang the alarm could not interrupt) is reported with the input it was on."""
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tk-mutation-", dir=_scratch_dir()) as scratch:
        procs = [
            _start_worker(w, scratch, out, stream, -(-inputs // workers), inputs, timeout, mem_mb)
            for w in range(workers)
        ]
        results, dead = [], []
        for w, inp, p in procs:
            while p.poll() is None:
                time.sleep(0.5)
                if os.path.exists(inp) and time.time() - os.path.getmtime(inp) > stall_s:
                    p.kill()
            stdout = open(inp + ".out").read()
            if p.returncode == 0:
                results.append(
                    json.loads(next(ln for ln in reversed(stdout.splitlines()) if ln.startswith('{"worker"')))
                )
                continue
            kept = os.path.join(out, f"died-worker{w}.safetensors")
            if os.path.exists(inp):
                shutil.move(inp, kept)
            dead.append(f"worker {w} exited with {p.returncode} (input kept as {kept}): {stdout[-2000:]}")
    outcomes: Counter[str] = Counter()
    for r in results:
        outcomes.update(r["outcomes"])
    seconds = time.perf_counter() - t0
    done = sum(r["inputs"] for r in results)
    return {
        "inputs": done,
        "seconds": round(seconds, 1),
        "inputs_per_s": round(done / seconds),
        "outcomes": dict(sorted(outcomes.items())),
        "failures": sum(outcomes[k] for k in FAILURES) + len(dead),
        "saved": [p for r in results for p in r["saved"]],
        "dead": dead,
        "out": out,
        "worker_maxrss_mb": [round(r["maxrss_mb"]) for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stream", type=int, default=0, help="which sequence of inputs (the random stream)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "tk-mutation-failures"))
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds per input")
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space a worker may add after start-up")
    ap.add_argument("--repro", help="STREAM:INDEX: run that one generated input and print the outcome")
    ap.add_argument("--check", help="run one saved input file (as an arbitrary, forged input)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--input-path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.stream, a.start, a.inputs, a.input_path, a.out, a.timeout, a.mem_mb << 20)))
        return
    if a.repro or a.check:
        setup_process()
        with tempfile.TemporaryDirectory(dir=_scratch_dir()) as d:
            seeds = make_seeds(d)
            if a.repro:
                stream, index = map(int, a.repro.split(":"))
                cases = [(generate(stream, index, seeds), how_for(index))]
            else:
                cases = [(Case(open(a.check, "rb").read(), 0, ["file"], True), how) for how in LOADERS]
            for case, how in cases:
                print(
                    how,
                    seeds[case.seed].name,
                    case.ops,
                    "forged" if case.forged else "",
                    *check_case(case, os.path.join(d, "input"), seeds, how, a.timeout),
                )
        return
    summary = run(a.inputs, a.out, workers=a.workers, stream=a.stream, timeout=a.timeout, mem_mb=a.mem_mb)
    print(json.dumps(summary, indent=1))
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
