import pytest

from florence_vl_hf.files import write_text_atomic


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
