"""The routing study's table: mean ± std over seeds with their number, from the jobs' result files."""
import json
import os

from utils.tools import jobs, study


REPORT = ["--report-only", "--seeds", "1,2"]


def _result(tmp_path, row, seed, **values):
    a = study.get_args_parser().parse_args(REPORT + ["--save-dir", str(tmp_path)])
    j = next(j for j in study.plan(a, [1, 2]) if j.name == row and j.seed == seed)
    folder = tmp_path / "main" / os.path.relpath(j.folder(str(tmp_path / "main")), str(tmp_path / "main"))
    folder.mkdir(parents=True)
    base = {"row": row, "seed": seed, "key": j.key, "n": 360, "aa_n": 100}
    (folder / "result.json").write_text(json.dumps({**base, **values}))


def test_report_only_aggregates_seeds_with_mean_std_and_n(tmp_path, capsys):
    _result(tmp_path, "AdvMoE", 1, sa=90.0, ra=20.0, aa=8.0, gflops=0.028)
    _result(tmp_path, "AdvMoE", 2, sa=92.0, ra=26.0, aa=10.0, gflops=0.028)
    _result(tmp_path, "dense r", 1, sa=95.0, ra=35.0, aa=19.0, gflops=0.004)
    assert study.main(REPORT + ["--save-dir", str(tmp_path)]) == 0
    table = (tmp_path / "main" / "table.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # dense r first (the study's row order), then AdvMoE; std is the sample standard deviation
    assert list(lines)[1:] == ["dense r", "AdvMoE"]
    assert "| AdvMoE | 2 | 91.00 ± 1.41 | 23.00 ± 4.24 | 9.00 ± 1.41 |" in lines["AdvMoE"]
    assert "| dense r | 1 | 95.00 ± 0.00 | 35.00 ± 0.00 |" in lines["dense r"]
    assert "0.028 ± 0.000" in lines["AdvMoE"] and "on [100] test images" in table
    assert "- AdvMoE: seed 1 SA 90.00 RA 20.00 AA 8.00; seed 2 SA 92.00 RA 26.00 AA 10.00" in table  # per seed


def test_rows_pass_their_flags_and_the_common_setting():
    names = [name for name, _, _ in study.ROWS["main"]]
    assert names[:4] == ["dense r", "dense 2r", "MoE joint AT", "AdvMoE"]
    flags = dict(zip(*[iter(study.ROWS["main"][1][2])] * 2))
    assert flags["--ratio"] == "{r2}" and study.ROWS["main"][1][1] == "train_ori"
    modes = [f[-1] for _, _, f in study.ROWS["balance"] if "--balance" in f]
    assert modes == ["median", "bias", "bias-sign", "switch", "entropy", "none"]
    assert study.ROWS["balance"][-1][2][-2:] == ["--router-objective", "reference"]
    assert "Digits16" in study.COMMON and str(study.EPS) in study.COMMON


# ------------------------------------------------------------------------------------------------------------
# Issue 19: bad settings are one line and exit 2; results are keyed by every flag that made them
# ------------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402

from conftest import assert_one_line, cli  # noqa: E402


def study_main(argv):
    import sys
    sys.exit(study.main(argv))


@pytest.mark.parametrize("argv,named", [(["--seeds", "a"], "--seeds"), (["--seeds", ""], "--seeds"),
                                        (["--jobs", "0"], "--jobs"), (["--epochs", "0"], "--epochs"),
                                        (["--only", "bogus_row"], "bogus_row"), (["--ratio", "0.75"], "--ratio"),
                                        (["--train-extra", "--max-batches 0"], "--max-batches")])
def test_bad_study_settings_are_one_line(tmp_path, capsys, argv, named):
    code, err = cli(study_main, argv + ["--save-dir", tmp_path / "s"], capsys)
    assert_one_line(code, err, named)
    assert not (tmp_path / "s").exists()


def test_a_truncated_result_is_named(tmp_path, capsys):
    _result(tmp_path, "AdvMoE", 1, sa=90.0, ra=20.0)
    path = next((tmp_path / "main" / "jobs").glob("advmoe-seed1-*")) / "result.json"
    path.write_text('{"row": "AdvMoE", "se')
    before = (tmp_path / "main" / "jobs").stat().st_mtime
    code, err = cli(study_main, REPORT + ["--save-dir", tmp_path], capsys)
    assert_one_line(code, err, str(path), "damaged")
    assert not (tmp_path / "main" / "table.md").exists()
    assert (tmp_path / "main" / "jobs").stat().st_mtime == before


def test_report_only_never_shows_results_of_other_settings(tmp_path, capsys):
    _result(tmp_path, "AdvMoE", 1, sa=90.0, ra=20.0, aa=8.0)
    assert study.main(REPORT + ["--epochs", "2", "--save-dir", str(tmp_path)]) == 0
    table = (tmp_path / "main" / "table.md").read_text()
    assert "90.00" not in table and "--epochs 2" in table


@pytest.mark.slow  # three whole jobs: about 2 minutes on a loaded 2-core machine
def test_a_rerun_with_other_epochs_or_ratio_computes_anew(tmp_path):
    """A whole job (train, --evaluate, AutoAttack) at the tiniest settings, then again with other --epochs and
    --ratio: the old numbers must never come back."""
    import subprocess
    import sys
    base = [sys.executable, "-m", "utils.tools.study", "--only", "dense_r", "--seeds", "1", "--aa-n-ex", "4",
            "--save-dir", str(tmp_path), "--train-extra", "--max-batches 1 --max-test-batches 1 --num-steps 1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for extra in (["--epochs", "1", "--ratio", "0.0625"], ["--epochs", "2", "--ratio", "0.0625"],
                  ["--epochs", "1", "--ratio", "0.125"]):
        p = subprocess.run(base + extra, cwd=jobs.ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        found = sorted((tmp_path / "main" / "jobs").glob("*/result.json"), key=os.path.getmtime)
        results.append(json.loads(found[-1].read_text()))
        assert f"--epochs {extra[1]}" in (tmp_path / "main" / "table.md").read_text()
    assert [r["last_epoch"]["epoch"] for r in results] == [1, 2, 1]
    assert len({r["command"] for r in results}) == 3 and "--ratio 0.125" in results[2]["command"]


@pytest.mark.slow
def test_the_training_child_dies_with_a_killed_study(tmp_path):
    """kill -9 of the study: its training process gets SIGTERM (checkpoints, stops), so a rerun finds no writer."""
    import glob
    import signal
    import subprocess
    import sys
    import time
    from utils.lock import hold
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "utils.tools.study", "--only", "dense_r", "--seeds", "1", "--epochs", "50",
                          "--ratio", "0.0625", "--save-dir", str(tmp_path)], cwd=jobs.ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    for _ in range(600):
        child = _training_child(p.pid)
        if child is not None:
            break
        time.sleep(0.1)
    assert child is not None, "the study never started its training process"
    time.sleep(3)  # past its start-up: it is training
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(600):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the training child outlived the study by a minute")
    for lock in glob.glob(str(tmp_path / "main" / "**" / "training" / "*" / "*" / ".lock"), recursive=True):
        with hold(os.path.dirname(lock)):  # free again: a rerun can write there
            pass


def _training_child(parent):
    """The pid of a `train_*.py` process whose parent is `parent`, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"train_ori.py" in cmd:
            return int(pid)
    return None


# ------------------------------------------------------------------------------------------------------------
# Issue 26: the recipe rows (the released recipe's ingredients, robust-routing methods), commands only
# ------------------------------------------------------------------------------------------------------------

# The job keys of the rows that have results (known answers: a key that changes orphans those results).
KNOWN_KEYS = {"main": {"dense r": "3d3c754e6f50", "dense 2r": "8efcd2377663", "MoE joint AT": "376b2f467dc8",
                       "AdvMoE": "a083e8472ea7", "AdvMoE, reference router objective": "aae6bae4804a",
                       "AdvMoE, layer routing": "d227abb218ac"},
              "balance": {"AdvMoE, --balance none": "fb6cc7ec2f9f", "AdvMoE, --balance median": "62887893b159"}}


def _jobs(rows):
    a = study.get_args_parser().parse_args(["--rows", rows, "--seeds", "1"])
    return {j.name: j for j in study.plan(a, [1])}


def test_existing_rows_keep_their_job_keys():
    for rows, keys in KNOWN_KEYS.items():
        jobs = _jobs(rows)
        assert {name: jobs[name].key for name in keys} == keys


def test_every_advmoe_row_names_its_recipe_and_keeps_its_key():
    """The default recipe changed (paper -> released) after rows were run: each AdvMoE row names its recipe, so
    no default decides what a row means, and naming `paper` keeps the key the row had when it was the default."""
    from args import parse_args
    for rows in study.ROWS:
        for name, j in _jobs(rows).items():
            a = parse_args(list(j.argv), script=j.script)
            if j.script != "train_moe" or a.moe_training != "advmoe":
                continue
            assert "--advmoe-recipe" in j.argv, (rows, name)
            assert a.advmoe_recipe == ("released" if "released recipe" in name else "paper"), (rows, name)
    job = _jobs("main")["AdvMoE"]
    unnamed = study.Job(job.name, job.script, tuple(study._without(job.argv, study.PAPER)), job.seed, job.aa_n_ex)
    assert len(unnamed.argv) == len(job.argv) - 2 and unnamed.key == job.key


def test_recipe_rows_run_the_grid_the_released_recipe_and_the_methods():
    from args import parse_args
    jobs = _jobs("recipe")
    resolved = {name: parse_args(list(j.argv), script=j.script) for name, j in jobs.items()}
    grid = {(a.attack_router_kl, a.router_objective) for name, a in resolved.items() if "router KL in attacks" in name}
    assert grid == {(kl, o) for kl in ("none", "both") for o in ("robust", "released")}
    for name, a in resolved.items():
        if "router KL in attacks" in name:  # the grid keeps the paper recipe's other ingredients
            assert (a.advmoe_recipe, a.advmoe_order, a.balance) == ("paper", "router-first", "median"), name
            assert ("yes" in name) == (a.attack_router_kl == "both"), name
            assert ("released" in name) == (a.router_objective == "released"), name
    released = resolved["AdvMoE, released recipe"]
    assert (released.advmoe_order, released.attack_router_kl, released.router_objective, released.balance,
            released.router_logit_cap, released.router_grad_clip, released.router_at, released.router_targets,
            released.flip_expert_at) == ("expert-first", "both", "released", "none", 0.0, 1.0, 0.0, "mod", 0.0)
    methods = [name for name in resolved if name.startswith("AdvMoE, released recipe +")]
    assert len(methods) >= 2
    for name in methods:  # each method on top of the released recipe, as its name says
        a = resolved[name]
        assert (a.advmoe_recipe, a.advmoe_order, a.balance) == ("released", "expert-first", "none"), name
        assert ("router AT" in name) == (a.router_at > 0), name
        assert ("partition" in name) == (a.router_targets == "partition"), name
        assert ("flip-expert AT" in name) == (a.flip_expert_at > 0), name
    # dense r and 2r as in the main rows: the same jobs (same keys)
    main = _jobs("main")
    assert {n: jobs[n].key for n in ("dense r", "dense 2r")} == {n: main[n].key for n in ("dense r", "dense 2r")}
    assert resolved["dense 2r"].ratio == 2 * resolved["dense r"].ratio


def test_welch_p_is_the_two_sided_unequal_variance_test():
    # by hand: means 2 and 5, variances 1 and 1, n 3 and 3: t = -3 / sqrt(2/3) = -3.674, Welch df = 4;
    # the two-sided p of |t| = 3.674 on 4 degrees of freedom is 0.02131
    assert abs(study.welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) - 0.02131) < 1e-4
    # unequal variances: var 1 (n 3) against var 16 (n 3): t = -3 / sqrt(17/3), df = (17/3)^2 / ((1/3)^2/2 +
    # (16/3)^2/2) = 2.249; p = 0.3225
    assert abs(study.welch_p([1.0, 2.0, 3.0], [1.0, 5.0, 9.0]) - 0.3225) < 1e-4
    assert study.welch_p([1.0], [4.0, 5.0]) is None and study.welch_p([2.0, 2.0], [3.0, 3.0]) is None


def test_the_table_gives_welch_p_against_dense_2r(tmp_path):
    for seed, (moe, dense) in enumerate([(8.0, 19.0), (10.0, 20.0)], start=1):
        _result(tmp_path, "AdvMoE", seed, sa=90.0, ra=20.0, aa=moe)
        _result(tmp_path, "dense 2r", seed, sa=95.0, ra=35.0, aa=dense)
    _result(tmp_path, "dense r", 1, sa=95.0, ra=35.0, aa=19.0)  # one seed: no test
    assert study.main(REPORT + ["--save-dir", str(tmp_path)]) == 0
    table = (tmp_path / "main" / "table.md").read_text()
    p = study.welch_p([8.0, 10.0], [19.0, 20.0])
    assert f"- AdvMoE against dense 2r: AutoAttack RA -10.50, p = {p:.3f}" in table
    assert "dense r against" not in table and "dense 2r against dense 2r" not in table


# ------------------------------------------------------------------------------------------------------------
# Issue 29: the job pipeline behind the study keeps the layout and the keys of studies started before it
# ------------------------------------------------------------------------------------------------------------

# The job folders of the recipe study run from commit 1ca216a (docs/results/recipe_r025: --rows recipe --ratio 0.25
# --epochs 10 --seeds 1,2,3 --aa-n-ex 0 --train-extra '--eval-every 1'), as that code named them.
RECIPE_R025 = """
    advmoe__released_recipe-seed1-38eb7967ea26 advmoe__released_recipe-seed2-28a6c226453e
    advmoe__released_recipe-seed3-c97766f6f3e4 advmoe__released_recipe___flip_expert_at-seed1-8a8f5475c4e8
    advmoe__released_recipe___flip_expert_at-seed2-5718b9391639
    advmoe__released_recipe___flip_expert_at-seed3-3087e3d4f472
    advmoe__released_recipe___partition_targets-seed1-e1e74f4bf6f9
    advmoe__released_recipe___partition_targets-seed2-64ae1d85041a
    advmoe__released_recipe___partition_targets-seed3-b5fed25af91e
    advmoe__released_recipe___router_at-seed1-867aea07d289
    advmoe__released_recipe___router_at-seed2-d17abe70aa94
    advmoe__released_recipe___router_at-seed3-c8980e3984f6
    advmoe__released_recipe___router_at___partition_targets-seed1-898326ac5f1a
    advmoe__released_recipe___router_at___partition_targets-seed2-311169e5b57f
    advmoe__released_recipe___router_at___partition_targets-seed3-754ad30cc699
    advmoe__router_kl_in_attacks__no__router_loss__paper-seed1-74530e6b1851
    advmoe__router_kl_in_attacks__no__router_loss__paper-seed2-0a5f7cd6c9d5
    advmoe__router_kl_in_attacks__no__router_loss__paper-seed3-e3c8d8e3435c
    advmoe__router_kl_in_attacks__no__router_loss__released-seed1-0290169f8c2d
    advmoe__router_kl_in_attacks__no__router_loss__released-seed2-0433ca989fff
    advmoe__router_kl_in_attacks__no__router_loss__released-seed3-6111a5f86602
    advmoe__router_kl_in_attacks__yes__router_loss__paper-seed1-8623f2982982
    advmoe__router_kl_in_attacks__yes__router_loss__paper-seed2-be11fd3842a9
    advmoe__router_kl_in_attacks__yes__router_loss__paper-seed3-5664bda5f31d
    advmoe__router_kl_in_attacks__yes__router_loss__released-seed1-b1dc268b5f36
    advmoe__router_kl_in_attacks__yes__router_loss__released-seed2-c31bc35e18ee
    advmoe__router_kl_in_attacks__yes__router_loss__released-seed3-cf88ca0b7761 dense_2r-seed1-f0c5b4605b51
    dense_2r-seed2-88848aea5110 dense_2r-seed3-5d488e222e13 dense_r-seed1-017fef9f2279
    dense_r-seed2-f29249eec460 dense_r-seed3-c3249d5f7ab0
""".split()
RECIPE_ARGS = ["--rows", "recipe", "--ratio", "0.25", "--epochs", "10", "--seeds", "1,2,3", "--aa-n-ex", "0",
               "--train-extra", "--eval-every 1"]


def test_job_folders_and_keys_are_those_of_studies_started_before():
    a = study.get_args_parser().parse_args(RECIPE_ARGS)
    folders = [os.path.basename(j.folder("SAVE")) for j in study.plan(a, [1, 2, 3])]
    assert sorted(folders) == sorted(RECIPE_R025)


def _old_job_folder(save, j):
    """What the study before the pipeline left in a finished job's folder: job.json (the settings), result.json
    (with the key), the run's folders; no command records."""
    out = j.folder(save)
    os.makedirs(os.path.join(out, "runs"))
    with open(os.path.join(out, "job.json"), "w") as f:
        json.dump(j.settings, f, indent=1)
    result = {"row": j.name, "seed": j.seed, "key": j.key, "sa": 80.0 + j.seed, "ra": 40.0, "n": 360, "aa": 30.0,
              "aa_n": 360, "command": "python train_ori.py ..."}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


def test_a_finished_job_of_the_old_layout_is_done(tmp_path, capsys, monkeypatch):
    """Finished jobs made before the pipeline are done for it: nothing runs, their results make the table."""
    from utils.tools import jobs

    def no_command(self, argv, out, env=None):
        raise AssertionError(f"a finished job ran {argv[:2]}")
    monkeypatch.setattr(jobs.Runner, "call", no_command)
    argv = RECIPE_ARGS + ["--only", "dense_r", "--save-dir", str(tmp_path)]
    a = study.get_args_parser().parse_args(argv)
    todo = study.plan(a, [1, 2, 3])
    for j in todo:
        _old_job_folder(str(tmp_path / "recipe"), j)
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("(done earlier)") == 3
    assert "| dense r | 3 | 82.00 ± 1.00 | 40.00 ± 0.00 | 30.00 ± 0.00 |" in out
    dense_r = [n for n in sorted(RECIPE_R025) if n.startswith("dense_r-")]
    assert sorted(os.listdir(tmp_path / "recipe" / "jobs")) == dense_r


# ------------------------------------------------------------------------------------------------------------
# Issue 27: the Fashion-MNIST rows (16x16, 60,000 / 10,000 images)
# ------------------------------------------------------------------------------------------------------------

FMNIST_ARGS = ["--rows", "fmnist", "--epochs", "5", "--seeds", "1", "--aa-n-ex", "1000"]


def test_fmnist_rows_train_on_fashion_mnist_with_their_own_eps_and_selection():
    """The fmnist rows use the setting of issue 27 (not the digits'): FashionMNIST16 at eps 0.1 in training, PGD
    and AutoAttack, validation every epoch with the test set once at the end, dense 2r and the cost-matched dense
    beside the two MoE rows; --data-dir reaches every command but not the key."""
    from args import parse_args
    a = study.get_args_parser().parse_args(FMNIST_ARGS)
    jobs = {j.name: j for j in study.plan(a, [1])}
    assert list(jobs)[:4] == ["dense 2r", study.COST_MATCHED, "AdvMoE, released recipe",
                              "AdvMoE, router KL in attacks: yes, router loss: released"]
    ratios = {name: parse_args(list(j.argv), script=j.script).ratio for name, j in jobs.items()}
    assert ratios["dense 2r"] == 0.5 and ratios[study.COST_MATCHED] == 0.390625
    assert ratios["AdvMoE, released recipe"] == 0.25
    for name, j in jobs.items():
        t = parse_args(list(j.argv), script=j.script)
        assert (t.dataset, t.epsilon, t.epsilon_test, t.batch_size, t.epochs) == ("FashionMNIST16", 0.1, 0.1, 128, 5)
        assert t.test_at_end and t.eval_every == 1 and t.data_fraction == 0.9 and t.at == "trades", name
        assert t.num_steps == 2 and t.lr_schedule == "cosine", name
        aa = j.pipeline("SAVE").aa
        assert "--epsilon 25.5" in aa and "--n-ex 1000" in aa, name
        assert j.settings["aa_eps"] == 0.1
    released = parse_args(list(jobs["AdvMoE, released recipe"].argv), script="train_moe")
    assert released.advmoe_recipe == "released" and released.n_expert == 2
    placed = study.get_args_parser().parse_args(FMNIST_ARGS + ["--data-dir", "/data/fm"])
    moved = {j.name: j for j in study.plan(placed, [1])}
    for name, j in moved.items():
        assert j.key == jobs[name].key, name
        p = j.pipeline("SAVE")
        assert all("--data-dir /data/fm" in c for c in (p.train, p.eval, p.aa)), name


def test_fmnist_rows_refuse_another_ratio(tmp_path, capsys):
    code, err = cli(study_main, FMNIST_ARGS + ["--ratio", "0.125", "--save-dir", tmp_path / "s"], capsys)
    assert_one_line(code, err, "--ratio 0.25")
    assert not (tmp_path / "s").exists()


def test_fmnist28_rows_are_two_fmnist_rows_at_28x28_costed_at_their_size():
    from args import parse_args
    from utils.flops import inference_gflops
    import models
    from utils.run import model_spec
    a = study.get_args_parser().parse_args(["--rows", "fmnist28"] + FMNIST_ARGS[2:])
    jobs = {j.name: j for j in study.plan(a, [1])}
    assert list(jobs) == ["dense 2r", "AdvMoE, released recipe"]
    for name, j in jobs.items():
        t = parse_args(list(j.argv), script=j.script)
        assert t.dataset == "FashionMNIST" and t.epsilon == 0.1 and t.test_at_end, name
        at28 = inference_gflops(models.build_model(model_spec(t)), image_size=28)["total"]
        assert study._gflops(j.argv) == at28, name
