"""Which provisioner a kernelspec starts through (bridge/kernels.py, bridge/provisioner.py)."""

from __future__ import annotations

import json
from pathlib import Path

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from bridge.kernels import SPECS_DIR, confine_by_default, install_kernelspecs, provisioner_of
from bridge.provisioner import NAME, SandboxProvisioner


def spec(metadata: dict[str, object]) -> KernelSpec:
    return KernelSpec(argv=["python", "-m", "ipykernel_launcher"], display_name="x",
                      language="python", metadata=metadata)


def test_every_shipped_kernelspec_names_the_sandbox_provisioner() -> None:
    specs = sorted(SPECS_DIR.glob("*/kernel.json"))
    assert len(specs) >= 9
    for path in specs:
        stanza = json.loads(path.read_text())["metadata"]["kernel_provisioner"]
        assert stanza["provisioner_name"] == NAME, path


def test_the_entry_point_is_the_sandbox_provisioner() -> None:
    factory = KernelProvisionerFactory.instance()
    assert factory._check_availability(NAME)
    assert factory.provisioners[NAME].load() is SandboxProvisioner


def test_a_spec_naming_none_is_ours_and_another_name_is_not() -> None:
    confine_by_default()
    assert provisioner_of(spec({})) == (NAME, True)
    assert provisioner_of(spec({"kernel_provisioner": {"provisioner_name": NAME}})) == (NAME, True)
    local = {"kernel_provisioner": {"provisioner_name": "local-provisioner"}}
    assert provisioner_of(spec(local)) == ("local-provisioner", False)
    missing = {"kernel_provisioner": {"provisioner_name": "no-such-provisioner"}}
    assert provisioner_of(spec(missing)) == ("no-such-provisioner", False)


def test_installed_for_another_jupyter_the_specs_drop_our_stanza(tmp_path: Path) -> None:
    done = install_kernelspecs(prefix=str(tmp_path))
    assert done
    for _name, path in done:
        meta = json.loads((Path(path) / "kernel.json").read_text()).get("metadata", {})
        assert "kernel_provisioner" not in meta


def test_usage_is_what_the_provisioner_says_and_zeros_when_it_says_nothing() -> None:
    from types import SimpleNamespace
    from typing import Any

    from bridge.kernels import Kernel
    from bridge.provisioner import Usage
    from bridge.sandbox import Confinement

    def kernel_with(provisioner: object) -> Kernel:
        manager: Any = SimpleNamespace(provisioner=provisioner)
        return Kernel(manager, SimpleNamespace(), Path("/nonexistent"), "x",  # type: ignore
                      Confinement(Path("/nonexistent"), Path("/nonexistent")), {})

    remote = SimpleNamespace(usage=lambda: Usage(cpu_ms=7, mem_bytes=8, mem_max_bytes=9,
                                                 io_read_bytes=1, io_write_bytes=2))
    assert kernel_with(remote).usage() == Usage(7, 8, 9, 1, 2)
    assert kernel_with(object()).usage() == Usage(0, 0, 0)
