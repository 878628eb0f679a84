"""Build .whl/ for the GPU machine: diffusers (without its pipelines) and what it needs there.

The device tool copies the working tree and the carried paths, 64 MiB in all; the tracked tree
is ~61 MB with the shipped weights, and the diffusers wheel is 6.4 MB, 4 MB of it the
``pipelines`` / ``modular_pipelines`` subpackages that snapc never imports (diffusers loads them
lazily). This keeps their ``__init__`` files and drops the rest (2.2 MB)::

    python scripts/device_wheels.py            # then carry [".whl"] (ignored by git)

On the device: ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and
``PYTHONPATH=/tmp/site``.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ["diffusers==0.42.1", "importlib_metadata", "zipp"]
DROPPED = ("diffusers/pipelines/", "diffusers/modular_pipelines/")
OUT = Path(__file__).resolve().parent.parent / ".whl"


def _dropped(name: str) -> bool:
    """A file of a pipelines subpackage (the packages' own top-level modules stay)."""
    return any(name.startswith(p) and "/" in name[len(p):] for p in DROPPED)


def slim(wheel: Path) -> None:
    """Rewrite ``wheel`` without the pipelines subpackages (and their RECORD lines)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if _dropped(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines() if not _dropped(line)]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def main() -> None:
    """Download the wheels for the device's Python 3.12 and slim diffusers'."""
    OUT.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(OUT), *WHEELS], check=True)
    for wheel in OUT.glob("diffusers-*.whl"):
        slim(wheel)
    for wheel in sorted(OUT.glob("*.whl")):
        print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
