"""Claims about nets.py: shapes, double differentiability, batch independence, behaviour over the
whole range of variances, basis-independence for isotropic Sigma, and a first training signal."""

import math

import pytest
import torch
import torch.nn.functional as F

import aebm
import covariances as cv
import data
import nets


def randomized(net, std=0.2, seed=0):
    """A network with every weight random (the zero-initialised output layers would hide the
    UNet from the checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return net


def some_covariance(basis, shape, dtype=torch.float32, seed=0):
    B, C, H, W = shape
    if basis == "pixel":
        return cv.mask_covariance(cv.box_mask(shape, H // 2), 10.0, 0.01, C, dtype=dtype)
    return cv.blur_problem(shape, 1.0, 0.05, basis, dtype=dtype).covariance()


@pytest.mark.parametrize("basis", cv.BASES)
@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_output_has_the_input_shape(basis, size, channels, batch):
    torch.manual_seed(0)
    net = nets.build_unet("tiny", size, channels)
    shape = (batch, channels, size, size)
    x, cov = torch.randn(shape), some_covariance(basis, shape)
    assert net(x, cov).shape == shape
    assert aebm.EnergyModel(net)(x, cov).shape == (batch,)


def test_small_config_runs_at_every_size_and_stays_under_a_million_parameters():
    for size, channels in ((16, 1), (32, 3), (64, 3)):
        net = nets.build_unet("small", size, channels)
        assert nets.count_parameters(net) <= 1_000_000
        x = torch.randn(1, channels, size, size)
        assert net(x, some_covariance("dct", x.shape)).shape == x.shape


def test_paper64_has_the_documented_parameter_count():
    # docs/benchmarks.md quotes 55.1 M; the pooled form of the paper, without the frequency features, has 55_111_686 (both with the mask-context offsets)
    assert nets.count_parameters(nets.build_unet("paper64", 64, 3)) == 55_145_094
    assert nets.count_parameters(nets.build_unet("paper64", 64, 3, spectral="pooled")) == 55_111_686


def test_bad_sizes_and_configs_give_clear_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        nets.build_unet("small", 30, 1)
    with pytest.raises(ValueError, match="unknown network config"):
        nets.build_unet("huge", 32, 1)
    net = nets.build_unet("tiny", 8, 1)
    assert net(torch.randn(1, 1, 12, 20), cv.isotropic(1.0, (1, 1, 12, 20))).shape == (1, 1, 12, 20)  # any size
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 1, 9, 8), cv.isotropic(1.0, (1, 1, 9, 8)))
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        net(torch.randn(1, 3, 8, 8), cv.isotropic(1.0, (1, 3, 8, 8)))


@pytest.mark.parametrize("basis", cv.BASES)
def test_energy_is_twice_differentiable_in_y_and_log_s(basis):
    torch.manual_seed(0)
    shape = (2, 1, 4, 4)
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 4, 1).double()))
    cov = some_covariance(basis, shape, torch.float64)
    cov = cv.Covariance(cov.s.clamp(max=100.0), basis)  # inside the embedding's range: smooth there
    y = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    log_s = cov.log_s.clone().requires_grad_(True)
    f_y = lambda y: model(y, cov)
    f_s = lambda log_s: model(y.detach(), cv.Covariance.from_log_s(log_s, basis))
    assert torch.autograd.gradcheck(f_y, (y,))
    assert torch.autograd.gradgradcheck(f_y, (y,))
    assert torch.autograd.gradcheck(f_s, (log_s,))
    assert torch.autograd.gradgradcheck(f_s, (log_s,))


def test_explicit_attention_equals_sdpa_and_supports_double_backward():
    torch.manual_seed(0)
    attn = randomized(nets.Attention(8, head_dim=4)).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    B, C, H, W = x.shape
    q, k, v = attn.qkv(attn.norm(x)).reshape(B, 3, 2, 4, H * W).unbind(1)
    ref = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    ref = (x + attn.proj(ref.transpose(-1, -2).reshape(B, C, H, W))) * math.sqrt(0.5)
    torch.testing.assert_close(attn(x), ref)
    assert torch.autograd.gradgradcheck(lambda x: attn(x).square().sum(), (x,))


# The explicit second derivatives on every device present: CUDA runs the same native kernels through other
# code (a GPU session runs `pytest tests/test_nets.py -k "gradgradcheck or composite or agree"` there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def strict_fp32():
    """No TF32 in CUDA convolutions and matmuls (cuDNN allows it by default): float32 means float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_flag_sets_cuda_precision_both_ways_and_leaves_the_cpu_alone():
    """train.py and sample.py --tf32 0 must forbid TF32 convolutions too: cuDNN allows them by default (the
    flags are process-wide settings, so this runs on a CPU-only machine as well)."""
    import sample
    import train

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for tf32 in (0, 1, 0):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
            nets.set_tf32(tf32, torch.device("cuda"))
            assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == bool(tf32)
        torch.backends.cudnn.allow_tf32 = True
        nets.set_tf32(0, torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32
        assert train.parse_args(["--preset", "hour"]).tf32 == 0 and train.parse_args(["--dataset", "imagenet64"]).tf32
        assert sample.parse_args([]).tf32 == 1 and sample.parse_args(["--tf32", "0"]).tf32 == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", [((2, 8, 3, 5), 2), ((3, 12, 4, 4), 3), ((2, 4, 2, 3), 1), ((1, 6, 2, 2), 6)])
def test_group_norm_second_derivative_passes_gradgradcheck(shape, groups, device):
    """The hand-written derivative of GroupNorm's backward (nets.GroupNormBackward) against finite
    differences, with random upstream gradients for all three of its outputs."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
               for s in (shape, shape[1], shape[1]))
    f = lambda x, w, b: nets.GroupNormFunction.apply(x, w, b, groups, 1e-6)
    torch.testing.assert_close(f(x, w, b), F.group_norm(x, groups, w, b, 1e-6))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


LAYOUTS = {"dense": lambda t: t, "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
           "strided": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,size,layout", [(torch.float64, 8, "dense"), (torch.float64, 8, "channels_last"),
                                               (torch.float64, 8, "strided"), (torch.float32, 32, "dense"),
                                               (torch.float32, 64, "dense")])
def test_group_norm_double_backward_equals_torchs_composite(dtype, size, layout, device, strict_fp32):
    """The training pattern, a gradient in x with create_graph=True and then a loss on it (the weight and
    bias gradients of the first backward unused: the path where they get no upstream gradient), against
    torch's own nn.GroupNorm, at the sizes users train at, and for inputs that are not dense in the
    default layout (GroupNorm copies them, and the second derivative must still reach x)."""
    g = torch.Generator().manual_seed(0)
    ours, ref = nets.group_norm(32), torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), ref.parameters()):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            q.copy_(p)
    ours, ref = ours.to(device, dtype), ref.to(device, dtype)
    x0 = (torch.randn(2, 32, size, size, generator=g, dtype=dtype) * 3 + 1).to(device)
    c = torch.randn(x0.shape, generator=g, dtype=dtype).to(device)

    def grads(norm):
        x = x0.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((F.silu(norm(LAYOUTS[layout](x))) * c).sum(), x, create_graph=True)
        return [gx] + list(torch.autograd.grad(gx.square().sum(), [x, norm.weight, norm.bias]))

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(grads(ours), grads(ref)):
        torch.testing.assert_close(a / b.abs().max(), b / b.abs().max(), **tol)


def test_silu_second_derivative_passes_gradgradcheck_and_equals_torchs():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    assert torch.autograd.gradcheck(nets.silu, (x,))
    assert torch.autograd.gradgradcheck(nets.silu, (x,))
    for dtype in (torch.float64, torch.float32):  # the training pattern at a user's size, against F.silu
        x0, c = (torch.randn(4, 28, 32, 32, generator=g, dtype=torch.float64).to(dtype) * s for s in (5, 1))
        out = []
        for f in (nets.silu, F.silu):
            x = x0.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad((f(x) * c).sum(), x, create_graph=True)
            out.append((gx, *torch.autograd.grad((gx * x0.cos()).sum(), x)))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, **(dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}))


@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_is_torchs_1x1_convolution_in_value_and_first_and_second_derivatives(bias):
    """nets.Conv1x1 (a batched matrix product on the CPU) against F.conv2d with the same parameters: outputs,
    the training pattern's first and second derivatives in float32 at a user's size (a 16-channel embedding map
    of 32x32 images into 84 gain channels, the small config's widest) and in channels_last, gradgradcheck in
    float64, the state dict of nn.Conv2d, and bf16 out under CPU autocast as the convolution gives."""
    g = torch.Generator().manual_seed(0)
    ours = nets.Conv1x1(16, 84, bias=bias)
    ref = torch.nn.Conv2d(16, 84, 1, bias=bias)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    x0, c = torch.randn(5, 16, 32, 32, generator=g), torch.randn(5, 84, 32, 32, generator=g)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = []
        for layer in (ours, ref):
            x = x0.clone().contiguous(memory_format=layout).requires_grad_(True)
            y = layer(x)
            (gx,) = torch.autograd.grad((y.sin() * c).sum(), x, create_graph=True)
            out.append((y, gx, *torch.autograd.grad((gx * x0.cos()).sum(), [x, *layer.parameters()])))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    small = nets.Conv1x1(3, 4, bias=bias).double()
    names, params = zip(*small.named_parameters())
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, *p: torch.func.functional_call(small, dict(zip(names, p)), (x,)), (x, *params))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x0).dtype == ref(x0).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_keeps_torchs_parameters_and_autocast_dtype(device):
    ours, ref = nets.group_norm(16).to(device), torch.nn.GroupNorm(4, 16, eps=1e-6).to(device)
    assert ours.state_dict().keys() == ref.state_dict().keys()  # checkpoints load either way
    x = torch.randn(2, 16, 8, 8, device=device)
    # CPU autocast: bf16 in, bf16 out, as torch's (mixed with float32 weights); CUDA autocast: float32 out
    with torch.autocast(device, dtype=torch.bfloat16):
        for x in (x, x.bfloat16()):
            assert ours(x).dtype == ref(x).dtype
        x = x.requires_grad_(True)
        (gx,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()  # the double backward runs in the mixed dtypes too
        torch.testing.assert_close(ours(x), ref(x))
    assert x.grad.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dual_loss_gradients_agree_with_torchs_group_norm_and_silu(dtype, device, strict_fp32):
    """The whole UNet: the parameter gradients of the dual loss (a double backward through every layer,
    the conditioning path included) with the explicit second derivatives and with torch's own
    (nets.set_second_order(net, False)), on the same batch and noise."""
    torch.manual_seed(0)
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 16, 3), std=0.1).to(device, dtype))
    x = torch.rand(6, 3, 16, 16, dtype=dtype).to(device)
    groups = cv.sample_training_covariances(x.shape, "dct", generator=torch.Generator().manual_seed(0), dtype=dtype,
                                            device=device)
    assert len(groups) == 2  # a pixel group and a spectral one

    def grads(on):
        nets.set_second_order(model.net, on)
        model.net.zero_grad()
        aebm.dual_score_loss(model, x, groups, generator=torch.Generator(device).manual_seed(1))[0].backward()
        return [p.grad.clone() for p in model.net.parameters()]

    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-6)
    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, **tol)


def test_samplers_get_torchs_layers_in_eval_mode():
    """Eval mode (and second_order off) runs torch's own GroupNorm and SiLU: the same kernels as a
    network built from nn.GroupNorm / nn.SiLU, and the same energy and score."""
    import bench

    net = nets.build_unet("tiny", 16, 3)
    y = torch.rand(2, 3, 16, 16)
    cov = some_covariance("dct", y.shape)
    run = lambda: aebm.energy_and_scores(aebm.EnergyModel(net), cov.U(y), cov, need_log_s=False)
    net.eval()
    run()  # the first call also builds and caches the DCT matrices
    ops_eval, out_eval = bench.operators_per_call(run), run()
    net.train()
    nets.set_second_order(net, False)
    assert bench.operators_per_call(run) == ops_eval
    for a, b in zip(out_eval[:2], run()[:2]):
        torch.testing.assert_close(a, b)
    # and which path each mode takes
    norm, act, x = nets.group_norm(8), nets.SiLU(), torch.randn(1, 8, 4, 4, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "GroupNormFunctionBackward"
    assert type(act(x).grad_fn).__name__ == "SiLUFunctionBackward"
    norm.eval(), act.eval()
    assert type(norm(x).grad_fn).__name__ == "NativeGroupNormBackward0"
    assert type(act(x).grad_fn).__name__ == "SiluBackward0"


def test_energy_of_one_image_does_not_depend_on_the_others():
    torch.manual_seed(0)
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 8, 3))).eval()
    for basis in cv.BASES:
        shape = (4, 3, 8, 8)
        x, cov = torch.rand(shape), some_covariance(basis, shape)
        together = model(x, cov)
        alone = torch.stack([model(x[i : i + 1], cov[i : i + 1])[0] for i in range(4)])
        torch.testing.assert_close(together, alone, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("basis", cv.BASES)
def test_energy_is_finite_over_the_whole_range_and_tends_to_the_gaussian_limit(basis):
    torch.manual_seed(0)
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 8, 1).double()))
    gaps = {}
    for s in (1e-6, 1e-3, 1.0, 1e2, 1e4, 1e6, cv.S_HUGE):
        cov = cv.isotropic(s, (2, 1, 8, 8), basis, dtype=torch.float64)
        n, _ = cov.sample(torch.Generator().manual_seed(1))
        y = torch.rand(2, 1, 8, 8, dtype=torch.float64) + n
        E, score_z, score_log_s = aebm.energy_and_scores(model, cov.U(y), cov)
        assert torch.isfinite(E).all() and torch.isfinite(score_z).all() and torch.isfinite(score_log_s).all()
        gaps[s] = (E - aebm.gaussian_limit_energy(y, cov, model.mean, model.data_var)).abs().max().item()
    assert gaps[1e-3] > 1e-2  # the learned term matters at low noise
    assert gaps[1e4] < 0.1 and gaps[1e6] < 1e-3 and gaps[1e4] > 30 * gaps[1e6]  # O(1/s), docs/method.md §3
    # anisotropic: masks with 1e8 on missing pixels are finite too
    if basis == "pixel":
        cov = cv.mask_covariance(cv.box_mask((2, 1, 8, 8), 4), cv.S_HUGE, 1e-6, 1, dtype=torch.float64)
        assert torch.isfinite(model(torch.rand(2, 1, 8, 8, dtype=torch.float64), cov)).all()


@pytest.mark.parametrize("spectral", ["frequency", "pooled"])
def test_isotropic_sigma_gets_the_same_energy_in_every_basis(spectral):
    torch.manual_seed(0)
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 8, 3, spectral=spectral).double()))
    y = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    results = []
    for basis in cv.BASES:
        cov = cv.isotropic(torch.tensor([1e-4, 0.05, 3.0]), y.shape, basis, dtype=torch.float64)
        E, score_z, score_log_s = aebm.energy_and_scores(model, cov.U(y), cov)
        results.append((E, cov.Uh(score_z), score_log_s.flatten(1).sum(1)))  # total derivative along sigma^2
    for E, score_y, total in results[1:]:
        torch.testing.assert_close(E, results[0][0], atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(score_y, results[0][1], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(total, results[0][2], atol=1e-9, rtol=1e-9)


def learned_constant(net, cov):
    """C(Sigma) = sum_k w_k b_k(Sigma), the learned normalizing constant of M3 (y-independent)."""
    _, b = net(torch.zeros(cov.s.shape, dtype=cov.s.dtype), cov, with_offset=True)
    return aebm.sum_coords(0.1 / (0.1 + cov.s) * b)


def test_a_masks_learned_constant_sees_the_arrangement_of_its_variances():
    """A box and a scattered mask with the same missing and observed variances on the same number of pixels have
    different exact constants under a correlated prior (the exact field energies differ by 5.5 nats here);
    the per-pixel offsets b(s_k) alone give them the same constant, the neighbourhood offsets do not."""
    shape = (1, 1, 16, 16)
    box = cv.box_mask(shape, 8)
    scattered = torch.zeros(shape, dtype=torch.bool)
    scattered.view(-1)[torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]] = True
    covs = [cv.mask_covariance(m, 10.0, 1e-3, 1, dtype=torch.float64) for m in (box, scattered)]
    field = data.GaussianField(16, 1).prior
    y = torch.full(shape, 0.5, dtype=torch.float64)
    exact = [(field(y, cov) - 0.5 * aebm.sum_coords(torch.log(2 * math.pi * cov.s))).item() for cov in covs]
    assert abs(exact[0] - exact[1]) > 1  # y = mu: the log-determinants alone
    net = randomized(nets.build_unet("tiny", 16, 1).double(), std=0.3)
    C = [learned_constant(net, cov).item() for cov in covs]
    assert abs(C[0] - C[1]) > 1e-2
    with torch.no_grad():
        net.offset_context.weight.zero_()  # the per-pixel form alone
    C = [learned_constant(net, cov).item() for cov in covs]
    assert abs(C[0] - C[1]) < 1e-9


@pytest.mark.parametrize("basis", ["fft", "dct"])
def test_learned_constant_is_a_sum_over_frequencies_by_the_swap_identity(basis):
    """A stationary Gaussian's exact constant is sum_k T(s_k, k), and every such sum satisfies
    C(a) + C(b) = C(a|b) + C(b|a), where a|b takes a's variances on a set of frequencies and b's elsewhere.
    The frequency-domain UNet's constant must satisfy it exactly for any weights; the paper's pooled form,
    gated by the mean log-variance, cannot (docs/method.md §3)."""
    shape = (1, 1, 16, 16)
    a = cv.blur_problem(shape, 1.0, 0.03, basis, dtype=torch.float64).covariance().s.clamp(max=1e3)
    b = cv.blur_problem(shape, 2.5, 0.3, basis, dtype=torch.float64).covariance().s.clamp(max=1e3)
    k = torch.arange(16)
    low = (torch.minimum(k, 16 - k) if basis == "fft" else k) < 5  # a set closed under k -> -k
    S = (low[:, None] & low[None, :]).expand(shape)
    a_b, b_a = torch.where(S, a, b), torch.where(S, b, a)
    C = lambda net, s: learned_constant(net, cv.Covariance(s, basis)).item()
    gaps = {}
    for mode in ("frequency", "pooled"):
        net = randomized(nets.build_unet("tiny", 16, 1, spectral=mode).double(), std=0.3)
        gaps[mode] = abs(C(net, a) + C(net, b) - C(net, a_b) - C(net, b_a))
        assert abs(C(net, a)) > 1.0  # the constant is not trivially zero
    assert gaps["frequency"] < 1e-9, gaps
    assert gaps["pooled"] > 1e-2, gaps


@pytest.mark.parametrize("basis", ["fft", "dct"])
def test_anisotropic_spectral_energy_tends_to_the_gaussian_limit(basis):
    """M3's anchor with the frequency-domain conditioning and the separable constant: a blur covariance
    scaled by t -> infinity (every frequency's variance growing, their ratios fixed, so the gains and
    offsets stay those of an anisotropic Sigma) must give the Gaussian limit, the gap falling like 1/t."""
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 8, 1).double()))
    blur = cv.blur_problem((2, 1, 8, 8), 1.0, 0.1, basis, dtype=torch.float64).covariance().s.clamp(max=1e3)
    y = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gap = {}
    for t in (1.0, 1e4, 1e6):
        cov = cv.Covariance(blur * t, basis)
        gap[t] = (model(y, cov) - aebm.gaussian_limit_energy(y, cov, model.mean, model.data_var)).abs().max().item()
    assert gap[1.0] > 1e-2  # the learned terms matter for the blur itself
    assert gap[1e6] < 1e-3 and gap[1e4] > 30 * gap[1e6], gap  # O(1/t)


@pytest.mark.parametrize("basis", ["fft", "dct"])
def test_frequency_gains_multiply_each_frequency_of_the_features(basis):
    """spectral_modulation is U^H(g U h) in the covariance's basis (checked against covariances.py's own
    transforms in float64), and frequency_crop hands a level of h x w pixels the gains of exactly the
    frequencies that map carries: a gain map that is a function of the frequency gives, after the crop,
    that function at the level's own frequencies."""
    g_ = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, 8, generator=g_, dtype=torch.float64)
    k = torch.arange(8, dtype=torch.float64)
    freq = torch.minimum(k, 8 - k) if basis == "fft" else k  # |frequency| of each coordinate of U h
    g = torch.randn(2, 3, 1, 1, generator=g_, dtype=torch.float64) * (freq[:, None] + 2 * freq[None, :]).cos()
    expected = cv.from_basis(g * cv.to_basis(h, basis), basis)
    torch.testing.assert_close(nets.spectral_modulation(h, g, basis), expected, rtol=1e-12, atol=1e-12)
    assert (nets.spectral_modulation(h, torch.ones_like(g), basis) - h).abs().max() < 1e-12  # g = 1: identity

    K = torch.arange(16, dtype=torch.float64)
    full = torch.minimum(K, 16 - K) if basis == "fft" else K
    G = (full[:, None] + 2 * full[None, :]).cos().expand(1, 1, 16, 16)
    if basis == "fft":
        G = torch.fft.fftshift(G, dim=(-2, -1))  # the embedding's layout: zero frequency in the middle
    torch.testing.assert_close(nets.frequency_crop(G, basis, 8, 8)[0, 0], (freq[:, None] + 2 * freq[None, :]).cos())


def test_energy_reduction_is_float64_under_bf16_autocast():
    torch.manual_seed(0)
    model = aebm.EnergyModel(randomized(nets.build_unet("tiny", 8, 1), std=0.05))
    y = torch.rand(2, 1, 8, 8)
    cov = some_covariance("dct", y.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        E = model(y, cov)
    assert E.dtype == torch.float64  # the sum over coordinates: docs/precision.md
    torch.testing.assert_close(E, model(y, cov), rtol=2e-2, atol=0.5)


def test_a_few_dual_loss_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = aebm.EnergyModel(nets.build_unet("small", 16, 1))
    x = torch.rand(8, 1, 16, 16)
    groups = cv.sample_training_covariances(x.shape, "fft", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    def loss():
        return aebm.dual_score_loss(model, x, groups, generator=torch.Generator().manual_seed(1))[0]
    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    last = loss().item()
    assert last < 0.8 * first, (first, last)  # measured 0.68 (0.66 for the pooled form)
