"""sh/sweep.sh (utils/tools/sweep.py): manifests, skip/resume decisions, backends (dry runs, fake commands, fake
sbatch)."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import started_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "sh", "sweep.sh")
# the interface's folder name: [ID_]{dataset}-{arch}-ratio{r}-epochs{E}-lr{lr}-eps{e}-steps{k}-beta{b}[-expert{N}]-seed{s}
NAME = re.compile(r"^(?P<id>[a-z-]+)_(?P<dataset>\w+?)-(?P<arch>\w+)-ratio(?P<ratio>[\d.]+)-epochs(?P<epochs>\d+)"
                  r"-lr[\d.e-]+-eps(?P<eps>\d+)-steps\d+-beta[\d.]+(?:-expert(?P<n>\d+))?-seed\d+$")


def sweep(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    for k in ("SWEEP_BACKEND", "SWEEP_GPUS", "SWEEP_PRESET", "SWEEP_SAVE_DIR", "SWEEP_EPOCHS"):
        if env is None or k not in env:
            full_env.pop(k, None)
    return subprocess.run(["bash", SWEEP, *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd or ROOT, timeout=120)


def manifest_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                fields = line.rstrip("\n").split("\t")
                assert len(fields) == 5, line
                rows.append(dict(zip(("run_dir", "eval_dir", "train", "eval", "aa"), fields)))
    return rows


def touch(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def fake_finished(run_dir, eval_dir=None, aa=True, row=None):
    """What a finished training run (and, optionally, its evaluation and AutoAttack, made by the commands of
    manifest row `row`) leaves behind."""
    touch(os.path.join(run_dir, "status.json"), json.dumps({"state": "finished", "message": ""}))
    touch(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))
    touch(os.path.join(run_dir, "checkpoint", "model_best.pth.tar"))
    later = time.time() + 5
    if eval_dir:
        touch(os.path.join(eval_dir, "status.json"), json.dumps({"state": "finished"}))
        touch(os.path.join(eval_dir, "metrics.jsonl"), "{}\n")
        os.utime(os.path.join(eval_dir, "metrics.jsonl"), (later, later))
        touch(os.path.join(run_dir, ".sweep_eval_command"), row["eval"] + "\n")
    if aa:
        touch(os.path.join(run_dir, "autoattack.json"), "{}")
        os.utime(os.path.join(run_dir, "autoattack.json"), (later, later))
        touch(os.path.join(run_dir, ".sweep_autoattack_command"), row["aa"] + "\n")


DIGITS = ["--preset", "digits", "--epochs", "2"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One dry run of the Digits preset: its manifest and output."""
    save = tmp_path_factory.mktemp("sweep") / "results"
    r = sweep(*DIGITS, "--save-dir", save, "--dry-run")
    assert r.returncode == 0, r.stderr
    return save, manifest_rows(save / "manifest.tsv"), r.stdout


def test_manifest_lines_and_names(planned):
    save, rows, out = planned
    assert len(rows) == 4  # dense at two ratios, joint, advmoe
    names = [NAME.match(os.path.basename(r["run_dir"])) for r in rows]
    assert all(names), [r["run_dir"] for r in rows]
    got = [(m["id"], m["arch"], m["ratio"], m["n"], m["eps"], m["epochs"]) for m in names]
    assert got == [("dense", "resnet18_cifar_ori", "0.25", None, "38", "2"),
                   ("dense", "resnet18_cifar_ori", "0.125", None, "38", "2"),
                   ("joint", "resnet18_cifar_moe", "0.125", "2", "38", "2"),
                   ("advmoe", "resnet18_cifar_moe", "0.125", "2", "38", "2")]
    for r in rows:
        assert r["run_dir"].startswith(str(save / "training")) and r["eval_dir"].startswith(str(save / "evaluate"))
        assert os.path.basename(r["run_dir"]) == os.path.basename(r["eval_dir"])
        best = os.path.join(r["run_dir"], "checkpoint", "model_best.pth.tar")
        # the evaluation is the training command on the whole test set (no per-epoch test cap)
        assert r["train"].endswith(" --max-test-batches 1")
        assert r["eval"] == f"{r['train'][:-len(' --max-test-batches 1')]} --evaluate --resume {best}"
        assert f"--source-net {best} --out {r['run_dir']}/autoattack.json --dataset Digits --epsilon 38.25" in r["aa"]
        assert "--version custom --attacks apgd-ce apgd-dlr --n-ex 32" in r["aa"]
        assert "--epsilon 0.15 --step-size 0.09375 --epsilon-test 0.15 --step-size-test 0.0375 --batch-size 64 " \
            "--num-workers 0" in r["train"]
    assert "--moe-training joint" in rows[2]["train"] and "--moe-training advmoe" in rows[3]["train"]
    # nothing ran: a dry run writes the manifest only
    assert sorted(os.listdir(save)) == ["manifest.tsv"]
    assert out.count("start train:") == 4 and out.count("then eval:") == 4 and out.count("then autoattack:") == 4


