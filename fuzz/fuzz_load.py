"""atheris target: tk.load / tk.open on mutated tensorkeep and safetensors files.

The same inputs and oracle as tests/crash/test_mutation_fuzz.py (tests/fuzz_inputs.py, tests/fuzz_mutation.py),
with coverage guidance choosing the mutations. See fuzz/README.md.

    python fuzz/fuzz_load.py -max_total_time=600 fuzz/corpus
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

with atheris.instrument_imports(include=["tensorkeep"]):
    import tensorkeep  # noqa: F401 - instrumented for coverage

import fuzz_mutation as fm  # noqa: E402
from fuzz_inputs import Case, ProviderRandom, make_case, make_seeds  # noqa: E402

SCRATCH = tempfile.mkdtemp(prefix="tk-atheris-", dir=fm._scratch_dir())
atexit.register(shutil.rmtree, SCRATCH, True)
SEEDS = make_seeds(SCRATCH)
PATH = os.path.join(SCRATCH, "input.safetensors")
LOADERS = list(fm.LOADERS)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    how = LOADERS[fdp.ConsumeIntInRange(0, len(LOADERS) - 1)]
    if fdp.ConsumeBool():  # mutations of a seed, chosen by the fuzzer
        case = make_case(ProviderRandom(fdp), SEEDS)
    else:  # raw bytes: may be any file, so it is judged as a forged one
        case = Case(fdp.ConsumeBytes(fdp.remaining_bytes()), 0, ["raw"], True)
    outcome, detail = fm.check_case(case, PATH, SEEDS, how, timeout=5.0)
    if outcome in fm.FAILURES:
        raise AssertionError(f"{outcome}: {detail}\nseed {SEEDS[case.seed].name}, mutations {case.ops}")


if __name__ == "__main__":
    fm.setup_process()
    fm.limit_memory(1 << 30)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
