"""Downloading a registry model once, verified by size and sha256, written atomically into the cache."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from explainer import limits
from explainer.cache import write_error
from explainer.errors import DownloadError

CHUNK = 1 << 16


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, size: int | None = None, *, verbose: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with the right checksum is already there."""
    dest = Path(dest)
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    if not url.startswith(("https://", "http://")):
        raise DownloadError(f"refusing to download from {url!r}: only http(s) URLs are allowed.")
    fix = f"Download it yourself from {url} and save it as {dest} (sha256 {sha256})."
    h, received, tmp = hashlib.sha256(), 0, None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError) as exc:
                raise DownloadError(f"cannot download {url}: {exc}. {fix}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or size
                limit = min(limits.MAX_DOWNLOAD_BYTES, size or limits.MAX_DOWNLOAD_BYTES)
                from tqdm.auto import tqdm

                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                          disable=not verbose) as bar:
                    while True:
                        try:
                            block = response.read(CHUNK)
                        except OSError as exc:
                            raise DownloadError(f"download of {url} broke off: {exc}. {fix}") from None
                        if not block:
                            break
                        received += len(block)
                        if received > limit:
                            raise DownloadError(
                                f"{url} sent more than the expected {limit} bytes; refused. {fix}")
                        h.update(block)
                        out.write(block)
                        bar.update(len(block))
        if size is not None and received != size:
            raise DownloadError(f"{url} sent {received} bytes, expected {size}. {fix}")
        if h.hexdigest() != sha256:
            raise DownloadError(
                f"checksum mismatch for {url}: got sha256 {h.hexdigest()}, expected {sha256}. {fix}")
        os.replace(tmp, dest)
    except DownloadError:
        raise
    except OSError as exc:  # the network errors are DownloadErrors above; this is the disk
        raise write_error(dest, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return dest
