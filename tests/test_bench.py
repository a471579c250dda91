"""Claims about bench.py: the prepared GPU check runs end to end (at a small size on the CPU, so it
cannot rot between the rare GPU sessions), every part of it."""

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import bench
import nets


def test_gpu_suite_runs_on_cpu_at_a_small_size():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "bench.py", "--suite", "gpu", "--device", "cpu"], cwd=here,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAILED" not in out, out
    for expected in ("c/b =", "operators per step", "img/s", "resumed: True", "final step 3", "MALA/ULA", "sr x4 dct",
                     "same argmin: True", "MALA log acceptance ratios"):
        assert expected in out, (expected, out)


def test_operator_count_is_exact_and_leaves_views_out():
    x = torch.ones(3)
    assert bench.operators_per_call(lambda: (x * 2 + 1).view(3, 1).t()) == (4, 2)  # mul, add; view, t


def test_explicit_second_derivatives_cut_the_double_backward_kernels():
    """The reason nets.GroupNorm and nets.silu exist (README, Benchmarks): the training pattern through
    GroupNorm -> SiLU dispatches under half the kernels of torch's own composite double backward."""
    x0, c = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)

    def kernels(norm, act):
        def step():
            x = x0.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad((act(norm(x)) * c).sum(), x, create_graph=True)
            gx.square().sum().backward()
        return bench.operators_per_call(step)[1]

    ours, torchs = kernels(nets.group_norm(16), nets.silu), kernels(torch.nn.GroupNorm(4, 16, eps=1e-6), F.silu)
    assert ours < 0.5 * torchs, (ours, torchs)
