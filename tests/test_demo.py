"""`make demo` tells its story and proves the resume was exact."""

import subprocess
import sys


def test_demo_runs_and_resume_is_exact(tmp):
    r = subprocess.run([sys.executable, "-m", "tensorkeep.demo", "--dir", tmp], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "SIGKILL" in out and "resuming from there" in out
    assert "ARE bit-identical" in out
    assert "Rolling back" in out and "hidden1.weight" in out
