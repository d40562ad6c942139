import pytest

from florence_vl_hf.files import sibling_prefix, write_text_atomic


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
