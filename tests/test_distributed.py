"""Two CPU processes under torchrun (gloo): one writer per run, sharded evaluation and AutoAttack equal to one
process, and a SIGTERM to the launcher checkpoints mid-epoch and resumes exactly."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import models
from utils.data import EpochSampler, LoaderConfig, build_loaders
from utils.evaluate import Counts, EvalConfig, Shard, evaluate
from conftest import ours, seeded, train_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ)

TINY = ["--dataset", "Digits16", "--ratio", "0.125", "--batch-size", "32", "--num-workers", "0", "--max-test-batches",
        "1", "--test-batch-size", "32", "--num-steps", "1", "--num-steps-test", "2", "--no-progress", "--device", "cpu"]
DENSE = ["--arch", "resnet18_cifar_ori"] + TINY
MOE = ["--arch", "resnet18_cifar_moe", "--n-expert", "2"] + TINY
ONE_EPOCH = ["--epochs", "1", "--max-batches", "3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(script, argv, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", os.path.join(ROOT, script), *map(str, argv)]


def torchrun(script, argv, nproc=2):
    return subprocess.run(torchrun_cmd(script, argv, nproc), capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=600)


def single(script, argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=600)


def only_run_folder(save_dir, kind, script):
    parent = os.path.join(save_dir, kind, script)
    folders = os.listdir(parent)
    assert len(folders) == 1, folders
    return os.path.join(parent, folders[0])


def metrics_rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoint(folder):
    return torch.load(os.path.join(folder, "checkpoint", "checkpoint.pth.tar"), weights_only=True)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A 2-process train_ori.py run (one epoch of 3 batches): (save dir, completed process)."""
    save = tmp_path_factory.mktemp("dense")
    return save, torchrun("train_ori.py", DENSE + ONE_EPOCH + ["--save-dir", save])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_ori.py", "train_moe.py"])
def test_two_processes_write_one_run_folder_once(dense_run, tmp_path, script):
    if script == "train_ori.py":
        save, out = dense_run
    else:
        save, out = tmp_path, torchrun(script, MOE + ONE_EPOCH + ["--save-dir", tmp_path])
    assert out.returncode == 0, out.stderr
    assert os.listdir(save) == ["training"]
    folder = only_run_folder(save, "training", script[:-3])
    assert sorted(os.listdir(os.path.join(folder, "checkpoint"))) == ["checkpoint.pth.tar", "model_best.pth.tar"]
    stray = [f for _, _, fs in os.walk(save) for f in fs if "tmp" in f]
    assert not stray, stray
    assert len(metrics_rows(folder)) == 1  # rank 1 logged nothing
    assert out.stdout.count("epoch 1/1 |") == 1, out.stdout  # and printed no epoch line
    ckpt = checkpoint(folder)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0


@pytest.mark.slow
def test_sharded_evaluate_equals_single_process(dense_run, tmp_path):
    """--evaluate on 2 processes: the same images (3 batches of 64: rank 0 takes batches 0 and 2), the same
    random starts, hence the same counts as one process."""
    save, out = dense_run
    assert out.returncode == 0, out.stderr
    best = os.path.join(only_run_folder(save, "training", "train_ori"), "checkpoint", "checkpoint.pth.tar")
    argv = DENSE + ONE_EPOCH + ["--evaluate", "--resume", best, "--test-batch-size", 64, "--max-test-batches", 3]
    rows = {}
    for name, run in (("single", single), ("two", torchrun)):
        done = run("train_ori.py", argv + ["--save-dir", tmp_path / name])
        assert done.returncode == 0, done.stderr
        rows[name] = metrics_rows(only_run_folder(tmp_path / name, "evaluate", "train_ori"))
        assert len(rows[name]) == 1, rows[name]
    one, two = rows["single"][0], rows["two"][0]
    assert one["n"] == two["n"] == 192
    assert (one["sa"], one["ra"]) == (two["sa"], two["ra"])


@pytest.mark.parametrize("n,world_size,block", [(0, 2, 4), (10, 2, 4), (12, 2, 4), (13, 3, 4), (9, 4, 2), (5, 3, 1)])
def test_evaluation_sampler_gives_each_rank_whole_single_process_batches(n, world_size, block):
    batches = [list(range(n))[i:i + block] for i in range(0, n, block)]
    for rank in range(world_size):
        sampler = EpochSampler(n, shuffle=False, seed=0, rank=rank, world_size=world_size, pad=False, block=block)
        assert list(sampler) == [i for b in batches[rank::world_size] for i in b]
        assert len(sampler) == len(list(sampler))
    with pytest.raises(ValueError):
        EpochSampler(n, shuffle=False, seed=0, world_size=world_size, block=block + 1)  # padding needs blocks of 1


