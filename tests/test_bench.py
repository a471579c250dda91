"""Claims about bench.py: the prepared GPU check runs end to end (at a small size on the CPU, so it
cannot rot between the rare GPU sessions), every part of it."""

import os
import subprocess
import sys


def test_gpu_suite_runs_on_cpu_at_a_small_size():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "bench.py", "--suite", "gpu", "--device", "cpu"], cwd=here,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAILED" not in out, out
    for expected in ("c/b =", "img/s", "resumed: True", "final step 3", "MALA/ULA", "sr x4 dct",
                     "same argmin: True", "MALA log acceptance ratios"):
        assert expected in out, (expected, out)
