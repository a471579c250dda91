"""Claims about bench.py: the prepared GPU check runs end to end (at a small size on the CPU, so it
cannot rot between the rare GPU sessions), every part of it."""

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import bench
import covariances as cv
import nets


def test_gpu_suite_runs_on_cpu_at_a_small_size():
    out = bench_output(["--suite", "gpu", "--device", "cpu"])
    assert "FAILED" not in out, out
    for expected in ("c/b =", "operators per step", "arithmetic per step", "img/s", "resumed: True", "final step 3", "MALA/ULA", "sr x4 dct",
                     "same argmin: True", "MALA log acceptance ratios", "one dual step, batch 4", "second backward:"):
        assert expected in out, (expected, out)


def test_batch_suite_runs_on_cpu_at_a_small_size():
    out = bench_output(["--suite", "batch", "--device", "cpu"])
    assert "FAILED" not in out, out
    for expected in ("batch   2:", "batch   4:", "c/a", "ms per image", "elementwise pass"):
        assert expected in out, (expected, out)


def bench_output(argv):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "bench.py", *argv], cwd=here, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_operator_count_is_exact_and_leaves_views_out():
    x = torch.ones(3)
    assert bench.operators_per_call(lambda: (x * 2 + 1).view(3, 1).t()) == (4, 2)  # mul, add; view, t


def test_explicit_second_derivatives_cut_the_double_backward_kernels():
    """The reason nets.GroupNorm and nets.silu exist (docs/benchmarks.md): the training pattern through
    GroupNorm -> SiLU dispatches under a third of the kernels of torch's own composite double backward
    (44 against 156 when written)."""
    x0, c = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)

    def kernels(norm, act):
        def step():
            x = x0.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad((act(norm(x)) * c).sum(), x, create_graph=True)
            gx.square().sum().backward()
        return bench.operators_per_call(step)[1]

    ours, torchs = kernels(nets.group_norm(16), nets.silu), kernels(torch.nn.GroupNorm(4, 16, eps=1e-6), F.silu)
    assert ours < torchs / 3, (ours, torchs)


def test_torch_layers_variant_times_torch_s_double_backward():
    """bench.py --torch-layers: (b0) and (c0) really run torch's composite GroupNorm/SiLU double backward
    (about twice the kernels of the explicit path), and (b), (c) the explicit one, in the same rounds."""
    t = bench.train_step_times("tiny", 16, 3, 2, torch.device("cpu"), False, False, rounds=1, warmup=0,
                               torch_layers=True)
    assert t["kernels_b0"] > 1.5 * t["kernels_b"], t
    assert t["kernels_c0"] > 1.5 * t["kernels_c"], t
    assert t["kernels_c0"] - t["kernels_b0"] > 0 and t["kernels_c"] - t["kernels_b"] > 0, t
    assert all(k in t for k in ("b/b0", "c/c0", "b0/a", "c0/a")), t


def test_flop_count_matches_the_layers_and_the_energy_step_does_twice_the_score_step_s_arithmetic():
    """bench.flops_per_call against a count from the layers themselves (2 multiply-adds per output value
    per input channel and kernel tap, for every convolution of a forward pass), and the claim it supports
    (docs/benchmarks.md): the DSM step (b) does twice the score step's (a) convolution and matrix-product
    arithmetic, and the covariance score (c) adds almost none of it. One product more per layer (weight
    gradients formed in the first backward, say) would put b/a at 7/3."""
    energy = bench.build_energy("tiny", 16, 3, torch.device("cpu"))
    net = energy.net
    x = torch.rand(2, 3, 16, 16)
    cov = cv.isotropic(0.1, x.shape)
    by_layers = []

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        by_layers.append(2 * output.numel() * module.in_channels // module.groups * kh * kw)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        counted = bench.flops_per_call(lambda: net(x, cov, with_offset=True))
    for h in handles:
        h.remove()
    n = (16 // 2) ** 2  # positions at the middle level, where tiny's only attention is
    attention = sum(2 * 2 * x.shape[0] * m.heads * n * n * (m.qkv.out_channels // 3 // m.heads)
                    for m in net.modules() if isinstance(m, nets.Attention))  # q^T k and w v: two (n x n x d) products
    assert counted == sum(by_layers) + attention, (counted, sum(by_layers), attention)

    t = bench.train_step_times("tiny", 16, 3, 2, torch.device("cpu"), False, False, rounds=1, warmup=0)
    # (1.97 with a spectral Sigma's gains per frequency: the FFTs applying them are not matrix products, and
    # their gain maps are formed once per step in either step)
    assert abs(t["flops_b"] / t["flops_a"] - 2) < 0.04, t
    assert 1 < t["flops_c"] / t["flops_b"] < 1.05, t
