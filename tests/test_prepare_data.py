"""sh/prepare_imagenet.sh and sh/prepare_tinyimagenet.sh (utils/tools/prepare_data.py) on small fake trees."""
import os
import subprocess
import zipfile

import pytest

from utils.tools.prepare_data import check_tiny_imagenet, prepare_imagenet, prepare_tiny_imagenet, undo_imagenet
from utils.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WNIDS = ["n01440764", "n01443537", "n01484850"]
VAL = {"ILSVRC2012_val_00000001": "n01443537", "ILSVRC2012_val_00000002": "n01440764",
       "ILSVRC2012_val_00000003": "n01484850", "ILSVRC2012_val_00000004": "n01443537"}


def run_sh(script, *args, cwd=None):
    return subprocess.run(["bash", os.path.join(ROOT, "sh", script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT)


def snapshot(top):
    """{relative path: file content} of every file under `top` (symlinks followed)."""
    out = {}
    for d, _, files in os.walk(top, followlinks=True):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, top)] = fh.read()
    return out


def fake_kaggle(root, val=VAL, csv=True):
    """Kaggle layout with tiny files: each 'image' holds its own name (so moves can be traced)."""
    cls = root / "ILSVRC" / "Data" / "CLS-LOC"
    for w in WNIDS:
        (cls / "train" / w).mkdir(parents=True)
        (cls / "train" / w / f"{w}_1.JPEG").write_bytes(f"train {w}".encode())
    (cls / "val").mkdir(parents=True)
    for image_id in val:
        (cls / "val" / f"{image_id}.JPEG").write_bytes(image_id.encode())
    if csv:
        lines = ["ImageId,PredictionString"]
        lines += [f"{i},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in val.items()]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return cls


def test_imagenet_in_place_idempotent_and_undo(tmp_path):
    cls = fake_kaggle(tmp_path)
    before = snapshot(tmp_path)
    r = run_sh("prepare_imagenet.sh", "--src", tmp_path, "--expected-classes", 3)
    assert r.returncode == 0, r.stderr
    for image_id, w in VAL.items():
        assert (cls / "val" / w / f"{image_id}.JPEG").read_bytes() == image_id.encode()
        assert not (cls / "val" / f"{image_id}.JPEG").exists()
    assert sorted(os.listdir(cls / "val")) == sorted(set(VAL.values()))
    after = snapshot(tmp_path)

    again = run_sh("prepare_imagenet.sh", "--src", tmp_path, "--expected-classes", 3)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert snapshot(tmp_path) == after  # the second run changed nothing

    undo = run_sh("prepare_imagenet.sh", "--src", tmp_path, "--undo")
    assert undo.returncode == 0, undo.stderr
    assert "4 images moved back" in undo.stdout
    restored = {k: v for k, v in snapshot(tmp_path).items() if ".journal" not in k}
    assert restored == before
    assert not any(os.path.isdir(cls / "val" / w) for w in WNIDS)  # the class folders it made are gone
    assert any(n.startswith(".prepare_imagenet.journal.tsv.undone-") for n in os.listdir(cls))  # kept, renamed


def test_imagenet_separate_dest_gives_loader_layout(tmp_path):
    src, dest = tmp_path / "kaggle", tmp_path / "imagenet"
    cls = fake_kaggle(src)
    r = run_sh("prepare_imagenet.sh", "--src", src, "--dest", dest, "--expected-classes", 3)
    assert r.returncode == 0, r.stderr
    assert os.path.islink(dest / "train") and os.path.samefile(dest / "train", cls / "train")
    assert sorted(os.listdir(dest / "val")) == sorted(set(VAL.values()))
    assert not any(n.endswith(".JPEG") for n in os.listdir(cls / "val"))  # moved out of the source
    undo = run_sh("prepare_imagenet.sh", "--src", src, "--dest", dest, "--undo")
    assert undo.returncode == 0, undo.stderr
    assert sorted(os.listdir(cls / "val")) == sorted(f"{i}.JPEG" for i in VAL)
    assert not os.path.lexists(dest / "train")


@pytest.mark.parametrize("mode", ["copy", "link", "symlink"])
def test_imagenet_copy_and_link_modes_leave_the_source(tmp_path, mode):
    src, dest = tmp_path / "kaggle", tmp_path / "imagenet"
    fake_kaggle(src)
    before = snapshot(src)
    result = prepare_imagenet(str(src), str(dest), mode=mode, expected_classes=3, say=lambda m: None)
    assert result["placed"] == len(VAL)
    assert snapshot(src) == before
    for image_id, w in VAL.items():
        target = dest / "val" / w / f"{image_id}.JPEG"
        assert target.read_bytes() == image_id.encode()
        assert os.path.islink(target) == (mode == "symlink")
    again = prepare_imagenet(str(src), str(dest), mode=mode, expected_classes=3, say=lambda m: None)
    assert again == {"placed": 0, "already": len(VAL), "dest": str(dest)}


def test_imagenet_resumes_an_interrupted_move(tmp_path):
    """Half the images already in class folders (an earlier run was killed): the rest is moved, and undo
    restores the half that the journal recorded."""
    cls = fake_kaggle(tmp_path)
    first = sorted(VAL)[:2]
    partial = {i: VAL[i] for i in first}
    # simulate the interrupted run with the library on a CSV holding only the first two
    (tmp_path / "part.csv").write_text("ImageId,PredictionString\n"
                                       + "".join(f"{i},{w} 1 2 3 4\n" for i, w in partial.items()))
    prepare_imagenet(str(tmp_path), mode="move", csv_path=str(tmp_path / "part.csv"), expected_classes=3,
                     say=lambda m: None)
    messages = []
    result = prepare_imagenet(str(tmp_path), mode="move", expected_classes=3, say=messages.append)
    assert result["placed"] == 2 and result["already"] == 2
    assert "2 already there" in " ".join(messages)
    undo_imagenet(str(cls), say=lambda m: None)
    assert sorted(os.listdir(cls / "val")) == sorted(f"{i}.JPEG" for i in VAL)


def test_imagenet_missing_csv_exit_2_and_nothing_changed(tmp_path):
    fake_kaggle(tmp_path, csv=False)
    before = snapshot(tmp_path)
    r = run_sh("prepare_imagenet.sh", "--src", tmp_path)
    assert r.returncode == 2
    assert "LOC_val_solution.csv" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before


def test_imagenet_missing_pieces_are_all_named(tmp_path):
    r = run_sh("prepare_imagenet.sh", "--src", tmp_path)  # empty folder: everything missing
    assert r.returncode == 2
    for piece in ("CLS-LOC/train", "CLS-LOC/val", "LOC_val_solution.csv"):
        assert piece in r.stderr


def test_imagenet_missing_images_exit_2_before_any_move(tmp_path):
    cls = fake_kaggle(tmp_path)
    os.remove(cls / "val" / "ILSVRC2012_val_00000003.JPEG")
    before = snapshot(tmp_path)
    r = run_sh("prepare_imagenet.sh", "--src", tmp_path, "--expected-classes", 3)
    assert r.returncode == 2
    assert "1 of the 4 validation images" in r.stderr and "ILSVRC2012_val_00000003" in r.stderr
    assert snapshot(tmp_path) == before


def test_imagenet_unknown_wnid_and_dry_run(tmp_path):
    cls = fake_kaggle(tmp_path, val={**VAL, "ILSVRC2012_val_00000009": "n99999999"})
    r = run_sh("prepare_imagenet.sh", "--src", tmp_path)
    assert r.returncode == 2 and "n99999999" in r.stderr
    os.remove(cls / "val" / "ILSVRC2012_val_00000009.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{i},{w} 1 2 3 4\n" for i, w in VAL.items()))
    before = snapshot(tmp_path)
    dry = run_sh("prepare_imagenet.sh", "--src", tmp_path, "--dry-run", "--expected-classes", 3)
    assert dry.returncode == 0, dry.stderr
    assert "move 4 validation images" in dry.stdout
    assert snapshot(tmp_path) == before


