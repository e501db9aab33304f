"""The paper's comparison as one sweep: for each dataset and architecture, dense adversarial training (TRADES)
at ratio 1.0 and 0.5, an MoE at ratio 0.5 with N=2 experts trained jointly (joint AT) and by AdvMoE; then
the PGD evaluation (`--evaluate`) and AutoAttack of each best checkpoint; then the report (table + plots).

  sh/sweep.sh [options] [-- extra flags for train_ori.py/train_moe.py]

  --preset paper|digits   paper (default): CIFAR10,CIFAR100,TinyImageNet x resnet18,wrn_28_10,vgg16_bn,densenet,
                          100 epochs, the entry scripts' default attack (eps 8/255), AutoAttack standard on
                          the whole test set. digits: see sh/digits_minisweep.sh.        [env SWEEP_PRESET]
  --backend local|slurm   local: runs here, in sequence or one per GPU (--gpus); slurm: writes a job-array
                          script (task i = manifest line i) and submits it with sbatch --array, plus a
                          report job that runs after it.                                 [env SWEEP_BACKEND]
  --gpus 0,1,...          local backend: one run per GPU in parallel (CUDA_VISIBLE_DEVICES per run, lines
                          claimed as GPUs free up; each line's output goes to SAVE/sweep_logs/). [env SWEEP_GPUS]
  --datasets LIST  --archs LIST  --methods LIST   filters (comma-separated). archs are families
                          (resnet18, wrn_28_10, vgg16_bn, densenet: the CIFAR variant on 32x32 data, the
                          ImageNet variant on TinyImageNet/ImageNet) or full names (resnet18_imagenet);
                          methods: dense, joint, advmoe, advmoe-reference (router trained on the reference's
                          objective; not in the default list).
  --epochs E              [env SWEEP_EPOCHS]     --seed S
  --dense-ratios LIST (1.0,0.5)   --moe-ratio R (0.5)   --n-expert N (2)
  --save-dir DIR          run folders go to DIR/training/..., evaluations to DIR/evaluate/... (default
                          results; digits: results/digits_minisweep)                     [env SWEEP_SAVE_DIR]
  --data-dir DIR          passed to every command
  --tag ID                prefix of the runs' --exp-identifier (ID_dense, ID_joint, ...; default: the method)
  --manifest FILE         where to write the manifest (default SAVE/manifest.tsv); an existing FILE is
                          replaced only when it is a manifest this script wrote
  --aa-n-ex N  --aa-version V  --aa-attacks "a b"  --aa-epsilon E (1/255 units)   AutoAttack settings
  --no-eval  --no-autoattack  --no-report
  --report-dir DIR        (default SAVE/report)
  --sbatch-args "ARGS"    extra sbatch flags (partition, time, account...; override the script's #SBATCH
                          lines) [env SWEEP_SBATCH_ARGS]     --max-parallel P   (array throttle %P)
  --dry-run               write the manifest (and the sbatch script), print what would run, run nothing

The manifest (SAVE/manifest.tsv: run_dir, eval_dir and the three commands per line) is written first; the
report lists its runs that have no folder as `missing`. Finished runs (status.json "finished") are skipped;
any other run is started with `--resume auto`, which resumes a partial run from its checkpoint. Evaluation
and AutoAttack are skipped when their result is newer than model_best.pth.tar and was made by the same
command (so changing e.g. --aa-n-ex reruns AutoAttack, which itself resumes its finished chunks when the
settings are unchanged). Exit status: 0; 1 when some run failed (the others still ran); 2 for bad usage;
75 when interrupted (checkpoints written: run the same command again to continue).

The lines run through utils/tools/jobs.py (one job per line: train, eval, autoattack). The run folders are
computed by the entry scripts' own parser and `utils.runlog.run_dir`, so the sweep and the runs cannot
disagree on names. A SLURM array task runs `python -m utils.tools.sweep --array-task MANIFEST N`.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from models.spec import base_arch

from ..cli import run_main
from ..errors import UsageError
from ..runfiles import run_state
from ..writes import write_text_atomic
from .jobs import (MANIFEST_HEADER, REQUEUE_EXIT, ROOT, Pipeline, Reporter, Runner, read_manifest, run_folders,
                   write_manifest)

METHODS = ("dense", "joint", "advmoe", "advmoe-reference")
DATASETS = ("CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet", "Digits")
# flags after -- that would break the sweep's naming (the sweep sets them itself)
OWN_FLAGS = ("--exp-identifier", "--save-dir", "--resume", "--evaluate", "--arch", "--dataset", "--ratio",
             "--n-expert", "--moe-training", "--epochs", "--seed")
INTERRUPTED = "run the same command again to continue (training resumes from its checkpoint)"
# option -> the SWEEP_* variable that gives its default (every option takes a value)
OPTIONS = {"--preset": "SWEEP_PRESET", "--backend": "SWEEP_BACKEND", "--gpus": "SWEEP_GPUS", "--datasets": None,
           "--archs": None, "--methods": None, "--epochs": "SWEEP_EPOCHS", "--seed": None, "--dense-ratios": None,
           "--moe-ratio": None, "--n-expert": None, "--save-dir": "SWEEP_SAVE_DIR", "--data-dir": None, "--tag": None,
           "--manifest": None, "--report-dir": None, "--aa-n-ex": None, "--aa-version": None, "--aa-attacks": None,
           "--aa-epsilon": None, "--sbatch-args": "SWEEP_SBATCH_ARGS", "--max-parallel": None}
SWITCHES = ("--no-eval", "--no-autoattack", "--no-report", "--dry-run")


def python() -> str:
    return os.environ.get("PYTHON") or "python3"


def split_list(text) -> list:
    """'a,b c' -> ['a', 'b', 'c']."""
    return [x for x in re.split(r"[,\s]+", text or "") if x]


def calc(value) -> str:
    """A float as the sweep writes it: up to 10 significant digits."""
    return f"{value:.10g}"


def arch_base(dataset, family):
    """The registry base name (no _ori/_moe) of an arch family for a dataset: its CIFAR variant on 32x32 data and
    its ImageNet variant on TinyImageNet and ImageNet where the registry has both (resnet18, wrn_28_10, densenet),
    else the name as given when the registry has it (vgg16_bn, resnet18_imagenet). None for an unknown family."""
    import models
    bases = {base_arch(name) for name in models.list_models()}
    variant = f"{family}_{'imagenet' if dataset in ('TinyImageNet', 'ImageNet') else 'cifar'}"
    return variant if variant in bases else family if family in bases else None


# ---------------------------------------------------------------------------------------------------------
# Settings: the command line, the environment, the preset
# ---------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (utils.cli.run_main), not argparse's usage and message
        raise UsageError(f"{message} (see sh/sweep.sh --help)")


def _value(flag):
    def check(text):
        if not text:
            raise argparse.ArgumentTypeError(f"{flag} needs a value")
        return text
    return check


def get_args_parser() -> argparse.ArgumentParser:
    """The sweep's options; an unset option defaults to its SWEEP_* variable, else to None (then '': the preset
    fills it)."""
    p = _Parser(prog="sh/sweep.sh", add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    for flag, var in OPTIONS.items():
        p.add_argument(flag, type=_value(flag), default=(os.environ.get(var) if var else None) or None)
    for flag in SWITCHES:
        p.add_argument(flag, action="store_true")
    return p


def parse_command_line(argv):
    """The settings of these options and the SWEEP_* environment (None for --help); the flags after `--` go to
    `extra` (for the training scripts)."""
    cut_at = argv.index("--") if "--" in argv else len(argv)
    s, unknown = get_args_parser().parse_known_args(argv[:cut_at])
    if s.help:
        return None
    if unknown:
        raise UsageError(f"unknown option {unknown[0]} (flags for the training scripts go after --; see "
                         f"sh/sweep.sh --help)")
    for name, value in vars(s).items():
        if value is None:
            setattr(s, name, "")
    s.preset, s.backend = s.preset or "paper", s.backend or "local"
    s.extra = list(argv[cut_at + 1:])
    # filled by the preset
    s.preset_args, s.train_only_args, s.aa_extra, s.gres, s.report_flags = [], [], [], "gpu:1", []
    return s


def _env_float(name, default) -> float:
    text = os.environ.get(name) or default
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{name}={text} is not a number") from None


def apply_preset(s):
    """Fill what the options left empty from the preset (options win)."""
    def default(name, value):
        if not getattr(s, name):
            setattr(s, name, value)

    env = os.environ
    if s.preset == "paper":
        for name, value in (("datasets", "CIFAR10,CIFAR100,TinyImageNet"),
                            ("archs", "resnet18,wrn_28_10,vgg16_bn,densenet"), ("methods", "dense,joint,advmoe"),
                            ("epochs", "100"), ("dense_ratios", "1.0,0.5"), ("moe_ratio", "0.5"), ("n_expert", "2"),
                            ("aa_version", "standard"), ("aa_epsilon", "8"), ("save_dir", "results")):
            default(name, value)
    elif s.preset == "digits":
        # Digits saturates at eps 8/255; at eps 0.15 it does not. Step sizes keep the paper's proportions:
        # training 5/8 of eps (5/255 at 8/255), test 1/4 of eps (2/255 at 8/255).
        eps_text = env.get("DIGITS_EPS") or "0.15"
        eps = _env_float("DIGITS_EPS", "0.15")
        for name, var, value in (("datasets", None, "Digits"), ("archs", "DIGITS_ARCHS", "resnet18"),
                                 ("methods", "DIGITS_METHODS", "dense,joint,advmoe"),
                                 ("epochs", "DIGITS_EPOCHS", "3"), ("dense_ratios", "DIGITS_DENSE_RATIOS", "0.25,0.125"),
                                 ("moe_ratio", "DIGITS_MOE_RATIO", "0.125"), ("n_expert", "DIGITS_N_EXPERT", "2"),
                                 ("aa_n_ex", "DIGITS_AA_N_EX", "32"), ("aa_version", "DIGITS_AA_VERSION", "custom")):
            default(name, (env.get(var) if var else "") or value)
        if s.aa_version == "custom":
            default("aa_attacks", env.get("DIGITS_AA_ATTACKS") or "apgd-ce apgd-dlr")
        default("aa_epsilon", calc(eps * 255))
        default("save_dir", "results/digits_minisweep")
        s.preset_args = ["--epsilon", eps_text, "--step-size", calc(eps * 5 / 8), "--epsilon-test", eps_text,
                         "--step-size-test", calc(eps / 4), "--batch-size", env.get("DIGITS_BATCH_SIZE") or "64",
                         "--num-workers", "0", "--no-progress"]
        # The per-epoch curves use one test batch (and one validation batch); the final --evaluate of
        # model_best uses the whole test set (this flag is not passed to it).
        s.train_only_args = ["--max-test-batches", env.get("DIGITS_EPOCH_TEST_BATCHES") or "1"]
        s.aa_extra = ["--num-workers", "0", "--no-progress"]
        s.gres = ""
        s.report_flags = ["--compute-flops", "--title", f"Digits mini-sweep (eps {eps_text})"]
    else:
        raise UsageError(f"unknown --preset {s.preset} (paper or digits)")


def check_settings(s):
    """UsageError for settings the sweep cannot run (before anything is written)."""
    if s.backend not in ("local", "slurm"):
        raise UsageError(f"unknown --backend {s.backend} (local or slurm)")
    if s.gpus and s.backend != "local":
        raise UsageError("--gpus is for the local backend (SLURM gives each task its GPU)")
    gpus = split_list(s.gpus)
    for g in gpus:
        if not re.fullmatch(r"[0-9]+", g):
            raise UsageError(f"--gpus {s.gpus}: each GPU is a device index (0,1,...), got {g}")
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus {s.gpus} names a GPU twice (two runs would share it)")
    if s.aa_n_ex and not re.fullmatch(r"[1-9][0-9]*", s.aa_n_ex):
        raise UsageError(f"--aa-n-ex must be a positive integer, got {s.aa_n_ex}")
    if not re.fullmatch(r"[1-9][0-9]*", s.epochs):
        raise UsageError(f"--epochs must be a positive integer, got {s.epochs}")
    if s.aa_version != "custom" and s.aa_attacks:
        raise UsageError("--aa-attacks needs --aa-version custom")
    for flag in OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in s.extra):
            raise UsageError(f"{flag} after -- would break the sweep's naming; use the sweep's own option")
    if s.data_dir and not os.path.isdir(s.data_dir):
        raise UsageError(f"--data-dir {s.data_dir} does not exist")
    for method in split_list(s.methods):
        if method not in METHODS:
            raise UsageError(f"unknown method {method} ({', '.join(METHODS)})")
    for dataset in split_list(s.datasets):
        if dataset not in DATASETS:
            raise UsageError(f"unknown dataset {dataset} ({', '.join(DATASETS)})")
    for family in split_list(s.archs):
        if arch_base("CIFAR10", family) is None:
            raise UsageError(f"unknown arch {family} (resnet18, wrn_28_10, vgg16_bn, densenet or a full name)")


# ---------------------------------------------------------------------------------------------------------
# The grid and the manifest
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Planned:
    """A run of the grid before its folders are known."""
    script: str
    dataset: str
    train: list  # argv
    eval_base: list  # the same without training-only flags


def grid(s, save_dir, data_dir) -> list:
    """The runs of the sweep: datasets x archs x methods (dense at each of its ratios)."""
    common = (["--seed", s.seed] if s.seed else []) + (["--data-dir", data_dir] if data_dir else [])
    moe = ["--n-expert", s.n_expert]
    runs = []

    def add(script, method, arch, ratio, dataset, flags=()):
        base = [python(), f"{script}.py", "--dataset", dataset, "--arch", arch, "--ratio", ratio, *flags,
                "--epochs", s.epochs, "--exp-identifier", f"{s.tag}_{method}" if s.tag else method,
                "--save-dir", save_dir, *common, *s.preset_args]
        runs.append(Planned(script, dataset, base + s.train_only_args + s.extra, base + s.extra))

    for dataset in split_list(s.datasets):
        for family in split_list(s.archs):
            base = arch_base(dataset, family)
            for method in split_list(s.methods):
                if method == "dense":
                    for r in split_list(s.dense_ratios):
                        add("train_ori", "dense", f"{base}_ori", r, dataset)
                elif method == "advmoe-reference":
                    add("train_moe", method, f"{base}_moe", s.moe_ratio, dataset,
                        moe + ["--moe-training", "advmoe", "--router-objective", "reference"])
                else:
                    add("train_moe", method, f"{base}_moe", s.moe_ratio, dataset, moe + ["--moe-training", method])
    if not runs:
        raise UsageError("the filters leave no run")
    return runs


def aa_flags(s, data_dir) -> list:
    """The AutoAttack flags of every line other than --source-net, --out and --dataset."""
    flags = ["--epsilon", s.aa_epsilon, "--version", s.aa_version]
    if s.aa_attacks:
        flags += ["--attacks", *s.aa_attacks.split()]
    flags += ["--n-ex", s.aa_n_ex] if s.aa_n_ex else []
    flags += ["--data-dir", data_dir] if data_dir else []
    flags += ["--seed", s.seed] if s.seed else []
    return flags + s.aa_extra


def check_aa_flags(flags):
    """auto_attack_eval.py's own parser and checks (args.validate_autoattack_args) on the sweep's AutoAttack flags,
    before anything runs: a dry run then catches what the real run would refuse only at the end."""
    from args import get_autoattack_parser, validate_autoattack_args
    parser = get_autoattack_parser()

    def refuse(message):
        raise UsageError(message)
    parser.error = refuse
    try:
        validate_autoattack_args(parser.parse_args(["--source-net", "CHECKPOINT", *flags]))
    except UsageError as e:
        raise UsageError(f"AutoAttack flags rejected by auto_attack_eval.py: {e}") from None


def run_dirs(planned) -> list:
    """(run_dir, eval_dir) of each planned run (its bad flags refused here, before anything runs)."""
    return [run_folders(p.train[2:], p.script, f"sweep command {n} ({shlex.join(p.train)})")
            for n, p in enumerate(planned, 1)]


def plan_lines(s, planned, dirs, aa) -> list:
    lines = []
    for p, (run, ev) in zip(planned, dirs):
        best = os.path.join(run, "checkpoint", "model_best.pth.tar")
        eval_cmd = "-" if s.no_eval else shlex.join(p.eval_base + ["--evaluate", "--resume", best])
        aa_cmd = "-" if s.no_autoattack else shlex.join(
            [python(), "auto_attack_eval.py", "--source-net", best, "--out", os.path.join(run, "autoattack.json"),
             "--dataset", p.dataset, *aa])
        lines.append(Pipeline(run, ev, shlex.join(p.train), eval_cmd, aa_cmd))
    return lines


def check_manifest_path(path):
    """UsageError unless `path` is new or a manifest this sweep wrote (its first line is the header): a sweep never
    replaces a file it did not make, not even in a dry run."""
    if not os.path.lexists(path):
        return
    if not os.path.isfile(path):
        raise UsageError(f"--manifest {path} exists and is not a regular file")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().rstrip("\n")
    if first != MANIFEST_HEADER:
        raise UsageError(f"--manifest {path} exists and is not a sweep manifest (its first line is not the header "
                         "this script writes): choose another --manifest")


class LineMessages(Reporter):
    """`[N] start train: CMD`, `[N] skip eval (done): NAME`, ...; with GPUs, `[gpu G] line N ...` on stdout."""

    def __init__(self, lines, dry_run=False):
        self.lines, self.dry_run = lines, dry_run

    def _line(self, job) -> Pipeline:
        return self.lines[int(job.name) - 1]

    def skip(self, job, stage, out):
        why = "finished" if stage.name == "train" else "done"
        out.write(f"[{job.name}] skip {stage.name} ({why}): {self._line(job).name}\n")

    def start(self, job, stage, earlier, out):
        x = self._line(job)
        if stage.name == "train":
            now = run_state(x.run_dir)
            action = (f"resume train ({now})" if os.path.exists(os.path.join(x.run_dir, "checkpoint",
                                                                              "checkpoint.pth.tar"))
                      else "start train")
        else:
            action = ("then " if self.dry_run and "train" in earlier else "") + stage.name
        out.write(f"[{job.name}] {action}: {stage.shown()}\n")
        out.flush()

    def failed(self, job, stage, rc, out):
        out.write(f"[{job.name}] {stage.name} exited with status {rc}: {self._line(job).name}\n")

    def job_start(self, job, slot):
        if slot is not None:
            print(f"[gpu {slot}] line {job.name} -> {job.log}", flush=True)

    def job_end(self, o):
        if o.slot is None:
            return
        if o.interrupted:
            print(f"[gpu {o.slot}] line {o.job.name} interrupted", flush=True)
        elif o.rc != 0:
            print(f"[gpu {o.slot}] line {o.job.name} failed with status {o.rc} (see {o.job.log})", flush=True)
        else:
            print(f"[gpu {o.slot}] line {o.job.name} done", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------

def run_lines(manifest, gpus=None, logdir=None, dry_run=False, only=None) -> int:
    """Every line of `manifest` (or line `only`), in order or one per GPU at a time (`gpus`: lines claimed as GPUs
    free up, each line's output in LOGDIR/NAME.log). A failed line does not stop the others, an interrupted one (75
    or a signal) stops the sweep. Returns 0, 1 (some line failed; `only`: its status) or 75."""
    lines = read_manifest(manifest)
    numbers = range(1, len(lines) + 1) if only is None else [only]
    if logdir:
        os.makedirs(logdir, exist_ok=True)
    runner = Runner(gpus=gpus, dry_run=dry_run, reporter=LineMessages(lines, dry_run))
    outcomes = runner.run([lines[n - 1].job(str(n), log=logdir and os.path.join(logdir, f"{lines[n - 1].name}.log"))
                           for n in numbers])
    stopped = next((n for n, o in zip(numbers, outcomes) if o is None or o.interrupted), None)
    if stopped is not None or runner.signalled:
        print(f"sweep interrupted{'' if gpus else f' at line {stopped}'}; {INTERRUPTED}", flush=True)
        return REQUEUE_EXIT
    if only is not None:
        return outcomes[0].rc
    failed = sum(o.rc != 0 for o in outcomes)
    if failed:
        print(f"{failed} of {len(lines)} lines failed ("
              + (f"logs in {logdir})" if logdir else "see the messages above and each run's setup.log)"), flush=True)
        return 1
    return 0


def array_spec(numbers) -> str:
    """'1-3,5,7-8' from sorted line numbers."""
    spans = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def write_sbatch(path, manifest, logdir, gres):
    """The job-array script: task i runs line i of `manifest`. SLURM sends SIGUSR1 to the batch shell 180 s before
    the time limit (and SIGTERM on preemption); the sweep, which the shell becomes, passes it to the run, which
    checkpoints and exits 75; the task then requeues itself (scontrol requeue) and resumes when it starts again."""
    text = ["#!/usr/bin/env bash", "#SBATCH --job-name=advmoe-sweep", f"#SBATCH --output={logdir}/%A_%a.out"]
    text += [f"#SBATCH --gres={gres}"] if gres else []
    text += ["#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@180",
             "# Written by the sweep (utils/tools/sweep.py): array task i runs line i of the manifest below;",
             "# when the run is interrupted (75: checkpoint written), the task requeues itself.",
             "set -uo pipefail",
             f"cd {shlex.quote(ROOT)}",
             f"export PYTHON={shlex.quote(python())}",
             f'export PYTHONPATH={shlex.quote(ROOT)}"${{PYTHONPATH:+:$PYTHONPATH}}"',
             f'exec "$PYTHON" -m utils.tools.sweep --array-task {shlex.quote(manifest)} "$SLURM_ARRAY_TASK_ID"']
    write_text_atomic(path, "\n".join(text) + "\n")
    os.chmod(path, 0o755)


def array_task(manifest, task) -> int:
    """One array task: line `task` of `manifest`; requeued (exit 75) when interrupted."""
    lines = read_manifest(manifest)
    if not re.fullmatch(r"[0-9]+", task) or not 1 <= int(task) <= len(lines):
        raise UsageError(f"{manifest} has no line {task}")
    rc = run_lines(manifest, only=int(task))
    if rc == REQUEUE_EXIT:
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '')}_{task}"
        subprocess.run(["scontrol", "requeue", job], check=False)
    return rc


def submit_slurm(s, manifest, sweep_dir, report_cmd) -> int:
    """Freeze the manifest, write the array script, submit the lines not yet done (and a report job after them)."""
    lines = read_manifest(manifest)
    todo = []
    for n, x in enumerate(lines, 1):
        if x.done():
            print(f"[{n}] skip (done): {x.name}")
        else:
            todo.append(n)
    if not todo:
        print(f"all {len(lines)} lines are done; nothing to submit")
        return 0
    folder = os.path.join(sweep_dir, f"slurm-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(os.path.join(folder, "logs"))
    frozen = os.path.join(folder, "manifest.tsv")
    with open(manifest, encoding="utf-8") as f:  # the array indexes this copy: a later sweep may rewrite the manifest
        write_text_atomic(frozen, f.read())
    script = os.path.join(folder, "array.sbatch")
    write_sbatch(script, frozen, os.path.join(folder, "logs"), s.gres)
    print(f"wrote {script} (array task i runs line i of {frozen})")
    spec = array_spec(todo) + (f"%{s.max_parallel}" if s.max_parallel else "")
    submit = ["sbatch", "--parsable", f"--array={spec}", *s.sbatch_args.split(), script]
    report = ["sbatch", "--parsable", "--job-name=advmoe-report", f"--output={folder}/logs/report_%j.out",
              *s.sbatch_args.split()]
    wrap = f"cd {shlex.quote(ROOT)} && {report_cmd}"
    if s.dry_run:
        print(f"dry run: {shlex.join(submit)}")
        print(f"dry run: {shlex.join(report + ['--dependency=afterany:JOBID', f'--wrap={wrap}'])}")
        return 0
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found: run this on a SLURM login node (or use --backend local)")
    sys.stdout.flush()
    done = subprocess.run(submit, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise UsageError("sbatch failed")
    jid = done.stdout.strip().split(";")[0]
    print(f"submitted job array {jid}: {len(todo)} of {len(lines)} lines (logs in {folder}/logs)", flush=True)
    done = subprocess.run(report + [f"--dependency=afterany:{jid}", f"--wrap={wrap}"], stdout=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise UsageError("sbatch (report job) failed")
    print(f"submitted report job {done.stdout.strip().split(';')[0]} (runs after the array): {report_cmd}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--array-task"]:
        if len(argv) != 3:
            raise UsageError("--array-task needs MANIFEST and a line number")
        return array_task(argv[1], argv[2])
    s = parse_command_line(argv)
    if s is None:
        print(__doc__.split("\n\nThe lines run through")[0])
        return 0
    apply_preset(s)
    check_settings(s)
    save_dir = os.path.abspath(s.save_dir)
    data_dir = os.path.abspath(s.data_dir) if s.data_dir else ""
    manifest = s.manifest or os.path.join(save_dir, "manifest.tsv")
    report_dir = s.report_dir or os.path.join(save_dir, "report")
    planned = grid(s, save_dir, data_dir)
    aa = aa_flags(s, data_dir)
    if not s.no_autoattack:
        check_aa_flags(aa)
    check_manifest_path(manifest)
    lines = plan_lines(s, planned, run_dirs(planned), aa)
    os.makedirs(save_dir, exist_ok=True)
    write_manifest(manifest, lines)
    on_gpus = f" on GPUs {s.gpus}" if s.gpus else ""
    print(f"manifest: {manifest} ({len(lines)} runs, preset {s.preset}, backend {s.backend}{on_gpus})", flush=True)
    report_cmd = shlex.join([python(), "-m", "utils.tools.report", save_dir, "--manifest", manifest,
                             "--out", report_dir, *s.report_flags])
    if s.backend == "slurm":
        return submit_slurm(s, manifest, os.path.join(save_dir, "sweep_slurm"), report_cmd)
    if s.dry_run:
        if s.gpus:
            print(f"dry run: lines would be spread over GPUs {s.gpus} (one run per GPU at a time)")
        status = run_lines(manifest, dry_run=True)
        print(f"dry run: then {report_cmd}")
        return status
    gpus = split_list(s.gpus)
    status = run_lines(manifest, gpus, os.path.join(save_dir, "sweep_logs") if gpus else None)
    if not s.no_report and status != REQUEUE_EXIT:
        print(f"report: {report_cmd}", flush=True)
        if subprocess.run(shlex.split(report_cmd), cwd=ROOT).returncode != 0:
            status = status or 1
    return status


if __name__ == "__main__":
    run_main(lambda argv: sys.exit(main(argv)))
