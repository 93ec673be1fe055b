"""Object storage: a 498 MB save and restore through a local S3 server (moto) vs the local disk.

    .venv/bin/python bench/bench_object_storage.py [--reps 3] [--dir /tmp/tk-bench-s3]

Workload: the GPT-2-small-shaped fp32 state dict (148 tensors, 497.8 MB). The S3 server is
moto's (``python -m moto.server``) in a subprocess on 127.0.0.1, reached directly (no proxy),
with dummy credentials; nothing leaves the machine. Rows, interleaved per repetition:
``tk.save`` / ``tk.load`` of one file, ``CheckpointManager.save`` / ``restore`` of the state as
a model, and ``tk.open(...).get`` of one 9.4 MB tensor. Local disk rows are warm (page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import gpt2_state_dict, nbytes, table

import tensorkeep as tk
from s3server import ENV, S3Server
from tensorkeep.storage import objects as storage


class Holder(torch.nn.Module):
    def __init__(self, sd: dict) -> None:
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(t) for t in sd.values()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/tk-bench-s3")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    server = S3Server()
    os.environ.update(ENV)
    import fsspec

    conf = server.fsspec_config()
    conf["endpoint_url"] = f"http://127.0.0.1:{server.server_port}"  # straight to the server, no proxy
    conf["config_kwargs"] = {"retries": {"max_attempts": 3, "mode": "standard"}, "read_timeout": 300}
    fsspec.config.conf["s3"] = conf
    fsspec.filesystem("s3").call_s3("create_bucket", Bucket="bench")
    try:
        run(a, server)
    finally:
        server.close()


def run(a: argparse.Namespace, server: S3Server) -> None:
    import fsspec

    sd = gpt2_state_dict()
    mb = nbytes(sd) / 1e6
    raw = os.urandom(1 << 20) * round(mb / 1.048576)  # the same number of bytes, for the s3fs baselines
    model = Holder(sd)
    clone = Holder(gpt2_state_dict(seed=1))
    one = "h.0.mlp.c_fc.weight"  # 768 x 3072 fp32: 9.4 MB
    where = {"disk": a.dir, "s3": "s3://bench/gpt2"}
    mgrs = {k: tk.CheckpointManager(f"{v}/run", keep_last=1) for k, v in where.items()}
    fs = fsspec.filesystem("s3")
    times: dict[str, list[tuple[float, float, float]]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        c, s, t = _cpu(), _cpu(server.proc.pid), time.perf_counter()
        fn()
        times.setdefault(name, []).append((time.perf_counter() - t, _cpu() - c, _cpu(server.proc.pid) - s))

    for rep in range(a.reps):
        for kind, base in where.items():
            f = f"{base}/gpt2.tk"
            timed(f"tk.save ({kind})", lambda: tk.save(sd, f))
            timed(f"tk.load ({kind})", lambda: tk.load(f))
            timed(f"tk.open + get 1 tensor ({kind})", lambda: tk.open(f).get(one))
            mgr = mgrs[kind]
            timed(f"CheckpointManager.save ({kind})", lambda: mgr.save(rep + 1, {"model": model}))
            timed(f"CheckpointManager.restore ({kind})", lambda: mgr.restore({"model": clone}))
        timed(
            "s3fs pipe_file, same bytes (s3)",
            lambda: fs.pipe_file("bench/raw", raw, chunksize=storage.PART_BYTES, max_concurrency=storage.THREADS),
        )
        timed("s3fs cat_file, one GET (s3)", lambda: fs.cat_file("bench/raw"))
        print(f"rep {rep + 1}/{a.reps} done", file=sys.stderr, flush=True)
    for m in mgrs.values():
        m.close()
    assert all(torch.equal(x, y) for x, y in zip(clone.parameters(), model.parameters()))
    rows = []
    for name, xs in times.items():
        wall = statistics.median(x[0] for x in xs)
        gbs = f"{mb / 1e3 / wall:.2f}" if "1 tensor" not in name else "-"
        client = statistics.median(x[1] for x in xs)
        srv = f"{statistics.median(x[2] for x in xs):.1f}" if "(s3)" in name else "-"
        rows.append((name, f"{wall * 1e3:.0f}", f"{min(x[0] for x in xs) * 1e3:.0f}", gbs, f"{client:.1f}", srv))
    order = sorted(rows, key=lambda r: (r[0].startswith("s3fs"), r[0].split(" (")[0], "s3" in r[0]))
    print(
        f"\nGPT-2-small-shaped state, {mb:.1f} MB; S3 = moto server on 127.0.0.1; part size "
        f"{storage.PART_BYTES >> 20} MiB, {storage.THREADS} parts/ranges at once; {a.reps} reps\n"
    )
    print(table(order, ("operation", "median ms", "min ms", "GB/s (median)", "client CPU s", "server CPU s")))


def _cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of process ``pid``."""
    if pid is None:
        r = os.times()
        return r.user + r.system
    with open(f"/proc/{pid}/stat") as f:
        x = f.read().rsplit(")", 1)[1].split()
    return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
