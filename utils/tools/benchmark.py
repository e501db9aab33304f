"""Cost of the MoE against dense models, from one run on whatever machine this is (issue 5, item 5).

    python -m utils.tools.benchmark                # CPU: batch-16 training steps, 3 repeats, a few minutes
    python -m utils.tools.benchmark --device cuda  # GPU: AMP, channels_last, cudnn flags of utils.gpu; add --compile
    python -m utils.tools.benchmark --quick        # tiny sizes, seconds: checks that it runs (sh/gpu_check.sh)
    python -m utils.tools.benchmark --steps --image-size 16 --against /work/main   # s/batch, main vs this tree

--steps times only training steps (s/batch; TRADES for dense rows, AdvMoE for MoE rows; `--rows`, default the
Fashion-MNIST study's rows of issue 27) at --image-size, batch --train-batch (128), one thread unless --threads.
With --against DIR the same steps of the source tree DIR (a git worktree of main) run beside this tree's, each
tree in its own process (utils/tools/step_worker.py) with its own code, alternating step by step (ABAB, the order
swapped every round), so the machine's load hits both alike; it prints both medians and the speed-ups, and the
per-FLOP check of AdvMoE against dense TRADES (s/batch ratio over training-step GFLOPs ratio).

ResNet-18 CIFAR (32x32, 10 classes), MoE at --ratio with N in --experts, against dense at --ratio and 1.0:
 (a) eval forward time at --batch, sparse and dense-masked MoE (the reference's computation);
 (b) GFLOPs per image of inference and of one training update with 2-step attacks at batch 8: AdvMoE for
     the MoE, TRADES for the dense models (counted by torch.utils.flop_counter);
 (c) training images per second (TRADES for dense, AdvMoE for MoE) at --train-batch.
Inputs are random CIFAR-shaped images and labels (synthetic: speed needs no dataset). On CUDA each row also
gives the peak memory of its pass beyond what the models already hold, and each model runs under its own cudnn
autotuning flag (`configure_backends`: on for dense models and the dense-masked MoE, off for the sparse MoE).
--compile compiles the dense models only (utils.gpu.maybe_compile refuses MoE models).
Times are medians of --repeats after --warmup runs, using the machine's default thread count; the models
are timed in turn within each repeat, so load from other processes hits them alike. MoE routing is
balanced (image i goes to expert i mod N, forced through a hook adding a constant to the router's logits,
so every pass still runs): the worst case for the sparse execution, which then runs N sub-batches.
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import models
from models import ModelSpec
from ..flops import make_train_step, train_step_gflops
from .flops import flops_rows
from .jobs import ROOT
from ..gpu import Precision, backend_flags, configure_backends, maybe_compile

ARCH = "resnet18_cifar"
# The reference's own figures (shared/reference/README.md), GFLOPs per image, for comparison in (b).
REFERENCE_GFLOPS = {("moe", 2): 0.68, ("moe", 4): 1.26}
REFERENCE_STEP_GFLOPS = {("moe", 2): 13.3, ("moe", 4): 23.8, ("dense", 1.0): 14.4}
# --steps' default rows: issue 27's Fashion-MNIST study (dense 2r, the dense ratio cost-matched to the MoE at 16x16,
# the MoE at r = 0.25 with 2 experts).
STUDY_ROWS = ("dense:0.5", "dense:0.390625", "moe:0.25:2")
SPEEDUP_GOAL, PER_FLOP_GOAL = 1.5, 1.2  # issue 27, item 6


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m utils.tools.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=128, help="forward-time batch")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: 128 CUDA, 16 CPU)")
    p.add_argument("--num-steps", type=int, default=2, help="attack steps of the training updates")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default: 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 5 CUDA, 1 CPU)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed training steps (default: 10 CUDA, 2 CPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA)")
    p.add_argument("--skip-train", action="store_true", help="skip (c)")
    p.add_argument("--skip-flops", action="store_true", help="skip (b)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (batch 8, training batch 4, one timed run, no (b)): checks the script runs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the machine's; --steps: 1); 1 gives steadier ratios on a loaded machine")
    p.add_argument("--steps", action="store_true", help="only training steps, s/batch per row (see above)")
    p.add_argument("--rows", nargs="+", default=list(STUDY_ROWS), metavar="ROW",
                   help="--steps: dense:RATIO or moe:RATIO:N (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="--steps: image side in pixels (FashionMNIST16: 16)")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="--steps: also time the source tree DIR (a git worktree of main), interleaved")
    p.add_argument("--channels-last", action="store_true",
                   help="--steps: this tree's models in channels-last (what --channels-last does on CPU)")
    return p


def check_args(args):
    """UsageError (one line, exit 2) for sizes that would time nothing or fail deep in a model."""
    from args import check_flags
    from utils.errors import UsageError
    check_flags(args, ("ratio",), lambda v: 0 < v <= 1, "in (0, 1]")
    if not args.experts or min(args.experts) < 1:
        raise UsageError(f"--experts must be whole numbers >= 1, got {' '.join(map(str, args.experts))}")
    check_flags(args, ("batch", "train_batch", "repeats", "train_repeats", "threads"), lambda v: v >= 1, ">= 1")
    check_flags(args, ("num_steps", "warmup"), lambda v: v >= 0, ">= 0")
    check_flags(args, ("image_size",), lambda v: v >= 8, ">= 8")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns, device, warmup, repeats):
    """{key: (median, best, peak)} of each `fns[key]()`: wall seconds, and on CUDA the peak memory (MiB) of one run
    beyond what was allocated before it (None on CPU). Timed round-robin.

    Each round runs every function once, so a change of machine load during the run (a shared machine)
    affects all of them alike and their ratios stay meaningful; `warmup` untimed rounds come first, then one
    untimed round measuring memory.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    peaks = {key: peak_memory_mib(fn, device) for key, fn in fns.items()}
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: (statistics.median(t), min(t), peaks[key]) for key, t in times.items()}