def test_imagenet_bad_csv_header(tmp_path):
    fake_kaggle(tmp_path)
    (tmp_path / "LOC_val_solution.csv").write_text("a,b\nx,y\n")
    with pytest.raises(UsageError, match="ImageId,PredictionString"):
        prepare_imagenet(str(tmp_path), say=lambda m: None)


# ----------------------------------------------------------------------------------------------------------
# TinyImageNet
# ----------------------------------------------------------------------------------------------------------

def fake_tiny_zip(path, n_classes=2, drop=None):
    """A miniature tiny-imagenet-200.zip: `n_classes` classes, 2 train images each, 2 val images."""
    wnids = [f"n0000000{i}" for i in range(n_classes)]
    files = {"tiny-imagenet-200/wnids.txt": "\n".join(wnids) + "\n", "tiny-imagenet-200/words.txt": ""}
    for w in wnids:
        files[f"tiny-imagenet-200/train/{w}/{w}_boxes.txt"] = ""
        for k in range(2):
            files[f"tiny-imagenet-200/train/{w}/images/{w}_{k}.JPEG"] = "jpeg"
    files["tiny-imagenet-200/val/val_annotations.txt"] = "".join(
        f"val_{k}.JPEG\t{wnids[k % n_classes]}\t0\t0\t63\t63\n" for k in range(2))
    for k in range(2):
        files[f"tiny-imagenet-200/val/images/val_{k}.JPEG"] = "jpeg"
    files["tiny-imagenet-200/test/images/test_0.JPEG"] = "jpeg"
    if drop:
        files.pop(drop)
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_tiny_imagenet_from_local_zip_then_skip(tmp_path):
    zp = fake_tiny_zip(tmp_path / "tiny.zip")
    data = tmp_path / "data"
    r = run_sh("prepare_tinyimagenet.sh", data, "--zip", zp, "--expected-classes", 2)
    assert r.returncode == 0, r.stderr
    root = data / "tiny-imagenet-200"
    assert check_tiny_imagenet(str(root), expected_classes=2) == []
    assert (root / "val" / "images" / "val_1.JPEG").is_file()
    assert sorted(os.listdir(data)) == ["tiny-imagenet-200"]  # no temporary folder left behind
    again = run_sh("prepare_tinyimagenet.sh", data, "--zip", zp, "--expected-classes", 2)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_tiny_imagenet_loader_reads_the_result(tmp_path):
    from PIL import Image
    zp = tmp_path / "tiny.zip"
    fake_tiny_zip(zp)
    data = tmp_path / "data"
    prepare_tiny_imagenet(str(data), zip_path=str(zp), expected_classes=2, say=lambda m: None)
    for d, _, files in os.walk(data):  # real (tiny) JPEGs so that the loader can open them
        for f in files:
            if f.endswith(".JPEG"):
                Image.new("RGB", (64, 64), (10, 20, 30)).save(os.path.join(d, f), format="JPEG")
    from utils.data import build_datasets
    train, test = build_datasets("TinyImageNet", str(data))
    assert len(train) == 4 and len(test) == 2
    assert test[1][0].shape == (3, 64, 64)


