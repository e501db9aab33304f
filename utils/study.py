"""The routing study: dense and MoE rows x seeds on Digits, trained, evaluated and attacked, one table.

    python -m utils.study --rows main --seeds 1,2,3 --save-dir results/routing_study [--jobs 2]
    python -m utils.study --rows balance ...      (AdvMoE under each load-balancing mode)
    python -m utils.study --report-only ...       (the table from what has finished)

Each (row, seed) is one job: train with `--resume auto` (a finished run is skipped, a killed one resumes), then
`--evaluate` of its best checkpoint on the whole test set (PGD-10, MoE dissection), then AutoAttack (APGD-CE then
APGD-T) on the whole test set, then GFLOPs per image. Every stage is skipped when its result exists, so rerunning
the same command continues where it stopped. `--jobs` jobs run at once, each on one thread. The table
(`SAVE/table.md`, `SAVE/table.csv`) gives mean ± std over seeds and n, with the command that made it.
"""
import argparse
import csv
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .runtime import write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The cheap setting (README: Routing study): 16x16 digits, ResNet-18 at ratio 0.25 (MoE, N=2) against dense at
# 0.25 (same per-image cost) and 0.5 (the paper's "original dense CNN"); eps 0.15 for training and test.
EPS = 0.15
COMMON = ["--dataset", "Digits16", "--batch-size", "32", "--test-batch-size", "128", "--num-workers", "0",
          "--epsilon", str(EPS), "--step-size", str(EPS * 5 / 8), "--epsilon-test", str(EPS),
          "--step-size-test", str(EPS / 4), "--no-progress", "--device", "cpu"]
MOE = ["--arch", "resnet18_cifar_moe", "--n-expert", "2"]
DENSE = ["--arch", "resnet18_cifar_ori"]

ROWS = {
    "main": [
        ("dense r", "train_ori", DENSE + ["--ratio", "{r}"]),
        ("dense 2r", "train_ori", DENSE + ["--ratio", "{r2}"]),
        ("MoE joint AT", "train_moe", MOE + ["--ratio", "{r}", "--moe-training", "joint"]),
        ("AdvMoE", "train_moe", MOE + ["--ratio", "{r}"]),
        ("AdvMoE, reference router objective", "train_moe", MOE + ["--ratio", "{r}", "--router-objective", "reference"]),
        ("AdvMoE, layer routing", "train_moe", MOE + ["--ratio", "{r}", "--routing", "layer"]),
    ],
    "balance": [
        (f"AdvMoE, --balance {mode}", "train_moe", MOE + ["--ratio", "{r}", "--balance", mode])
        for mode in ("bias", "bias-sign", "switch", "entropy", "none")
    ],
}
COLUMNS = [("sa", "SA"), ("ra", "PGD-10 RA"), ("aa", "AutoAttack RA"), ("router_robustness", "router robustness"),
           ("expert_robustness", "expert RA"), ("load_clean_min", "min clean load"), ("load_adv_min", "min adv load"),
           ("gflops", "GFLOPs/image"), ("minutes", "training minutes")]


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _run(cmd, log):
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def _status(folder):
    try:
        with open(os.path.join(folder, "status.json")) as f:
            return json.load(f).get("state")
    except (OSError, ValueError):
        return None


