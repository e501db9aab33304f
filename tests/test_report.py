"""utils/tools/report.py on fixture run folders: table rows and values, missing/failed/running runs, PNG plots."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

import models
from utils.runfiles import TEST_KEYS
from utils.tools import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(save, script, name, args, rows=(), state="finished", message="", device="cpu", world_size=1,
             aa=None, flops=None, best=True):
    """A run folder as the entry scripts write it (only the files the report reads)."""
    folder = save / "training" / script / name
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "args.yaml").write_text(yaml.safe_dump(args))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "status.json").write_text(json.dumps({"state": state, "message": message}))
    (folder / "provenance.json").write_text(json.dumps({"device": device, "world_size": world_size}))
    if best:
        (folder / "checkpoint" / "model_best.pth.tar").write_bytes(b"weights")
    if aa is not None:
        (folder / "autoattack.json").write_text(json.dumps(aa))
    if flops is not None:
        (folder / "flops.json").write_text(json.dumps({"gflops_inference": flops}))
    return folder


def make_eval(save, script, name, run_folder, sa, ra):
    folder = save / "evaluate" / script / name
    folder.mkdir(parents=True)
    (folder / "args.yaml").write_text(yaml.safe_dump({"evaluate": True, "arch": "x_ori"}))
    ckpt = os.path.join(run_folder, "checkpoint", "model_best.pth.tar")
    (folder / "metrics.jsonl").write_text(json.dumps({"checkpoint": ckpt, "epoch": 3, "sa": sa, "ra": ra}) + "\n")
    (folder / "status.json").write_text(json.dumps({"state": "finished", "message": ""}))
    return folder


def epochs(sa_ra, seconds=100.0, moe=False):
    """Metrics rows (epochs from 1, as the runs write them) of a run whose validation RA equals its test RA (so
    selection picks the best test RA)."""
    rows, best, best_epoch = [], -1.0, None
    for e, (sa, ra) in enumerate(sa_ra):
        if ra > best:
            best, best_epoch = ra, e + 1
        row = {"epoch": e + 1, "lr": 0.1, "train_loss": 1.0, "val_ra": ra, "sa": sa, "ra": ra, "best_ra": best,
               "best_epoch": best_epoch, "seconds": seconds}
        if moe:
            row.update(load_clean=[70.0, 30.0], load_adv=[60.0, 40.0], collapse=False,
                       router_robustness=50.0, expert_robustness=40.0)
        rows.append(row)
    return rows


def args_of(arch, ratio, dataset="CIFAR10", epochs=3, **kw):
    return {"arch": arch, "ratio": ratio, "dataset": dataset, "epochs": epochs, **kw}


@pytest.fixture()
def sweep(tmp_path):
    save = tmp_path / "results"
    dense = make_run(save, "train_ori", "dense_CIFAR10-resnet18_cifar_ori-ratio1.0-epochs3-lr0.1-eps8-steps2-beta6.0-"
                     "seed1", args_of("resnet18_cifar_ori", 1.0),
                     epochs([(80.0, 40.0), (85.0, 48.5), (86.0, 47.0)], seconds=1800.0), device="cuda:0",
                     world_size=2, aa={"clean_accuracy": 84.0, "robust_accuracy": 44.25, "n_ex": 1000,
                                       "version": "standard", "eps": 8 / 255, "seconds": 5.0}, flops=1.11)
    make_eval(save, "train_ori", dense.name, dense, sa=85.5, ra=48.0)
    moe = make_run(save, "train_moe", "advmoe_CIFAR10-resnet18_cifar_moe-ratio0.5-epochs3-lr0.1-eps8-steps2-beta6.0-"
                   "expert2-seed1", args_of("resnet18_cifar_moe", 0.5, n_expert=2, moe_training="advmoe"),
                   epochs([(70.0, 30.0), (75.0, 35.0), (76.0, 36.0)], seconds=60.0, moe=True))
    failed = make_run(save, "train_moe", "joint_CIFAR10-resnet18_cifar_moe-ratio0.5-epochs3-lr0.1-eps8-steps2-"
                      "beta6.0-expert2-seed1", args_of("resnet18_cifar_moe", 0.5, n_expert=2, moe_training="joint"),
                      epochs([(20.0, 10.0)]), state="failed", message="RuntimeError: CUDA out of memory")
    running = make_run(save, "train_ori", "dense_CIFAR10-resnet18_cifar_ori-ratio0.5-epochs3-lr0.1-eps8-steps2-"
                       "beta6.0-seed1", args_of("resnet18_cifar_ori", 0.5), [], state="running", best=False)
    missing = save / "training" / "train_moe" / ("advmoe_CIFAR100-resnet18_cifar_moe-ratio0.5-epochs3-lr0.1-eps8-"
                                                 "steps2-beta6.0-expert2-seed1")
    manifest = save / "manifest.tsv"
    cmd = ("python train_moe.py --dataset CIFAR100 --arch resnet18_cifar_moe --ratio 0.5 --n-expert 2 "
           "--moe-training advmoe --epochs 3 --exp-identifier advmoe")
    lines = ["#run_dir\teval_dir\tcommand\teval_command\tautoattack_command"]  # as sh/sweep.sh writes it
    for f in (dense, running, failed, moe):
        lines.append(f"{f}\t-\tpython x.py --arch whatever\t-\t-")
    lines.append(f"{missing}\t-\t{cmd}\t{cmd} --evaluate --resume x\tpython auto_attack_eval.py --source-net x")
    manifest.write_text("\n".join(lines) + "\n")
    return dict(save=save, dense=dense, moe=moe, failed=failed, running=running, missing=missing, manifest=manifest)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_table_rows_and_values(sweep, tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "utils.tools.report", str(sweep["save"]), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "using manifest" in r.stdout  # found at the top of the sweep folder
    rows = {row["run_dir"]: row for row in read_csv(out / "table.csv")}
    assert len(rows) == 5  # 4 folders + 1 missing, nothing dropped
    # manifest order
    assert [row["run_dir"] for row in read_csv(out / "table.csv")] == [
        str(sweep[k]) for k in ("dense", "running", "failed", "moe", "missing")]

    dense = rows[str(sweep["dense"])]
    assert (dense["arch"], dense["dataset"], dense["method"], dense["ratio"], dense["n_expert"]) == \
        ("resnet18_cifar", "CIFAR10", "dense", "1.0", "")
    assert dense["status"] == "finished" and dense["epochs_done"] == "3"
    assert float(dense["sa"]) == 85.5 and float(dense["pgd_ra"]) == 48.0  # from the --evaluate folder
    assert dense["pgd_source"] == "evaluate"
    assert float(dense["aa_ra"]) == 44.25 and dense["aa_n_ex"] == "1000"
    assert float(dense["gflops"]) == 1.11
    assert float(dense["gpu_hours"]) == pytest.approx(3 * 1800.0 * 2 / 3600)  # seconds x world size
    assert dense["cpu_hours"] == ""
    assert dense["best_epoch"] == "2"

    moe = rows[str(sweep["moe"])]
    assert (moe["method"], moe["ratio"], moe["n_expert"]) == ("advmoe", "0.5", "2")
    assert float(moe["sa"]) == 76.0 and float(moe["pgd_ra"]) == 36.0 and moe["pgd_source"] == "training"
    assert float(moe["cpu_hours"]) == pytest.approx(180.0 / 3600) and moe["gpu_hours"] == ""
    assert moe["aa_ra"] == ""

    failed = rows[str(sweep["failed"])]
    assert failed["status"] == "failed" and failed["method"] == "joint"
    assert "out of memory" in failed["message"]
    assert rows[str(sweep["running"])]["status"] == "running"

    missing = rows[str(sweep["missing"])]
    assert (missing["status"], missing["dataset"], missing["method"], missing["arch"], missing["n_expert"]) == \
        ("missing", "CIFAR100", "advmoe-released released-recipe", "resnet18_cifar", "2")  # as train_moe.py reads it

    md = (out / "table.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| resnet18")]
    assert len(table) == 5
    assert "| resnet18_cifar | CIFAR10 | dense | 1.0 | - | finished | 3/3 |  | 1 | 85.50 ± 0.00 | 48.00 ± 0.00 | " \
           "44.25 ± 0.00 (n=1000) | 1.110 ± 0.000 | 3.000 ± 0.000 | - |" in md
    assert "| * | 1 | 76.00 ± 0.00 | 36.00 ± 0.00 |" in md  # from the training log, marked
    assert "- missing: resnet18_cifar CIFAR100 advmoe-released released-recipe r=0.5 N=2" in md
    assert "- failed: resnet18_cifar CIFAR10 joint r=0.5 N=2: RuntimeError: CUDA out of memory" in md
    assert md in r.stdout  # the table is also printed


def test_report_plots_are_png(sweep, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(sweep["save"]), "--out", str(out)]) == 0
    for name in ("curves.png", "expert_load.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name


def test_plot_panels_follow_the_runs(sweep, tmp_path):
    """One curve panel per run with epochs, one load panel per MoE run with loads."""
    import matplotlib
    matplotlib.use("Agg")
    from PIL import Image
    rows = report.collect([str(sweep["save"])], [str(sweep["manifest"])])
    assert [r.label for r in rows if r.curves] == ["resnet18_cifar CIFAR10 dense r=1", "resnet18_cifar CIFAR10 "
                                                   "joint r=0.5 N=2", "resnet18_cifar CIFAR10 advmoe r=0.5 N=2"]
    assert [r.load for r in rows if r.load] == [{"clean": [70.0, 30.0], "adv": [60.0, 40.0]}]
    report.plot_curves(rows, str(tmp_path / "c.png"))
    report.plot_curves(rows[:1], str(tmp_path / "c1.png"))
    w3, w1 = Image.open(tmp_path / "c.png").size[0], Image.open(tmp_path / "c1.png").size[0]
    assert w3 > 2 * w1  # three panels side by side


def test_stale_evaluation_is_not_used(sweep, tmp_path):
    best = sweep["dense"] / "checkpoint" / "model_best.pth.tar"
    later = time.time() + 60
    os.utime(best, (later, later))  # the checkpoint changed after the evaluation and the AutoAttack run
    row = report.summarize_run(str(sweep["dense"]), report.evaluations_by_run(
        [str(sweep["save"] / "evaluate" / "train_ori" / sweep["dense"].name)])[str(sweep["dense"])])
    assert row.pgd_source == "training" and row.pgd_ra == 48.5 and row.sa == 85.0
    assert row.aa_stale
    assert "stale" in report.markdown_table([row])


def test_missing_status_empty_metrics_and_cut_line(tmp_path):
    save = tmp_path / "s"
    empty = make_run(save, "train_ori", "CIFAR10-vgg16_bn_ori-ratio0.5-epochs2-lr0.1-eps8-steps2-beta6.0-seed1",
                     args_of("vgg16_bn_ori", 0.5), [], state="finished")
    cut = make_run(save, "train_ori", "CIFAR10-vgg16_bn_ori-ratio1.0-epochs2-lr0.1-eps8-steps2-beta6.0-seed1",
                   args_of("vgg16_bn_ori", 1.0), epochs([(50.0, 20.0)]), state="interrupted")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "sa": 5')  # the writer was killed mid-line
    # no args.yaml (a run writes it first): damaged, the file named; its name is not parsed
    bare = save / "training" / "train_moe" / ("t1_CIFAR100-wrn_28_10_cifar_moe-ratio0.5-epochs7-lr0.01-eps8-steps2-"
                                              "beta6.0-expert4-seed3")
    bare.mkdir(parents=True)
    (bare / "metrics.jsonl").write_text("")
    rows = {r.run_dir: r for r in report.collect([str(save)])}
    assert rows[str(empty)].status == "failed" and rows[str(empty)].message == "no epoch recorded"
    assert rows[str(cut)].status == "interrupted" and rows[str(cut)].epochs_done == 1
    b = rows[str(bare)]
    assert (b.status, b.arch, b.dataset, b.ratio, b.method) == ("damaged", "?", "?", None, "advmoe")
    assert b.message == f"{bare / 'args.yaml'} is missing or unreadable"


def test_single_run_folder_finds_its_evaluation(sweep, tmp_path):
    rows = report.collect([str(sweep["dense"])])
    assert len(rows) == 1 and rows[0].pgd_source == "evaluate" and rows[0].pgd_ra == 48.0


def test_evaluation_without_training_run_is_kept(tmp_path):
    save = tmp_path / "s"
    make_eval(save, "train_ori", "CIFAR10-x", tmp_path / "elsewhere" / "run", sa=60.0, ra=30.0)
    rows = report.collect([str(save)])
    assert len(rows) == 1 and rows[0].status == "evaluated" and rows[0].pgd_ra == 30.0


def test_empty_folder_and_bad_path(tmp_path):
    out = tmp_path / "out"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "expert_load.png").read_bytes()[:8] == PNG_MAGIC
    assert len(read_csv(out / "table.csv")) == 0
    r = subprocess.run([sys.executable, "-m", "utils.tools.report", str(tmp_path / "nope"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: no such file") and "Traceback" not in r.stderr


def test_compute_flops_fills_the_column(tmp_path):
    save = tmp_path / "s"
    for r in (1.0, 0.5):
        make_run(save, "train_ori", f"Digits-resnet18_cifar_ori-ratio{r}-epochs1-lr0.1-eps38-steps2-beta6.0-seed1",
                 args_of("resnet18_cifar_ori", r, dataset="Digits", epochs=1), epochs([(50.0, 20.0)]))
    rows = report.collect([str(save)])
    report.add_computed_flops(rows)
    by_ratio = {r.ratio: r.gflops for r in rows}
    assert by_ratio[1.0] == pytest.approx(1.11, rel=0.05)  # the reference's ResNet-18 CIFAR figure
    assert by_ratio[0.5] == pytest.approx(by_ratio[1.0] / 4, rel=0.1)  # width x 0.5: about a quarter


def test_compute_flops_counts_each_runs_own_model(tmp_path):
    """An MoE's GFLOPs follow its routing, top-k and MoE stages, not only arch, ratio and N: each row's figure is
    the count of the model its own flags build."""
    from args import parse_args
    from utils.flops import inference_gflops
    from utils.run import model_spec
    save = tmp_path / "s"
    variants = {"global": {}, "layer": {"routing": "layer"}, "top2": {"top_k": 2}, "stage4": {"moe_stages": [4]}}
    for name, kw in variants.items():
        make_run(save, "train_moe", f"{name}_Digits-resnet18_cifar_moe-ratio0.25-expert2-seed1",
                 args_of("resnet18_cifar_moe", 0.25, dataset="Digits16", epochs=1, n_expert=2, **kw),
                 epochs([(50.0, 20.0)], moe=True))
    rows = report.collect([str(save)])
    report.add_computed_flops(rows)
    got = {r.run_dir.rsplit("/", 1)[-1].split("_", 1)[0]: r.gflops for r in rows}
    for name, kw in variants.items():
        flags = ["--arch", "resnet18_cifar_moe", "--ratio", "0.25", "--n-expert", "2", "--dataset", "Digits16"]
        a = parse_args(flags, script="train_moe")
        vars(a).update(kw)
        want = inference_gflops(models.build_model(model_spec(a)), image_size=16, batch=2)["total"]
        assert got[name] == pytest.approx(want, rel=1e-9), name
    # per-layer routers cost less than the global router here, top-2 more; MoE stages alone cost as top-1 does
    assert len({got["global"], got["layer"], got["top2"]}) == 3


def test_selection_on_the_test_set_is_said_in_the_table(tmp_path):
    """A log without `best_epoch` (the report then takes the best test RA) or a run without a validation split
    selected its epoch on the test set: the table marks it (†) and the CSV says `test`."""
    save = tmp_path / "results"
    val = epochs([(80.0, 40.0), (85.0, 45.0), (86.0, 44.0)])
    val[-1].update(val_ra=50.0, best_epoch=3)  # validation picks the last epoch, not the best test RA
    logs = {"val": val,
            "no-best-epoch": [{k: v for k, v in r.items() if k not in ("best_epoch", "val_ra")} for r in val],
            "no-val-split": [{k: v for k, v in r.items() if k != "val_ra"}
                             for r in epochs([(70.0, 30.0), (60.0, 20.0), (65.0, 25.0)])]}
    for seed, rows in enumerate(logs.values()):
        make_run(save, "train_ori", f"CIFAR10-resnet18_cifar_ori-ratio0.5-epochs3-lr0.1-eps8-steps2-beta6.0-"
                 f"seed{seed}", args_of("resnet18_cifar_ori", 0.5, seed=seed), rows)
    rows = sorted(report.collect([str(save)]), key=lambda r: r.run_dir)
    assert [(r.selection, r.best_epoch, r.pgd_ra) for r in rows] == [("val", 3, 44.0), ("test", 2, 45.0),
                                                                      ("test", 1, 30.0)]
    md = report.markdown_table(rows)  # the three seeds of one setting: one line, mean ± std (sample std)
    assert "| finished | 3/3 | *† | 3 | 80.33 ± 8.96 | 39.67 ± 8.39 |" in md
    assert "†: the best epoch was chosen by test RA" in md


def test_a_test_at_end_log_reports_the_best_epoch_with_the_last_rows_test_figures(tmp_path):
    """--test-at-end: the test keys only on the last row, of epoch 2's weights (`test_epoch`); the table gives
    epoch 2, chosen on validation, with those figures (the MoE dissection too) and epoch 2's routing report."""
    save = tmp_path / "results"
    rows = [{k: v for k, v in r.items() if k not in TEST_KEYS}
            for r in epochs([(80.0, 40.0), (85.0, 45.0), (86.0, 44.0)], moe=True)]
    for r, margin in zip(rows, (1.0, 2.0, 3.0)):  # the routing report (training images) of every epoch
        r.update(best_ra=None, best_epoch=2, router_margin_p50=margin)
    rows[-1].update(sa=81.0, ra=41.0, best_ra=41.0, test_epoch=2, router_robustness=60.0, ra_routing_attack=12.0,
                    load_clean=[55.0, 45.0])
    make_run(save, "train_moe", "CIFAR10-resnet18_cifar_moe-ratio0.5-epochs3-lr0.1-eps8-steps2-beta6.0-expert2-seed1",
             args_of("resnet18_cifar_moe", 0.5, seed=1), rows)
    (row,) = report.collect([str(save)])
    assert (row.selection, row.best_epoch, row.sa, row.pgd_ra) == ("val", 2, 81.0, 41.0)
    assert (row.router_robustness, row.load_clean_min, row.ra_routing_attack) == (60.0, 45.0, 12.0)
    assert report.best_row(rows)["router_margin_p50"] == 2.0


