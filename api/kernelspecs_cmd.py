"""``kernel-bridge kernelspecs install``: put the kernels we ship into a Jupyter installation."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from bridge.kernels import SPECS_DIR


def install(*, user: bool = False, prefix: str | None = None) -> list[tuple[str, str]]:
    """Install every shipped spec with its interpreter made absolute; returns (name, path)."""
    ksm = KernelSpecManager()
    done = []
    for spec_dir in sorted(SPECS_DIR.iterdir()):
        if not (spec_dir / "kernel.json").is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / spec_dir.name
            shutil.copytree(spec_dir, staged)
            spec = json.loads((staged / "kernel.json").read_text())
            if spec["argv"][0] in ("python", "python3"):
                # A Jupyter elsewhere must start our kernels with this environment's Python.
                spec["argv"][0] = sys.executable
            (staged / "kernel.json").write_text(json.dumps(spec, indent=2))
            path = ksm.install_kernel_spec(str(staged), spec_dir.name, user=user, prefix=prefix)
        done.append((spec_dir.name, path))
    return done