def peak_memory_mib(fn, device):
    """MiB that one `fn()` needs at its peak beyond what is allocated before it (CUDA), else None."""
    if device.type != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def with_own_flags(backends, fn):
    """`fn` run under `backends`' cudnn flag: the models take turns, so each sets its own (`configure_backends`
    set the process-wide flag once per model built, and every model ran under the last one's)."""
    def run():
        with backend_flags(backends):
            fn()
    return run


def memory_text(peak):
    return f"{peak:9.0f}" if peak is not None else f"{'-':>9}"


def balance_routing(model):
    """Force a balanced load (image i -> expert i mod N) by adding a constant to the router's logits."""
    def hook(module, inputs, logits):
        n = logits.shape[1]
        bonus = torch.nn.functional.one_hot(torch.arange(logits.shape[0], device=logits.device) % n, n)
        return logits + 1e4 * bonus.to(logits.dtype)
    return model.router.register_forward_hook(hook)


@dataclass(frozen=True)
class Model:
    """A model of the comparison: ResNet-18 CIFAR at width `ratio`, dense (`n_expert` None) or an MoE with
    `n_expert` experts, sparse or dense-masked (the reference's computation)."""
    ratio: float
    n_expert: Optional[int] = None
    sparse: bool = True

    @property
    def kind(self) -> str:
        return "dense" if self.n_expert is None else "moe"

    @property
    def label(self) -> str:
        if self.n_expert is None:
            return f"dense r={self.ratio:g}"
        return f"MoE r={self.ratio:g} N={self.n_expert} {'sparse' if self.sparse else 'dense-masked'}"

    @property
    def step_label(self) -> str:
        """--steps' label: the model and its training step."""
        if self.n_expert is None:
            return f"dense r={self.ratio:g} TRADES"
        return f"MoE r={self.ratio:g} N={self.n_expert} AdvMoE"

    def build(self, device="cpu", balanced=False):
        """The model from seed 0 on `device`; `balanced`: image i routed to expert i mod N (`balance_routing`)."""
        torch.manual_seed(0)
        if self.n_expert is None:
            return models.build_model(f"{ARCH}_ori", ratio=self.ratio).to(device)
        model = models.build_model(f"{ARCH}_moe", ratio=self.ratio, n_expert=self.n_expert, sparse=self.sparse)
        if balanced:
            balance_routing(model)
        return model.to(device)


def ratio_text(value, base):
    return f"{value / base:6.2f}x" if base else "     -"


def _met(ok):
    return "met" if ok else "NOT met"


