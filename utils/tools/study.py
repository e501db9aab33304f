"""The routing study: dense and MoE rows x seeds on Digits, trained, evaluated and attacked, one table.

    python -m utils.tools.study --rows main --seeds 1,2,3 --save-dir results/routing_study [--jobs 2]
    python -m utils.tools.study --rows balance ...  (AdvMoE under each balancing mode, and the reference objective)
    python -m utils.tools.study --rows recipe ...   (the released recipe's ingredients, robust-routing methods)
    python -m utils.tools.study --rows fmnist --epochs 5 --aa-n-ex 1000 --data-dir DIR ...  (Fashion-MNIST at 16x16)
    python -m utils.tools.study --rows fmnist28 ...  (two of those rows at 28x28: does the finding depend on the size?)
    python -m utils.tools.study --report-only ...   (the table from what has finished)

Each (row, seed) is one job of the pipeline in utils/tools/jobs.py: train with `--resume auto` (a finished run is
skipped, a killed one resumes), then `--evaluate` of its best checkpoint on the whole test set (PGD-10, MoE
dissection), then AutoAttack (APGD-CE then APGD-T) on the whole test set, then GFLOPs per image, in a folder named
by the hash of every setting. A job whose result.json records that hash is done; a step is skipped when its result
is current (jobs.current), so rerunning the same command continues where it stopped. `--jobs` jobs run at once, each on one thread. The table
(`SAVE/table.md`, `SAVE/table.csv`) gives mean ± std over seeds and n, with the command that made it.
"""
import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

from args import SEED_RANGE, check_flags

from ..cli import run_main
from ..errors import UsageError
from ..lock import hold
from ..runfiles import read_metrics
from ..runlog import check_can_create
from ..writes import write_json_atomic, write_text_atomic
from .jobs import Pipeline, Reporter, Runner, run_folders, training_args
from .tables import Column, markdown, seed_table, write_csv

# The cheap setting (README: Routing study): 16x16 digits, ResNet-18 at ratio 0.25 (MoE, N=2) against dense at
# 0.25 (same per-image cost) and 0.5 (the paper's "original dense CNN"); eps 0.15 for training and test.
EPS = 0.15
COMMON = ["--dataset", "Digits16", "--batch-size", "32", "--test-batch-size", "128", "--num-workers", "0",
          "--epsilon", str(EPS), "--step-size", str(EPS * 5 / 8), "--epsilon-test", str(EPS),
          "--step-size-test", str(EPS / 4), "--no-progress", "--device", "cpu"]
AA_ATTACKS = ("apgd-ce", "apgd-t")


@dataclass(frozen=True)
class Setting:
    """What a row set shares: the flags every job adds after its row's (`common`), the eps of training, PGD and
    AutoAttack, and whether the jobs evaluate every epoch (else only the last)."""
    common: tuple
    eps: float
    every_epoch: bool = False
    ratio: float | None = None  # the only --ratio the rows are made for (None: any)


DIGITS = Setting(tuple(COMMON), EPS)
# Issue 27: all 60,000 / 10,000 Fashion-MNIST images at 16x16, its README defaults (eps 0.1, step sizes, batch 128,
# TRADES with 2-step attacks, SGD 0.1, cosine), 10% of the training set for the validation split that picks the
# best epoch at every epoch, the test set once at the end on that epoch's weights, the CPU's faster conv layout.
FMNIST_EPS = 0.1
_FMNIST_FLAGS = ("--epsilon", str(FMNIST_EPS), "--epsilon-test", str(FMNIST_EPS), "--batch-size", "128",
                 "--test-batch-size", "128", "--num-workers", "0", "--data-fraction", "0.9", "--test-at-end",
                 "--channels-last", "--no-progress", "--device", "cpu")
