"""
Speed (and GPU precision) benchmarks, nanoGPT-style: they import the real code and time it; nothing
here is used by training or sampling. Ratios are measured within one run, with the variants
interleaved round by round; a time is the median over rounds, a ratio the median of each round's own
ratio (machines are shared and noisy: their drift between rounds cancels within a round).

    python bench.py                                  # training-step ratios, small config, CPU (~1 min)
    python bench.py --torch-layers                   # also (b), (c) with torch's GroupNorm/SiLU double backward
    python bench.py --what sample                    # restoration time and the MALA/ULA step ratio
    python bench.py --suite gpu                      # the one prepared GPU check (< 6 min on one H100 or H200)
    python bench.py --suite gpu --device cpu         # the same check at a small size (tests run it)
    python bench.py --suite batch                    # what limits it: the same work at batches 16, 32, 64 (~2 min)

--what train times, on the same UNet and batch:
  (a) a score-model step: the UNet as a plain denoiser (predict the noise, MSE, backward);
  (b) an energy step with A-DSM only (M5): one extra backward for dE/dz, create_graph=True;
  (c) an energy step with both losses (M8): dE/dz and dE/dlog s from the same autograd call;
and prints b/a, c/a, c/b (the paper reports c/a ~ 3.75 and c/b ~ 1.07 on GPUs), and the kernels each
step dispatches (bench.operators_per_call).

--suite gpu runs, with the device's name:
  1. the paper64 training step at the paper's per-GPU batch (16), TF32 and bf16 autocast:
     (a), (b), (c), their ratios and peak memory; with TF32 also (b), (c) with torch's own GroupNorm and
     SiLU in the same rounds (what nets.GroupNorm / nets.silu's explicit second derivatives buy);
  2. the real entry point, `torchrun --nproc_per_node=1 train.py --dataset imagenet64` on a small
     ImageNet64 npz written here (NCCL on CUDA), with a checkpoint and a resume: images/s and the
     projected wall time of the paper's 400k steps on 8 such GPUs;
  3. sampling: 16 images 64x64x3, deblurring, 600 levels, one corrector step each, ULA and MALA, in
     float32 (TF32), each evaluation replayed as a CUDA graph;
  4. precision of bf16 autocast against float32 on the same device: posterior means of every task,
     energy differences between blind-estimation candidates, MALA log acceptance ratios;
  5. and 6. profiles: one sampler evaluation, and one dual training step (its two halves' device time
     and the top operators).
Each part reports its own failure and the next one still runs.
"""

import argparse
import copy
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import aebm
import covariances as cv
import data
import nets

# Sizes of the GPU suite: the real ones on CUDA, a small stand-in on CPU (so a test keeps it alive). On an H100
# the check took 338 s with 6 rounds and no training-step profile; 5 rounds leave room for that profile.
SUITE = {
    "cuda": dict(config="paper64", size=64, batch=16, rounds=5, n=16, levels=600,
                 entry=dict(steps=30, resume_steps=40, extra=[])),
    "cpu": dict(config="tiny", size=16, batch=4, rounds=2, n=2, levels=4,
                entry=dict(steps=2, resume_steps=3, extra=["--config", "tiny", "--img-size", "16", "--bf16", "0",
                                                           "--tf32", "0"])),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["gpu", "speed", "batch"], default=None,
                   help="gpu: the prepared GPU check; speed: variants that cut its time; batch: the same work at "
                        "larger batches, what limits it (any --device)")
    p.add_argument("--what", choices=["train", "sample"], default="train", help="which single benchmark")
    p.add_argument("--config", default="small", help=f"network config, one of {sorted(nets.CONFIGS)}")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: 32 for small/tiny, 64 otherwise)")
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--batch", type=int, default=8, help="batch size (train)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (interleaved; median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--bf16", action="store_true", help="run the UNet under bf16 autocast (reductions stay float64)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for the UNet")
    p.add_argument("--n", type=int, default=4, help="images to restore (sample)")
    p.add_argument("--levels", type=int, default=20, help="noise levels of the reverse diffusion (sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--torch-layers", action="store_true",
                   help="(train) also time (b) and (c) with torch's GroupNorm and SiLU instead of the explicit ones")
    args = p.parse_args(argv)
    if nets.device_error(args.device):
        p.error(f"--device {nets.device_error(args.device)}")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns, device, rounds, warmup, per_round=None):
    """Median seconds per call of each function in `fns` (name -> callable), timed round-robin.
    per_round: a dict that receives each function's list of times, round by round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    if per_round is not None:
        per_round.update(times)
    return {k: float(np.median(v)) for k, v in times.items()}


def operators_per_call(fn):
    """Operators one call of fn dispatches (after autograd and autocast, so every backward counted),
    as (all, kernels): kernels leaves out the views (view, transpose, select, ...), which launch nothing.
    Exact and noise-free on any machine; on an H100 and an H200 at the paper's per-GPU batch the training
    step's time ratios followed them (a kernel's fixed cost dominates there; docs/benchmarks.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.is_view] += 1
            return func(*args, **(kwargs or {}))

    counts = {True: 0, False: 0}
    with Count():
        fn()
    return counts[True] + counts[False], counts[False]


