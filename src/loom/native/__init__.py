"""loom's compiled CPU kernels: C++ sources in this folder, built on first use and cached.

A kernel is one ``<name>.cpp`` here with a C interface, built by the machine's C++ compiler
(``$CXX``, else ``c++``, ``g++`` or ``clang++``) with OpenMP for its threads, for this machine
(``-march=native``), into ``$LOOM_CACHE/native`` (``~/.cache/loom`` where unset, as the token
caches), one file per
source, compiler, flags, CPU and torch version, so a change of any rebuilds it. The build writes a
temporary file and renames it into place, so ranks that start together never load a half-written
library. Matrix products inside the kernels go through the BLAS that torch itself links (its
``sgemm_``, whose address :func:`library` hands the kernel): no other dependency.

Where there is no compiler, the build fails, or torch's BLAS exports no ``sgemm_``,
:func:`library` raises :class:`NativeUnavailable` saying why; callers fall back to their
torch-ops kernels (:func:`available` asks without raising).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loom.errors import LoomError

SOURCES = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300


class NativeUnavailable(LoomError):
    """A compiled kernel could not be built or loaded here."""


def compiler() -> str | None:
    """The C++ compiler: ``$CXX`` where set, else the first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


def cache_dir() -> Path:
    return Path(os.environ.get("LOOM_CACHE") or "~/.cache/loom").expanduser() / "native"


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags where Linux says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _torch_library() -> ctypes.CDLL:
    import torch

    lib = Path(torch.__file__).parent / "lib"
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}
    return ctypes.CDLL(str(lib / names.get(sys.platform, "libtorch_cpu.so")))


def _build(name: str, cxx: str) -> Path:
    """The built library for ``name``, compiling it where the cache lacks it."""
    import torch

    source = SOURCES / f"{name}.cpp"
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), cxx, version, " ".join(FLAGS), _cpu(), torch.__version__]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [cxx, *FLAGS, str(source), "-o", partial], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if done.returncode:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise NativeUnavailable(
                f"building loom's {name} kernel failed ({cxx}, exit {done.returncode}):\n{tail}",
                "install a C++ compiler with OpenMP (g++ or clang++ with libomp), or set CXX to one.",
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def library(name: str) -> ctypes.CDLL:
    """The loaded kernel library ``name`` (built on first use), its BLAS set; raises
    :class:`NativeUnavailable` with the reason where it cannot be had (once a process: a failed
    build is not tried again)."""
    loaded = _load(name)
    if isinstance(loaded, NativeUnavailable):
        raise loaded
    return loaded


@functools.cache
def _load(name: str) -> ctypes.CDLL | NativeUnavailable:
    try:
        return _open(name)
    except NativeUnavailable as error:
        return error


def _open(name: str) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise NativeUnavailable(
            f"loom's {name} kernel needs a C++ compiler and none was found (CXX unset; no c++, g++ or clang++).",
            "install one (e.g. apt install g++), set CXX, or choose the torch kernel.",
        )
    torch_lib = _torch_library()
    if not hasattr(torch_lib, "sgemm_"):
        raise NativeUnavailable(
            "torch's CPU library exports no BLAS sgemm_ for loom's kernels to multiply with.",
            "choose the torch kernel.",
        )
    try:
        path = _build(name, cxx)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"building loom's {name} kernel failed: {error}", "choose the torch kernel.") from error
    kernel = ctypes.CDLL(str(path))
    local = getattr(torch_lib, "MKL_Set_Num_Threads_Local", None)  # MKL: one BLAS thread inside the kernel's
    kernel.loom_init(
        ctypes.c_void_p(ctypes.cast(torch_lib.sgemm_, ctypes.c_void_p).value),
        ctypes.c_void_p(ctypes.cast(local, ctypes.c_void_p).value if local is not None else None),
    )
    return kernel


def available(name: str) -> bool:
    """Whether :func:`library` can give ``name`` here (building it if need be)."""
    try:
        library(name)
    except NativeUnavailable:
        return False
    return True