FMNIST = Setting(("--dataset", "FashionMNIST16", *_FMNIST_FLAGS), FMNIST_EPS, every_epoch=True, ratio=0.25)
FMNIST28 = Setting(("--dataset", "FashionMNIST", *_FMNIST_FLAGS), FMNIST_EPS, every_epoch=True, ratio=0.25)
MOE = ["--arch", "resnet18_cifar_moe", "--n-expert", "2"]
# The rows below that mean the paper's AdvMoE name its recipe: `released` became train_moe.py's default after the
# recipe study (docs/routing.md). `paper` was the default when those rows were first run, so `Job.key` leaves the
# pair out and their jobs keep the keys they had (studies started before resume, their results are found).
PAPER = ("--advmoe-recipe", "paper")
ADVMOE = MOE + list(PAPER)
DENSE = ["--arch", "resnet18_cifar_ori"]

ROWS = {
    "main": [
        ("dense r", "train_ori", DENSE + ["--ratio", "{r}"]),
        ("dense 2r", "train_ori", DENSE + ["--ratio", "{r2}"]),
        ("MoE joint AT", "train_moe", MOE + ["--ratio", "{r}", "--moe-training", "joint"]),
        ("AdvMoE", "train_moe", ADVMOE + ["--ratio", "{r}"]),
        ("AdvMoE, reference router objective", "train_moe",
         ADVMOE + ["--ratio", "{r}", "--router-objective", "reference"]),
        ("AdvMoE, layer routing", "train_moe", ADVMOE + ["--ratio", "{r}", "--routing", "layer"]),
    ],
    "balance": [
        (f"AdvMoE, --balance {mode}", "train_moe", ADVMOE + ["--ratio", "{r}", "--balance", mode])
        for mode in ("median", "bias", "bias-sign", "switch", "entropy", "none")
    ] + [("AdvMoE, reference router objective", "train_moe",
          ADVMOE + ["--ratio", "{r}", "--router-objective", "reference"])],
}
# Issue 26: which ingredient of the released recipe makes routing robust, and robust-routing methods on top of it.
# The grid {router KL in the attacks} x {router loss: paper, the released code's} keeps the paper recipe's other
# ingredients (order, balancing).
RELEASED = ["--advmoe-recipe", "released"]
ROUTER_AT = "6"  # --router-at's weight in the study: alpha's, so the adversarial router CE weighs as the clean one
FLIP_EXPERT_AT = "1"  # --flip-expert-at's: the runner-up expert's CE weighs as TRADES' clean CE
ROWS["recipe"] = [
    ("dense r", "train_ori", DENSE + ["--ratio", "{r}"]),
    ("dense 2r", "train_ori", DENSE + ["--ratio", "{r2}"]),
] + [
    (f"AdvMoE, router KL in attacks: {'yes' if kl == 'both' else 'no'}, router loss: "
     f"{'released' if objective == 'released' else 'paper'}", "train_moe",
     ADVMOE + ["--ratio", "{r}", "--attack-router-kl", kl, "--router-objective", objective])
    for kl in ("none", "both") for objective in ("robust", "released")
] + [
    ("AdvMoE, released recipe", "train_moe", MOE + ["--ratio", "{r}", *RELEASED]),
    ("AdvMoE, released recipe + router AT", "train_moe", MOE + ["--ratio", "{r}", *RELEASED, "--router-at", ROUTER_AT]),
    ("AdvMoE, released recipe + partition targets", "train_moe",
     MOE + ["--ratio", "{r}", *RELEASED, "--router-targets", "partition"]),
    ("AdvMoE, released recipe + router AT + partition targets", "train_moe",
     MOE + ["--ratio", "{r}", *RELEASED, "--router-at", ROUTER_AT, "--router-targets", "partition"]),
    ("AdvMoE, released recipe + flip-expert AT", "train_moe",
     MOE + ["--ratio", "{r}", *RELEASED, "--flip-expert-at", FLIP_EXPERT_AT]),
]
# Issue 27: the paper's trade-off on Fashion-MNIST at 16x16 (setting FMNIST), MoE r = 0.25 against dense 2r (the same
# parameters) and the dense ratio whose inference GFLOPs match the MoE's at 16x16 (0.0426 against 0.0425 per image,
# `python -m utils.tools.flops --dataset FashionMNIST16`; 0.375 matches at 28x28 only). The MoE rows: the released
# recipe, and the recipe study's best robust routing (the grid's router KL in the attacks with the released router
# loss: docs/study.md, issue 26); the paper-reading AdvMoE last, as the budget allows.
COST_MATCHED = "dense cost-matched"  # r = 0.390625
ROWS["fmnist"] = [
    ("dense 2r", "train_ori", DENSE + ["--ratio", "{r2}"]),
    (COST_MATCHED, "train_ori", DENSE + ["--ratio", "0.390625"]),
    ("AdvMoE, released recipe", "train_moe", MOE + ["--ratio", "{r}", *RELEASED]),
    ("AdvMoE, router KL in attacks: yes, router loss: released", "train_moe",
     ADVMOE + ["--ratio", "{r}", "--attack-router-kl", "both", "--router-objective", "released"]),
    ("AdvMoE, paper recipe", "train_moe", ADVMOE + ["--ratio", "{r}"]),
]
ROWS["fmnist28"] = [row for row in ROWS["fmnist"] if row[0] in ("dense 2r", "AdvMoE, released recipe")]
SETTINGS = {"fmnist": FMNIST, "fmnist28": FMNIST28}  # the other row sets: DIGITS
COLUMNS = [("sa", "SA"), ("ra", "PGD-10 RA"), ("aa", "AutoAttack RA"), ("ra_minus_aa", "PGD RA - AA RA"),
           ("ra_routing_attack", "RA under routing attack"), ("router_robustness", "router robustness"),
           ("expert_robustness", "expert RA"), ("load_clean_min", "min clean load"), ("load_adv_min", "min adv load"),
           ("margin_p50", "router margin p50"), ("margin_p95", "router margin p95"), ("gflops", "GFLOPs/image"),
           ("minutes", "training minutes")]