def _metrics(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _eval_rows(folder):
    found = glob.glob(os.path.join(folder, "**", "metrics.jsonl"), recursive=True)
    return _metrics(os.path.dirname(found[0])) if found else []


def job(save, name, script, flags, seed, epochs, aa_n_ex, extra=()):
    """Train, evaluate, attack one (row, seed); returns its result dict (or None if a stage failed)."""
    ident = slug(name)
    out = os.path.join(save, "jobs", f"{ident}-seed{seed}")
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "job.log")
    train_dir = os.path.join(save, "runs")
    argv = flags + COMMON + ["--epochs", str(epochs), "--eval-every", str(epochs), "--seed", str(seed),
                             "--exp-identifier", ident, *extra]
    train = [sys.executable, f"{script}.py", *argv, "--save-dir", train_dir, "--resume", "auto"]
    folders = glob.glob(os.path.join(train_dir, "training", script, f"{ident}_*seed{seed}"))
    if not (folders and _status(folders[0]) == "finished"):
        if _run(train, log) != 0:
            return None
        folders = glob.glob(os.path.join(train_dir, "training", script, f"{ident}_*seed{seed}"))
    run = folders[0]
    best = os.path.join(run, "checkpoint", "model_best.pth.tar")
    result_path = os.path.join(out, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    eval_dir = os.path.join(out, "evaluate")
    if not _eval_rows(eval_dir):
        if _run([sys.executable, f"{script}.py", *argv, "--save-dir", eval_dir, "--evaluate", "--resume", best],
                log) != 0:
            return None
    ev = _eval_rows(eval_dir)[-1]
    aa_path = os.path.join(out, "autoattack.json")
    if not os.path.exists(aa_path):
        aa = [sys.executable, "auto_attack_eval.py", "--source-net", best, "--version", "custom", "--attacks",
              "apgd-ce", "apgd-t", "--epsilon", f"{EPS * 255:g}", "--num-workers", "0", "--no-progress",
              "--seed", str(seed), "--out", aa_path]
        if aa_n_ex:
            aa += ["--n-ex", str(aa_n_ex)]
        if _run(aa, log) != 0:
            return None
    with open(aa_path) as f:
        aa_report = json.load(f)
    rows = _metrics(run)
    result = {"row": name, "seed": seed, "sa": ev["sa"], "ra": ev["ra"], "n": ev["n"],
              "aa": aa_report.get("robust_accuracy"), "aa_n": aa_report.get("n_ex"),
              "router_robustness": ev.get("router_robustness"), "expert_robustness": ev.get("expert_robustness"),
              "load_clean": ev.get("load_clean"), "load_adv": ev.get("load_adv"),
              "load_clean_min": min(ev["load_clean"]) if ev.get("load_clean") else None,
              "load_adv_min": min(ev["load_adv"]) if ev.get("load_adv") else None,
              "gflops": _gflops(flags), "minutes": sum(r.get("seconds", 0) for r in rows) / 60,
              "last_epoch": rows[-1] if rows else None, "command": shlex.join(train)}
    write_json_atomic(result_path, result)
    return result


def _gflops(flags):
    """Inference GFLOPs per 16x16 image of the row's model (global router or per-layer routers included)."""
    import models
    from utils.flops import inference_gflops
    get = dict(zip(flags[::2], flags[1::2]))
    model = models.build_model(get["--arch"], ratio=float(get["--ratio"]), n_expert=int(get["--n-expert"])
                               if "--n-expert" in get else None, routing=get.get("--routing", "global"))
    return inference_gflops(model, image_size=16)["total"]


def _fmt(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(save, results, command):
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    header = ["row", "seeds"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for name, rs in by_row.items():
        cells = [name, str(len(rs))] + [_fmt([r.get(k) for r in rs], 3 if k == "gflops" else 2)
                                            for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        csv_rows.append(dict(zip(header, cells)))
    aa_n = sorted({r.get("aa_n") for r in results if r.get("aa_n")})
    text = "\n".join(lines) + (
        f"\n\nMean ± std over seeds (n in 'seeds'). PGD-10 on {results[0]['n'] if results else '-'} test images "
        f"(eps {EPS}); AutoAttack APGD-CE then APGD-T on {aa_n or '-'} test images. Loads: % of test images on "
        f"the least-used expert. Command: `{command}`\n")
    with open(os.path.join(save, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(save, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(csv_rows)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", choices=sorted(ROWS), default="main")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--ratio", type=float, default=0.25, help="the MoE's width ratio r (dense rows: r and 2r)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--aa-n-ex", type=int, default=0, help="AutoAttack on the first N test images (0: all)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--save-dir", default="results/routing_study")
    p.add_argument("--only", default="", help="comma-separated row names in slug form (e.g. dense_r,advmoe)")
    p.add_argument("--train-extra", default="", help="extra flags for the training scripts (e.g. '--max-batches 2')")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    save = os.path.abspath(os.path.join(a.save_dir, a.rows))
    os.makedirs(save, exist_ok=True)
    command = "python -m utils.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    fill = {"r": f"{a.ratio:g}", "r2": f"{2 * a.ratio:g}"}
    todo = [(name, script, [f.format(**fill) for f in flags], seed)
            for seed in seeds for name, script, flags in ROWS[a.rows]
            if not a.only or slug(name) in a.only.split(",")]
    t0 = time.time()
    results = []
    if a.report_only:
        for path in sorted(glob.glob(os.path.join(save, "jobs", "*", "result.json"))):
            with open(path) as f:
                results.append(json.load(f))
    else:
        with ThreadPoolExecutor(a.jobs) as pool:
            futures = [pool.submit(job, save, *t, a.epochs, a.aa_n_ex, shlex.split(a.train_extra)) for t in todo]
            for (name, _, _, seed), fut in zip(todo, futures):
                r = fut.result()
                print(f"{name} seed {seed}: " + ("failed (see its job.log)" if r is None else
                      f"SA {r['sa']:.1f} RA {r['ra']:.1f} AA {r['aa']}"), flush=True)
                if r is not None:
                    results.append(r)
    order = {name: i for i, (name, _, _) in enumerate(ROWS[a.rows])}
    results.sort(key=lambda r: (order.get(r["row"], 99), r["seed"]))
    print(report(save, results, command))
    print(f"wall time {(time.time() - t0) / 60:.1f} min")
    return 0 if len(results) == len(todo) or a.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
