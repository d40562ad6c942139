"""transformers' own common test suites, for the installed transformers release.

transformers tests each of its models with the mixins of `tests/test_modeling_common.py` (`ModelTesterMixin`),
`tests/test_configuration_common.py` (`ConfigTester`) and `tests/test_processing_common.py`
(`ProcessorTesterMixin`). They are not in transformers' wheel, only in its source distribution (sdist), which ships
them without the helper modules they import. This module

1. finds the installed transformers version (`importlib.metadata`, checked against `transformers.__version__`);
2. keeps, per version, a cache in the virtual environment: `<sys.prefix>/transformers-test-suites/<version>/`.
   The first time, it downloads the sdist of exactly that version with the environment's own pip
   (`python -m pip download --no-binary :all: --no-deps transformers==<version>`, through pip's configured index),
   or takes the file named by `$FLORENCE_VL_TRANSFORMERS_SDIST`; checks the sdist's `PKG-INFO` version; extracts
   the three suite files into a temporary folder next to the cache and renames it into place (atomic: a half-written
   cache is never seen, and of two concurrent first runs one rename wins, the other's copy is dropped);
3. lays the suites out as a package with a unique name, `SUITES_PACKAGE`, so that their relative imports resolve:

       <version>/MANIFEST.json                      version, sdist name and sha256, files
       <version>/florence_vl_transformers_suites/   __init__.py, test_*_common.py (from the sdist)
           exporters/test_export.py                 stand-ins (tests/transformers_suites/standins/),
           generation/test_utils.py                 copied in on every load, so edits to them apply
           utils/test_configuration_utils.py
       <version>/utils/fetch_hub_objects_for_ci.py  stand-in: test_processing_common.py appends `<version>/utils`
                                                    to sys.path and imports it from there

4. imports the package from that folder (without putting the folder itself on sys.path) and records what it loaded
   (`loaded_version()`, `loaded_info()`).

A failure (no index, no such release, an sdist without the suites) raises `SuitesUnavailable` with the reason and
the command that failed; the test modules call `suite()` at import, so they fail (collection error) instead of
skipping.
"""

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SUITES_PACKAGE = "florence_vl_transformers_suites"
SUITE_FILES = {
    "modeling": "test_modeling_common.py",
    "configuration": "test_configuration_common.py",
    "processing": "test_processing_common.py",
}
STANDINS_DIR = Path(__file__).resolve().parent / "standins"
# stand-in file (under STANDINS_DIR) -> its place in the cache (relative to the version folder)
STANDIN_FILES = {
    "exporters/test_export.py": f"{SUITES_PACKAGE}/exporters/test_export.py",
    "generation/test_utils.py": f"{SUITES_PACKAGE}/generation/test_utils.py",
    "utils/test_configuration_utils.py": f"{SUITES_PACKAGE}/utils/test_configuration_utils.py",
    "fetch_hub_objects_for_ci.py": "utils/fetch_hub_objects_for_ci.py",
}
PACKAGE_INITS = {
    f"{SUITES_PACKAGE}/__init__.py": (
        '"""transformers\' common test suites, from the sdist of the installed release (see tests/transformers_suites/'
        'common_suites.py).\n\nKept free of code: test_configuration_common.py runs this file once more, as '
        '`direct_transformers_import(<this folder>)`."""\n'
    ),
    f"{SUITES_PACKAGE}/exporters/__init__.py": '"""Stand-in for transformers\' tests/exporters."""\n',
    f"{SUITES_PACKAGE}/generation/__init__.py": '"""Stand-in for transformers\' tests/generation."""\n',
    f"{SUITES_PACKAGE}/utils/__init__.py": '"""Stand-in for transformers\' tests/utils."""\n',
}
SDIST_ENV = "FLORENCE_VL_TRANSFORMERS_SDIST"
CACHE_ENV = "FLORENCE_VL_TRANSFORMERS_SUITES_CACHE"
MANIFEST = "MANIFEST.json"

_loaded: dict | None = None


class SuitesUnavailable(RuntimeError):
    """transformers' common test suites could not be obtained for the installed release."""


def installed_version() -> str:
    import transformers

    version = importlib.metadata.version("transformers")
    if version != transformers.__version__:
        raise SuitesUnavailable(
            f"transformers' distribution metadata says {version} but the imported module says "
            f"{transformers.__version__} ({transformers.__file__}): the environment is inconsistent"
        )
    return version