@pytest.mark.slow
def test_dry_run_skips_finished_and_resumes_partial(planned, tmp_path):
    save, rows, _ = planned
    fake_finished(rows[0]["run_dir"], rows[0]["eval_dir"], row=rows[0])  # all done
    touch(os.path.join(rows[1]["run_dir"], "status.json"), json.dumps({"state": "interrupted"}))
    touch(os.path.join(rows[1]["run_dir"], "checkpoint", "checkpoint.pth.tar"))  # partial
    fake_finished(rows[2]["run_dir"], aa=False)  # trained, not evaluated
    try:
        r = sweep(*DIGITS, "--save-dir", save, "--dry-run")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert [x.split(":")[0] for x in lines if x.startswith("[1]")] == [
            "[1] skip train (finished)", "[1] skip eval (done)", "[1] skip autoattack (done)"]
        resume = [x for x in lines if x.startswith("[2]")]
        assert resume[0] == f"[2] resume train (interrupted): {rows[1]['train']} --resume auto"
        assert resume[1].startswith("[2] then eval: ")
        assert [x.split(":")[0] for x in lines if x.startswith("[3]")] == [
            "[3] skip train (finished)", "[3] eval", "[3] autoattack"]
        assert [x.split(":")[0] for x in lines if x.startswith("[4]")] == [
            "[4] start train", "[4] then eval", "[4] then autoattack"]

        # other AutoAttack settings run it again (the evaluation stays done)
        r = sweep(*DIGITS, "--save-dir", save, "--dry-run", "--aa-n-ex", "50")
        assert [x.split(":")[0] for x in r.stdout.splitlines() if x.startswith("[1]")] == [
            "[1] skip train (finished)", "[1] skip eval (done)", "[1] autoattack"]

        # a newer model_best makes the evaluation and AutoAttack stale
        best = os.path.join(rows[0]["run_dir"], "checkpoint", "model_best.pth.tar")
        os.utime(best, (time.time() + 60, time.time() + 60))
        r = sweep(*DIGITS, "--save-dir", save, "--dry-run")
        assert [x.split(":")[0] for x in r.stdout.splitlines() if x.startswith("[1]")] == [
            "[1] skip train (finished)", "[1] eval", "[1] autoattack"]
    finally:
        import shutil
        for sub in ("training", "evaluate"):
            shutil.rmtree(save / sub, ignore_errors=True)


def test_paper_preset_filters_and_archs(tmp_path):
    r = sweep("--save-dir", tmp_path, "--datasets", "CIFAR100,TinyImageNet", "--archs", "resnet18,vgg16_bn",
              "--methods", "dense,advmoe", "--epochs", "3", "--no-autoattack", "--dry-run", "--", "--lr", "0.05")
    assert r.returncode == 0, r.stderr
    rows = manifest_rows(tmp_path / "manifest.tsv")
    archs = [NAME.match(os.path.basename(x["run_dir"]))["arch"] for x in rows]
    assert archs == ["resnet18_cifar_ori"] * 2 + ["resnet18_cifar_moe", "vgg16_bn_ori", "vgg16_bn_ori", "vgg16_bn_moe",
                     "resnet18_imagenet_ori", "resnet18_imagenet_ori", "resnet18_imagenet_moe", "vgg16_bn_ori",
                     "vgg16_bn_ori", "vgg16_bn_moe"]
    assert all("-lr0.05-" in x["run_dir"] and x["aa"] == "-" for x in rows)
    assert all(x["train"].endswith("--lr 0.05") for x in rows)  # extra flags reach training and evaluation
    assert "--ratio 1.0" in rows[0]["train"] and "--ratio 0.5" in rows[1]["train"]
    assert "TinyImageNet" in rows[-1]["run_dir"] and "-expert2-" in rows[-1]["run_dir"]


