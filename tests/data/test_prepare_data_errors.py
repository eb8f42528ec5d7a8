"""Bad input to `pipelines/prepare_data.py`: each case fails with one clear sentence (and exit code 2)."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from .helpers import load_prepare_data, make_image_folder

prepare_data = load_prepare_data()


def run_cli(capsys, *args) -> tuple[int, str]:
    code = prepare_data.main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_sentence(stderr: str) -> str:
    """The error line: exactly one, after any progress bars (which tqdm draws on stderr too)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert errors[0].rstrip().endswith("."), errors[0]
    return errors[0]


@pytest.fixture
def tree(tmp_path):
    made = make_image_folder(tmp_path / "src", per_class={"train": 3, "val": 2})
    return tmp_path / "src", made


def test_missing_src_is_named(capsys, tmp_path):
    """Neither --src nor --embedded: the message says which option to pass."""
    code, err = run_cli(capsys, "--out", tmp_path / "out")
    assert code == 2
    assert "Pass --src DIR" in one_sentence(err)


def test_src_that_does_not_exist(capsys, tmp_path):
    """A --src folder that does not exist is named in the message."""
    code, err = run_cli(capsys, "--src", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert code == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in one_sentence(err)


def test_no_class_folders(capsys, tmp_path):
    """train/ with images but no class sub-folders is refused, saying classes need sub-folders."""
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "val").mkdir()
    code, err = run_cli(capsys, "--src", tmp_path / "src", "--out", tmp_path / "out")
    assert code == 2
    assert "has no class folders" in one_sentence(err)


def test_train_and_val_with_different_classes(capsys, tree, tmp_path):
    """A class in val/ that train/ lacks is refused, naming the class and the split it is in."""
    src, _ = tree
    shutil.copytree(src / "val" / "bee", src / "val" / "wasp")
    code, err = run_cli(capsys, "--src", src, "--out", tmp_path / "out")
    assert code == 2
    assert "only in val: wasp" in one_sentence(err)
    assert "only in train: none" in err


def test_empty_class(capsys, tree, tmp_path):
    """A class folder with no images is refused, naming the folder."""
    src, _ = tree
    for image in (src / "val" / "cat").iterdir():
        image.unlink()
    code, err = run_cli(capsys, "--src", src, "--out", tmp_path / "out")
    assert code == 2
    assert f"{src / 'val' / 'cat'} has no images" in one_sentence(err)


def test_unwritable_output_folder(capsys, tree, tmp_path):
    """An --out that cannot be created (here under a regular file; tests run as root) is refused."""
    src, _ = tree
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(capsys, "--src", src, "--out", blocker / "out")
    assert code == 2
    assert f"Cannot write to the output folder {blocker / 'out'}" in one_sentence(err)


def test_invalid_writer_option_names_the_flag(capsys, tree, tmp_path):
    """A page size FFCV cannot use is refused, naming the command-line flag."""
    src, _ = tree
    code, err = run_cli(capsys, "--src", src, "--out", tmp_path / "out", "--page-size-mib", "3")
    assert code == 2
    assert "Invalid --page-size-mib" in one_sentence(err)


def corrupt(src):
    """One garbage file and one truncated JPEG among 9 training and 6 validation images."""
    (src / "train" / "ant" / "garbage.jpg").write_bytes(b"not an image at all")
    jpeg = io.BytesIO()
    Image.open(src / "val" / "bee" / "000.png").save(jpeg, "JPEG", quality=90)
    (src / "val" / "bee" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return {src / "train" / "ant" / "garbage.jpg", src / "val" / "bee" / "truncated.jpg"}


def listed(out):
    return {line.split("\t")[0] for line in (out / "skipped.txt").read_text().splitlines()}


def test_too_many_unreadable_images_fail_and_are_listed(capsys, tree, tmp_path):
    """More unreadable images than --max-bad-fraction: the run fails, counts them, lists them in skipped.txt,
    and writes no .beton."""
    src, _ = tree
    bad = corrupt(src)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--src", src, "--out", out, "--max-bad-fraction", "0.05", "--workers", "2")
    assert code == 2
    assert "2 of 17 images are unreadable" in one_sentence(err)
    assert listed(out) == {str(p) for p in bad}
    assert not list(out.glob("*.beton"))


def test_few_unreadable_images_are_skipped(capsys, tree, tmp_path):
    """Unreadable images within --max-bad-fraction are skipped, counted and listed; the rest is written."""
    from ffcv.reader import Reader

    src, made = tree
    bad = corrupt(src)
    out = tmp_path / "out"
    code = prepare_data.main(["--src", str(src), "--out", str(out), "--max-bad-fraction", "0.2"])
    assert code == 0
    assert "2 unreadable images skipped" in capsys.readouterr().out
    assert listed(out) == {str(p) for p in bad}
    assert Reader(str(out / "train.beton")).num_samples == len(made["train"])
    assert Reader(str(out / "val.beton")).num_samples == len(made["val"])
