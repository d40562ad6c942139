"""Stand-in for transformers' `utils/fetch_hub_objects_for_ci.py`, which its sdist does not ship.

`test_processing_common.py` maps the Hub URLs of its sample inputs (`MODALITY_INPUT_DATA`, the chat-template tests)
to local files with `url_to_local_path`. Nothing is ever downloaded here:

- an image URL (.png, .jpg, .jpeg, .webp, .bmp, .gif) becomes a PNG generated in `hub_objects/` next to this file: an
  RGB 640x480 image (the size of transformers' coco_sample.png) whose pixels are a fixed function of their
  coordinates and of the file name, so every run gets the same bytes;
- any other URL (videos, audio: Florence-VL's processor takes neither) becomes a path in `hub_objects/missing/` that
  does not exist, so a test that tried to read it would fail on the missing file instead of reaching the network.
"""

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_SIZE = (640, 480)
OBJECTS_DIR = Path(__file__).resolve().parent / "hub_objects"


def _local_name(url: str) -> str:
    name = os.path.basename(urlparse(url).path) or "object"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{digest}-{name}"


def _write_image(path: Path, seed: int):
    import numpy as np
    from PIL import Image

    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(x * 255) // (width - 1), (y * 255) // (height - 1), ((x // 16 + y // 16) * 37 + seed) % 256], axis=-1
    ).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(handle)
    try:
        Image.fromarray(pixels, "RGB").save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def url_to_local_path(url, return_url_if_not_found=True):
    """Local stand-in file for `url` (see the module docstring); a path that is not a URL is returned unchanged."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return url
    name = _local_name(url)
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return str(OBJECTS_DIR / "missing" / name)
    path = (OBJECTS_DIR / name).with_suffix(".png")
    if not path.is_file():
        _write_image(path, seed=int(hashlib.sha256(name.encode()).hexdigest()[:4], 16) % 256)
    return str(path)