def flops_per_call(fn):
    """Floating-point operations of one call of fn in convolutions and matrix products, the work that does
    not depend on how many kernels carry it (torch's FlopCounterMode; elementwise work is not counted).
    Exact and noise-free. Double backprop through a network costs twice a score step's arithmetic: the
    score step does each product three times (forward, input gradient, weight gradient), the DSM step six
    (forward, the first backward's input gradient, and the second backward's four: the derivative of that
    input gradient in its output gradient and in the weight, and the forward's two). So b/a here is 2.0,
    and time ratios above it are elementwise work and per-operator overhead (docs/benchmarks.md)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x{torch.get_num_threads()} threads"


def build_energy(config, size, channels, device, channels_last=False, random_output=False, seed=0):
    """The UNet energy of a config. random_output: the zero-initialised layers get small random weights,
    so the learned term is not zero (precision checks; timings do not depend on the weights)."""
    torch.manual_seed(seed)
    net = nets.build_unet(config, size, channels)
    if random_output:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d) and m.weight.abs().max() == 0:
                    m.weight.normal_(0, 0.02)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return aebm.EnergyModel(net)


# -----------------------------------------------------------------------------
# 1. The training step: score model vs energy (DSM) vs energy (dual).

def train_step_times(config, size, channels, batch, device, bf16, channels_last, rounds, warmup, seed=0,
                     torch_layers=False):
    """torch_layers: also time (b) and (c) with torch's own GroupNorm and SiLU (their composite double backward)
    instead of nets.GroupNorm / nets.silu's explicit one, interleaved in the same rounds ("b0", "c0")."""
    energy = build_energy(config, size, channels, device, channels_last, seed=seed)
    net = energy.net
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, foreach=True)  # as train.py
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    shape = (batch, channels, size, size)
    x = torch.rand(shape, device=device)
    groups = cv.sample_training_covariances(shape, "fft", generator=torch.Generator().manual_seed(seed), device=device)

    def score_step():  # (a) the same UNet as a plain denoiser: predict zeta from the whitened y
        nets.set_second_order(net, False)  # never differentiated twice: torch's own GroupNorm and SiLU
        opt.zero_grad(set_to_none=True)
        loss = 0
        for idx, cov in groups:
            zeta = cv.white_noise(cov.s.shape, cov.basis, None, cov.s.dtype, device)
            z = cov.U(x[idx]) + cov.s.sqrt() * zeta
            y_in = cov.Uh((z - cov.U(torch.full_like(x[idx], energy.mean))) * (energy.data_var + cov.s).rsqrt())
            with autocast:
                pred = net(y_in, cov)
            loss = loss + (cov.U(pred.float()) - zeta).abs().square().sum() / x.numel()
        loss.backward()
        opt.step()
        nets.set_second_order(net, True)

    def energy_step(lam, explicit=True):  # (b) lam = 0, (c) lam = 1
        def step():
            nets.set_second_order(net, explicit)
            opt.zero_grad(set_to_none=True)
            with autocast:
                L, _, _ = aebm.dual_score_loss(energy, x, groups, lam=lam)
            L.backward(inputs=params)  # as train.train_step: the parameters' gradients only
            opt.step()
            nets.set_second_order(net, True)
        return step

    fns = {"a": score_step, "b": energy_step(0.0), "c": energy_step(1.0)}
    if torch_layers:
        fns.update(b0=energy_step(0.0, explicit=False), c0=energy_step(1.0, explicit=False))
    times = {}
    out = interleaved(fns, device, rounds, warmup, per_round=times)
    for k, f in fns.items():
        out[f"ops_{k}"], out[f"kernels_{k}"] = operators_per_call(f)
        out[f"flops_{k}"] = flops_per_call(f)
    # The ratios are medians of each round's own ratio: a round times a, b, c back to back, so the machine's
    # drift between rounds (10-20% on a shared CPU) cancels; a ratio of medians mixes rounds.
    t = {k: np.array(v) for k, v in times.items()}
    out.update({"b/a": float(np.median(t["b"] / t["a"])), "c/a": float(np.median(t["c"] / t["a"])),
                "c/b": float(np.median(t["c"] / t["b"]))})
    if torch_layers:
        out.update({"b/b0": float(np.median(t["b"] / t["b0"])), "c/c0": float(np.median(t["c"] / t["c0"])),
                    "b0/a": float(np.median(t["b0"] / t["a"])), "c0/a": float(np.median(t["c0"] / t["a"]))})
    if device.type == "cuda":
        for k, f in fns.items():
            torch.cuda.reset_peak_memory_stats(device)
            f()
            sync(device)
            out[f"peak_{k}_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def print_train(t, what):
    print(f"train step, {what}")
    for k, name in (("a", "score model"), ("b", "energy, DSM"), ("c", "energy, dual")):
        mem = f"   peak {t[f'peak_{k}_gib']:.1f} GiB" if f"peak_{k}_gib" in t else ""
        print(f"  ({k}) {name:13s} {1e3 * t[k]:8.1f} ms/step{mem}")
    print(f"  ratios (median over rounds): b/a = {t['b/a']:.2f}   c/a = {t['c/a']:.2f}   c/b = {t['c/b']:.3f}   "
          f"(paper: c/a ~ 3.75, c/b ~ 1.07; goals: c/a <= 2.5, c/b <= 1.03 on GPU; <= 2.3, <= 1.05 on CPU)")
    if "b0" in t:
        print(f"  with torch's own GroupNorm and SiLU: (b) {1e3 * t['b0']:.1f}, (c) {1e3 * t['c0']:.1f} ms/step "
              f"({t['kernels_b0']} / {t['kernels_c0']} operators), b0/a = {t['b0/a']:.2f}, c0/a = {t['c0/a']:.2f}; "
              f"explicit over torch's: (b) {t['b/b0']:.3f}, (c) {t['c/c0']:.3f}")
    if "kernels_a" in t:
        k = [t[f"kernels_{x}"] for x in "abc"]
        print(f"  operators per step (non-view, exact): {k[0]} / {k[1]} / {k[2]}   ratios b/a = {k[1] / k[0]:.2f}   "
              f"c/a = {k[2] / k[0]:.2f}   c/b = {k[2] / k[1]:.3f}   (all, with views: "
              f"{' / '.join(str(t[f'ops_{x}']) for x in 'abc')})")
    if "flops_a" in t:
        f = [t[f"flops_{x}"] for x in "abc"]
        print(f"  arithmetic per step (convolutions and matrix products, exact): {' / '.join(f'{v / 1e9:.2f}' for v in f)} "
              f"GFLOP   ratios b/a = {f[1] / f[0]:.2f}   c/a = {f[2] / f[0]:.2f}   c/b = {f[2] / f[1]:.3f}   "
              f"(time above these: elementwise work and per-operator overhead)")


# -----------------------------------------------------------------------------
# 2. The real entry point under torchrun.

def write_imagenet64(root, n_train=256, n_val=64, seed=0):
    """A small ImageNet64 in the official npz format: 'data' (N, 12288) uint8, R/G/B planes (smooth
    random images, so that resizing and moments behave like photographs')."""
    g = np.random.default_rng(seed)
    for name, n in (("train_data_batch_1.npz", n_train), ("val_data.npz", n_val)):
        low = g.integers(0, 256, size=(n, 3, 8, 8)).astype(np.float32)
        img = low.repeat(8, axis=2).repeat(8, axis=3) + g.normal(0, 8, size=(n, 3, 64, 64))
        np.savez(os.path.join(root, name), data=img.clip(0, 255).astype(np.uint8).reshape(n, -1),
                 labels=np.ones(n, dtype=np.int64))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", str(free_port()),
           "train.py", *args]
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun train.py failed ({done.returncode}): {done.stderr[-1500:]}")
    return done.stdout