# ------------------------------------------------------------------------------------------------------------
# Issue 19: the report replaces only its own files, and says when a run's log is damaged
# ------------------------------------------------------------------------------------------------------------

def _one_line_2(argv):
    r = subprocess.run([sys.executable, "-m", "utils.tools.report", *map(str, argv)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    return r.stderr


def test_out_never_replaces_a_file_the_report_did_not_write(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    out.mkdir()
    (out / "table.md").write_text("my notes\n")
    assert "table.md" in _one_line_2([runs, "--out", out])
    assert (out / "table.md").read_text() == "my notes\n" and sorted(os.listdir(out)) == ["table.md"]
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_line_2([runs, "--out", tmp_path / "file"])
    assert report.main([str(runs), "--out", str(tmp_path / "mine")]) == 0  # its own files: replaced on a rerun
    assert report.main([str(runs), "--out", str(tmp_path / "mine")]) == 0


def test_lost_rows_and_a_non_utf8_log_are_named_not_reported_as_results(tmp_path):
    save = tmp_path / "s"
    lost = make_run(save, "train_ori", "CIFAR10-vgg16_bn_ori-ratio0.5-epochs3-lr0.1-eps8-steps2-beta6.0-seed1",
                    args_of("vgg16_bn_ori", 0.5), epochs([(50.0, 20.0)]), state="finished")
    binary = make_run(save, "train_ori", "CIFAR10-vgg16_bn_ori-ratio1.0-epochs3-lr0.1-eps8-steps2-beta6.0-seed1",
                      args_of("vgg16_bn_ori", 1.0), epochs([(50.0, 20.0)]), state="running")
    with open(binary / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\n")
    rows = {r.run_dir: r for r in report.collect([str(save)])}
    assert rows[str(lost)].status == "damaged" and "epochs 2, 3" in rows[str(lost)].message
    assert rows[str(lost)].pgd_ra is None
    assert rows[str(binary)].status == "damaged" and "metrics.jsonl" in rows[str(binary)].message
    assert report.main([str(save), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "damaged" in table and f"Made by: `python -m utils.tools.report {save} --out {tmp_path / 'out'}`" in table


def test_the_report_and_the_model_spec_import_without_torch():
    """A report needs no torch: models.spec and utils.tools.report load without it (the registry loads lazily)."""
    code = "import sys, models.spec, utils.tools.report; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
