"""
Training: dual score matching (docs/method.md §4, §5) in one plain loop.

    python train.py                                        # small UNet on dead leaves, CPU, a few minutes
    python train.py --preset hour                          # the model docs/results.md measures
    torchrun --nproc_per_node=8 train.py --dataset imagenet64 --data-dir DIR   # the paper's run

The file reads top to bottom: presets, flags, one training step, the loop, then the steps it calls
(set-up, checkpoints, validation) and what a cluster does to a run. Each step draws images x, one
covariance per image (docs/method.md §2) and noise, and minimises L = L_DSM + lam L_CSM (M8).

Distributed: torchrun starts one process per device (NCCL on CUDA, gloo on CPU), each rank with its
own share of the batch and its own seeds; gradients are averaged by one explicit all_reduce, not the
DDP wrapper, whose reducer assumes one forward per backward (a dual-score step calls the network once
per covariance group and differentiates through autograd.grad). Checkpoints hold every random stream
of every rank and are written atomically, so --resume continues bit for bit (docs/training.md).
"""

import argparse
import copy
import csv
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import aebm
import covariances as cv
import data
import nets

# Presets: `--dataset imagenet64` alone gives the paper's configuration (docs/method.md §5); every other
# dataset starts from the quick preset. Any flag given on the command line wins over the preset.
# quick and hour are the CPU presets. Against the paper's recipe (the imagenet64 preset) they weight A-DSM per
# coordinate (--dsm-weight edm: M5 charges a dropped frequency's error by 1/s = 1e-8, so nothing trains what SR
# or a hole leaves to the prior), draw half the masks like an inpainting task (--p-hole 0.5: independent draws
# rarely do), start the training variances at 1e-4 (below, the denoiser is nearly the identity and teaches
# restoration little), and weight A-CSM by lam = 0.2 (its noisy target takes a share of a small network's
# training that restoration needs; any lam > 0 keeps the exact energy as the minimiser); hour also gives a blur/SR
# Sigma the data's power spectrum as M3's Gaussian part (--anchor spectral: blind deblurring, calibrated samples) and
# weights A-DSM by each coordinate's own anchor variance (--dsm-weight anchor). Each choice is measured
# against the paper's in docs/results.md. The paper preset trains in float32 with TF32 rather than bf16 autocast:
# faster at the per-GPU batch and closer to float32 (docs/benchmarks.md).
PRESETS = {
    "quick": dict(config="small", batch=8, steps=400, lr=2e-3, warmup=50, decay="cosine", decay_every=0, ema=0.99,
                  log_every=25, eval_every=200, ckpt_every=200, bf16=False, tf32=False, s_range=(1e-4, 1e3),
                  dsm_weight="edm", p_hole=0.5, lam=0.2, anchor="white"),
    "hour": dict(config="small", batch=16, steps=3600, lr=1e-3, warmup=100, decay="cosine", decay_every=0, ema=0.999,
                 log_every=100, eval_every=600, ckpt_every=600, bf16=False, tf32=False, s_range=(1e-4, 1e3),
                 dsm_weight="anchor", p_hole=0.5, lam=0.2, anchor="spectral"),
    "imagenet64": dict(config="paper64", batch=128, steps=400_000, lr=2e-4, warmup=1000, decay="step", decay_every=100_000,
                       ema=0.9999, log_every=100, eval_every=5000, ckpt_every=5000, bf16=False, tf32=True,
                       dsm_weight="none", p_hole=0.0, lam=1.0, anchor="white"),
}
# hour's recipe on random 32x32 crops of a folder of photographs at their own resolution (README, Your own images):
# the prior that sample.py --observed needs to restore such photographs whole.
PRESETS["photos"] = dict(PRESETS["hour"], crop="random", img_size=32)
# The paper's losses over the full range of variances (the imagenet64 preset's), as flags: the validation
# experiments on the Gaussian field train with them; each passes its own --lam.
PAPER_LOSSES = ["--dsm-weight", "none", "--p-hole", "0", "--s-range", str(cv.S_MIN), str(cv.S_MAX)]


# -----------------------------------------------------------------------------
# Flags: the ones a learner needs first, then the advanced ones (`python train.py --help`).