@pytest.mark.slow
def test_evaluation_shards_sum_to_the_single_process_counts():
    """In one process: each rank's evaluation loader and batch numbers, summed, give the single-process counts
    (MoE dissection and expert loads included), whatever the global RNG holds."""
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", num_classes=10, ratio=0.0625, n_expert=2)
    cfg = EvalConfig(eps=8 / 255, step_size=2 / 255, num_steps=1, max_batches=3, progress=False, seed=5)

    def run(rank, world_size):
        _, _, test, _ = build_loaders(LoaderConfig("Digits", "unused", batch_size=32, test_batch_size=40,
                                                   num_workers=0, seed=0), "cpu", rank=rank, world_size=world_size)
        torch.manual_seed(seeded(rank + 100 * world_size))  # the global RNG must play no part
        return evaluate(model, test, cfg, "cpu", shard=Shard(rank, world_size))

    whole, parts = run(0, 1), [run(r, 2) for r in range(2)]
    assert whole["n"] == 120 and [p["n"] for p in parts] == [80, 40]
    summed = parts[0]["counts"] + parts[1]["counts"]
    for f in dataclasses.fields(Counts):
        whole_count, summed_count = (torch.as_tensor(getattr(c, f.name)) for c in (whole["counts"], summed))
        assert torch.equal(whole_count, summed_count), f.name
    assert 0 <= whole["counts"].router_kept <= 120 and whole["counts"].load_clean.sum() == 120
    for key in ("load_clean", "load_adv"):
        summed = [sum(p["n"] * p[key][e] for p in parts) / 120 for e in range(2)]
        assert summed == pytest.approx(whole[key]), key


@pytest.mark.slow  # a correctness test, kept in CI: three 2-process runs of two epochs
def test_sigterm_to_torchrun_checkpoints_mid_epoch_and_resumes_exactly(tmp_path):
    argv = MOE + ["--epochs", 2, "--max-batches", 12]
    ref = torchrun("train_moe.py", argv + ["--save-dir", tmp_path / "ref"])
    assert ref.returncode == 0, ref.stderr
    ref_ckpt = checkpoint(only_run_folder(tmp_path / "ref", "training", "train_moe"))

    save = tmp_path / "term"
    proc = subprocess.Popen(torchrun_cmd("train_moe.py", argv + ["--save-dir", save]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None and not any(
            os.path.getsize(os.path.join(d, f)) > 0 for d, _, fs in os.walk(save) for f in fs if f == "metrics.jsonl"):
        time.sleep(0.05)
    time.sleep(1.0)  # into epoch 2
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both workers
    _, err = proc.communicate(timeout=300)
    # Each worker checkpoints together with the other and exits 75; torchrun itself re-raises the signal
    # as a SignalException and exits 1, whatever its workers returned.
    assert proc.returncode != 0, err
    assert err.count("interrupted: checkpoint written") == 2, err
    folder = only_run_folder(save, "training", "train_moe")
    with open(os.path.join(folder, "status.json")) as f:
        assert json.load(f)["state"] == "interrupted"
    ckpt = checkpoint(folder)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] > 0 and len(ckpt["mid_epoch"]) == 2

    resumed = torchrun("train_moe.py", argv + ["--save-dir", save, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    ckpt = checkpoint(folder)
    assert ckpt["epoch"] == 2
    rows, ref_rows = metrics_rows(folder), metrics_rows(only_run_folder(tmp_path / "ref", "training", "train_moe"))
    assert len(rows) == 2
    for key in ref_rows[1]:  # rank 1's partial sums and BatchNorm statistics were kept, not replaced by rank 0's
        assert key == "seconds" or rows[1][key] == ref_rows[1][key], key
    assert ckpt["state_dict"].keys() == ref_ckpt["state_dict"].keys()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, ref_ckpt["state_dict"][k]), k


@pytest.mark.slow
def test_autoattack_on_two_processes_equals_one(tmp_path):
    """`--version custom --attacks apgd-ce` on 12 points in chunks of 4: rank 0 attacks chunks 0 and 2, rank 1
    chunk 1; rank 0 alone writes and prints the report, equal to a single process's."""
    model, opt = train_tiny("resnet18_cifar_ori", steps=40)
    ckpt = tmp_path / "dense.pth.tar"
    torch.save(ours(model, opt, "resnet18_cifar_ori"), ckpt)
    argv = ["--source-net", ckpt, "--dataset", "Digits", "--data-dir", "unused", "--device", "cpu",
            "--num-workers", 0, "--n-ex", 12, "--chunk-size", 4, "--epsilon", 4, "--version", "custom",
            "--attacks", "apgd-ce"]
    one = single("auto_attack_eval.py", argv + ["--no-progress", "--out", tmp_path / "one" / "aa.json"])
    assert one.returncode == 0, one.stderr
    two = torchrun("auto_attack_eval.py", argv + ["--out", tmp_path / "two" / "aa.json"])
    assert two.returncode == 0, two.stderr
    assert "(rank 0): 100%" in two.stderr and "2/2" in two.stderr, two.stderr  # each attacked its own share
    assert "(rank 1): 100%" in two.stderr and "1/1" in two.stderr, two.stderr
    assert two.stdout.count("robust accuracy") == 1 and two.stdout.count("wrote ") == 1, two.stdout
    assert sorted(os.listdir(tmp_path / "two")) == ["aa.json", "aa.json.chunks"]
    reports = {name: json.loads((tmp_path / name / "aa.json").read_text()) for name in ("one", "two")}
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after", "n_ex", "n_robust", "n_chunks",
                "warnings"):
        assert reports["one"][key] == reports["two"][key], key
    assert reports["two"]["n_ex"] == 12 and reports["two"]["robust_accuracy"] <= reports["two"]["clean_accuracy"]
    chunks = [f for f in os.listdir(reports["two"]["chunks_dir"]) if f != ".lock"]  # the lock file stays, empty
    assert sorted(chunks) == ["chunk_00000.json", "chunk_00001.json", "chunk_00002.json", "settings.json"]
