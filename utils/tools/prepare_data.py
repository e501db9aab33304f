"""Dataset preparation: ImageNet validation images into class folders, TinyImageNet fetched and unpacked.

Called by `sh/prepare_imagenet.sh` and `sh/prepare_tinyimagenet.sh` (or `python -m utils.tools.prepare_data ...`).

ImageNet (Kaggle's `imagenet-object-localization-challenge` download, unpacked):

    KAGGLE/ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG
    KAGGLE/ILSVRC/Data/CLS-LOC/val/*.JPEG              (50,000 images, no class folders)
    KAGGLE/LOC_val_solution.csv                        (ImageId,PredictionString; first token = wnid)

`imagenet --src KAGGLE [--dest X]` puts every validation image into `X/val/<wnid>/` and makes `X/train` a
symlink to the CLS-LOC train folder, so that `--dataset ImageNet --data-dir X` works. Without `--dest`, X is
the CLS-LOC folder itself and the images are sorted in place (the classic `valprep.sh` step). Moves are
written to a journal (`X/.prepare_imagenet.journal.tsv`) *before* they happen, so `--undo` puts every image
back where it was, even after an interrupted run; `--copy`, `--link` (hard links) and `--symlink` leave the
source untouched. Nothing is ever deleted (only the empty class folders this tool created, on `--undo`).
A second run finds everything in place and says so. Missing pieces (CSV, train folder, images listed in the
CSV) are reported together and the exit status is 2, before anything is changed.

TinyImageNet: `tinyimagenet --data-dir DIR [--zip PATH]` downloads `tiny-imagenet-200.zip` (unless a zip is
given or already at DIR/tiny-imagenet-200.zip), checks its members, unpacks it into a temporary folder next to
the destination and renames that to `DIR/tiny-imagenet-200` once complete, then verifies the structure our
loader reads (wnids.txt, train/<wnid>/images/, val/images/ with val/val_annotations.txt). An existing complete
folder is left alone. Offline: a message says where to put the zip by hand.
"""
import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

from ..errors import UsageError
from ..writes import atomic_file, open_append

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_CLASSES = 200
IMAGENET_CLASSES = 1000
JOURNAL_NAME = ".prepare_imagenet.journal.tsv"
MODES = ("move", "copy", "link", "symlink")
_MAX_LISTED = 5  # examples printed per kind of problem


class MissingError(UsageError):
    """Expected input is absent; the message lists everything that is missing (exit status 2)."""


