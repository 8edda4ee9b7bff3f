"""Preflight for the GPU scripts: say what is missing before a phase needs it, not halfway through the lease.

torch.compile (inductor -> Triton) builds its kernels' launchers with a C compiler against `Python.h` at the first
compiled step; a box without Triton, a compiler or the Python headers fails there, minutes into the run. These checks
follow Triton's own lookup (`triton/runtime/build.py`: `$CC`, else gcc, else clang; the include dir of sysconfig's
scheme, posix_local read as posix_prefix) and return one line per missing piece with its fix, so the caller can
turn compile off and go on. `missing_imports` imports every module of resenc_lightning (the code the GPU path runs)
and names the first missing top-level package of each.

    python scripts/gpu_preflight.py          # prints the lines; exit 0 always (the callers decide)
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILE_OFF = "compile phases run with compile off (nnUNet_compile=f)"
#: the code a GPU run executes: the package, train.py and the GPU scripts (their third-party imports must all resolve)
GPU_PATH = [ROOT / "src" / "resenc_lightning", ROOT / "train.py", ROOT / "scripts" / "gpu_e2e.py",
            ROOT / "scripts" / "gpu_stable_epochs.py", ROOT / "scripts" / "benchmark_data_pipeline.py"]
#: import name -> distribution name, where they differ
DIST_NAMES = {"pynvml": "nvidia-ml-py", "yaml": "pyyaml", "sklearn": "scikit-learn", "skimage": "scikit-image",
              "cc3d": "connected-components-3d", "PIL": "pillow"}


def python_include_dir() -> Path:
    """Where Triton looks for Python.h (its scheme rule: Debian's posix_local is read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    return Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])


def compile_toolchain(env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which,
                      has_module: Callable[[str], bool] | None = None,
                      include_dir: Path | None = None) -> list[str]:
    """One 'missing X: fix; consequence' line per piece torch.compile on CUDA needs and this machine lacks."""
    env = os.environ if env is None else env
    has_module = has_module or (lambda name: importlib.util.find_spec(name) is not None)
    include_dir = python_include_dir() if include_dir is None else include_dir
    missing = []
    if not has_module("triton"):
        missing.append("missing triton: install the triton wheel matching this torch (CUDA builds of torch require it)")
    cc = env.get("CC")
    if cc:
        if which(cc) is None:
            missing.append(f"missing C compiler: CC={cc} is not on PATH; set CC to an installed gcc/clang")
    elif which("gcc") is None and which("clang") is None:
        missing.append("missing C compiler (gcc or clang, or $CC): apt-get install gcc, or set CC")
    if not (include_dir / "Python.h").is_file():
        missing.append(f"missing Python.h in {include_dir}: apt-get install python{sys.version_info.major}."
                       f"{sys.version_info.minor}-dev (or the image's python headers)")
    return [f"{line}; {COMPILE_OFF}" for line in missing]


def third_party_imports(paths: list[Path] = GPU_PATH) -> set[str]:
    """Top-level names of every absolute import (lazy ones inside functions included) not stdlib, ours or scripts/."""
    files = [f for p in paths for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    names: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    ours = {"resenc_lightning", "__future__"} | {f.stem for f in (ROOT / "scripts").glob("*.py")}
    return {n for n in names if n not in sys.stdlib_module_names and n not in ours}


def missing_packages(names: set[str] | None = None,
                     has_module: Callable[[str], bool] | None = None) -> list[str]:
    """'missing X' for each third-party package of the GPU path that is not importable (found without importing)."""
    has_module = has_module or (lambda name: importlib.util.find_spec(name) is not None)
    names = third_party_imports() if names is None else names
    return [f"missing {n}: pip package {DIST_NAMES.get(n, n)}; add its wheel to scripts/make_gpu_bundle.sh and carry "
            "gpu_bundle/" for n in sorted(names) if not has_module(n)]


def missing_imports(package: str = "resenc_lightning") -> list[str]:
    """'missing X: ...' for each top-level package that a module of `package` cannot import (first failure each)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    seen: dict[str, str] = {}

    def attempt(name: str) -> bool:
        try:
            importlib.import_module(name)
        except ImportError as err:
            top = (err.name or "").split(".")[0] if isinstance(err, ModuleNotFoundError) else ""
            seen.setdefault(top or f"{name} ({err})", name)
            return False
        return True

    if attempt(package):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            attempt(info.name)
    return [f"missing {top}: {module} cannot import it; add its wheel to scripts/make_gpu_bundle.sh and carry "
            f"gpu_bundle/" for top, module in seen.items()]


def main() -> int:
    lines = missing_packages()
    lines += [line for line in missing_imports() if line.split(":")[0] not in {x.split(":")[0] for x in lines}]
    lines += compile_toolchain()
    for line in lines:
        print(f"preflight: {line}", flush=True)
    if not lines:
        print("preflight: ok (every resenc_lightning module imports; triton, C compiler, Python.h present)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
