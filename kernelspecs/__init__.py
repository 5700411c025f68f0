"""Jupyter kernels that kernel-bridge ships, and their kernel.json specs.

Kernel-side code: modules here import neither ``bridge`` nor ``api`` (they run
inside the kernel process), only the standard library, ipykernel and psutil.
Each directory under ``specs/`` is one kernelspec; its argv starts with
``"python"``, which the installer replaces with an absolute interpreter path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

KERNEL_VERSION: Final = "0.1.0"
SPECS_DIR: Final = Path(__file__).resolve().parent / "specs"


def spec_dirs() -> dict[str, Path]:
    """Kernelspec name → directory holding its kernel.json."""
    return {
        path.name: path for path in sorted(SPECS_DIR.iterdir()) if (path / "kernel.json").is_file()
    }