TABLE_COLUMNS = [Column(title, lambda r, key=key: column_value(r, key), 3 if key == "gflops" else 2)
                 for key, title in COLUMNS]


def _without(argv, pair) -> list:
    """argv less each occurrence of the two flags `pair` in a row."""
    out, i = [], 0
    while i < len(argv):
        if tuple(argv[i:i + 2]) == pair:
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


@dataclass(frozen=True)
class Job:
    """One (row, seed) of the study with everything that decides its numbers; `key` hashes all of it."""
    name: str
    script: str
    argv: tuple  # the training flags, fully resolved (row flags, COMMON, epochs, seed, --train-extra)
    seed: int
    aa_n_ex: int
    eps: float = EPS
    data_dir: tuple = ()  # ("--data-dir", DIR) or (): where the data is, not a setting (not in `key`)

    @property
    def settings(self) -> dict:
        return {"row": self.name, "script": self.script, "argv": _without(self.argv, PAPER), "seed": self.seed,
                "aa_n_ex": self.aa_n_ex, "aa_eps": self.eps, "aa_attacks": list(AA_ATTACKS)}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]

    def folder(self, save) -> str:
        return os.path.join(save, "jobs", f"{slug(self.name)}-seed{self.seed}-{self.key}")

    def pipeline(self, save) -> Pipeline:
        """Train, evaluate, attack in the job's folder (command records there too); the run folders are computed by
        the entry scripts' own parser (no glob that could match another setting's run)."""
        out = self.folder(save)
        runs, evaluations = os.path.join(out, "runs"), os.path.join(out, "evaluate")
        run, _ = run_folders([*self.argv, "--save-dir", runs], self.script, self.name)
        _, evaluated = run_folders([*self.argv, "--save-dir", evaluations], self.script, self.name)
        best = os.path.join(run, "checkpoint", "model_best.pth.tar")
        program = [sys.executable, f"{self.script}.py", *self.argv, *self.data_dir]
        aa_out = os.path.join(out, "autoattack.json")
        aa = [sys.executable, "auto_attack_eval.py", "--source-net", best, "--version", "custom", "--attacks",
              *AA_ATTACKS, "--epsilon", f"{self.eps * 255:g}", "--num-workers", "0", "--no-progress", *self.data_dir,
              "--seed", str(self.seed), "--out", aa_out] + (["--n-ex", str(self.aa_n_ex)] if self.aa_n_ex else [])
        return Pipeline(run, evaluated, shlex.join([*program, "--save-dir", runs]),
                        shlex.join([*program, "--save-dir", evaluations, "--evaluate", "--resume", best]),
                        shlex.join(aa), aa_out=aa_out, records=out)


