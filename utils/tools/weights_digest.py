"""Digest of what fixed-seed Digits runs compute: for a refactoring that must not change any number.

Runs (CPU, tiny): dense TRADES, AdvMoE and joint AT training (2 epochs of 4 batches, one evaluated batch each),
`--evaluate --per-expert` of the AdvMoE checkpoint and AutoAttack (APGD-CE, 16 points) of the dense and AdvMoE
checkpoints. Prints one line per run: the sha256 of the final weights (every state-dict tensor's bytes, in
order) and of its metrics rows (wall times removed). Compare the output before and after a change, with the same
OMP_NUM_THREADS:

    OMP_NUM_THREADS=1 python -m utils.tools.weights_digest --work /tmp/digest > before.txt
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch

from .jobs import ROOT

COMMON = ["--dataset", "Digits", "--ratio", "0.125", "--epochs", "2", "--max-batches", "4", "--batch-size", "32",
          "--test-batch-size", "50", "--max-test-batches", "1", "--epsilon", "0.1", "--epsilon-test", "0.1", "--num-steps", "2",
          "--num-steps-test", "3", "--seed", "7", "--no-progress"]
RUNS = {
    "dense": ["train_ori.py", "--arch", "resnet18_cifar_ori"],
    "advmoe": ["train_moe.py", "--arch", "resnet18_cifar_moe", "--n-expert", "2"],
    "joint": ["train_moe.py", "--arch", "resnet18_cifar_moe", "--n-expert", "2", "--moe-training", "joint"],
}
TIMES = ("seconds", "time", "wall", "started", "finished")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def weights_digest(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def rows_digest(path, drop=TIMES):
    def clean(row):
        return {k: v for k, v in row.items() if not any(k.startswith(t) or k.endswith(t) for t in drop)}
    with open(path) as f:
        rows = [clean(json.loads(line)) for line in f if line.strip()]
    return sha(json.dumps(rows, sort_keys=True).encode()), rows


def only_run_folder(save):
    """The one folder holding a metrics.jsonl under `save`."""
    (folder,) = {root for root, _, files in os.walk(save) if "metrics.jsonl" in files}
    return folder


def run(cmd):
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(prog="python -m utils.tools.weights_digest", description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="scratch folder (emptied first)")
    p.add_argument("--show", action="store_true", help="also print the metrics rows")
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    for name, (script, *flags) in RUNS.items():
        save = os.path.join(a.work, name)
        run([script, *flags, *COMMON, "--save-dir", save])
        folder = only_run_folder(save)
        digest, rows = rows_digest(os.path.join(folder, "metrics.jsonl"))
        print(f"{name}: weights {weights_digest(os.path.join(folder, 'checkpoint', 'checkpoint.pth.tar'))} "
              f"metrics {digest}", flush=True)
        if a.show:
            print(json.dumps(rows))
        ckpt = os.path.join(folder, "checkpoint", "checkpoint.pth.tar")
        if name == "advmoe":
            ev = os.path.join(a.work, "evaluate")
            run([script, *flags, *COMMON, "--save-dir", ev, "--evaluate", "--per-expert", "--resume", ckpt])
            ef = only_run_folder(ev)
            digest, rows = rows_digest(os.path.join(ef, "metrics.jsonl"), drop=TIMES + ("checkpoint",))
            print(f"advmoe --evaluate --per-expert: metrics {digest}", flush=True)
            if a.show:
                print(json.dumps(rows))
        if name in ("dense", "advmoe"):
            out = os.path.join(a.work, f"aa_{name}.json")
            run(["auto_attack_eval.py", "--source-net", ckpt, "--version", "custom", "--attacks", "apgd-ce",
                 "--n-ex", "16", "--chunk-size", "8", "--out", out, "--no-progress", "--device", "cpu"])
            with open(out) as f:
                report = json.load(f)
            keep = {k: report[k] for k in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after")
                    if k in report}
            print(f"{name} AutoAttack: {sha(json.dumps(keep, sort_keys=True).encode())} {json.dumps(keep)}",
                  flush=True)


if __name__ == "__main__":
    main()