def train_throughput(args, configs, prepared, precision, device, warmup, train_batch, train_repeats):
    """(c): training images per second of the dense models (TRADES) and the MoE models (AdvMoE); returns
    {config: images/s}."""
    r = args.ratio
    print(f"\n(c) training images/s, batch {train_batch}, {args.num_steps}-step attacks "
          f"(TRADES for dense, AdvMoE for MoE; ratios against dense r={r:g}; peak MiB of a step on CUDA)")
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(train_batch, 3, 32, 32, generator=g).to(device)
    yt = torch.randint(0, 10, (train_batch,), generator=g).to(device)
    steps = {}
    for cfg in configs:
        model, backends = prepared(cfg, train=True)
        xin = xt.contiguous(memory_format=torch.channels_last) if backends.channels_last else xt
        step = make_train_step(model, "auto", num_steps=args.num_steps, scaler=precision.scaler)

        def train_step(step=step, xin=xin):
            with precision.autocast():
                step(xin, yt)
        steps[cfg] = with_own_flags(backends, train_step)
    timed = interleaved_times(steps, device, warmup, train_repeats)
    rates = {cfg: train_batch / t for cfg, (t, _, _) in timed.items()}
    base = rates[Model(r)]
    print(f"{'model':<32} {'images/s':>9} {'/ dense r':>10} {'peak MiB':>9}")
    for cfg, rate in rates.items():
        print(f"{cfg.label:<32} {rate:9.1f} {ratio_text(rate, base):>10} {memory_text(timed[cfg][2])}")
    return rates


def parse_row(text) -> Model:
    """'dense:0.5' -> Model(0.5); 'moe:0.25:2' -> Model(0.25, 2); UsageError otherwise."""
    from utils.errors import UsageError
    parts = text.split(":")
    try:
        if parts[0] == "dense" and len(parts) == 2:
            row = Model(float(parts[1]))
        elif parts[0] == "moe" and len(parts) == 3:
            row = Model(float(parts[1]), int(parts[2]))
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--rows: {text!r} is not dense:RATIO or moe:RATIO:N") from None
    if not 0 < row.ratio <= 1 or (row.n_expert is not None and row.n_expert < 1):
        raise UsageError(f"--rows: {text!r}: the ratio must be in (0, 1] and N >= 1")
    return row