def make_job(name, script, flags, seed, a) -> Job:
    s = SETTINGS.get(a.rows, DIGITS)
    argv = [*flags, *s.common, "--epochs", str(a.epochs), "--eval-every", str(1 if s.every_epoch else a.epochs),
            "--seed", str(seed), "--exp-identifier", slug(name), *shlex.split(a.train_extra)]
    return Job(name, script, tuple(argv), seed, a.aa_n_ex, s.eps, ("--data-dir", a.data_dir) if a.data_dir else ())


def read_result(path, key):
    """A job's result.json (None when there is none); UsageError naming a damaged one, or one whose recorded
    key is not `key`, the job's own (a result copied in from another setting)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is damaged ({e}); remove it to recompute that job") from None
    if not isinstance(result, dict) or not {"row", "seed", "sa", "ra"} <= set(result):
        raise UsageError(f"{path} is damaged (not a job result); remove it to recompute that job")
    if result.get("key") != key:
        raise UsageError(f"{path} records the key {str(result.get('key'))[:40]!r}, not this job's {key}: it is the "
                         f"result of other settings (copied in?); remove it to recompute that job")
    return result


def check_job_folder(job, out):
    """UsageError when `out` records other settings than `job` (a hash collision or a hand-edited job.json)."""
    path = os.path.join(out, "job.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded != job.settings:
            raise UsageError(f"{path} records other settings than this job's: its results are not this job's")
    else:
        write_json_atomic(path, job.settings)


class StudyLog(Reporter):
    """Each command goes into the job's log before its output, as `$ COMMAND`; a line on stdout as each job ends."""

    def start(self, job, stage, earlier, out):
        out.write(f"$ {stage.shown()}\n")

    def job_end(self, outcome):
        print(f"{outcome.job.name}: {result_line(outcome)}", flush=True)


FAILED = {"train": "training failed", "eval": "evaluation failed", "autoattack": "AutoAttack failed"}


def study_job(save, j: Job):
    """One (row, seed) as a job of the runner, locked while it runs; done when its result.json records its key
    (and then collected from it), else collected from its steps' results into result.json."""
    out, p = j.folder(save), j.pipeline(save)
    result_path = os.path.join(out, "result.json")
    return p.job(f"{j.name} seed {j.seed}", out, lock="study job", log=os.path.join(out, "job.log"),
                 prepare=lambda: check_job_folder(j, out), done=lambda: read_result(result_path, j.key) is not None,
                 collect=lambda: read_result(result_path, j.key) or _collect(j, p))