def entry_point(device, steps, resume_steps, extra, batch):
    """Train `steps` steps, resume to `resume_steps`; returns images/s of the logged rows after the first."""
    with tempfile.TemporaryDirectory() as root:
        write_imagenet64(root)
        out = os.path.join(root, "run")
        common = ["--dataset", "imagenet64", "--data-dir", root, "--batch", str(batch), "--out", out,
                  "--log-every", str(max(1, steps // 3)), "--eval-every", "1000000", "--device", device.type,
                  "--val-batch", "4", *extra]
        t0 = time.perf_counter()
        first = torchrun_train(common + ["--steps", str(steps), "--ckpt-every", str(steps)])
        second = torchrun_train(common + ["--steps", str(resume_steps), "--ckpt-every", str(resume_steps), "--resume"])
        wall = time.perf_counter() - t0
        ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(out, "log.csv")) as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
        img_s = [float(r["img_per_s"]) for r in rows[1:]] or [float(rows[-1]["img_per_s"])]
        return dict(img_s=float(np.median(img_s)), step=ckpt["step"], resumed="resumed from" in second,
                    backend="nccl" if device.type == "cuda" else "gloo", wall_s=wall, log=first + second)


# -----------------------------------------------------------------------------
# 3. Sampling time.

def sampling_times(energy, n, size, levels, device, bf16, graph=False):
    """Seconds of a ULA and a MALA run (16 deblurring images in the suite). graph: replay (E, dE/dz) as a
    CUDA graph (sample.CudaGraphEnergy; sample.py does this on CUDA)."""
    import sample

    energy.net.eval()
    shape = (n, 3, size, size)
    x = data.DeadLeaves(size, 3).get_batch(n, torch.Generator().manual_seed(0)).to(device)
    prob = cv.blur_problem(shape, 1.5, 0.02, "dct", device=device)
    y, cov = prob.to_denoising(prob.measure(x), mean=energy.mean)
    e = sample.CudaGraphEnergy(energy, cov.U(y), cov, bf16=bf16) if graph else energy
    out = {}
    for corrector in ("ula", "mala"):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not graph):
            res = sample.reverse_diffusion(e, y, cov, levels=levels, corrector=corrector, n_corrector=1,
                                           generator=torch.Generator(device).manual_seed(0))
        sync(device)
        out[corrector] = time.perf_counter() - t0
        out[corrector + "_acceptance"] = res.acceptance
        out[corrector + "_psnr"] = data.psnr(res.x_mean.float(), x).mean().item()
    return out


