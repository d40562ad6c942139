import pytest

import os

from florence_vl_hf.files import replace_dir, sibling_prefix, write_text_atomic


def test_write_text_atomic_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "new" / "report.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"

    def fail(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr("florence_vl_hf.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "third")
    assert target.read_text() == "second" and [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_sibling_names_of_a_255_byte_name_stay_valid_and_stable(tmp_path):
    long = tmp_path / ("é" * 127)  # 254 bytes: valid, but `.NAME.partial-...` would not be
    prefix = sibling_prefix(long, "partial")
    assert prefix == sibling_prefix(long, "partial") and prefix.endswith(".partial-") and prefix.startswith(".éé")
    assert sibling_prefix(long, "old") != prefix
    assert sibling_prefix(tmp_path / ("é" * 126), "partial") != prefix  # the hash tells near names apart
    (tmp_path / f"{prefix}4294967295-0123abcd").mkdir()  # the longest a caller appends
    write_text_atomic(long, "x")
    assert long.read_text() == "x"
    assert sibling_prefix(tmp_path / "out", "partial") == ".out.partial-"


def folder(path, files: dict):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_replace_dir_moves_a_folder_into_place_and_replaces_an_old_one_whole(tmp_path):
    replace_dir(folder(tmp_path / "new", {"a.txt": "1"}), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "1"
    replace_dir(folder(tmp_path / "newer", {"b.txt": "2"}), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]  # nothing of the old folder is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nor its retired copy


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    old = folder(tmp_path / "out", {"kept.txt": "old"})
    new = folder(tmp_path / "new", {"lost.txt": "new"})
    real_replace = os.replace

    def fail_for_the_new_folder(source, destination):
        if source == new:
            raise OSError("no space left")
        real_replace(source, destination)

    monkeypatch.setattr("florence_vl_hf.files.os.replace", fail_for_the_new_folder)
    with pytest.raises(OSError, match="no space left"):
        replace_dir(new, old)
    assert [p.name for p in old.iterdir()] == ["kept.txt"] and (old / "kept.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # the caller still holds its new folder

