"""Bad data folders and data configs are refused with one sentence naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from orchestrator.data import DataConfig, DataError, check_data_folder, read_classes
from orchestrator.data.loaders import build_loaders


def test_missing_data_folder_names_it_and_the_command(tmp_path):
    """A data folder that does not exist: the message names it and the command that makes it."""
    with pytest.raises(DataError, match=f"The data folder {tmp_path / 'nope'} does not exist") as error:
        check_data_folder(tmp_path / "nope")
    assert f"--out {tmp_path / 'nope'}`" in str(error.value)


def test_missing_files_are_named(tmp_path):
    """A data folder without val.beton and classes.json: both are named."""
    (tmp_path / "train.beton").write_bytes(b"")
    with pytest.raises(DataError, match="has no val.beton, classes.json; create it"):
        read_classes(tmp_path)


def test_unknown_data_key_is_named():
    """A misspelt key in the data config is rejected, naming it."""
    with pytest.raises(ValidationError, match="batchsize"):
        DataConfig(path="x", batchsize=4)


def test_progressive_schedule_must_move_forward():
    """A progressive schedule that ends before it starts is rejected, naming both epochs."""
    with pytest.raises(ValidationError, match=r"progressive.end_epoch \(2\) must be greater"):
        DataConfig(path="x", progressive={"start_res": 160, "end_res": 192, "start_epoch": 5, "end_epoch": 2})


def test_progressive_resolution_schedule():
    """Linear from start_res to end_res between the two epochs, rounded down to a multiple of step."""
    cfg = DataConfig(path="x", progressive={"start_res": 160, "end_res": 192, "start_epoch": 2, "end_epoch": 6})
    assert [cfg.resolution_for(e) for e in range(8)] == [160, 160, 160, 160, 160, 160, 192, 192]
    cfg = DataConfig(path="x", progressive={"start_res": 96, "end_res": 192, "start_epoch": 0, "end_epoch": 3})
    assert [cfg.resolution_for(e) for e in range(4)] == [96, 128, 160, 192]
    assert DataConfig(path="x", train_resolution=176).resolution_for(9) == 176


def test_distributed_without_a_process_group(digits):
    """distributed=True outside a process group is refused before FFCV is asked to shard."""
    with pytest.raises(DataError, match="needs an initialised torch.distributed process group"):
        build_loaders(DataConfig(path=str(digits)), rank=0, world_size=2, device=torch.device("cpu"),
                      distributed=True)


def test_train_crop_scale_must_be_an_ordered_fraction_range():
    """A crop-scale range outside (0, 1] or with low > high must be rejected, naming the field."""
    import pytest
    from pydantic import ValidationError

    from orchestrator.data.config import DataConfig

    assert DataConfig(path="x", train_crop_scale=(0.35, 1.0)).train_crop_scale == (0.35, 1.0)
    for bad in ((0.0, 1.0), (0.9, 0.5), (0.5, 1.5)):
        with pytest.raises(ValidationError, match="train_crop_scale"):
            DataConfig(path="x", train_crop_scale=bad)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from orchestrator.data.embedded import write_embedded_digits
    return write_embedded_digits(tmp_path_factory.mktemp("digits") / "digits")


def _copy(digits, tmp_path):
    import shutil
    folder = tmp_path / "data"
    shutil.copytree(digits, folder)
    return folder


def test_classes_must_match_num_classes(digits, tmp_path):
    """classes.json with 10 classes against a config of 1000: the sentence gives both numbers and the fix."""
    with pytest.raises(DataError, match=r"has 10 classes \(classes.json\) but the config says num_classes: 1000; "
                                        r"set data.num_classes to 10"):
        check_data_folder(digits, num_classes=1000)
    assert len(check_data_folder(digits, num_classes=10)) == 10


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.write_bytes(b"PK\x03\x04 a zip file, not FFCV" * 200), "format version"),
    (lambda f: f.write_bytes(f.read_bytes()[:3000]), "truncated"),
    (lambda f: f.write_bytes(b"\x02\x00"), "shorter than an FFCV header"),
])
def test_foreign_beton_is_named_before_any_loader(digits, tmp_path, damage, problem):
    """A .beton that FFCV did not write (another format, cut short) is named with what is wrong with it,
    instead of FFCV's empty AssertionError inside a worker; the rest of the folder is untouched."""
    folder = _copy(digits, tmp_path)
    damage(folder / "val.beton")
    before = (folder / "train.beton").read_bytes()
    with pytest.raises(DataError, match=f"{folder / 'val.beton'} is not a data file this pipeline wrote "
                                        f"\\(.*{problem}.*\\); write the data folder again"):
        check_data_folder(folder, num_classes=10)
    assert (folder / "train.beton").read_bytes() == before


def test_manifest_digest_follows_the_data_not_the_path(digits, tmp_path):
    """The digest is the same for a copy of the folder and changes when a split or the classes change."""
    from orchestrator.data.folder import manifest_digest
    copy = _copy(digits, tmp_path)
    assert manifest_digest(copy) == manifest_digest(digits) != "absent"
    (copy / "classes.json").write_text('{"a": 0}')
    assert manifest_digest(copy) != manifest_digest(digits)
    assert manifest_digest(tmp_path / "nowhere") == "absent"
