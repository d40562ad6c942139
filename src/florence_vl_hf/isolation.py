"""Run Python code in a fresh interpreter in which florence_vl_hf cannot be imported.

Used to prove that a saved folder works through trust_remote_code alone, as on a machine with only transformers.
"""

import os
import subprocess
import sys
import tempfile

_BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "florence_vl_hf" or name.startswith("florence_vl_hf."):
            raise ModuleNotFoundError(f"{name} is blocked: this process must run on trust_remote_code alone")
sys.meta_path.insert(0, _Block())
"""


def run_without_package(code: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a child interpreter that cannot import florence_vl_hf; raises on a non-zero exit."""
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="florence_vl_modules_") as modules_cache:
        child_env.setdefault("HF_MODULES_CACHE", modules_cache)
        result = subprocess.run(
            [sys.executable, "-c", _BLOCKER + code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env,
        )
    if result.returncode != 0:
        raise RuntimeError(f"Isolated process failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