# -----------------------------------------------------------------------------
# 4. bf16 autocast against float32 on the same device.

class mode:
    """A precision mode as a context manager: bf16 autocast or not, TF32 or strict float32 on CUDA."""

    def __init__(self, device, bf16, tf32):
        self.device, self.bf16, self.tf32 = device, bf16, tf32

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        self.autocast.__enter__()

    def __exit__(self, *exc):
        self.autocast.__exit__(*exc)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def precision(energy, size, n, device, low=None, ref=None, tasks=None):
    """Largest differences between a low-precision mode (default bf16 autocast) and a reference (default
    float32 as the device runs it): posterior means (every task), blind candidate energies (relative to
    each image's best candidate), MALA log acceptance ratios."""
    import sample
    from experiments.precision import TASKS, observation

    energy.net.eval()
    tf32 = torch.backends.cudnn.allow_tf32
    low = low or (lambda: mode(device, True, tf32))
    ref = ref or (lambda: mode(device, False, tf32))
    x = data.DeadLeaves(size, 3).get_batch(n, torch.Generator().manual_seed(1)).double()
    out = {"tasks": {}}
    for name, argv in [t for t in TASKS if tasks is None or t[0] in tasks]:
        y, cov, _ = observation(x, argv, 0.05, energy.mean)
        y, cov = y.float().to(device), cv.Covariance(cov.s.float().to(device), cov.basis)
        with ref():
            x_ref = aebm.posterior_mean(energy, y, cov)
        with low():
            x_low = aebm.posterior_mean(energy, y, cov)
        c = energy.anchor_var(cov)
        w = c / (c + cov.s)
        mu = cov.U(torch.full_like(y, energy.mean))
        learned = (x_ref - cov.Uh(mu + w * (cov.U(y) - mu))).abs().max().item()  # size of the learned correction
        out["tasks"][name] = dict(max_diff=(x_low - x_ref).abs().max().item(), learned=learned,
                                  psnr_fp32=data.psnr(x_ref, x.float().to(device)).mean().item(),
                                  psnr_bf16=data.psnr(x_low, x.float().to(device)).mean().item())
    # blind inpainting candidates: E(y, Sigma_k) - min_k, fp32 vs bf16
    xd = x.float().to(device)
    y, cov, _ = observation(x, ["--task", "inpaint", "--box-size", str(size // 2)], 0.05, energy.mean)
    y = y.float().to(device)
    sizes, noises = [size // 4, size // 2, 3 * size // 4], [0.02, 0.05, 0.1]
    with ref():
        g32, _, _ = aebm.blind_inpaint(energy, y, 3, sizes, noises)
    with low():
        g16, _, _ = aebm.blind_inpaint(energy, y, 3, sizes, noises)
    rel = lambda g: (g - g.flatten(1).min(1).values.view(-1, 1, 1))[:, 1]  # the true box size's row
    out["blind_max_diff_nats"] = (rel(g16) - rel(g32)).abs().max().item()
    out["blind_same_argmin"] = bool((g16.flatten(1).argmin(1) == g32.flatten(1).argmin(1)).all())
    # MALA log acceptance ratios at a mid-path level of deblurring
    prob = cv.blur_problem(xd.shape, 1.5, 0.05, "dct", device=device)
    y, cov = prob.to_denoising(prob.measure(xd, torch.Generator(device).manual_seed(2)), energy.mean)
    s = sample.geometric_level(cov.s.clamp(max=sample.S_MAX_PRIOR), 1e-4, 300, 600)
    z0 = cov.U(xd + cv.Covariance(s, "dct").sample(torch.Generator(device).manual_seed(3))[0])
    ratios = {}
    for key, ctx in (("fp32", ref()), ("bf16", low())):
        logs = []
        with ctx:
            sample.langevin(energy, z0, cov.U(y), cov.s, s, "dct", n_steps=3, method="mala",
                            generator=torch.Generator(device).manual_seed(4), log_alphas=logs)
        ratios[key] = torch.stack(logs)
    out["mala_max_diff"] = (ratios["bf16"][0] - ratios["fp32"][0]).abs().max().item()
    out["mala_fp32_log_alpha"] = ratios["fp32"][0].tolist()
    return out


def kernel_launches(events):
    """CUDA kernel launches among a profile's averaged events (the runtime's and the driver's launch calls)."""
    return sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))


def device_time_ms(events):
    """A profile's device time with each kernel counted once: the device-side events (kernels, copies). An
    operator's self device time repeats the time of the kernels it launched, so a sum over every row counts
    it twice (docs/gpu/h200_2026-12-04_profiles.log shows both sums)."""
    from torch.autograd import DeviceType
    return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3


def profile_evaluation(energy, n, size, device, calls=3, top=12, bf16=False):
    """Where one sampler evaluation (E and dE/dz at batch n) spends its time: the top operators by device
    time, and the number of kernel launches per evaluation. float32 (TF32 where the suite allows it), the
    precision sampling runs in; bf16=True profiles it under bf16 autocast, whose casts add kernels."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(n, 3, size, size, device=device)
    cov = cv.blur_problem(x.shape, 1.5, 0.05, "dct", device=device).covariance()
    cov = cv.Covariance(cov.s.clamp(max=625.0), "dct")
    z = cov.U(x)
    run = lambda: aebm.energy_and_scores(energy, z, cov, need_log_s=False)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        run()
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                run()
            sync(device)
        if device.type == "cuda":  # unprofiled, against the device time below
            eager = interleaved({"t": run}, device, calls, 1)["t"]
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    if device.type == "cuda":
        launches, busy = kernel_launches(events) / calls, device_time_ms(events) / calls
        # busy is what a CUDA graph's replay cannot go below; eager - busy is the host's launch work it removes
        print(f"  per evaluation: {launches:.0f} kernel launches, {busy:.1f} ms of device time "
              f"({1e3 * busy / launches:.1f} us per kernel), eager {1e3 * eager:.1f} ms")
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))


def profile_train_step(config, size, batch, device, top=15):
    """Where ONE dual-loss training step (c) spends its time, in float32 with TF32: its device time against
    the same step's wall time unprofiled (the device's busy share: the rest is the host dispatching kernels),
    the kernels it launches, and the top operators by device time. On the CPU, the time of its two halves
    (the loss, i.e. forward and first backward with create_graph, then the second backward into the
    parameters); on CUDA the second backward runs on autograd's device thread, outside the main thread's
    record_function, so the halves are not told apart there. One step only: profiling several steps of a
    paper64 step with the CUDA activity did not finish in 150 s on an H100."""
    from torch.profiler import ProfilerActivity, profile, record_function

    energy = build_energy(config, size, 3, device)
    params = list(energy.parameters())
    x = torch.rand(batch, 3, size, size, device=device)
    groups = cv.sample_training_covariances(x.shape, "fft", generator=torch.Generator().manual_seed(0), device=device)

    def step():
        with record_function("loss: forward + first backward"):
            L, _, _ = aebm.dual_score_loss(energy, x, groups, lam=1.0)
        with record_function("second backward"):
            L.backward(inputs=params)

    wall = interleaved({"step": step}, device, 3, 2)["step"]  # warm-up (cuDNN's autotuner, caches), then timed
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    if cuda:
        busy = device_time_ms(events)
        print(f"  one dual step, batch {batch}: {busy:.0f} ms of device time in a {1e3 * wall:.0f} ms step "
              f"(device busy {busy / (1e3 * wall):.0%}); {kernel_launches(events)} kernel launches")
    else:
        halves = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in ("loss: forward + first backward",
                                                                             "second backward")}
        print(f"  one dual step, batch {batch}: {1e3 * wall:.0f} ms; " + "; ".join(f"{k}: {v:.0f} ms" for k, v in halves.items()))
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=top,
                       max_name_column_width=60))


def run_suite(args):
    device = torch.device(args.device)
    sz = SUITE[device.type]
    nets.set_tf32(True, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = True  # CPU autocast supports bf16 too, so the CPU stand-in runs the same code
    print(f"GPU check: {device_name(device)}, torch {torch.__version__}, {sz['config']} at {sz['size']}x{sz['size']}x3",
          flush=True)
    t_start = time.perf_counter()

    def part(title, fn):
        t0 = time.perf_counter()
        print(f"\n== {title}", flush=True)
        try:
            fn()
        except Exception as e:  # report and go on: the other parts are still worth their device time
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    def train():
        for low in (False, True):  # float32/TF32 also against torch's own GroupNorm and SiLU (docs/benchmarks.md)
            t = train_step_times(sz["config"], sz["size"], 3, sz["batch"], device, low, False, sz["rounds"], 2,
                                 torch_layers=not low)
            print_train(t, f"batch {sz['batch']}, " + ("bf16 autocast and TF32" if low else "float32 with TF32"))

    def entry():
        e = entry_point(device, sz["entry"]["steps"], sz["entry"]["resume_steps"], sz["entry"]["extra"], sz["batch"])
        t_step = sz["batch"] / e["img_s"]
        print(f"  torchrun train.py --dataset imagenet64 ({e['backend']}): {e['img_s']:.1f} img/s at batch "
              f"{sz['batch']} per GPU; checkpoint at step {sz['entry']['steps']}, resumed: {e['resumed']}, "
              f"final step {e['step']} (wall {e['wall_s']:.0f} s incl. start-up)")
        print(f"  projected: 400k steps x {t_step:.3f} s = {400_000 * t_step / 3600:.1f} h on 8 such GPUs "
              f"(8 x {sz['batch']} = {8 * sz['batch']} images per step, all-reduce not included; paper: 5 days on A100s, "
              f"1M steps)")

    energy = build_energy(sz["config"], sz["size"], 3, device, random_output=True).eval()  # channels_last: slower

    def sampling():
        graph = device.type == "cuda"
        # float32 (TF32 on CUDA), the precision sampling runs in (bf16 is too coarse for MALA: part 4), each
        # evaluation replayed as a CUDA graph on CUDA. Timed over a third of the levels and scaled (the cost per
        # level is constant: 38.2 s scaled against 37.8 s for all 600 on an H100), which keeps the check inside
        # 6 minutes. A short probe first, so that a slow device cannot eat the whole check: beyond 75 s per
        # run, time fewer levels still.
        probe = sampling_times(energy, sz["n"], sz["size"], 10, device, False, graph)["ula"] / 10
        levels = max(1, sz["levels"] // 3)
        levels = levels if probe * levels < 75 else max(10, int(75 / probe))
        s = sampling_times(energy, sz["n"], sz["size"], levels, device, False, graph)
        k = sz["levels"] / levels
        print(f"  deblur {sz['n']} images, {sz['levels']} levels, 1 corrector step, float32{'/TF32' if graph else ''}"
              f"{', CUDA graph' if graph else ''}: ULA {s['ula'] * k:.1f} s, MALA {s['mala'] * k:.1f} s (timed {levels} "
              f"levels, scaled by {k:.1f}; MALA/ULA {s['mala'] / s['ula']:.2f}, acceptance {s['mala_acceptance']:.2f}; "
              f"random weights); paper: 139 s (DPS 167 s, RED-Diff 22 s); goal <= 25 s")
        print(f"    per evaluation (E and dE/dz of {sz['n']} images): {1e3 * s['ula'] / (2 * levels + 1):.1f} ms",
              flush=True)

    def prec():
        strict = lambda: mode(device, False, False)
        for label, low in (("TF32", lambda: mode(device, False, True)), ("bf16 autocast", lambda: mode(device, True, True))):
            p = precision(energy, sz["size"], 4 if device.type == "cuda" else 2, device, low=low, ref=strict)
            print(f"  {label} against strict float32 (max |diff| per pixel of the posterior mean; size of the learned"
                  f" correction; PSNR float32 / {label}):")
            for name, r in p["tasks"].items():
                print(f"    {name:18s} {r['max_diff']:9.2e}   learned {r['learned']:7.3f}   "
                      f"{r['psnr_fp32']:6.2f} / {r['psnr_bf16']:6.2f} dB")
            print(f"    blind inpainting: energies above the best candidate differ by up to "
                  f"{p['blind_max_diff_nats']:.3f} nats; same argmin: {p['blind_same_argmin']}")
            print(f"    MALA log acceptance ratios: max |diff| = {p['mala_max_diff']:.3f} "
                  f"(float32 values {', '.join(f'{v:.2f}' for v in p['mala_fp32_log_alpha'])})", flush=True)

    part("1. training step", train)
    part("2. the real entry point under torchrun", entry)
    part("3. sampling", sampling)
    part("4. precision: TF32 and bf16 autocast against strict float32", prec)
    part("5. where a sampler evaluation spends its time", lambda: profile_evaluation(energy, sz["n"], sz["size"], device))
    part("6. where a dual training step spends its time",
         lambda: profile_train_step(sz["config"], sz["size"], sz["batch"], device))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)


def eval_times(energy, n, size, device, variants, evals=20):
    """Seconds per sampler evaluation (E and dE/dz, batch n, dct deblurring at a mid-path level) for each
    variant (name -> (bf16, channels_last, cuda_graph)); graphed outputs are checked against eager ones."""
    import sample

    x = torch.rand(n, 3, size, size, device=device)
    cov = cv.blur_problem(x.shape, 1.5, 0.05, "dct", device=device).covariance()
    cov = cv.Covariance(cov.s.clamp(max=625.0), "dct")
    z = cov.U(x)
    out = {}
    for name, (bf16, channels_last, graph) in variants.items():
        try:
            e = copy.deepcopy(energy)
            e.net = e.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                eager = aebm.energy_and_scores(e, z, cov, need_log_s=False)
            if graph:
                e = sample.CudaGraphEnergy(e, z, cov, bf16=bf16)
                got = aebm.energy_and_scores(e, z, cov, need_log_s=False)
                diff = (got[1] - eager[1]).abs().max().item() / eager[1].abs().max().item()
            else:
                diff = 0.0
            ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not graph)
            def run():
                with ctx():
                    aebm.energy_and_scores(e, z, cov, need_log_s=False)
            t = interleaved({"t": run}, device, evals, 3)["t"]
            out[name] = dict(ms=1e3 * t, rel_diff=diff, energy=e)
        except Exception as err:
            out[name] = dict(error=f"{type(err).__name__}: {err}")
    return out


def run_speed_suite(args):
    """The second GPU check: where the time goes and what removes it (channels_last, CUDA graphs, TF32)."""
    device = torch.device(args.device)
    sz = SUITE[device.type]
    cuda = device.type == "cuda"
    nets.set_tf32(True, device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    print(f"speed check: {device_name(device)}, torch {torch.__version__}, {sz['config']} at {sz['size']}", flush=True)
    t_start = time.perf_counter()
    for bf16, cl in ((True, False), (False, False)):
        try:
            t = train_step_times(sz["config"], sz["size"], 3, sz["batch"], device, bf16, cl, max(2, sz["rounds"] // 2), 2)
            print_train(t, f"batch {sz['batch']}, {'bf16' if bf16 else 'TF32'}, channels_last {cl}")
        except Exception as e:
            print(f"  train step FAILED: {type(e).__name__}: {e}")
        print(f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
    energy = build_energy(sz["config"], sz["size"], 3, device, random_output=True).eval()
    variants = {"bf16 channels_last": (True, True, False), "bf16": (True, False, False), "tf32": (False, False, False)}
    if cuda:
        variants.update({"bf16 cuda-graph": (True, False, True), "tf32 cuda-graph": (False, False, True)})
    res = eval_times(energy, sz["n"], sz["size"], device, variants)
    print(f"sampler evaluation (E and dE/dz of {sz['n']} images), ms and the 1200 evaluations of 600 levels:")
    for name, r in res.items():
        if "error" in r:
            print(f"  {name:20s} FAILED: {r['error']}")
        else:
            print(f"  {name:20s} {r['ms']:7.1f} ms  -> {1.2 * r['ms']:6.1f} s   (graph vs eager: {r['rel_diff']:.1e})")
    print(f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
    import sample
    for name in ("bf16 cuda-graph", "tf32 cuda-graph") if cuda else ("bf16",):
        r = res.get(name, {})
        if "energy" not in r or r["rel_diff"] > 0.05 or 1.2 * r["ms"] > 40:  # correct, and under 40 s a run
            continue
        x = data.DeadLeaves(sz["size"], 3).get_batch(sz["n"], torch.Generator().manual_seed(0)).to(device)
        prob = cv.blur_problem(x.shape, 1.5, 0.02, "dct", device=device)
        y, cov = prob.to_denoising(prob.measure(x), mean=energy.mean)
        for corrector in ("ula", "mala"):
            try:
                g = r["energy"] if name.endswith("graph") else energy
                if name.endswith("graph"):  # a graph for this observation's shapes: the same as the probe's
                    g = sample.CudaGraphEnergy(energy, cov.U(y), cov, bf16=name.startswith("bf16"))
                sync(device)
                t0 = time.perf_counter()
                res_s = sample.reverse_diffusion(g, y, cov, levels=sz["levels"], corrector=corrector,
                                                 generator=torch.Generator(device).manual_seed(0))
                sync(device)
                print(f"  {name}: deblur {sz['n']} images, {sz['levels']} levels, {corrector}: "
                      f"{time.perf_counter() - t0:.1f} s (acceptance {res_s.acceptance:.2f})", flush=True)
            except Exception as e:
                print(f"  {name} {corrector} FAILED: {type(e).__name__}: {e}")
    print(f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if cuda:
        strict = lambda: mode(device, False, False)
        for label, low in (("TF32", lambda: mode(device, False, True)), ("bf16", lambda: mode(device, True, True))):
            try:
                p = precision(energy, sz["size"], 4, device, low=low, ref=strict,
                              tasks=("inpaint box", "deblur b=1.5 dct", "sr x2 fft"))
                worst = max(r["max_diff"] for r in p["tasks"].values())
                print(f"  {label} vs strict float32: posterior means max |diff| {worst:.2e}; blind candidate energies "
                      f"{p['blind_max_diff_nats']:.3f} nats; MALA log ratios {p['mala_max_diff']:.3f}", flush=True)
            except Exception as e:
                print(f"  precision {label} FAILED: {type(e).__name__}: {e}")
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)


# -----------------------------------------------------------------------------
# What limits the GPU figures at the paper's batch: the same work at larger batches.

BATCH_SUITE = {
    "cuda": dict(config="paper64", size=64, batches=(16, 32, 64), rounds=3, evals=20),
    "cpu": dict(config="tiny", size=16, batches=(2, 4), rounds=1, evals=2),
}


def run_batch_suite(args):
    """The paper64 training step and a sampler evaluation at batches 16, 32 and 64, as time per image. Arithmetic
    grows with the batch; a kernel's fixed costs (its launch inside a graph, its ramp and tail, a grid too small to
    fill the device) do not. So a per-image time that falls with the batch says the batch-16 figures are bound by
    how many kernels the step runs, not by their arithmetic, and c/a moving toward the arithmetic ratio (2.0,
    bench.flops_per_call) as the batch grows says the same of the dual step's excess over the score step."""
    device = torch.device(args.device)
    sz = BATCH_SUITE[device.type]
    nets.set_tf32(True, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"batch check: {device_name(device)}, torch {torch.__version__}, {sz['config']} at {sz['size']}x{sz['size']}x3, "
          f"float32{' with TF32' if device.type == 'cuda' else ''}", flush=True)
    t_start = time.perf_counter()
    print("training step, ms per image (a) score / (b) DSM / (c) dual; time ratios; achieved GFLOP/s of (a) / (c)")
    for batch in sz["batches"]:
        try:
            t = train_step_times(sz["config"], sz["size"], 3, batch, device, False, False, sz["rounds"], 2)
            per = " / ".join(f"{1e3 * t[k] / batch:6.2f}" for k in "abc")
            tflops = " / ".join(f"{t[f'flops_{k}'] / t[k] / 1e9:.4g}" for k in "ac")
            mem = f"; peak (c) {t['peak_c_gib']:.1f} GiB" if "peak_c_gib" in t else ""
            print(f"  batch {batch:3d}: {per}   b/a {t['b/a']:.2f}  c/a {t['c/a']:.2f}  c/b {t['c/b']:.3f}   "
                  f"{tflops}{mem}   ({time.perf_counter() - t_start:.0f} s)", flush=True)
        except Exception as e:  # out of memory at the largest batch, say: the smaller ones still stand
            print(f"  batch {batch:3d}: FAILED: {type(e).__name__}: {e}", flush=True)
    energy = build_energy(sz["config"], sz["size"], 3, device, random_output=True).eval()
    graph = device.type == "cuda"
    print(f"sampler evaluation (E and dE/dz, deblurring, float32{', CUDA graph' if graph else ''}), per image")
    for n in sz["batches"]:
        try:
            r = eval_times(energy, n, sz["size"], device, {"e": (False, False, graph)}, evals=sz["evals"])["e"]
            if "error" in r:
                raise RuntimeError(r["error"])
            print(f"  batch {n:3d}: {r['ms']:7.2f} ms per evaluation, {r['ms'] / n:6.3f} ms per image   "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        except Exception as e:
            print(f"  batch {n:3d}: FAILED: {type(e).__name__}: {e}", flush=True)
    # The floor under a kernel-bound evaluation: one elementwise pass over the largest activation of batch 16.
    a = torch.rand(sz["batches"][0], nets.CONFIGS[sz["config"]]["channels"], sz["size"], sz["size"], device=device)
    t = interleaved({"pass": lambda: torch.add(a, a, out=a)}, device, 20, 3)["pass"]
    print(f"one elementwise pass over a {tuple(a.shape)} float32 activation: {1e6 * t:.1f} us "
          f"({3 * a.numel() * 4 / t / 1e9:.0f} GB/s counting two reads and a write)")
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.suite == "gpu":
        return run_suite(args)
    if args.suite == "speed":
        return run_speed_suite(args)
    if args.suite == "batch":
        return run_batch_suite(args)
    device = torch.device(args.device)
    nets.set_tf32(args.tf32, device)  # without --tf32, float32 convolutions too (cuDNN's default is TF32)
    size = args.img_size or (32 if args.config in ("small", "tiny") else 64)
    what = (f"batch {args.batch}: {args.config}, {size}x{size}x{args.channels}, {device_name(device)}, "
            f"torch {torch.__version__}, " + (" ".join(f for f, on in (("bf16", args.bf16), ("tf32", args.tf32),
                                                                         ("channels_last", args.channels_last)) if on)
                                               or "fp32"))
    if args.what == "train":
        t = train_step_times(args.config, size, args.channels, args.batch, device, args.bf16, args.channels_last,
                             args.rounds, args.warmup, args.seed, torch_layers=args.torch_layers)
        print_train(t, what)
    else:
        energy = build_energy(args.config, size, args.channels, device, args.channels_last)
        s = sampling_times(energy, args.n, size, args.levels, device, args.bf16)
        print(f"deblur {args.n} images, {args.levels} levels, 1 corrector step: {what}")
        for c in ("ula", "mala"):
            print(f"{c:5s} {s[c]:8.2f} s per run   ({s[c] / args.levels * 1e3:.1f} ms per level)")
        print(f"MALA/ULA time ratio: {s['mala'] / s['ula']:.3f} (goal <= 1.10); MALA acceptance {s['mala_acceptance']:.2f}")


if __name__ == "__main__":
    main()
