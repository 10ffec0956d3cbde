"""Outputs written after the work (predict --out, export --out, the report) are written whole or not at all: a
full disk or a folder that cannot be made is one line, no 0-byte or truncated file is left under the name, and an
older file there stays as it was."""

from __future__ import annotations

import json

import pytest

from pipeline.atomic import NAME_MAX, temporary_name, write_atomically
from pipeline.errors import RunError
from pipeline.predict import _save_export, write_predictions

ROWS = [{"path": f"img_{i:05d}.jpg", "label": "ant", "probability": 0.9, "probs": {"ant": 0.9, "bee": 0.1}}
        for i in range(20_000)]  # ~1 MB of CSV: more than the small disk holds


def _nothing_left(folder, name):
    assert [p.name for p in folder.iterdir() if p.name != name and name in p.name] == []


def test_a_full_disk_is_one_line_and_keeps_the_older_file(small_tmpfs):
    out = small_tmpfs / "predictions.csv"
    out.write_text("older predictions\n")
    with pytest.raises(RunError) as err:
        write_predictions(ROWS, ["ant", "bee"], out)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot write the predictions to {out} (No space left on device)")
    assert "nothing was written under that name" in msg
    assert out.read_text() == "older predictions\n"  # not truncated, not replaced
    _nothing_left(small_tmpfs, "predictions.csv")
    with pytest.raises(RunError, match="cannot write the predictions to .*json"):
        write_predictions(ROWS, ["ant", "bee"], small_tmpfs / "p.json")
    assert not (small_tmpfs / "p.json").exists()
    _nothing_left(small_tmpfs, "p.json")


def test_an_exported_model_that_does_not_fit_leaves_no_truncated_file(small_tmpfs):
    class Big:  # stands in for a Keras model: save writes more than the disk holds
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"\0" * 1_000_000)

    out = small_tmpfs / "model.keras"
    with pytest.raises(RunError, match="cannot write the exported model to .*model.keras"):
        _save_export(Big(), out, {"class_names": ["a", "b"]})
    assert list(small_tmpfs.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where the output's folder should be: fails even for root
    for write in (lambda out: write_predictions(ROWS[:2], ["ant", "bee"], out / "p.csv"),
                  lambda out: write_atomically(out / "report.html", lambda t: t.write_text("<html>"), "the report")):
        with pytest.raises(RunError) as err:
            write(blocker / "sub")
        assert "\n" not in str(err.value) and "Not a directory" in str(err.value)
    assert blocker.read_text() == "x"


def test_interrupted_writes_leave_no_temporary_and_long_names_fit(tmp_path):
    out = tmp_path / "r.json"

    def interrupted(tmp):
        tmp.write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, interrupted, "the report")
    assert list(tmp_path.iterdir()) == []
    long = tmp_path / ("p" * 250 + ".csv")  # 254 bytes: the name fits, its temporary must too
    assert len(temporary_name(long).name.encode()) <= NAME_MAX and temporary_name(long).suffix == ".csv"
    write_atomically(long, lambda t: t.write_text(json.dumps([1])), "the predictions")
    assert long.read_text() == "[1]" and [p.name for p in tmp_path.iterdir()] == [long.name]


def test_outputs_the_disk_cannot_hold_are_refused_before_any_model_is_built(small_tmpfs, tmp_path):
    from pipeline.atomic import check_free_space
    from pipeline.predict import export_size, predictions_size

    (small_tmpfs / "filler").write_bytes(b"\0" * 200_000)  # about 56 kB of the 256 kB disk left
    with pytest.raises(RunError) as err:
        check_free_space(small_tmpfs / "model.keras", 10_000_000, "the exported model")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"not enough free space for the exported model at {small_tmpfs}")
    assert "about 10.0 MB needed" in msg and "nothing was done" in msg
    check_free_space(small_tmpfs / "small.csv", 1_000, "the predictions")  # what fits passes
    # the estimates: predictions grow with the files and classes; an export counts the weights file and the head
    files = [tmp_path / f"{i:04d}.jpg" for i in range(1000)]
    assert predictions_size(files, ["a", "b"], "p.json") > predictions_size(files, ["a", "b"], "p.csv") > 2 * 1000 * 60
    weights, head = tmp_path / "w.h5", tmp_path / "h.keras"
    weights.write_bytes(b"\0" * 100_000)
    head.write_bytes(b"\0" * 1_000)
    assert export_size(str(weights), head) >= 2 * 101_000 and export_size("imagenet", head) >= 2_000