def cache_dir(version: str) -> Path:
    base = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else Path(sys.prefix) / "transformers-test-suites"
    return base / version


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_sdist(version: str, into: Path) -> Path:
    local = os.environ.get(SDIST_ENV)
    if local:
        path = Path(local)
        if not path.is_file():
            raise SuitesUnavailable(f"${SDIST_ENV} names {path}, which is not a file")
        return path
    command = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
        f"transformers=={version}", "-d", str(into),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SuitesUnavailable(f"`{' '.join(command)}` could not run: {error}") from error
    sdists = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not sdists:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise SuitesUnavailable(
            f"The sdist of transformers=={version} (the installed release), which holds transformers' common test "
            f"suites, could not be downloaded: `{' '.join(command)}` exited with {result.returncode}:\n"
            + "\n".join(output[-15:])
            + f"\nMake the package index reachable, or point ${SDIST_ENV} at transformers-{version}.tar.gz."
        )
    return sdists[0]


def _extract(sdist: Path, version: str, into: Path) -> list[str]:
    top = f"transformers-{version}"
    wanted = {f"{top}/tests/{name}": name for name in SUITE_FILES.values()}
    package = into / SUITES_PACKAGE
    package.mkdir(parents=True)
    found = []
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            info = archive.extractfile(f"{top}/PKG-INFO")
            metadata = info.read().decode("utf-8", "replace") if info is not None else ""
            if f"\nVersion: {version}\n" not in metadata:
                raise SuitesUnavailable(f"{sdist.name} is not the sdist of transformers {version} (see its PKG-INFO)")
            for member in archive.getmembers():
                if member.name in wanted and member.isfile():
                    (package / wanted[member.name]).write_bytes(archive.extractfile(member).read())
                    found.append(wanted[member.name])
    except (tarfile.TarError, KeyError, OSError) as error:
        raise SuitesUnavailable(f"{sdist} could not be read as transformers' sdist: {error}") from error
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise SuitesUnavailable(f"{sdist.name} has no tests/{', tests/'.join(missing)}")
    return sorted(found)


def _populate(root: Path, version: str):
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="transformers-sdist-") as download_dir:
            sdist = _download_sdist(version, Path(download_dir))
            files = _extract(sdist, version, staging)
            manifest = {
                "transformers_version": version,
                "source": "sdist",
                "sdist_from": f"${SDIST_ENV}" if os.environ.get(SDIST_ENV) else "pip download (pip's configured index)",
                "sdist": sdist.name,
                "sdist_sha256": _sha256(sdist),
                "files": files,
            }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(staging, root)
        except OSError as error:
            if not (root / MANIFEST).is_file():  # not a concurrent first run that got there first
                raise SuitesUnavailable(f"The cache {root} could not be created ({error}); remove it and retry") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_if_changed(path: Path, content: bytes):
    if path.is_file() and path.read_bytes() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(handle, "wb") as stream:
        stream.write(content)
    os.replace(temporary, path)


def _install_standins(root: Path):
    for relative, content in PACKAGE_INITS.items():
        _write_if_changed(root / relative, content.encode())
    for source, target in STANDIN_FILES.items():
        _write_if_changed(root / target, (STANDINS_DIR / source).read_bytes())


def _import_package(root: Path):
    existing = sys.modules.get(SUITES_PACKAGE)
    location = root / SUITES_PACKAGE
    if existing is not None:
        if Path(existing.__file__).resolve().parent != location.resolve():
            raise SuitesUnavailable(f"{SUITES_PACKAGE} is already imported from {existing.__file__}, not {location}")
        return existing
    spec = importlib.util.spec_from_file_location(
        SUITES_PACKAGE, location / "__init__.py", submodule_search_locations=[str(location)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[SUITES_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[SUITES_PACKAGE]
        raise
    return module


def load() -> dict:
    """Make sure the suites of the installed transformers are cached and importable; returns what was loaded."""
    global _loaded
    if _loaded is not None:
        return _loaded
    version = installed_version()
    root = cache_dir(version)
    if not (root / MANIFEST).is_file():
        _populate(root, version)
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("transformers_version") != version:
        raise SuitesUnavailable(f"{root / MANIFEST} is for transformers {manifest.get('transformers_version')}")
    _install_standins(root)
    _import_package(root)
    _loaded = {**manifest, "cache": str(root)}
    return _loaded


def suite(name: str):
    """The module of one suite: "modeling", "configuration" or "processing" (downloaded on first use)."""
    if name not in SUITE_FILES:
        raise ValueError(f"Unknown suite {name!r}; choose one of {sorted(SUITE_FILES)}")
    load()
    return importlib.import_module(f"{SUITES_PACKAGE}.{SUITE_FILES[name][:-3]}")


def loaded_info() -> dict | None:
    """The manifest of the loaded suites (version, sdist, sha256, cache folder), or None before `load()`."""
    return _loaded


def loaded_version() -> str | None:
    """The transformers version whose suites were loaded, or None before `load()`."""
    return _loaded["transformers_version"] if _loaded else None


def describe() -> str:
    """One line for pytest's header: "transformers common suites: <version> (sdist)"."""
    if _loaded is None:
        return "transformers common suites: not loaded"
    return f"transformers common suites: {_loaded['transformers_version']} ({_loaded['source']})"
