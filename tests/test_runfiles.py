"""metrics.jsonl is parsed once (`utils.runfiles.metrics_lines`): the tools' lenient reader and the training loop's
strict one agree on every line and differ only in what they do with a line that is not a row."""
import pytest

from utils.errors import UsageError
from utils.runfiles import read_metrics
from utils.runlog import metrics_rows

ROWS = ['{"epoch": 1, "ra": 10.0}\n', "\n", '{"epoch": 2, "ra": 12.5}\n']


def test_a_last_line_cut_by_a_kill_is_dropped_by_both(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(ROWS) + '{"epoch": 3, "r')
    problems = []
    assert read_metrics(path, problems) == [{"epoch": 1, "ra": 10.0}, {"epoch": 2, "ra": 12.5}] and not problems
    assert metrics_rows(path) == [(ROWS[0], {"epoch": 1, "ra": 10.0}), (ROWS[2], {"epoch": 2, "ra": 12.5})]


@pytest.mark.parametrize("bad", ['{"epoch": 3, "r\n', "[1, 2]\n", "null\n"])
def test_any_other_line_that_is_no_row_is_named_by_both(tmp_path, bad):
    """A damaged line inside the file (JSON that is no row, `null` included) is line 3 to both readers."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(ROWS[0] + ROWS[1] + bad + ROWS[2])
    problems = []
    assert read_metrics(path, problems) == [{"epoch": 1, "ra": 10.0}, {"epoch": 2, "ra": 12.5}]
    assert problems == [f"{path} line 3 is not a metrics row"]
    with pytest.raises(UsageError, match=f"^{path} line 3 is not a metrics row"):
        metrics_rows(path)
