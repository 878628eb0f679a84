"""Pack TVM's compiler for the GPU machine: .tvm/tvm.tar.xz (or parts), to carry with ``run``.

The device tool copies the working tree and the carried paths, 64 MiB in all, and the GPU
machine has no TVM. The apache-tvm 0.27 wheel is 100.5 MB (259 MB unpacked, nearly all of it
``libtvm_compiler.so``), too big to carry as it is. This installs the pinned TVM wheels for the
device's Python (3.12, manylinux x86_64) into a scratch folder with pip, drops the CUTLASS
headers (the pip build has no CUTLASS codegen to use them), and packs the rest with xz (x86
branch filter): 66.0 MB against the wheels' 105.0 MB::

    python scripts/device_tvm.py                   # -> .tvm/tvm.tar.xz (ignored by git)
    python scripts/device_tvm.py --part-mb 30      # -> .tvm/tvm.tar.xz.part-00, -01, ...

The archive is still 66 MB, so the call that carries it cannot also carry the shipped weights
(snapc/weights, ~59 MB): move that folder aside for the call (the benches that need TVM on
the GPU use random-weight configs) and put it back after; with ``--part-mb`` the parts can go
in consecutive warm calls instead (ignored paths stay on a warm machine between calls). On the
device::

    mkdir -p /tmp/site && cat .tvm/tvm.tar.xz* | tar -xJ -C /tmp/site
    export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# pyproject.toml's `tvm` extra less what only this machine uses (PoCL's OpenCL bindings), plus
# apache-tvm's own dependency that the GPU machine lacks.
HOST_ONLY = ("pyopencl",)
EXTRA_DEPS = ["ml_dtypes>=0.5"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
DROPPED = ["tvm/3rdparty/cutlass"]
OUT = REPO / ".tvm"


def wheels() -> list[str]:
    """The requirements to install on the device: the pins of pyproject.toml's `tvm` extra."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["tvm"]
    return [r for r in extra if not r.startswith(HOST_ONLY)] + EXTRA_DEPS


def install_for_device(target: Path, python: str) -> None:
    """pip-install the wheels for the device's Python and platform into ``target``."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
           "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--target", str(target)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + wheels(), check=True)
    for rel in DROPPED:
        shutil.rmtree(target / rel, ignore_errors=True)


def pack(source: Path, archive: Path) -> None:
    """Write ``source``'s contents as a tar.xz (xz -9e, x86 branch filter)."""
    tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(source), "."], stdout=subprocess.PIPE)
    with archive.open("wb") as out:
        subprocess.run(["xz", "--x86", "--lzma2=preset=9e,dict=256MiB", "-T0", "-c"],
                       stdin=tar.stdout, stdout=out, check=True)
    if tar.wait() != 0:
        raise SystemExit("tar failed")


def split(archive: Path, part_mb: float) -> list[Path]:
    """Cut ``archive`` into ``part_mb``-MB pieces named ``.part-NN``; remove the whole file."""
    size = int(part_mb * 1e6)
    parts = []
    with archive.open("rb") as whole:
        while chunk := whole.read(size):
            part = archive.with_name(f"{archive.name}.part-{len(parts):02d}")
            part.write_bytes(chunk)
            parts.append(part)
    archive.unlink()
    return parts


def main() -> None:
    """Build .tvm/ from the pinned wheels; print the files and their sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    parser.add_argument("--part-mb", type=float, default=None,
                        help="split the archive into parts of this many MB")
    args = parser.parse_args()
    if shutil.which("xz") is None or shutil.which("tar") is None:
        raise SystemExit("xz and tar are needed: install xz-utils")
    with tempfile.TemporaryDirectory(dir=OUT.parent, prefix=".tvm-") as tmp:
        site, staged = Path(tmp) / "site", Path(tmp) / "out"
        staged.mkdir()
        install_for_device(site, args.python)
        archive = staged / "tvm.tar.xz"
        pack(site, archive)
        if args.part_mb:
            split(archive, args.part_mb)
        shutil.rmtree(OUT, ignore_errors=True)
        staged.rename(OUT)
    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(OUT.parent)}: {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