def _collect(j: Job, p: Pipeline):
    """result.json of a job whose steps are done."""
    ev = read_metrics(os.path.join(p.eval_dir, "metrics.jsonl"))[-1]
    with open(p.aa_out) as f:
        aa_report = json.load(f)
    rows = read_metrics(os.path.join(p.run_dir, "metrics.jsonl"))
    best_epoch = rows[-1].get("best_epoch") if rows else None
    at_best = next((r for r in rows if r.get("epoch") == best_epoch), {})  # the evaluated checkpoint's epoch
    result = {"row": j.name, "seed": j.seed, "key": j.key, "sa": ev["sa"], "ra": ev["ra"], "n": ev["n"],
              "aa": aa_report.get("robust_accuracy"), "aa_n": aa_report.get("n_ex"),
              "ra_routing_attack": ev.get("ra_routing_attack"),
              "router_robustness": ev.get("router_robustness"), "expert_robustness": ev.get("expert_robustness"),
              "load_clean": ev.get("load_clean"), "load_adv": ev.get("load_adv"),
              "load_routing_attack": ev.get("load_routing_attack"),
              "load_clean_min": min(ev["load_clean"]) if ev.get("load_clean") else None,
              "load_adv_min": min(ev["load_adv"]) if ev.get("load_adv") else None,
              "margin_p50": at_best.get("router_margin_p50"), "margin_p95": at_best.get("router_margin_p95"),
              "gflops": _gflops(j.argv), "minutes": sum(r.get("seconds", 0) for r in rows) / 60,
              "last_epoch": rows[-1] if rows else None, "command": p.train + " --resume auto"}
    write_json_atomic(os.path.join(p.records, "result.json"), result)
    return result


def result_line(o) -> str:
    """The study's words for a job's outcome."""
    if o.rc == 0:
        r = o.result
        return f"SA {r['sa']:.1f} RA {r['ra']:.1f} AA {r['aa']} (" + ("done earlier" if o.skipped else "done") + ")"
    if o.stage:
        return f"{FAILED[o.stage]} (see {o.job.log})"
    return o.message


def _gflops(argv):
    """Inference GFLOPs per image (of the row's dataset's size) of the row's model (global router or per-layer
    routers included)."""
    import models
    from ..data import dataset_info
    from ..flops import inference_gflops
    from ..run import model_spec
    a = training_args(argv, "train_moe" if "--n-expert" in argv else "train_ori", "the GFLOPs' model")
    model = models.build_model(model_spec(a))
    return inference_gflops(model, image_size=dataset_info(a.dataset).image_size)["total"]


def column_value(result, key):
    """A table cell's value of one job's result: the result's own field, or `ra_minus_aa`, the gap between its PGD
    RA and its AutoAttack RA (same checkpoint; None without AutoAttack)."""
    if key == "ra_minus_aa":
        ra, aa = result.get("ra"), result.get("aa")
        return None if ra is None or aa is None else ra - aa
    return result.get(key)


def _routing_cells(r):
    """A job's routing figures for its per-seed line ('' for a dense job or one evaluated without them)."""
    cells = [(label, r.get(key)) for key, label in (("ra_routing_attack", "RA under routing attack"),
                                                    ("router_robustness", "router robustness"),
                                                    ("load_clean_min", "min clean load"))]
    return "".join(f" {label} {value:.2f}" for label, value in cells if value is not None) \
        if r.get("ra_routing_attack") is not None else ""


# Welch's t-test (two-sided, unequal variances) of each row against these, where both have at least 2 seeds.
BASELINES = ("dense 2r", COST_MATCHED, "AdvMoE, released recipe")
WELCH_KEYS = (("aa", "AutoAttack RA"), ("router_robustness", "router robustness"))


def welch_p(a, b):
    """Two-sided p of Welch's t-test between two samples; None when either has fewer than 2 values or both have
    no spread (a t of 0/0)."""
    from scipy.stats import ttest_ind
    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def welch_lines(by_row) -> list:
    """'- ROW against BASELINE: AutoAttack RA p = ..., router robustness p = ...' for each row and baseline."""
    lines = []
    for base in (b for b in BASELINES if b in by_row):
        for name, rs in by_row.items():
            cells = []
            for key, label in WELCH_KEYS:
                x = [r[key] for r in rs if r.get(key) is not None]
                y = [r[key] for r in by_row[base] if r.get(key) is not None]
                p = None if name == base else welch_p(x, y)
                if p is not None:
                    cells.append(f"{label} {statistics.fmean(x) - statistics.fmean(y):+.2f}, p = {p:.3f}")
            if cells:
                lines.append(f"- {name} against {base}: " + "; ".join(cells))
    return lines


