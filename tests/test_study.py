"""The routing study's table: mean ± std over seeds with their number, from the jobs' result files."""
import json

from utils import study


def _result(tmp_path, row, seed, **values):
    folder = tmp_path / "main" / "jobs" / f"{study.slug(row)}-seed{seed}"
    folder.mkdir(parents=True)
    base = {"row": row, "seed": seed, "n": 360, "aa_n": 100}
    (folder / "result.json").write_text(json.dumps({**base, **values}))


def test_report_only_aggregates_seeds_with_mean_std_and_n(tmp_path, capsys):
    _result(tmp_path, "AdvMoE", 1, sa=90.0, ra=20.0, aa=8.0, gflops=0.028)
    _result(tmp_path, "AdvMoE", 2, sa=92.0, ra=26.0, aa=10.0, gflops=0.028)
    _result(tmp_path, "dense r", 1, sa=95.0, ra=35.0, aa=19.0, gflops=0.004)
    assert study.main(["--report-only", "--save-dir", str(tmp_path)]) == 0
    table = (tmp_path / "main" / "table.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # dense r first (the study's row order), then AdvMoE; std is the sample standard deviation
    assert list(lines)[1:] == ["dense r", "AdvMoE"]
    assert "| AdvMoE | 2 | 91.00 ± 1.41 | 23.00 ± 4.24 | 9.00 ± 1.41 |" in lines["AdvMoE"]
    assert "| dense r | 1 | 95.00 ± 0.00 | 35.00 ± 0.00 |" in lines["dense r"]
    assert "0.028 ± 0.000" in lines["AdvMoE"] and "on [100] test images" in table


def test_rows_pass_their_flags_and_the_common_setting():
    names = [name for name, _, _ in study.ROWS["main"]]
    assert names[:4] == ["dense r", "dense 2r", "MoE joint AT", "AdvMoE"]
    flags = dict(zip(*[iter(study.ROWS["main"][1][2])] * 2))
    assert flags["--ratio"] == "{r2}" and study.ROWS["main"][1][1] == "train_ori"
    assert [f for _, _, f in study.ROWS["balance"]][0][-2:] == ["--balance", "bias"]
    assert "Digits16" in study.COMMON and str(study.EPS) in study.COMMON