class StepWorker:
    """A `step_worker.py` process timing the training steps of the rows with the code of source tree `tree`."""

    def __init__(self, tree, cfg):
        import json
        import subprocess
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_worker.py")
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONPATH=tree)
        self.proc = subprocess.Popen([sys.executable, worker, tree, json.dumps(cfg)], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the step worker of {tree} did not start (its stderr is above)")

    def time(self, i):
        """(wall seconds, CPU seconds of the worker process) of one training step of row `i`."""
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait(timeout=60)


def step_times(args, rows):
    """{side: [[(wall, CPU) seconds of each repeat] per row]} for 'this' tree and, with --against, 'main';
    interleaved ABAB."""
    from utils.errors import UsageError
    if args.against is not None and not os.path.isfile(os.path.join(args.against, "utils", "flops.py")):
        raise UsageError(f"--against {args.against}: not a source tree of this project (no utils/flops.py)")
    cfg = dict(rows=[[m.kind, m.ratio, m.n_expert] for m in rows], image_size=args.image_size, batch=args.train_batch,
               num_steps=args.num_steps, threads=args.threads, warmup=args.warmup)
    sides = {"this": (ROOT, args.channels_last)}
    if args.against is not None:
        sides = {"main": (os.path.abspath(args.against), False), **sides}
    workers = {}
    try:
        for side, (tree, channels_last) in sides.items():
            workers[side] = StepWorker(tree, dict(cfg, channels_last=channels_last))
        times = {side: [[] for _ in rows] for side in workers}
        order = list(workers)
        for r in range(args.train_repeats):
            for i in range(len(rows)):
                for side in (order if (r + i) % 2 == 0 else order[::-1]):
                    times[side][i].append(workers[side].time(i))
    finally:
        for w in workers.values():
            w.close()
    return times


def steps_main(args):
    """--steps: s/batch of each row (this tree, and main with --against), speed-ups, the per-FLOP check."""
    args.threads = args.threads or 1
    args.train_batch = args.train_batch or 128
    args.train_repeats = args.train_repeats or 5
    args.warmup = 1 if args.warmup is None else args.warmup
    rows = [parse_row(r) for r in args.rows]
    load0, cores = os.getloadavg()[0], os.cpu_count()
    print(f"# training steps, ResNet-18 CIFAR rows at {args.image_size}x{args.image_size}, batch {args.train_batch}, "
          f"{args.num_steps}-step attacks (TRADES dense, AdvMoE MoE), random images; CPU, {args.threads} thread(s); "
          f"torch {torch.__version__}; median of {args.train_repeats} after {args.warmup} warm-up"
          f"{', interleaved step by step with --against ' + args.against if args.against else ''}; this tree "
          f"{'channels-last' if args.channels_last else 'default layout'}; load average {load0:.1f} on {cores} cores")
    times = step_times(args, rows)
    load1 = os.getloadavg()[0]
    gflops = [train_step_gflops(m.build(), "auto", image_size=args.image_size, batch=8, num_steps=args.num_steps)
              for m in rows]
    med = {side: [statistics.median(w for w, _ in t) for t in per_row] for side, per_row in times.items()}
    cpu = {side: [statistics.median(c for _, c in t) for t in per_row] for side, per_row in times.items()}
    head = f"{'row':<26} {'GF/image':>9}"
    head += f" {'main s/batch':>13}" if "main" in med else ""
    head += f" {'this s/batch':>13}" + (f" {'speed-up':>9}" if "main" in med else "")
    print(head + "   (wall; CPU seconds of the step's process in brackets)")
    for i, row in enumerate(rows):
        line = f"{row.step_label:<26} {gflops[i]:9.3f}"
        if "main" in med:
            line += f" {med['main'][i]:6.3f} ({cpu['main'][i]:5.3f})"
        line += f" {med['this'][i]:6.3f} ({cpu['this'][i]:5.3f})"
        if "main" in med:
            line += f" {med['main'][i] / med['this'][i]:5.2f}x ({cpu['main'][i] / cpu['this'][i]:.2f}x)"
        print(line)
    print(f"# load average {load1:.1f} at the end; every wall time of each side: "
          + "; ".join(f"{side} {rows[i].step_label}: {' '.join(f'{w:.2f}' for w, _ in ts)}"
                      for side, per_row in times.items() for i, ts in enumerate(per_row)))
    dense = next((i for i, m in enumerate(rows) if m.n_expert is None), None)
    for i, row in enumerate(rows):
        if row.n_expert is None or dense is None:
            continue
        for side in med:
            for what, t in (("wall", med[side]), ("CPU", cpu[side])):
                per_flop = (t[i] / t[dense]) / (gflops[i] / gflops[dense])
                print(f"per FLOP ({side}, {what}): {row.step_label} over {rows[dense].step_label}: s/batch ratio "
                      f"{t[i] / t[dense]:.2f} / GFLOPs ratio {gflops[i] / gflops[dense]:.2f} = "
                      f"{per_flop:.2f} (goal <= {PER_FLOP_GOAL}: {_met(per_flop <= PER_FLOP_GOAL)})")
    if "main" in med:
        for what, t in (("wall", med), ("CPU", cpu)):
            speedups = [m / n for m, n in zip(t["main"], t["this"])]
            print(f"speed-up over main >= {SPEEDUP_GOAL}x on every row ({what}): "
                  f"{_met(min(speedups) >= SPEEDUP_GOAL)} (smallest {min(speedups):.2f}x)")
    return 0


def main(args):
    from utils.runtime import resolve_device
    check_args(args)
    if args.steps:
        return steps_main(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if args.quick:
        args.batch, args.skip_flops = 8, True
    repeats = args.repeats or (1 if args.quick else 20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 5)
    train_batch = args.train_batch or (4 if args.quick else 128 if cuda else 16)
    train_repeats = args.train_repeats or (1 if args.quick else 10 if cuda else 2)
    precision = Precision(device, args.amp)
    r = args.ratio
    configs = [Model(1.0), Model(r)] + [Model(r, n, sparse) for n in args.experts for sparse in (True, False)]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    load, cores = os.getloadavg()[0], os.cpu_count()
    print(f"# {ARCH}, random CIFAR-shaped images (synthetic), 10 classes; device {device} ({name}); "
          f"torch {torch.__version__}; amp {precision.dtype if precision.enabled else 'off'}; "
          f"compile {'dense models' if args.compile else 'off'}; median of {repeats} after {warmup} warm-up; "
          f"load average {load:.1f} on {cores} cores")
    if not cuda and load > cores:
        print(f"# warning: the machine is busier than its {cores} cores; CPU times include waiting for them "
              f"(multi-threaded runs of many small operations suffer most: try --threads 1)")

    def prepared(cfg, train):
        model = cfg.build(device, balanced=True)
        backends = configure_backends(device, model)
        maybe_compile(model, args.compile and not model.is_moe)
        return model.train(train), backends

    # (a) forward time
    print(f"\n(a) eval forward, batch {args.batch} (ms, median and best of the runs; ratios of the medians "
          f"against dense r={r:g}; peak MiB of a forward on CUDA)")
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    forwards = {}
    for cfg in configs:
        model, backends = prepared(cfg, train=False)
        xin = x.contiguous(memory_format=torch.channels_last) if backends.channels_last else x

        def forward(model=model, xin=xin):
            with torch.inference_mode(), precision.autocast():
                model(xin)
        forwards[cfg] = with_own_flags(backends, forward)
    timed = interleaved_times(forwards, device, warmup, repeats)
    times = {cfg: t[0] for cfg, t in timed.items()}
    del forwards
    base = times[Model(r)]
    print(f"{'model':<32} {'median':>9} {'best':>9} {'/ dense r':>10} {'peak MiB':>9}")
    for cfg, (t, best, peak) in timed.items():
        print(f"{cfg.label:<32} {1e3 * t:9.1f} {1e3 * best:9.1f} {ratio_text(t, base):>10} "
              f"{memory_text(peak)}")

    flops = {} if args.skip_flops else gflops_table(args, configs, device)
    rates = {}
    if not args.skip_train:
        rates = train_throughput(args, configs, prepared, precision, device, warmup, train_batch, train_repeats)
    print(f"\ntargets (ResNet-18 CIFAR, ratio {r:g}; reported, not asserted):")
    for n in args.experts:
        t_ratio = times[Model(r, n)] / times[Model(r)]
        line = f"  N={n}: forward time / dense r={r:g} {t_ratio:.2f} <= 1.6: {_met(t_ratio <= 1.6)}"
        if Model(r, n) in rates:
            rate_ratio = rates[Model(r, n)] / rates[Model(r)]
            line += f"; AdvMoE images/s / dense TRADES {rate_ratio:.2f} >= 0.35: {_met(rate_ratio >= 0.35)}"
        if flops:
            inf, step = flops[Model(r, n)]["total"], flops[Model(r, n)]["step"]
            line += (f"; inference {inf:.3f} GFLOPs <= 0.39: {_met(inf <= 0.39)}; "
                     f"AdvMoE step {step:.2f} GFLOPs <= 8.5: {_met(step <= 8.5)}")
        print(line)
    return 0


def gflops_table(args, configs, device):
    """(b): prints GFLOPs per image of inference and of a training update, as counted by the FLOP table
    (utils/tools/flops.py); returns {model: that table's row}."""
    r = args.ratio
    print(f"\n(b) GFLOPs per image: inference, and one training update ({args.num_steps}-step attacks, batch 8; "
          f"TRADES for dense, AdvMoE for MoE)")
    flops = {}
    for n in args.experts:  # each: the dense models at 1.0 and r, then the MoE sparse and dense-masked
        counted = flops_rows(ModelSpec(f"{ARCH}_moe", ratio=r, n_expert=n), train_step=True,
                             num_steps=args.num_steps, device=device)
        flops.update(zip(dict.fromkeys([Model(1.0), Model(r), Model(r, n), Model(r, n, False)]), counted))
    base_inf, base_step = flops[Model(r)]["total"], flops[Model(r)]["step"]
    print(f"{'model':<32} {'infer':>7} {'backbone':>9} {'router':>7} {'/ dense r':>10} {'ref':>6}"
          f" | {'step':>7} {'/ dense r':>10} {'ref':>6}")
    for cfg in dict.fromkeys(configs):
        row = flops[cfg]
        key = (cfg.kind, cfg.ratio if cfg.n_expert is None else cfg.n_expert)
        ref = REFERENCE_GFLOPS.get(key) if not cfg.sparse else None
        ref_step = REFERENCE_STEP_GFLOPS.get(key) if cfg.n_expert is None or not cfg.sparse else None
        print(f"{cfg.label:<32} {row['total']:7.3f} {row.get('backbone', row['total']):9.3f} "
              f"{row.get('router', 0.0):7.3f} {ratio_text(row['total'], base_inf):>10} "
              f"{ref if ref else '-':>6} | {row['step']:7.2f} {ratio_text(row['step'], base_step):>10} "
              f"{ref_step if ref_step else '-':>6}")
    print("ref: the reference's measured cost (its MoE computes every expert; its AdvMoE step also runs extra passes)")
    return flops


if __name__ == "__main__":
    from utils.cli import run_main  # bad sizes and devices: one line, exit 2
    run_main(lambda argv: sys.exit(main(get_args_parser().parse_args(argv))))