def build_parser():
    p = argparse.ArgumentParser(description="Train an anisotropic energy model with dual score matching.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="defaults for the flags below (default: imagenet64 for --dataset imagenet64, else quick)")
    p.add_argument("--dataset", default="deadleaves", help=f"one of {data.BUILTIN + data.ON_DISK}")
    p.add_argument("--data-dir", default=None, help="directory of an on-disk dataset (README, Datasets)")
    p.add_argument("--out", default="runs/quick", help="run directory: ckpt.pt, log.csv, PNG grids, curves.png")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt exactly")
    p.add_argument("--restart", action="store_true",
                   help="start over in an --out that holds a run: its files move to OUT/replaced_TIME/ first "
                        "(without --resume or --restart such a folder is refused)")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps")
    p.add_argument("--batch", type=int, default=None, help="global batch size, split over ranks")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate after warm-up")
    p.add_argument("--lam", type=float, default=None,
                   help="weight of the A-CSM loss (M8); 0 = DSM-only (preset: 0.2 for quick and hour, else 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (rank r uses seed + r)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    a = p.add_argument_group("data and network")
    a.add_argument("--img-size", type=int, default=None, help="image size (default: the dataset's, e.g. 32 for deadleaves)")
    a.add_argument("--channels", type=int, default=3, help="1 or 3 (built-in datasets and image folders)")
    a.add_argument("--leaf-radii", type=float, nargs=2, default=None, metavar=("R_MIN", "R_MAX"),
                   help="dead leaves: smallest and largest disk radius in pixels (default 1 and IMG_SIZE/3)")
    a.add_argument("--crop", default=None, choices=["center", "random"],
                   help="--dataset folder: each file's centred square resized to --img-size (default), or random "
                        "--img-size crops at the photographs' own resolution (preset photos)")
    a.add_argument("--scale", type=float, default=1.0, help="with --crop random: shrink photographs by 0 < SCALE <= 1 first")
    a.add_argument("--train-images", type=int, default=0,
                   help="train on a fixed set of N images (0: the whole dataset, or fresh draws of a built-in one)")
    a.add_argument("--subset", type=int, default=0,
                   help="with --train-images N: which set of N, disjoint from every other (experiments/generalization.py)")
    a.add_argument("--config", default=None, help=f"network, one of {sorted(nets.CONFIGS)} (preset: small / paper64)")
    a.add_argument("--dropout", type=float, default=None, help="dropout rate of the UNet (default: the config's)")
    a.add_argument("--spectral", default="frequency", choices=["frequency", "pooled"],
                   help="a blur/SR Sigma's gains: per frequency (default) or the paper's, pooled (nets.py)")
    a.add_argument("--anchor", default=None, choices=["white", "spectral"],
                   help="M3's Gaussian part for a blur/SR Sigma: white, N(mu, sigma_d^2 I) as in the paper, or spectral, "
                        "the data's own power spectrum fitted at the start (aebm.EnergyModel.anchor_var; "
                        "preset: spectral for hour and photos, else white)")
    a.add_argument("--learned-scale", default="w", choices=["w", "unit", "fill"],
                   help="weight of the network's output in M3's learned term: w, as the paper writes it, or unit, EDM's "
                        "preconditioning carried over so the network's output is unit-scale at every noise level, or fill, "
                        "a direct output for coordinates that carry no information (aebm.EnergyModel.learned_weight)")
    a.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="parameter dtype (float64 for tests)")

    a = p.add_argument_group("the loss and its covariances (docs/method.md §2, §4)")
    a.add_argument("--dsm-weight", default=None, choices=["none", "edm", "anchor", "edm-pixel"],
                   help="edm: A-DSM's coordinates weighted by (s + sigma_d^2)/sigma_d^2, so missing pixels count; anchor: "
                        "by (s + c)/c, c the anchor's variance; edm-pixel: edm for pixel-basis Sigma, none for spectral; "
                        "none: M5 as written (aebm.dual_score_losses; preset: edm for quick, anchor for hour, photos; else none)")
    a.add_argument("--spectral-basis", default=None, choices=["fft", "dct"],
                   help="basis of the blur/SR training covariances (default: fft for gaussian and imagenet64, dct otherwise)")
    a.add_argument("--s-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"range of the log-uniform training variances (default {cv.S_MIN:g} {cv.S_MAX:g}; "
                        "preset: 1e-4 1e3 for quick and hour)")
    a.add_argument("--p-hole", type=float, default=None,
                   help="fraction of training masks drawn like inpainting: hole variance in [1, HI], observed in "
                        "[LO, 1e-2]; 0: independent draws, as in the paper (preset: 0.5 for quick and hour, else 0)")
    a.add_argument("--p-iso", type=float, default=0.1, help="fraction of isotropic training covariances")
    a.add_argument("--p-random", type=float, default=0.0,
                   help="fraction of training masks that are random pixel masks, 5-95%% missing (default 0: boxes and halves)")
    a.add_argument("--spectral-noise-max", type=float, default=1.0,
                   help="largest noise variance of the blur/SR training draws (from LO of --s-range); above 1 "
                        "the spectral families reach M3's s -> infinity anchor along their own noise axis")

    a = p.add_argument_group("optimisation")
    a.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (0: none)")
    a.add_argument("--decay", default=None, choices=["cosine", "step", "none"],
                   help="after warm-up: cosine to lr/20 over --steps (quick and hour), halve every --decay-every "
                        "steps (paper preset), or constant")
    a.add_argument("--decay-every", type=int, default=None, help="with --decay step: halve the learning rate every this many steps")
    a.add_argument("--clip", type=float, default=20.0, help="gradient-norm clip")
    a.add_argument("--ema", type=float, default=None, help="EMA decay of the weights")
    a.add_argument("--bf16", type=int, default=None, help="1: UNet under bf16 autocast on CUDA (energy reductions stay float32)")
    a.add_argument("--tf32", type=int, default=None, help="1: allow TF32 matmuls/convolutions on CUDA")

    a = p.add_argument_group("logging and validation")
    a.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    a.add_argument("--eval-every", type=int, default=None, help="steps between validations (EMA model)")
    a.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    a.add_argument("--val-batch", type=int, default=16, help="held-out images for validation losses and grids")
    a.add_argument("--val-restore", type=int, default=1, choices=[0, 1],
                   help="1: validation also scores restorations against a fitted Wiener filter and blind inpainting")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.preset = args.preset or ("imagenet64" if args.dataset == "imagenet64" else "quick")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    size, basis = data.DATASET_DEFAULTS.get(args.dataset, (32, "dct"))
    args.img_size = size if args.img_size is None else args.img_size
    args.spectral_basis = args.spectral_basis or basis
    if args.dataset == "mnist":
        args.channels = 1
    if args.config not in nets.CONFIGS:
        p.error(f"--config {args.config!r} is not one of {sorted(nets.CONFIGS)}")
    if args.dropout is None:
        args.dropout = nets.CONFIGS[args.config]["dropout"]
    if args.leaf_radii is not None:
        args.leaf_radii = tuple(args.leaf_radii)
    args.crop = args.crop or "center"
    args.s_range = tuple(args.s_range or (cv.S_MIN, cv.S_MAX))
    check_args(p, args)
    return args


def check_args(p, args):
    """One-line errors at parse time, each naming its flag."""
    for flag, value, minimum in [("--img-size", args.img_size, 1), ("--batch", args.batch, 1), ("--steps", args.steps, 1),
                                 ("--warmup", args.warmup, 0), ("--decay-every", args.decay_every, 1 if args.decay == "step" else 0),
                                 ("--log-every", args.log_every, 1), ("--eval-every", args.eval_every, 1),
                                 ("--ckpt-every", args.ckpt_every, 1), ("--val-batch", args.val_batch, 1)]:
        if value < minimum:
            p.error(f"{flag} must be at least {minimum}, got {value}")
    for flag, value, ok, what in [("--lr", args.lr, args.lr > 0, "positive"), ("--clip", args.clip, args.clip > 0, "positive"),
                                  ("--ema", args.ema, 0 <= args.ema < 1, "in [0, 1)"),
                                  ("--p-iso", args.p_iso, 0 <= args.p_iso <= 1, "in [0, 1]"),
                                  ("--p-hole", args.p_hole, 0 <= args.p_hole <= 1, "in [0, 1]"),
                                  ("--p-random", args.p_random, 0 <= args.p_random <= 1, "in [0, 1]"),
                                  ("--lam", args.lam, args.lam >= 0, "0 or more"),
                                  ("--dropout", args.dropout, 0 <= args.dropout < 1, "in [0, 1)")]:
        if not (math.isfinite(value) and ok):
            p.error(f"{flag} must be {what}, got {value}")
    if args.leaf_radii is not None:
        if args.dataset != "deadleaves":
            p.error(f"--leaf-radii applies to --dataset deadleaves only, not {args.dataset}")
        if not (math.isfinite(args.leaf_radii[1]) and 0 < args.leaf_radii[0] < args.leaf_radii[1]):
            p.error(f"--leaf-radii must be two radii 0 < R_MIN < R_MAX in pixels, got {args.leaf_radii[0]:g} {args.leaf_radii[1]:g}")
    lo, hi = args.s_range
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi and lo < 1):
        p.error(f"--s-range must be two variances 0 < LO < HI with LO < 1, got {lo:g} {hi:g}")
    if not (math.isfinite(args.spectral_noise_max) and args.spectral_noise_max > lo):
        p.error(f"--spectral-noise-max must be above LO of --s-range ({lo:g}), got {args.spectral_noise_max:g}")
    if args.train_images < 0 or args.subset < 0 or (args.subset and not args.train_images):
        p.error(f"--train-images N and --subset K must be 0 or more, and --subset needs --train-images, "
                f"got {args.train_images} and {args.subset}")
    if args.crop == "random" and args.dataset != "folder":
        p.error(f"--crop random (and --preset photos) takes crops of an image folder: pass --dataset folder --data-dir DIR")
    if not 0 < args.scale <= 1 or (args.scale != 1 and args.crop != "random"):
        p.error(f"--scale must be in (0, 1] and goes with --crop random, got {args.scale:g}")
    if args.resume and args.restart:
        p.error("--resume continues the run in --out and --restart sets it aside: pass one of them")
    if args.device is not None and nets.device_error(args.device):
        p.error(f"--device {nets.device_error(args.device)}")


# -----------------------------------------------------------------------------
# One training step.

def draw_batch(ds, n, g_data, device, dtype):
    """n clean images with random horizontal flips, on device."""
    x = ds.get_batch(n, g_data)
    flip = torch.rand(n, generator=g_data) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x.to(device=device, dtype=dtype)


def training_ranges(args):
    """--s-range, --spectral-noise-max, --p-hole and --p-random as keyword arguments of
    cv.sample_training_covariances (spectral noise variance from LO to min(HI, --spectral-noise-max))."""
    lo, hi = args.s_range
    return dict(s_range=(lo, hi), noise_range=(lo, min(hi, args.spectral_noise_max)), p_hole=args.p_hole,
                p_random=args.p_random)


def train_step(energy, opt, x, groups, args, world=1, generator=None, zetas=None):
    """One step of dual score matching: loss (M8), backward, gradient all_reduce, clip, Adam.
    Returns (L_dsm, L_csm, grad_norm), averaged over ranks. Raises FloatingPointError on a
    non-finite loss or gradient, before the parameters change."""
    params = [p for p in energy.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bool(args.bf16) and x.device.type == "cuda"):
        weight = {"edm": energy.data_var, "anchor": "anchor", "edm-pixel": "edm-pixel", "none": None}[args.dsm_weight]
        L, L_dsm, L_csm = aebm.dual_score_loss(energy, x, groups, lam=args.lam, generator=generator, zetas=zetas,
                                               dsm_weight=weight)
    # Only the parameters' gradients: a plain backward would carry on to the z and log s the energy was
    # differentiated by in the loss, which nothing reads (tests/test_train.py: the same gradients).
    L.backward(inputs=params)
    average_gradients(params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
    L_val, L_dsm, L_csm, grad_norm = all_mean([L.detach(), L_dsm, L_csm, grad_norm], world)
    if not (math.isfinite(L_val) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"loss {L_val} / gradient norm {grad_norm} is not finite")
    opt.step()
    return L_dsm, L_csm, grad_norm


# -----------------------------------------------------------------------------
# The run: the loop on one screen. The named steps it calls follow it.

def main(argv=None):
    args = parse_args(argv)
    stop = StopSignals()
    try:
        return run(args, stop)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    finally:
        stop.restore()


def run(args, stop):
    ctx = setup(args)  # ranks, device, dtype, the run directory
    ds, val_x, wiener = load_data(args, ctx)
    m = build_model(args, ds, ctx)  # the energy, its EMA, Adam, the random streams, the step
    if args.resume:
        resume(m, args, ctx)
    log = open_log(args, ctx, m)
    while m.step < args.steps:
        lr = learning_rate(m.step, args)
        for group in m.opt.param_groups:
            group["lr"] = lr
        x = draw_batch(ds, ctx.local_batch, m.g_data, ctx.device, ctx.dtype)
        groups = cv.sample_training_covariances(x.shape, args.spectral_basis, args.p_iso, generator=m.g_data,
                                                **training_ranges(args), dtype=ctx.dtype, device=ctx.device)
        try:
            losses = train_step(m.energy, m.opt, x, groups, args, ctx.world, m.g_noise)
        except FloatingPointError as e:
            last = f"the last good checkpoint {ctx.ckpt_path} is kept" if os.path.exists(ctx.ckpt_path) else "no checkpoint was written yet"
            sys.exit(f"error: step {m.step}: {e}; stopping, {last}. Try a lower --lr or check the data.")
        update_ema(m.ema, m.net, args.ema, m.step)
        m.step += 1
        last_step = m.step == args.steps
        if log is not None and (m.step % args.log_every == 0 or last_step):
            log_training(log, args, m.step, lr, losses)
        if log is not None and (m.step % args.eval_every == 0 or last_step):
            log_validation(log, args, m, val_x, wiener, lr)
        signum = agreed_signal(stop.signum, ctx.world)
        if m.step % args.ckpt_every == 0 or last_step or signum:
            checkpoint(m, ctx)
        if signum:
            finish(ctx, log, f"stopped by {signal.Signals(signum).name} at step {m.step}: checkpoint {ctx.ckpt_path} "
                             "written; continue with --resume")
            sys.exit(128 + signum)
    finish(ctx, log, f"done: {m.step} steps in {(time.time() - log.t_start) / 60 if log else 0:.1f} min; checkpoint "
                     f"{ctx.ckpt_path}, grid {os.path.join(args.out, f'val_{m.step:07d}.png')}")


# -----------------------------------------------------------------------------
# Set-up.

def setup(args):
    """Ranks and device: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    distributed = "RANK" in os.environ  # launched by torchrun (even with one process: NCCL is exercised)
    if distributed:
        join_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if args.batch % world:
        raise ValueError(f"batch {args.batch} must be divisible by the number of processes {world}")
    nets.set_tf32(args.tf32, device)
    try:
        data.prepare_out(args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    ctx = SimpleNamespace(world=world, rank=rank, master=rank == 0, device=device, distributed=distributed,
                          local_batch=args.batch // world, dtype=getattr(torch, args.dtype),
                          ckpt_path=os.path.join(args.out, "ckpt.pt"), log_path=os.path.join(args.out, "log.csv"))
    protect_previous_run(args, ctx)
    return ctx


def join_process_group(**kwargs):
    """dist.init_process_group, with torch._dynamo imported first. torch.optim imports dynamo on first use,
    and dynamo imported after init_process_group keeps references to the default group: destroy_process_group
    then cannot free it, gloo's worker threads outlive the interpreter, and a rank that finished well can
    abort at exit ("terminate called without an active exception", SIGABRT). Imported first, it holds none."""
    import torch._dynamo as _dynamo  # noqa: F401  (aliased: a bare import would make torch a local name)
    dist.init_process_group(**kwargs)


def load_data(args, ctx):
    """Training data, held-out images for validation, and the classical baseline validation compares with:
    a Gaussian prior fitted to 512 training images (its posterior mean is the Wiener filter)."""
    ds = data.load_dataset(args.dataset, args.img_size, args.channels, args.data_dir, "train", args.leaf_radii,
                           args.crop, args.scale)
    if args.train_images:  # a fixed set of N, recorded in the checkpoint's config (data.dataset_for finds it again)
        ds = data.finite_subset(ds, args.train_images, args.subset)
    val_ds = data.load_dataset(args.dataset, args.img_size, args.channels, args.data_dir, "test", args.leaf_radii,
                               args.crop, args.scale)
    args.channels = ds.channels
    val_x = val_ds.get_batch(args.val_batch, torch.Generator().manual_seed(999_999)).to(ctx.device, ctx.dtype)
    wiener = None
    if args.val_restore:
        fit_x = ds.get_batch(512, torch.Generator().manual_seed(777_777)).to(ctx.device, torch.float64)
        wiener = aebm.fit_gaussian(fit_x, args.spectral_basis).to(ctx.dtype)
    return ds, val_x, wiener


def build_model(args, ds, ctx):
    """The energy, its EMA (a frozen copy), Adam, and the per-rank random streams. g_data (CPU) draws images,
    flips and covariances; g_noise the noise; torch's global generator (seeded per rank) drives dropout. All
    three are checkpointed; validation draws from none of them. Every rank initialises from the same seed
    and then takes rank 0's tensors: without the DDP wrapper nobody else would synchronise the replicas."""
    config = {k: getattr(args, k) for k in nets.ARCHITECTURE_KEYS}
    spectrum = None
    if args.anchor == "spectral":  # the power law of 512 training images (the same draw on every rank)
        spectrum = aebm.fit_spectrum(ds.get_batch(512, torch.Generator().manual_seed(777_777)), args.spectral_basis, ds.mean)
    config.update(spectral_basis=args.spectral_basis, data_mean=ds.mean, data_var=ds.var, anchor_spectrum=spectrum, learned_scale=args.learned_scale, lam=args.lam,
                  dropout=args.dropout, spectral=args.spectral, leaf_radii=args.leaf_radii, crop=args.crop, scale=args.scale,
                  train_images=args.train_images, subset=args.subset,
                  data_dir=os.path.abspath(args.data_dir) if args.data_dir else None)  # data.dataset_for reads these
    # the training distribution of covariances, a record for the experiments (which families a model has seen);
    # not checked on resume
    config.update(p_iso=args.p_iso, p_hole=args.p_hole, p_random=args.p_random, s_range=list(args.s_range),
                  spectral_noise_max=args.spectral_noise_max, dsm_weight=args.dsm_weight)
    torch.manual_seed(args.seed)
    energy = nets.build_energy(config, ctx.device)
    net = energy.net
    if ctx.world > 1:
        for tensor in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(tensor.data, src=0)
    torch.manual_seed(20_000 + args.seed + ctx.rank)  # per-rank dropout
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # never trained, so no dropout in validation
    ema_energy = type(energy)(ema, ds.mean, ds.var, spectrum)  # the same wrapper (experiments/denoiser.py swaps it)
    # foreach: every parameter's update in a few multi-tensor operations (torch's default on CUDA, not on CPU)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, foreach=True)
    return SimpleNamespace(config=config, energy=energy, net=net, ema=ema, ema_energy=ema_energy, opt=opt, step=0,
                           g_data=torch.Generator().manual_seed(args.seed + ctx.rank),
                           g_noise=torch.Generator(ctx.device).manual_seed(10_000 + args.seed + ctx.rank))


def learning_rate(step, args):
    """Linear warm-up (none for --warmup 0), then: cosine from lr to lr/20 over the run's --steps (so a
    longer run keeps learning); halving every decay_every steps (the paper's 400k-step schedule); or
    constant (docs/method.md §5)."""
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    if args.decay == "cosine":
        progress = min(1.0, max(0, step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    if args.decay == "step":
        return args.lr * warm * 0.5 ** (step // args.decay_every)
    return args.lr * warm


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, resumed exactly, refused with the differences when they do not fit.

def checkpoint(m, ctx):
    """Every rank's random streams are gathered; rank 0 writes."""
    rng = {"data": m.g_data.get_state(), "noise": m.g_noise.get_state(), "torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    all_rng = [rng]
    if ctx.world > 1:
        all_rng = [None] * ctx.world
        dist.all_gather_object(all_rng, rng)
    if ctx.master:
        save_checkpoint(ctx.ckpt_path, {"model": m.net.state_dict(), "ema": m.ema.state_dict(), "opt": m.opt.state_dict(),
                                        "step": m.step, "config": m.config, "rng": all_rng})


def resume(m, args, ctx):
    """Load the weights, EMA, optimizer, step, data moments and this rank's random streams of OUT/ckpt.pt."""
    ckpt = nets.load_checkpoint(ctx.ckpt_path, ctx.device)
    check_same_config(ckpt["config"], args, ctx.ckpt_path)
    if ckpt["config"].get("model", "energy") != m.config.get("model", "energy"):
        raise ValueError(f"checkpoint {ctx.ckpt_path} is a plain-denoiser control: resume it with "
                         "python -m experiments.denoiser --resume and the same flags, or pass a new --out")
    if len(ckpt["rng"]) != ctx.world:
        raise ValueError(f"checkpoint {ctx.ckpt_path} was written by {len(ckpt['rng'])} processes; resume with as many")
    m.net.load_state_dict(ckpt["model"])
    m.ema.load_state_dict(ckpt["ema"])
    m.opt.load_state_dict(ckpt["opt"])
    m.step = ckpt["step"]
    m.config.update(data_mean=ckpt["config"]["data_mean"], data_var=ckpt["config"]["data_var"],
                    anchor_spectrum=ckpt["config"].get("anchor_spectrum"))
    for energy in (m.energy, m.ema_energy):
        energy.mean, energy.data_var = m.config["data_mean"], m.config["data_var"]
        energy.spectrum = m.config["anchor_spectrum"]
    rng = ckpt["rng"][ctx.rank]
    m.g_data.set_state(rng["data"].cpu())  # generator states are CPU byte tensors
    m.g_noise.set_state(rng["noise"].cpu())
    torch.set_rng_state(rng["torch"].cpu())
    if ctx.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    if ctx.master:
        note = data.restore_log(ctx.log_path, m.step)
        print(f"resumed from {ctx.ckpt_path} at step {m.step}" + (f"; {note}" if note else ""))


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one (if any) is intact."""


def protect_previous_run(args, ctx):
    """A folder that holds a run is continued (--resume), set aside (--restart), or refused: one missing
    flag must not replace hours of training. A ckpt.pt.tmp left by a kill during a checkpoint write is
    stale (the checkpoint beside it is intact) and goes."""
    tmp = ctx.ckpt_path + ".tmp"
    if ctx.master and os.path.exists(tmp):
        os.remove(tmp)
        print(f"note: removed {tmp}, left by an interrupted checkpoint write (the checkpoint itself is intact)")
    held = os.path.exists(ctx.ckpt_path)
    if ctx.distributed:
        dist.barrier()  # every rank has looked before rank 0 moves anything
    if args.resume or not held:
        return
    if not args.restart:
        sys.exit(f"error: {args.out} already holds a run ({describe_checkpoint(ctx.ckpt_path)}); continue it with "
                 f"--resume, start over with --restart (its files move to {args.out}/replaced_TIME/), or pass a new --out")
    if ctx.master:
        print(f"note: --restart: the previous run ({describe_checkpoint(ctx.ckpt_path)}) moved to {set_aside(args.out)}")
    if ctx.distributed:
        dist.barrier()


def describe_checkpoint(path):
    try:
        ckpt = nets.load_checkpoint(path)
    except ValueError:
        return "an unreadable ckpt.pt"
    c = ckpt["config"]
    return f"step {ckpt['step']}, {c['dataset']} {c['img_size']}x{c['img_size']}x{c['channels']}, {c['config']}"


def set_aside(out):
    """Move a run's files (checkpoint, log, curves, validation grids) into a new OUT/replaced_TIME/."""
    stem = os.path.join(out, "replaced_" + time.strftime("%Y%m%d-%H%M%S"))
    dest, n = stem, 1
    while os.path.exists(dest):
        dest, n = f"{stem}_{n}", n + 1
    os.makedirs(dest)
    for name in sorted(os.listdir(out)):
        if name in ("ckpt.pt", "log.csv", "curves.png") or (name.startswith("val_") and name.endswith(".png")):
            os.replace(os.path.join(out, name), os.path.join(dest, name))
    return dest


def save_checkpoint(path, state):
    """Atomic: write a temporary file in the same directory, flush it to disk, then os.replace. A disk
    or permission fault leaves the previous checkpoint as it was and raises CheckpointError."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {path} ({e.strerror or e}); {kept}. "
                              "Free disk space or fix the directory's permissions, then --resume") from None


def leaf_radii(config):
    """Dead leaves' (r_min, r_max) of a run's or a checkpoint's config, None for other datasets (the default
    radii when none were given, and in checkpoints from before --leaf-radii)."""
    if config.get("dataset") != "deadleaves":
        return None
    leaves = data.DeadLeaves(config["img_size"], 1, *(config.get("leaf_radii") or ()))  # cheap: draws nothing
    return leaves.r_min, leaves.r_max


def check_same_config(saved, args, path):
    # the network's shape and dtype, and the data it learns
    diff = {k: (saved.get(k), getattr(args, k)) for k in nets.ARCHITECTURE_KEYS if saved.get(k) != getattr(args, k)}
    if leaf_radii(saved) != leaf_radii(vars(args)):
        diff["leaf_radii"] = (leaf_radii(saved), leaf_radii(vars(args)))
    if ("spectral" if saved.get("anchor_spectrum") else "white") != args.anchor:
        diff["anchor"] = ("spectral" if saved.get("anchor_spectrum") else "white", args.anchor)
    for k, default in (("crop", "center"), ("scale", 1.0), ("spectral", "pooled"), ("learned_scale", "w"),  # older checkpoints lack these
                       ("train_images", 0), ("subset", 0)):
        if saved.get(k, default) != getattr(args, k):
            diff[k] = (saved.get(k, default), getattr(args, k))
    if diff:
        items = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} was trained with another configuration ({items}); "
                         "pass the same flags or a new --out")


# -----------------------------------------------------------------------------
# Logging: a line per --log-every steps, validation per --eval-every, both in OUT/log.csv.

def open_log(args, ctx, m):
    """Rank 0's log (None on the other ranks): the run's header line, OUT/log.csv, and the clock."""
    if not ctx.master:
        return None
    print(f"{args.dataset} {args.img_size}x{args.img_size}x{args.channels}, {args.config} "
          f"({nets.count_parameters(m.net) / 1e6:.2f} M params), batch {args.batch} on {ctx.world} x {ctx.device}, "
          f"lam {args.lam}, spectral basis {args.spectral_basis}"
          + (f", a fixed set of {args.train_images} training images (subset {args.subset})" if args.train_images else ""))
    f = open(ctx.log_path, "a" if args.resume else "w", newline="")
    writer = csv.writer(f)
    if not args.resume:
        writer.writerow(data.LOG_COLUMNS)
    now = time.time()
    return SimpleNamespace(file=f, writer=writer, t_start=now, t_last=now, step_last=m.step)


def log_training(log, args, step, lr, losses):
    L_dsm, L_csm, grad_norm = losses
    now = time.time()
    img_s = (step - log.step_last) * args.batch / max(now - log.t_last, 1e-9)
    eta = (args.steps - step) * args.batch / max(img_s, 1e-9)
    print(f"step {step:7d} | dsm {L_dsm:.4f} | csm {L_csm:.4f} | lr {lr:.2e} | |g| {grad_norm:6.2f} | "
          f"{img_s:7.1f} img/s | eta {eta / 60:6.1f} min", flush=True)
    log.writer.writerow([step, "train", L_dsm, L_csm, lr, grad_norm, img_s, now - log.t_start])
    log.file.flush()
    log.t_last, log.step_last = now, step


def log_validation(log, args, m, val_x, wiener, lr):
    v = validate(m.ema_energy, val_x, args, m.step, args.out, wiener)
    above = " ".join(f"{k} {v[f'psnr_{k}'] - v[f'wiener_{k}']:+.2f}" for k in ("denoise", "inpaint", "deblur", "sr")
                     if f"psnr_{k}" in v)
    print(f"step {m.step:7d} | validation (EMA) dsm {v['loss_dsm']:.4f} | csm {v['loss_csm']:.4f}"
          + (f" | dB above Wiener: {above} | blind inpainting {v['blind_inpaint']:.2f}" if above else ""), flush=True)
    log.writer.writerow([m.step, "val", v["loss_dsm"], v["loss_csm"], lr, "", "", time.time() - log.t_start]
                        + [v.get(k, "") for k in data.LOG_COLUMNS[8:]])
    log.file.flush()
    data.save_learning_curves(log.file.name, os.path.join(args.out, "curves.png"))


def finish(ctx, log, message):
    """Close the log, say how the run ended, and leave the process group together."""
    if log is not None:
        log.file.close()
        print(message, flush=True)
    if ctx.distributed:
        dist.barrier()  # every rank waits until rank 0 has written its checkpoint before any of them disconnects
        dist.destroy_process_group()


@torch.no_grad()
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) theta, with d ramped up as (1 + step) / (10 + step) early on."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.to(e.dtype), 1 - d)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


@torch.no_grad()
def restoration_tasks(x, spectral_basis):
    """The four restorations validation tracks, as (name, Degradation) on images x: denoising sigma 0.1, a
    centred half-size box, blur b = 1.5 and SR x2 with sigma 0.05 (spectral ones in the dataset's basis)."""
    kw = dict(dtype=x.dtype, device=x.device)
    missing = cv.box_mask(x.shape, x.shape[-1] // 2, device=x.device)
    return [("denoise", cv.denoising_problem(x.shape, 0.1, **kw)),
            ("inpaint", cv.inpainting_problem(missing, x.shape[1], 0.05, x.dtype)),
            ("deblur", cv.blur_problem(x.shape, 1.5, 0.05, spectral_basis, **kw)),
            ("sr", cv.sr_problem(x.shape, 2, 0.05, spectral_basis, **kw))]


def restoration_psnr(energy, wiener, x, spectral_basis, seed=0, tasks=None):
    """{task: (PSNR of the energy's posterior mean, PSNR of the Wiener filter, PSNR of the observation)}
    on the same images and noise (dB, mean over images). tasks: (name, Degradation) pairs, default
    restoration_tasks(x, spectral_basis); task i is measured with noise seed + i."""
    out = {}
    for i, (name, prob) in enumerate(tasks or restoration_tasks(x, spectral_basis)):
        y_obs = prob.measure(x, torch.Generator(x.device).manual_seed(seed + i))
        y, cov = prob.to_denoising(y_obs, energy.mean)
        out[name] = tuple(data.psnr(t.to(x.dtype), x).mean().item()
                          for t in (aebm.posterior_mean(energy, y, cov), aebm.posterior_mean(wiener, y, cov), y_obs))
    return out


def blind_inpainting_accuracy(energy, x, seed=0):
    """Each image on its own: the fraction of (image, true box x noise) pairs whose normalized-energy
    argmin over the 3 x 3 candidate grid is the truth (boxes 1/4, 1/2, 3/4 of the size; noise 0.02,
    0.05, 0.1; missing variance s_huge)."""
    H = x.shape[-1]
    sizes, noises = [H // 4, H // 2, 3 * H // 4], [0.02, 0.05, 0.1]
    hits, total = 0, 0
    for k, (b, sigma) in enumerate([(b, s) for b in sizes for s in noises]):
        cov = cv.mask_covariance(cv.box_mask(x.shape, b, device=x.device), cv.S_HUGE, sigma ** 2, x.shape[1], x.dtype)
        y = x + cov.sample(torch.Generator(x.device).manual_seed(seed + k))[0]
        _, est_b, est_s = aebm.blind_inpaint(energy, y, x.shape[1], sizes, noises)
        hits += int(((est_b == b) & (est_s.float() == torch.tensor(sigma).float())).sum())
        total += x.shape[0]
    return hits / total


@torch.no_grad()
def validate(energy, val_x, args, step, out_dir, wiener=None):
    """Held-out losses with fixed noise (comparable across steps), a grid of posterior means for box
    inpainting (truth | observation | posterior mean), and, given the fitted Gaussian prior `wiener`,
    what matters: restoration PSNR next to the Wiener filter's and blind inpainting accuracy.
    Draws from no training generator (docs/training.md)."""
    g = torch.Generator(val_x.device).manual_seed(1234)
    groups = cv.sample_training_covariances(val_x.shape, args.spectral_basis, args.p_iso, **training_ranges(args),
                                            generator=torch.Generator().manual_seed(1234),
                                            dtype=val_x.dtype, device=val_x.device)
    with torch.enable_grad():
        _, L_dsm, L_csm = aebm.dual_score_loss(energy, val_x, groups, lam=1.0, generator=g)
    n = min(8, val_x.shape[0])
    x = val_x[:n]
    prob = restoration_tasks(x, args.spectral_basis)[1][1]
    y_obs = prob.measure(x, torch.Generator(x.device).manual_seed(0))
    y, cov = prob.to_denoising(y_obs, energy.mean)
    x_hat = aebm.posterior_mean(energy, y, cov)
    data.save_grid(os.path.join(out_dir, f"val_{step:07d}.png"), [x, y_obs, x_hat])
    scores = {"loss_dsm": L_dsm.item(), "loss_csm": L_csm.item()}
    if wiener is not None:
        for name, (model, wien, obs) in restoration_psnr(energy, wiener, val_x, args.spectral_basis).items():
            scores[f"psnr_{name}"], scores[f"wiener_{name}"], scores[f"observed_{name}"] = model, wien, obs
        scores["blind_inpaint"] = blind_inpainting_accuracy(energy, val_x[:4])
    return scores


# -----------------------------------------------------------------------------
# What a cluster does to a run: signals, resumes, several processes.

class StopSignals:
    """SIGTERM (a scheduler's warning before preemption) and SIGINT (Ctrl-C) ask the loop to stop
    after the current step, write a checkpoint and exit with 128 + the signal's number; a second
    signal exits at once. The previous handlers come back with restore()."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)  # the second signal: no more waiting
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def agreed_signal(signum, world):
    """The signal any rank received (0 if none), the same on every rank: they stop together."""
    if not dist.is_initialized():
        return signum or 0
    t = torch.tensor([float(signum or 0)], device=dist_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def average_gradients(params, world):
    """Average .grad over ranks with one all_reduce of a flat buffer (a missing grad counts as 0)."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def all_mean(values, world):
    """Mean over ranks of a few scalars (for logging and the non-finite check)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
    if dist.is_initialized():
        t = t.to(dist_device())
        dist.all_reduce(t)
        t = t.cpu() / world
    return t.tolist()


def dist_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def cli():
    """`python train.py ...`: errors of the user's making (a missing or corrupt dataset, a checkpoint of another
    configuration) as one line, not a traceback, as sample.py does; a run that fails mid-way has already said
    which step and kept its last checkpoint."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    cli()
