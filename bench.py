"""
Speed benchmarks, nanoGPT-style: they import the real code and time it; nothing here is used by
training or sampling. Ratios are measured within one run (machines are shared and noisy).

    python bench.py                                  # small config, CPU, under a minute
    python bench.py --config paper64 --device cuda --batch 16 --bf16 --tf32 --channels-last
    python bench.py --what sample                    # restoration time and the MALA/ULA step ratio

--what train times, on the same UNet and batch:
  (a) a score-model step: the UNet as a plain denoiser (predict the noise, MSE, backward);
  (b) an energy step with A-DSM only (M5): one extra backward for dE/dy, create_graph=True;
  (c) an energy step with both losses (M8): dE/dy and dE/dlog s from the same autograd call.
and prints b/a, c/a, c/b (the paper reports c/a ~ 3.75 and c/b ~ 1.07 on GPUs).

--what sample times the deblurring of --n images with --levels levels and one corrector step
(ULA, then MALA) and prints the seconds per run and the MALA/ULA corrector-step ratio.
"""

import argparse
import time

import torch

import aebm
import covariances as cv
import nets

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--what", choices=["train", "sample"], default="train", help="which benchmark")
parser.add_argument("--config", default="small", help=f"network config, one of {sorted(nets.CONFIGS)}")
parser.add_argument("--img-size", type=int, default=None, help="image size (default: 32 for small, 64 otherwise)")
parser.add_argument("--channels", type=int, default=3, help="image channels")
parser.add_argument("--batch", type=int, default=8, help="batch size (train) ")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
parser.add_argument("--bf16", action="store_true", help="run the UNet under bf16 autocast (reductions stay float32)")
parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA")
parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for the UNet")
parser.add_argument("--n", type=int, default=4, help="images to restore (sample)")
parser.add_argument("--levels", type=int, default=20, help="noise levels of the reverse diffusion (sample)")
parser.add_argument("--seed", type=int, default=0, help="random seed")
args = parser.parse_args()

torch.manual_seed(args.seed)
device = torch.device(args.device)
if args.tf32:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
size = args.img_size or (32 if args.config in ("small", "tiny") else 64)
net = nets.build_unet(args.config, size, args.channels).to(device)
if args.channels_last:
    net = net.to(memory_format=torch.channels_last)
energy = aebm.EnergyModel(net)
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
opt = torch.optim.Adam(net.parameters(), lr=1e-4)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n_steps):
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync()
    return (time.perf_counter() - t0) / n_steps


def describe():
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    flags = [f for f, on in (("bf16", args.bf16), ("tf32", args.tf32), ("channels_last", args.channels_last)) if on]
    return (f"{args.config} ({nets.count_parameters(net) / 1e6:.2f} M params), {size}x{size}x{args.channels}, "
            f"{name}, torch {torch.__version__}, {' '.join(flags) or 'fp32'}")


if args.what == "train":
    shape = (args.batch, args.channels, size, size)
    x = torch.rand(shape, device=device)
    groups = cv.sample_training_covariances(shape, "fft", generator=torch.Generator().manual_seed(0), device=device)

    def score_step():  # (a) the same UNet as a plain denoiser: predict zeta from the whitened y
        opt.zero_grad(set_to_none=True)
        loss = 0
        for idx, cov in groups:
            n, zeta = cov.sample()
            y_in = cov.Uh(cov.U(x[idx] + n - energy.mean) * (energy.data_var + cov.s).rsqrt())
            with autocast:
                pred = net(y_in, cov)
            loss = loss + (cov.U(pred.float()) - zeta).abs().square().sum() / x.numel()
        loss.backward()
        opt.step()

    def energy_step(lam):  # (b) lam = 0, (c) lam = 1
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                L, _, _ = aebm.dual_score_loss(energy, x, groups, lam=lam)
            L.backward()
            opt.step()
        return step

    print(f"train step, batch {args.batch}: {describe()}")
    a = timed(score_step, args.steps)
    b = timed(energy_step(0.0), args.steps)
    c = timed(energy_step(1.0), args.steps)
    print(f"(a) score model  {1e3 * a:8.1f} ms/step")
    print(f"(b) energy, DSM  {1e3 * b:8.1f} ms/step")
    print(f"(c) energy, dual {1e3 * c:8.1f} ms/step")
    print(f"ratios: b/a = {b / a:.2f}   c/a = {c / a:.2f}   c/b = {c / b:.3f}   "
          f"(paper: c/a ~ 3.75, c/b ~ 1.07; goal on GPU: c/a <= 2.5, c/b <= 1.03)")

if args.what == "sample":
    import sample  # noqa: E402  (only this benchmark needs it)

    net.eval()
    shape = (args.n, args.channels, size, size)
    x = torch.rand(shape, device=device)
    prob = cv.blur_problem(shape, 1.5, 0.02, "dct", device=device)
    y, cov = prob.to_denoising(prob.measure(x), mean=energy.mean)
    results = {}
    for corrector in ("ula", "mala"):
        def run():
            with autocast:
                results[corrector] = sample.reverse_diffusion(energy, y, cov, levels=args.levels,
                                                              corrector=corrector, n_corrector=1)
        results[corrector + "_s"] = timed(run, 1)
    print(f"deblur {args.n} images, {args.levels} levels, 1 corrector step: {describe()}")
    for corrector in ("ula", "mala"):
        print(f"{corrector:5s} {results[corrector + '_s']:8.2f} s per run   "
              f"({results[corrector + '_s'] / args.levels * 1e3:.1f} ms per level)")
    print(f"MALA/ULA time ratio: {results['mala_s'] / results['ula_s']:.3f} (goal <= 1.10); "
          f"MALA acceptance {results['mala'].acceptance:.2f}")