@pytest.mark.slow
def test_paper_preset_full_size(tmp_path):
    r = sweep("--save-dir", tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    rows = manifest_rows(tmp_path / "manifest.tsv")
    assert len(rows) == 3 * 4 * 4  # datasets x archs x (dense 1.0, dense 0.5, joint, advmoe)
    assert len({x["run_dir"] for x in rows}) == len(rows)
    assert {NAME.match(os.path.basename(x["run_dir"]))["arch"] for x in rows} == {
        "resnet18_cifar_ori", "resnet18_cifar_moe", "wrn_28_10_cifar_ori", "wrn_28_10_cifar_moe", "vgg16_bn_ori",
        "vgg16_bn_moe", "densenet_cifar_ori", "densenet_cifar_moe", "resnet18_imagenet_ori", "resnet18_imagenet_moe",
        "wrn_28_10_imagenet_ori", "wrn_28_10_imagenet_moe", "densenet_imagenet_ori", "densenet_imagenet_moe"}
    assert all("--epochs 100" in x["train"] and "--epsilon 8 --version standard" in x["aa"] for x in rows)


@pytest.mark.parametrize("args,message", [
    (["--methods", "dense,magic"], "unknown method magic"),
    (["--archs", "alexnet"], "unknown arch alexnet"),
    (["--backend", "pbs"], "unknown --backend pbs"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--", "--exp-identifier", "x"], "--exp-identifier after --"),
    (["--", "--ratio=0.3"], "--ratio after --"),
    (["--", "--no-such-flag"], "rejected by"),
    (["--bogus"], "unknown option --bogus"),
    (["--aa-n-ex", "-3"], "--aa-n-ex must be a positive integer"),
    (["--aa-epsilon", "300"], "AutoAttack flags rejected by auto_attack_eval.py: --epsilon must be > 0 and <= 255"),
    (["--aa-version", "nope"], "AutoAttack flags rejected"),
    (["--gpus", "a,b"], "each GPU is a device index"),
    (["--gpus", "0,0"], "names a GPU twice"),
])
@pytest.mark.slow
def test_bad_usage_exit_2(tmp_path, args, message):
    r = sweep(*DIGITS, "--save-dir", tmp_path, "--dry-run", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "training").exists()


# ----------------------------------------------------------------------------------------------------------
# SLURM
# ----------------------------------------------------------------------------------------------------------

def fake_bin(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_slurm_dry_run_writes_array_script(planned, tmp_path):
    save, rows, _ = planned
    fake_finished(rows[0]["run_dir"], rows[0]["eval_dir"], row=rows[0])
    try:
        r = sweep(*DIGITS, "--save-dir", save, "--backend", "slurm", "--dry-run", "--max-parallel", "2",
                  "--sbatch-args", "--partition=gpu --time=2:00:00")
        assert r.returncode == 0, r.stderr
        assert "[1] skip (done)" in r.stdout
        scripts = list((save / "sweep_slurm").glob("slurm-*/array.sbatch"))
        assert len(scripts) == 1
        text = scripts[0].read_text()
        frozen = scripts[0].parent / "manifest.tsv"
        assert frozen.read_text() == (save / "manifest.tsv").read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@180" in text
        assert "#SBATCH --gres" not in text  # the Digits preset needs no GPU
        # the task runs its line of the frozen manifest (and requeues itself: test_array_task_runs_its_line_and_requeues)
        assert f'--array-task {frozen} "$SLURM_ARRAY_TASK_ID"' in text
        assert f"#SBATCH --output={scripts[0].parent}/logs/%A_%a.out" in text
        submit = [x for x in r.stdout.splitlines() if x.startswith("dry run: sbatch")]
        assert submit[0] == f"dry run: sbatch --parsable --array=2-4%2 --partition=gpu --time=2:00:00 {scripts[0]}"
        assert "--dependency=afterany:JOBID" in submit[1] and "utils.tools.report" in submit[1]
        subprocess.run(["bash", "-n", str(scripts[0])], check=True)  # valid bash
    finally:
        import shutil
        for sub in ("training", "evaluate", "sweep_slurm"):
            shutil.rmtree(save / sub, ignore_errors=True)


@pytest.mark.slow
def test_slurm_submits_with_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake_bin(bin_dir, "sbatch", f'echo "$@" >> {calls}\necho "4242;cluster"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SWEEP_BACKEND": "slurm"}
    r = sweep("--save-dir", tmp_path / "s", "--datasets", "CIFAR10", "--archs", "resnet18", "--methods", "advmoe",
              env=env)
    assert r.returncode == 0, r.stderr
    first, second = calls.read_text().splitlines()
    assert first.startswith("--parsable --array=1 ") and first.endswith("array.sbatch")
    assert "--dependency=afterany:4242" in second and "--job-name=advmoe-report" in second
    assert "submitted job array 4242: 1 of 1 lines" in r.stdout
    script = first.split()[-1]
    assert "#SBATCH --gres=gpu:1" in open(script).read()


@pytest.mark.slow
@pytest.mark.parametrize("dry", [["--dry-run"], []])
def test_manifest_never_replaces_a_file_the_sweep_did_not_write(tmp_path, dry):
    mine = tmp_path / "notes.tsv"
    mine.write_text("my own notes\n")
    r = sweep(*DIGITS, "--save-dir", tmp_path / "s", "--manifest", mine, *dry)
    assert r.returncode == 2 and "not a sweep manifest" in r.stderr, r.stderr
    assert mine.read_text() == "my own notes\n"
    ours = tmp_path / "ours.tsv"
    for _ in range(2):  # its own manifest: replaced on a rerun
        r = sweep(*DIGITS, "--save-dir", tmp_path / "s", "--manifest", ours, "--dry-run")
        assert r.returncode == 0, r.stderr


def test_gpus_flag_is_local_only(tmp_path):
    r = sweep("--save-dir", tmp_path, "--backend", "slurm", "--gpus", "0,1", "--dry-run")
    assert r.returncode == 2 and "--gpus is for the local backend" in r.stderr


# ----------------------------------------------------------------------------------------------------------
# Running lines (utils/tools/sweep.py) with fake commands
# ----------------------------------------------------------------------------------------------------------

FAKE_STEP = r"""
# fake_step.sh KIND RUN_DIR EVAL_DIR RC: what a train/eval/aa command leaves, then exit RC
kind=$1 run=$2 ev=$3 rc=$4
echo "$kind $(basename "$run") gpu=${CUDA_VISIBLE_DEVICES:-none}" >> "$(dirname "$0")/ran.txt"
if [ "$kind" = wait ] || [ "$kind" = waitkill ]; then
    [ "$kind" = waitkill ] || trap 'echo term >> "$(dirname "$0")/ran.txt"; exit 75' TERM
    touch "$(dirname "$0")/ready"
    for i in $(seq 300); do sleep 0.1; done
    exit 1
fi
[ "$rc" = 0 ] || exit "$rc"
case $kind in
train) mkdir -p "$run/checkpoint"; echo '{"state": "finished"}' > "$run/status.json"
       touch "$run/checkpoint/model_best.pth.tar" "$run/checkpoint/checkpoint.pth.tar" ;;
eval) mkdir -p "$ev"; echo '{"state":"finished"}' > "$ev/status.json"; echo '{}' > "$ev/metrics.jsonl" ;;
aa) echo '{}' > "$run/autoattack.json" ;;
esac
sleep "${FAKE_SLEEP:-0}"
"""


def fake_manifest(tmp_path, train_rcs):
    step = tmp_path / "fake_step.sh"
    step.write_text(FAKE_STEP)
    lines = ["#run_dir\teval_dir\tcommand\teval_command\tautoattack_command"]
    for i, rc in enumerate(train_rcs):
        run, ev = tmp_path / "training" / f"run{i}", tmp_path / "evaluate" / f"run{i}"
        cmd = lambda kind, rc=0: f"bash {step} {kind} {run} {ev} {rc}"  # noqa: E731
        lines.append("\t".join([str(run), str(ev), cmd(rc) if rc in ("wait", "waitkill") else cmd("train", rc),
                                cmd("eval"), cmd("aa")]))
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.tsv", tmp_path / "ran.txt"


def py(script, env=None, **kw):
    """Run `script` in a fresh Python with the sweep's functions imported (as the sweep runs them)."""
    return subprocess.run([sys.executable, "-c", f"from utils.tools.sweep import *\n{script}"], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=ROOT, timeout=60, **kw)


def test_sequential_runs_steps_continues_after_failure_and_skips_done(tmp_path):
    manifest, ran = fake_manifest(tmp_path, [0, 3, 0])
    r = py(f"print('rc=%d' % run_lines('{manifest}'))")
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "[2] train exited with status 3: run1" in r.stdout
    assert ran.read_text().split("\n")[:-1] == [
        "train run0 gpu=none", "eval run0 gpu=none", "aa run0 gpu=none", "train run1 gpu=none",
        "train run2 gpu=none", "eval run2 gpu=none", "aa run2 gpu=none"]
    done = py(f"for n, x in enumerate(read_manifest('{manifest}'), 1): print(('done' if x.done() else 'todo') + str(n))")
    assert done.stdout.split() == ["done1", "todo2", "done3"]
    ran.unlink()
    again = py(f"import sys; sys.exit(run_lines('{manifest}', only=1))")
    assert again.returncode == 0 and not ran.exists()
    assert again.stdout.splitlines() == ["[1] skip train (finished): run0", "[1] skip eval (done): run0",
                                         "[1] skip autoattack (done): run0"]


def test_interrupted_run_stops_the_sweep(tmp_path):
    manifest, ran = fake_manifest(tmp_path, [75, 0])
    r = py(f"print('rc=%d' % run_lines('{manifest}'))")
    assert "rc=75" in r.stdout and "sweep interrupted at line 1" in r.stdout
    assert ran.read_text().split("\n")[:-1] == ["train run0 gpu=none"]  # line 2 never started


@pytest.mark.parametrize("kind", ["wait", "waitkill"])
def test_sigterm_is_passed_to_the_run(tmp_path, kind):
    """SLURM's SIGTERM/SIGUSR1 reach the batch shell; the run must get it to write its checkpoint. A step
    without a handler (killed, status 143) also ends the sweep as interrupted (75), not as failed."""
    manifest, ran = fake_manifest(tmp_path, [kind, 0])
    proc = started_until([sys.executable, "-c", f"import sys; from utils.tools.sweep import run_lines; "
                          f"sys.exit(run_lines('{manifest}'))"], tmp_path / "ready", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, out + err
    assert "sweep interrupted at line 1" in out
    expected = ["wait run0 gpu=none", "term"] if kind == "wait" else ["waitkill run0 gpu=none"]
    assert ran.read_text().split("\n")[:-1] == expected


def test_one_run_per_gpu(tmp_path):
    manifest, ran = fake_manifest(tmp_path, [0, 0, 0, 0])
    r = py(f"import sys; sys.exit(run_lines('{manifest}', ['0', '1'], '{tmp_path / 'logs'}'))",
           env={"FAKE_SLEEP": "0.5"})
    assert r.returncode == 0, r.stdout + r.stderr
    trains = [x for x in ran.read_text().splitlines() if x.startswith("train")]
    assert sorted(x.split()[1] for x in trains) == ["run0", "run1", "run2", "run3"]  # each line once
    assert {x.split()[2] for x in trains} == {"gpu=0", "gpu=1"}
    for line in ran.read_text().splitlines():  # a line's three steps share its GPU
        run, gpu = line.split()[1:]
        assert f"train {run} {gpu}" in trains
    assert len(os.listdir(tmp_path / "logs")) == 4


def test_array_task_runs_its_line_and_requeues(tmp_path):
    manifest, ran = fake_manifest(tmp_path, [0, 75])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_bin(bin_dir, "scontrol", f'echo "scontrol $@" >> {ran}\n')
    script = tmp_path / "array.sbatch"
    py(f"write_sbatch('{script}', '{manifest}', '{tmp_path / 'logs'}', 'gpu:1')")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "77"}
    ok = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    requeued = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "2"}, capture_output=True,
                              text=True)
    assert requeued.returncode == 75
    assert ran.read_text().split("\n")[:-1] == ["train run0 gpu=none", "eval run0 gpu=none", "aa run0 gpu=none",
                                                "train run1 gpu=none", "scontrol requeue 77_2"]


def test_array_spec():
    from utils.tools.sweep import array_spec
    assert [array_spec([1, 2, 3, 5, 7, 8]), array_spec([4]), array_spec([])] == ["1-3,5,7-8", "4", ""]


def test_report_reads_the_sweep_manifest(planned):
    """Before anything ran, the report lists every planned run as missing, described by its command."""
    from utils.tools import report
    save, rows, _ = planned
    got = report.collect([str(save)], [str(save / "manifest.tsv")])
    assert [(r.status, r.arch, r.dataset, r.method, r.ratio, r.n_expert, r.epochs) for r in got] == [
        ("missing", "resnet18_cifar", "Digits", "dense", 0.25, None, 2),
        ("missing", "resnet18_cifar", "Digits", "dense", 0.125, None, 2),
        ("missing", "resnet18_cifar", "Digits", "joint", 0.125, 2, 2),
        ("missing", "resnet18_cifar", "Digits", "advmoe-released released-recipe", 0.125, 2, 2)]
    assert [r.run_dir for r in got] == [r["run_dir"] for r in rows]


def test_array_task_of_a_line_the_manifest_lacks_is_one_line(tmp_path):
    manifest, ran = fake_manifest(tmp_path, [0])
    for task in ("2", "0", "x"):
        r = subprocess.run(["bash", SWEEP, "--array-task", str(manifest), task], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {manifest} has no line {task}"], r.stderr
    assert not ran.exists()
