"""Reading a run folder's files as the tools and `--evaluate` need them, leniently and without torch: a missing or
damaged file gives an empty value (and, for metrics.jsonl, a description of what was skipped), never an error.
The training loop's own strict reader of metrics.jsonl is `utils.runlog.metrics_rows`.
"""
import json
import os

import yaml


# The metrics-row fields of a test evaluation (`utils.evaluate.moe_row`): the MoE dissection, then all of them with
# SA and RA (under `--test-at-end` the last row's, of the best epoch's weights: its `test_epoch`).
MOE_KEYS = ("ra_ste", "ra_routing_attack", "router_robustness", "expert_robustness", "load_clean", "load_adv",
            "load_routing_attack")
TEST_KEYS = ("sa", "ra") + MOE_KEYS + ("collapse",)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


CUT = object()  # a last line cut short by a killed writer (no newline, not JSON): a resume redoes that row


def metrics_lines(lines: list):
    """(line number, line, value) for each non-blank line of a metrics.jsonl: the JSON value the line holds, `CUT`
    for a last line cut short by a killed writer, None for any other line that is not JSON. The one parse of the
    file: `read_metrics` (lenient) and `utils.runlog.metrics_rows` (strict) differ only in what they make of it."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, line, json.loads(line)
        except ValueError:
            yield n, line, CUT if n == len(lines) and not line.endswith("\n") else None


def read_metrics(path: str, problems: list | None = None) -> list[dict]:
    """Rows of a metrics.jsonl. A last line cut short by a killed writer is skipped; any other line that is not
    a JSON object, or a file that is not UTF-8, is skipped too and described in `problems` (when given)."""
    problems = [] if problems is None else problems
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        lines = []
        problems.append(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")
    except OSError:
        lines = []
    rows = []
    for n, _, row in metrics_lines(lines):
        if isinstance(row, dict):
            rows.append(row)
        elif row is not CUT:
            problems.append(f"{path} line {n} is not a metrics row")
    return rows


def read_args(folder: str) -> dict:
    """The run's resolved flags (args.yaml, written when the run folder is made); {} when it is unreadable."""
    try:
        with open(os.path.join(folder, "args.yaml"), encoding="utf-8") as f:
            args = yaml.safe_load(f)
        if isinstance(args, dict):
            return args
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass
    return {}


def run_state(folder: str) -> str:
    """The state a run folder's status.json records (running, finished, failed, interrupted), or "none"."""
    status = read_json(os.path.join(folder, "status.json"))
    value = status.get("state") if isinstance(status, dict) else None
    return value if isinstance(value, str) and value else "none"