def report(save, results, command, settings="", eps=EPS):
    """table.md and table.csv of `results` (mean ± std over seeds); `settings` says what made them."""
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    header, cells = seed_table(by_row, (["row"], lambda name, rs: [name]), TABLE_COLUMNS)
    lines = markdown(header, cells)
    aa_n = sorted({r.get("aa_n") for r in results if r.get("aa_n")})
    per_seed = [f"- {name}: " + "; ".join(f"seed {r['seed']} SA {r['sa']:.2f} RA {r['ra']:.2f} AA "
                                          + ("-" if r.get("aa") is None else f"{r['aa']:.2f}")
                                          + _routing_cells(r) for r in rs) for name, rs in by_row.items()]
    text = "\n".join(lines) + (
        f"\n\nMean ± std over seeds (n in 'seeds'). PGD-10 on {results[0]['n'] if results else '-'} test images "
        f"(eps {eps}); AutoAttack APGD-CE then APGD-T on {aa_n or '-'} test images. MoE PGD RA: the per-image "
        f"worst of the straight-through, fixed-routing and routing attacks (docs/evaluation.md; a job evaluated "
        f"before the routing attack joined it shows '-' under routing attack, and its PGD RA is the worst of the "
        f"first two). PGD RA - AA RA: per seed, then mean ± std (AutoAttack finds what PGD misses). RA under "
        f"routing attack: the whole MoE on the images that PGD pushes towards another expert; router robustness: "
        f"% of routing decisions those images leave unchanged. Loads: % of test images on "
        f"the least-used expert (adv: under the straight-through attack). Router margin: top-1 minus top-2 "
        f"selection score on training images at the "
        f"evaluated (best) epoch, median and 95th percentile. Command: `{command}`\n\nPer seed:\n"
        + "\n".join(per_seed) + "\n"
        + ("\nWelch's t-test (two-sided, unequal variances; difference of means, p):\n" + "\n".join(welch) + "\n"
           if (welch := welch_lines(by_row)) else "")
        + (f"\n{settings}\n" if settings else ""))
    write_text_atomic(os.path.join(save, "table.md"), text)
    write_csv(os.path.join(save, "table.csv"), header, cells)
    return text


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m utils.tools.study", description=__doc__.splitlines()[0])
    p.add_argument("--rows", choices=sorted(ROWS), default="main")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated whole numbers")
    p.add_argument("--ratio", type=float, default=0.25, help="the MoE's width ratio r (dense rows: r and 2r)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--aa-n-ex", type=int, default=0, help="AutoAttack on the first N test images (0: all)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--save-dir", default="results/routing_study")
    p.add_argument("--only", default="", help="comma-separated row names in slug form (e.g. dense_r,advmoe)")
    p.add_argument("--data-dir", default=None,
                   help="where the training scripts and AutoAttack find the data (--rows fmnist: the Fashion-MNIST "
                        "files, e.g. /usr/share/datasets/fashion-mnist); not a setting: jobs keep their keys")
    p.add_argument("--train-extra", default="", help="extra flags for the training scripts (e.g. '--max-batches 2')")
    p.add_argument("--report-only", action="store_true",
                   help="the table from the finished jobs of exactly these settings (nothing is run)")
    return p


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated whole numbers such as 1,2,3") from None
    if any(not SEED_RANGE[0] <= s <= SEED_RANGE[1] for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: seeds are distinct whole numbers in [0, 2**32 - 1]")
    return seeds


def check_study_args(a):
    """UsageError for settings that cannot make a table; returns the seeds."""
    seeds = parse_seeds(a.seeds)
    check_flags(a, ("epochs", "jobs"), lambda v: v >= 1, ">= 1")
    check_flags(a, ("aa_n_ex",), lambda v: v >= 0, ">= 0")
    top = 0.5 if any("{r2}" in flags for _, _, flags in ROWS[a.rows]) else 1.0  # rows with a dense model at 2r
    if not 0 < a.ratio <= top:
        raise UsageError(f"--ratio must be in (0, {top:g}] for --rows {a.rows}, got {a.ratio}")
    fixed = SETTINGS.get(a.rows, DIGITS).ratio
    if fixed is not None and a.ratio != fixed:
        raise UsageError(f"--rows {a.rows} is made for --ratio {fixed:g} (its dense rows are cost-matched to that "
                         f"MoE), got {a.ratio:g}")
    names = [slug(name) for name, _, _ in ROWS[a.rows]]
    unknown = [n for n in a.only.split(",") if n and n not in names] if a.only else []
    if unknown:
        raise UsageError(f"--only {','.join(unknown)}: no such row in --rows {a.rows} ({', '.join(names)})")
    try:
        shlex.split(a.train_extra)
    except ValueError as e:
        raise UsageError(f"--train-extra {a.train_extra!r}: {e}") from None
    return seeds


def plan(a, seeds) -> list:
    """The jobs of these settings, each checked by the training script's parser before anything runs."""
    fill = {"r": f"{a.ratio:g}", "r2": f"{2 * a.ratio:g}"}
    todo = [make_job(name, script, [f.format(**fill) for f in flags], seed, a)
            for seed in seeds for name, script, flags in ROWS[a.rows]
            if not a.only or slug(name) in a.only.split(",")]
    for j in todo:
        training_args(j.argv, j.script, j.name)
    return todo


def settings_line(a, todo) -> str:
    keys = ", ".join(f"{j.name} seed {j.seed}: {j.key}" for j in todo)
    return (f"Settings: --rows {a.rows} --ratio {a.ratio:g} --epochs {a.epochs} --seeds {a.seeds} --aa-n-ex "
            f"{a.aa_n_ex} --train-extra {a.train_extra!r}. Jobs (SAVE/jobs/ROW-seedS-KEY, the key a hash of every "
            f"flag): {keys}.")


def main(argv=None):
    a = get_args_parser().parse_args(argv)
    seeds = check_study_args(a)
    todo = plan(a, seeds)
    save = os.path.abspath(os.path.join(a.save_dir, a.rows))
    for j in todo:  # a damaged result is named before anything runs
        read_result(os.path.join(j.folder(save), "result.json"), j.key)
    check_can_create(save, f"--save-dir {a.save_dir}")
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--save-dir {a.save_dir}: cannot create {save} ({e.strerror or e})") from None
    command = "python -m utils.tools.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    results = run_jobs(save, todo, a)
    order = {name: i for i, (name, _, _) in enumerate(ROWS[a.rows])}
    results.sort(key=lambda r: (order.get(r["row"], 99), r["seed"]))
    with hold(save, "study folder"):  # one table writer at a time (the jobs hold their own folders)
        print(report(save, results, command, settings_line(a, todo), SETTINGS.get(a.rows, DIGITS).eps))
    print(f"wall time {(time.time() - t0) / 60:.1f} min")
    if len(results) != len(todo):
        print(f"{len(todo) - len(results)} of {len(todo)} jobs have no result", file=sys.stderr)
    return 0 if len(results) == len(todo) or a.report_only else 1


def run_jobs(save, todo, a) -> list:
    """The results of `todo` (`--report-only`: those already finished), one line printed per job."""
    results = []
    if a.report_only:
        found = [(j, read_result(os.path.join(j.folder(save), "result.json"), j.key)) for j in todo]
        for j, r in found:
            print(f"{j.name} seed {j.seed}: " + ("no result yet" if r is None else "done"), flush=True)
        return [r for _, r in found if r is not None]
    outcomes = Runner(parallel=a.jobs, env={"OMP_NUM_THREADS": "1"}, reporter=StudyLog()).run(
        [study_job(save, j) for j in todo])
    for j, o in zip(todo, outcomes):  # each finished job said its line as it ended
        if o is None:
            print(f"{j.name} seed {j.seed}: not started (the study was interrupted)", flush=True)
        elif o.result is not None:
            results.append(o.result)
    return results

if __name__ == "__main__":
    run_main(lambda argv: sys.exit(main(argv)))