def test_tiny_imagenet_zip_found_in_data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    fake_tiny_zip(data / "tiny-imagenet-200.zip")
    root = prepare_tiny_imagenet(str(data), url="http://127.0.0.1:9/never-fetched.zip", expected_classes=2,
                                 say=lambda m: None)
    assert os.path.isdir(os.path.join(root, "train"))


def test_tiny_imagenet_offline_message(tmp_path):
    r = run_sh("prepare_tinyimagenet.sh", tmp_path / "data", "--url", "http://127.0.0.1:9/tiny-imagenet-200.zip")
    assert r.returncode == 2
    assert "could not download" in r.stderr
    assert os.path.join(str(tmp_path / "data"), "tiny-imagenet-200.zip") in r.stderr  # where to put it
    assert "Traceback" not in r.stderr


def test_tiny_imagenet_incomplete_zip_is_reported(tmp_path):
    zp = fake_tiny_zip(tmp_path / "tiny.zip", drop="tiny-imagenet-200/val/val_annotations.txt")
    data = tmp_path / "data"
    r = run_sh("prepare_tinyimagenet.sh", data, "--zip", zp, "--expected-classes", 2)
    assert r.returncode == 2
    assert "val_annotations.txt" in r.stderr
    assert not (data / "tiny-imagenet-200").exists()  # never a half folder in place


def test_tiny_imagenet_wrong_class_count_and_damaged_zip(tmp_path):
    zp = fake_tiny_zip(tmp_path / "tiny.zip", n_classes=2)
    with pytest.raises(UsageError, match="2 classes, 200 expected"):
        prepare_tiny_imagenet(str(tmp_path / "a"), zip_path=str(zp), say=lambda m: None)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip")
    r = run_sh("prepare_tinyimagenet.sh", tmp_path / "b", "--zip", bad)
    assert r.returncode == 2 and "damaged" in r.stderr


def test_tiny_imagenet_existing_incomplete_folder_is_not_touched(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "train").mkdir(parents=True)
    (root / "keep.txt").write_text("mine")
    r = run_sh("prepare_tinyimagenet.sh", tmp_path, "--zip", fake_tiny_zip(tmp_path / "t.zip"))
    assert r.returncode == 2
    assert "incomplete" in r.stderr and "wnids.txt" in r.stderr
    assert (root / "keep.txt").read_text() == "mine"


def test_tiny_imagenet_rejects_members_outside_the_folder(tmp_path):
    zp = tmp_path / "evil.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        zf.writestr("tiny-imagenet-200/../../escape.txt", "x")
    with pytest.raises(UsageError, match="outside"):
        prepare_tiny_imagenet(str(tmp_path / "d"), zip_path=str(zp), say=lambda m: None)
    assert not (tmp_path / "escape.txt").exists()
