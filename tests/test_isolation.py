import tempfile

import pytest

from florence_vl_hf.isolation import run_without_package


def test_the_child_cannot_import_the_package_and_leaves_no_module_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("HF_MODULES_CACHE", raising=False)
    result = run_without_package("import os, transformers; print(os.environ['HF_MODULES_CACHE'])")
    assert result.stdout.strip().startswith(str(tmp_path / "florence_vl_modules_"))
    with pytest.raises(RuntimeError, match="florence_vl_hf is blocked"):
        run_without_package("import florence_vl_hf")
    assert list(tmp_path.iterdir()) == []
