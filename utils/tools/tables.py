"""The results table of the study and of the report: one line per setting, its seeds aggregated (mean ± std, n).

    header, lines = seed_table({"dense r": [r1, r2]}, lead=("row", lambda name, rs: [name]),
                               columns=[Column("SA", lambda r: r["sa"])])
"""
import csv
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

from ..writes import atomic_file


@dataclass
class Column:
    """A numeric column: `value(record)` of each seed (None: not there), shown as mean ± std with `digits`;
    `note(records)` is added after it (e.g. how many test images)."""
    title: str
    value: Callable
    digits: int = 2
    note: Optional[Callable] = None


def mean_std(values, digits=2) -> str:
    """'mean ± std' of the values that are there (std: the sample's; 0 for one value); '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def seed_table(groups: dict, lead, columns) -> tuple:
    """(header, rows of cells) for `groups` ({setting: [one record per seed]}, in order): the `lead` cells
    (titles, and a function of the setting and its records), the number of seeds, then one cell per column."""
    titles, cells_of = lead
    header = [*titles, "seeds"] + [c.title for c in columns]
    rows = []
    for name, records in groups.items():
        cells = [*cells_of(name, records), str(len(records))]
        for c in columns:
            cell = mean_std([c.value(r) for r in records], c.digits)
            cells.append(cell + (c.note(records) if c.note and cell != "-" else ""))
        rows.append(cells)
    return header, rows


def markdown(header, rows) -> list:
    """The lines of a markdown table ('|' inside a cell becomes '/')."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |" for cells in rows]


def write_csv(path, header, rows):
    """A CSV file of `rows` (lists of cells, None written as an empty cell) under `header`, written atomically."""
    with atomic_file(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(["" if c is None else c for c in cells] for cells in rows)