def _listing(items, limit=_MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------------
# ImageNet
# ----------------------------------------------------------------------------------------------------------

def kaggle_paths(src: str) -> dict:
    """Where the Kaggle layout keeps the pieces, given its unpacked root folder."""
    cls_loc = os.path.join(src, "ILSVRC", "Data", "CLS-LOC")
    return {"cls_loc": cls_loc, "train": os.path.join(cls_loc, "train"), "val": os.path.join(cls_loc, "val"),
            "csv": os.path.join(src, "LOC_val_solution.csv")}


def read_val_solution(csv_path: str) -> dict:
    """{image id (file name without .JPEG): wnid} from LOC_val_solution.csv.

    Each row is `ImageId,PredictionString`, the string being `wnid x0 y0 x1 y1 [wnid x0 ...]`; every box of an
    image carries the same wnid, the first one is the label.
    """
    labels, bad = {}, []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise UsageError(f"{csv_path}: expected the header 'ImageId,PredictionString', found {header!r}")
        for n, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            tokens = row[1].split() if len(row) >= 2 else []
            if not row[0].strip() or not tokens:
                bad.append(n)
                continue
            labels[row[0].strip()] = tokens[0]
    if bad:
        raise UsageError(f"{csv_path}: rows without an image id or a wnid at lines {_listing(bad)}")
    if not labels:
        raise UsageError(f"{csv_path}: no rows")
    return labels


def _is_image(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg", ".png"))


def plan_imagenet_val(labels: dict, src_val: str, dest_val: str) -> tuple[list, list, int]:
    """Decide what to do with each listed validation image.

    Returns (todo, missing, done): todo = [(source path, destination path, wnid)] for images still flat in
    `src_val`; missing = image ids found neither flat in `src_val` nor in `dest_val/<wnid>/`; done = how many
    are already in their class folder.
    """
    flat = {os.path.splitext(n)[0]: n for n in os.listdir(src_val)
            if _is_image(n) and os.path.isfile(os.path.join(src_val, n))}
    todo, missing, done = [], [], 0
    for image_id in sorted(labels):
        wnid = labels[image_id]
        name = flat.get(image_id, image_id + ".JPEG")
        target = os.path.join(dest_val, wnid, name)
        if os.path.lexists(target):
            done += 1
        elif image_id in flat:
            todo.append((os.path.join(src_val, name), target, wnid))
        else:
            missing.append(image_id)
    return todo, missing, done


def plan_unlisted(labels: dict, src_val: str) -> list:
    """Image files lying flat in `src_val` that the CSV does not label (left alone, reported)."""
    return sorted(n for n in os.listdir(src_val)
                  if _is_image(n) and os.path.splitext(n)[0] not in labels and os.path.isfile(os.path.join(src_val, n)))


def check_imagenet(src: str, csv_path: str | None = None, expected_classes: int = IMAGENET_CLASSES) -> dict:
    """Check the Kaggle tree; raise MissingError listing every missing piece. Returns the paths and labels."""
    paths = kaggle_paths(src)
    if csv_path:
        paths["csv"] = csv_path
    problems = []
    if not os.path.isdir(src):
        raise MissingError(f"ImageNet source folder {src} does not exist (pass the unpacked Kaggle download "
                           f"imagenet-object-localization-challenge with --src)")
    for key, what in (("train", "training images, one folder per class"),
                      ("val", "validation images"), ("csv", "validation labels")):
        exists = os.path.isfile(paths[key]) if key == "csv" else os.path.isdir(paths[key])
        if not exists:
            problems.append(f"{paths[key]} ({what})")
    if problems:
        raise MissingError("ImageNet: missing " + "; ".join(problems))
    train_classes = sorted(d for d in os.listdir(paths["train"]) if os.path.isdir(os.path.join(paths["train"], d)))
    if not train_classes:
        raise MissingError(f"ImageNet: no class folders in {paths['train']}")
    labels = read_val_solution(paths["csv"])
    unknown = sorted(set(labels.values()) - set(train_classes))
    if unknown:
        raise MissingError(f"ImageNet: {len(unknown)} wnids of {paths['csv']} have no folder in {paths['train']}: "
                           f"{_listing(unknown)} (labels would not match the training classes)")
    paths.update(labels=labels, train_classes=train_classes)
    if expected_classes and len(train_classes) != expected_classes:
        paths["warnings"] = [f"{len(train_classes)} class folders in {paths['train']}, {expected_classes} expected"]
    return paths


class Journal:
    """Append-only TSV of operations (`op<TAB>source<TAB>destination`), flushed and synced line by line.

    A move is recorded before it happens; `--undo` tolerates a recorded move that never happened.
    """

    def __init__(self, path: str):
        self.path = path
        self._f = None

    def __enter__(self):
        self._f = open_append(self.path)
        return self

    def __exit__(self, *exc):
        self._f.close()

    def record(self, op: str, source: str, destination: str = ""):
        self._f.write(f"{op}\t{source}\t{destination}\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    @staticmethod
    def read(path: str) -> list:
        with open(path) as f:
            return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def _place(source: str, target: str, mode: str):
    if mode == "move":
        os.rename(source, target)  # same folder tree; never copies then deletes
    elif mode == "copy":
        shutil.copy2(source, target)
    elif mode == "link":
        os.link(source, target)
    else:
        os.symlink(os.path.abspath(source), target)


def _link_train(dest: str, train: str, dry_run: bool, say) -> None:
    """`dest/train` -> the Kaggle train folder (a symlink, journaled), unless it already is that folder."""
    link = os.path.join(dest, "train")
    if os.path.lexists(link):
        if os.path.exists(link) and os.path.samefile(link, train):
            return
        raise UsageError(f"{link} exists and is not {train}; move it away or choose another --dest")
    say(f"link {link} -> {os.path.abspath(train)}")
    if not dry_run:
        with Journal(os.path.join(dest, JOURNAL_NAME)) as journal:
            journal.record("trainlink", link, os.path.abspath(train))
            os.symlink(os.path.abspath(train), link)


def prepare_imagenet(src: str, dest: str | None = None, *, mode: str = "move", csv_path: str | None = None,
                     dry_run: bool = False, expected_classes: int = IMAGENET_CLASSES, say=print) -> dict:
    """Put the Kaggle validation images into `dest/val/<wnid>/`; returns counts {placed, already, dest}.

    dest: output root (default: the CLS-LOC folder itself, sorted in place). mode: move (journaled, undoable
    with `undo_imagenet`), copy, link (hard link) or symlink. Raises MissingError before changing anything
    when a piece is missing.
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    paths = check_imagenet(src, csv_path, expected_classes)
    for w in paths.get("warnings", []):
        say(f"warning: {w}")
    dest = dest or paths["cls_loc"]
    dest_val = os.path.join(dest, "val")
    todo, missing, done = plan_imagenet_val(paths["labels"], paths["val"], dest_val)
    if missing:
        raise MissingError(f"ImageNet: {len(missing)} of the {len(paths['labels'])} validation images listed in "
                           f"{paths['csv']} are neither in {paths['val']} nor in {dest_val}/<wnid>/: "
                           f"{_listing(missing)}")
    unlisted = plan_unlisted(paths["labels"], paths["val"])
    if unlisted:
        say(f"warning: {len(unlisted)} images in {paths['val']} are not in {paths['csv']} and stay where they "
            f"are: {_listing(unlisted)}")
    in_place = os.path.abspath(dest) == os.path.abspath(paths["cls_loc"])
    if not in_place:
        if not dry_run:
            os.makedirs(dest, exist_ok=True)
        _link_train(dest, paths["train"], dry_run, say)
    no_val = sorted(set(paths["train_classes"]) - set(paths["labels"].values()))
    if no_val:
        say(f"warning: {len(no_val)} training classes have no validation image: {_listing(no_val)} "
            f"(ImageFolder needs the same class folders in train/ and val/)")
    if not todo:
        say(f"nothing to do: all {done} validation images are already in class folders under {dest_val}")
        return {"placed": 0, "already": done, "dest": dest}
    verb = {"move": "move", "copy": "copy", "link": "hard-link", "symlink": "symlink"}[mode]
    say(f"{verb} {len(todo)} validation images into {dest_val}/<wnid>/ ({done} already there)")
    if dry_run:
        for s, t, _ in todo[:_MAX_LISTED]:
            say(f"  {s} -> {t}")
        return {"placed": 0, "already": done, "dest": dest, "planned": len(todo)}
    os.makedirs(dest_val, exist_ok=True)
    journal_path = os.path.join(dest, JOURNAL_NAME)
    with Journal(journal_path) as journal:
        for source, target, wnid in todo:
            folder = os.path.dirname(target)
            if not os.path.isdir(folder):
                journal.record("mkdir", folder)
                os.mkdir(folder)
            journal.record(mode, source, target)
            try:
                _place(source, target, mode)
            except OSError as e:
                hint = {"link": " (hard links need one file system: try --copy or --symlink)",
                        "move": " (moves stay on one file system: try --copy, --link or --symlink)"}
                raise UsageError(f"could not {verb} {source} to {target}: {e.strerror}"
                                 + hint.get(mode, "") + f"; what was done so far is in {journal_path}") from None
    say(f"done: {len(todo)} images placed; journal {journal_path}"
        + (" (undo with --undo)" if mode == "move" else ""))
    return {"placed": len(todo), "already": done, "dest": dest}


def undo_imagenet(dest: str, say=print) -> dict:
    """Put back every journaled move under `dest` (newest first); remove the class folders the moves
    created when they are empty again. Copies and links are left (their sources were never touched).
    The journal is renamed `<journal>.undone-<time>`, not deleted."""
    journal_path = os.path.join(dest, JOURNAL_NAME)
    if not os.path.isfile(journal_path):
        raise MissingError(f"no journal {journal_path}: nothing to undo (was --dest the same as when preparing?)")
    restored, kept, conflicts = 0, 0, []
    for entry in reversed(Journal.read(journal_path)):
        op, source = entry[0], entry[1]
        target = entry[2] if len(entry) > 2 else ""
        if op == "move":
            if os.path.lexists(target) and not os.path.lexists(source):
                os.rename(target, source)
                restored += 1
            elif os.path.lexists(target):
                conflicts.append(source)  # both exist: keep both, say so
        elif op == "trainlink":
            if os.path.islink(source):
                os.unlink(source)  # our symlink, not data
        elif op == "mkdir":
            try:
                os.rmdir(source)  # only succeeds when empty
            except OSError:
                pass
        else:
            kept += 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.rename(journal_path, f"{journal_path}.undone-{stamp}")
    say(f"undo: {restored} images moved back" + (f"; {kept} copies/links left in place" if kept else ""))
    if conflicts:
        say(f"warning: {len(conflicts)} images exist at both places and were left alone: {_listing(conflicts)}")
    return {"restored": restored, "kept": kept, "conflicts": len(conflicts)}


# ----------------------------------------------------------------------------------------------------------
# TinyImageNet
# ----------------------------------------------------------------------------------------------------------

def check_tiny_imagenet(root: str, expected_classes: int = TINY_IMAGENET_CLASSES) -> list:
    """Problems with an unpacked TinyImageNet folder (empty list: usable by `--dataset TinyImageNet`)."""
    problems = []
    wnids_file = os.path.join(root, "wnids.txt")
    train, val = os.path.join(root, "train"), os.path.join(root, "val")
    annotations, val_images = os.path.join(val, "val_annotations.txt"), os.path.join(val, "images")
    for p in (wnids_file, annotations):
        if not os.path.isfile(p):
            problems.append(f"missing file {p}")
    for p in (train, val_images):
        if not os.path.isdir(p):
            problems.append(f"missing folder {p}")
    if problems:
        return problems
    with open(wnids_file) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if expected_classes and len(wnids) != expected_classes:
        problems.append(f"{wnids_file} lists {len(wnids)} classes, {expected_classes} expected")
    no_images = [w for w in wnids if not os.path.isdir(os.path.join(train, w, "images"))
                 or not any(_is_image(n) for n in os.listdir(os.path.join(train, w, "images")))]
    if no_images:
        problems.append(f"{len(no_images)} classes without train/<wnid>/images/*.JPEG: {_listing(no_images)}")
    present, known, bad = set(os.listdir(val_images)), set(wnids), []
    n_val = 0
    with open(annotations) as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if fields == [""]:
                continue
            n_val += 1
            if len(fields) < 2 or fields[0] not in present or fields[1] not in known:
                bad.append(n)
    if bad:
        problems.append(f"{annotations}: {len(bad)} lines name a missing image or an unknown class "
                        f"(lines {_listing(bad)})")
    if not n_val:
        problems.append(f"{annotations} lists no images")
    return problems


def download(url: str, target: str, say=print, timeout: float = 60.0) -> None:
    """Fetch `url` to `target` via a temp file beside it (renamed when complete). UsageError when offline."""
    say(f"downloading {url} -> {target}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_file(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            got, last = 0, time.time()
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                out.write(block)
                got += len(block)
                if time.time() - last > 10:
                    say(f"  {got / 2**20:.0f} MiB" + (f" of {total / 2**20:.0f} MiB" if total else ""))
                    last = time.time()
            if total and got != total:  # inside: the temp file is removed, nothing is renamed
                raise OSError(f"got {got} of {total} bytes")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"could not download {url} ({reason}). Without network access, fetch the zip "
                         f"elsewhere and place it at {target} (or pass --zip PATH), then run this again") from None


def _safe_members(zf: zipfile.ZipFile, top: str) -> list:
    names = zf.namelist()
    unsafe = [n for n in names if n.startswith("/") or ".." in n.replace("\\", "/").split("/")]
    if unsafe:
        raise UsageError(f"{zf.filename}: refusing to unpack members outside the target: {_listing(unsafe)}")
    outside = [n for n in names if n.split("/")[0] != top]
    if outside or not names:
        raise UsageError(f"{zf.filename}: expected every member under {top}/, found {_listing(outside) or 'none'}"
                         f" (is this tiny-imagenet-200.zip?)")
    return names


def prepare_tiny_imagenet(data_dir: str, *, zip_path: str | None = None, url: str = TINY_IMAGENET_URL,
                          expected_classes: int = TINY_IMAGENET_CLASSES, say=print) -> str:
    """Make `data_dir/tiny-imagenet-200` a complete TinyImageNet folder; returns its path.

    Uses `zip_path`, else `data_dir/tiny-imagenet-200.zip`, else downloads `url` there. Unpacks into a
    temporary folder renamed into place when complete (an interrupted run leaves no half folder behind).
    """
    root = os.path.join(data_dir, TINY_IMAGENET_FOLDER)
    if os.path.exists(root):
        problems = check_tiny_imagenet(root, expected_classes)
        if problems:
            raise MissingError(f"{root} exists but is incomplete: " + "; ".join(problems)
                               + ". Move it away (nothing is deleted by this tool) and run this again")
        say(f"nothing to do: {root} is already complete")
        return root
    os.makedirs(data_dir, exist_ok=True)
    if zip_path is None:
        zip_path = os.path.join(data_dir, TINY_IMAGENET_FOLDER + ".zip")
        if not os.path.isfile(zip_path):
            download(url, zip_path, say)
    elif not os.path.isfile(zip_path):
        raise MissingError(f"--zip {zip_path}: no such file")
    say(f"unpacking {zip_path} into {root}")
    tmp = tempfile.mkdtemp(prefix=f".{TINY_IMAGENET_FOLDER}.partial-", dir=data_dir)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp, members=_safe_members(zf, TINY_IMAGENET_FOLDER))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise UsageError(f"{zip_path} is damaged ({e}); delete it and download it again. The partial unpack "
                         f"is in {tmp} (safe to delete)") from None
    problems = check_tiny_imagenet(os.path.join(tmp, TINY_IMAGENET_FOLDER), expected_classes)
    if problems:
        raise MissingError(f"{zip_path} does not hold a complete TinyImageNet: " + "; ".join(problems)
                           + f". Its unpacked content is in {tmp}")
    os.rename(os.path.join(tmp, TINY_IMAGENET_FOLDER), root)
    os.rmdir(tmp)
    say(f"done: {root} (use --dataset TinyImageNet --data-dir {data_dir})")
    return root


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.tools.prepare_data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    im = sub.add_parser("imagenet", help="sort the Kaggle ImageNet validation images into class folders")
    im.add_argument("--src", required=True, help="unpacked Kaggle imagenet-object-localization-challenge folder")
    im.add_argument("--dest", default=None,
                    help="output root X for --data-dir X (default: ILSVRC/Data/CLS-LOC inside --src, in place)")
    im.add_argument("--csv", default=None, help="LOC_val_solution.csv (default: inside --src)")
    group = im.add_mutually_exclusive_group()
    group.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy instead of moving")
    group.add_argument("--link", dest="mode", action="store_const", const="link", help="hard links")
    group.add_argument("--symlink", dest="mode", action="store_const", const="symlink", help="symbolic links")
    group.add_argument("--undo", action="store_true", help="put back the images a previous run moved")
    im.add_argument("--dry-run", action="store_true", help="check and say what would be done")
    im.add_argument("--expected-classes", type=int, default=IMAGENET_CLASSES,
                    help="warn when the train folder holds another number of classes (0: no check)")
    im.set_defaults(mode="move")
    tiny = sub.add_parser("tinyimagenet", help="download and unpack tiny-imagenet-200.zip")
    tiny.add_argument("--data-dir", required=True, help="folder that will hold tiny-imagenet-200/")
    tiny.add_argument("--zip", default=None, help="use this zip instead of downloading")
    tiny.add_argument("--url", default=TINY_IMAGENET_URL)
    tiny.add_argument("--expected-classes", type=int, default=TINY_IMAGENET_CLASSES, help="0: no check")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "imagenet":
            if args.undo:
                undo_imagenet(args.dest or kaggle_paths(args.src)["cls_loc"])
            else:
                prepare_imagenet(args.src, args.dest, mode=args.mode, csv_path=args.csv, dry_run=args.dry_run,
                                 expected_classes=args.expected_classes)
        else:
            prepare_tiny_imagenet(args.data_dir, zip_path=args.zip, url=args.url,
                                  expected_classes=args.expected_classes)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
