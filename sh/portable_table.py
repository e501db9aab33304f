"""The table of sh/check_portable.sh: one row per test file, and one per test that failed in some setting; one
column per setting (seed offset x thread count), pass / FAIL / skip / ERROR.

    python sh/portable_table.py SETTING=JUNIT.xml[:EXIT] ...

SETTING is the column's name (e.g. "seed 1, 2 threads"), JUNIT.xml the report that pytest wrote for it
(--junitxml, with -o junit_family=xunit1) and EXIT pytest's exit status. A setting whose pytest ended with a status other than 0 (all passed)
or 1 (some failed), or left no report, is ERROR in every row: it did not run its tests (a collection error, an
interrupt, a usage error). Prints the table; exits 0 when every cell is pass or skip, else 1.
Standard library only: it runs in whatever Python runs the tests.
"""
import os
import sys
import xml.etree.ElementTree as ET

PASS, FAIL, SKIP, ERROR = "pass", "FAIL", "skip", "ERROR"


def outcomes(junit_path):
    """{(file, node id): pass/FAIL/skip} from a pytest junit XML report written with `-o junit_family=xunit1`
    (each testcase names its file; classname "tests.test_x" or "tests.test_x.TestClass", name "test_y[param]")."""
    out = {}
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        path, classname = case.get("file", "?"), case.get("classname", "")
        module = path[:-3].replace("/", ".") if path.endswith(".py") else ""
        inner = classname[len(module) + 1:] if module and classname.startswith(module + ".") else ""
        node = "::".join([path, *([inner] if inner else []), case.get("name", "")])
        tags = {child.tag for child in case}
        out[(path, node)] = FAIL if tags & {"failure", "error"} else SKIP if "skipped" in tags else PASS
    return out


def file_cell(cells):
    """One file's cell from its tests' cells: FAIL if any failed, skip if every one skipped, else pass."""
    if FAIL in cells:
        return FAIL
    return SKIP if cells and all(c == SKIP for c in cells) else PASS


def table(settings):
    """settings: [(name, {(file, node): cell}, or None where the setting did not run its tests)].
    Returns (rows, all_good): rows = [[test, one cell per setting]]: each file (sorted), followed by each of its
    tests that failed in some setting ("-": not run there); all_good: every setting ran and every cell is pass or
    skip."""
    ran = [res for _, res in settings if res is not None]
    files = sorted({f for res in ran for f, _ in res})
    rows = []
    for f in files:
        rows.append([f] + [ERROR if res is None else file_cell([c for (g, _), c in res.items() if g == f])
                           for _, res in settings])
        failed = sorted({n for res in ran for (g, n), c in res.items() if g == f and c == FAIL})
        for n in failed:
            rows.append(["  ::" + n.split("::", 1)[1]] + [ERROR if res is None else res.get((f, n), "-")
                                                           for _, res in settings])
    good = bool(files) and len(ran) == len(settings) and all(c in (PASS, SKIP) for r in rows for c in r[1:])
    return rows, good


def render(names, rows):
    header = ["test"] + list(names)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_arg(arg):
    """"NAME=PATH[:EXIT]" -> (NAME, outcomes or None)."""
    name, _, rest = arg.rpartition("=")
    path, _, code = rest.partition(":")
    if code not in ("", "0", "1") or not os.path.exists(path):
        return name, None
    try:
        return name, outcomes(path)
    except ET.ParseError:
        return name, None


def main(argv):
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    settings = [parse_arg(a) for a in argv]
    rows, good = table(settings)
    print(render([n for n, _ in settings], rows))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
