"""The deployment files (Dockerfile, deploy/k8s), checked offline: hadolint, Kubernetes' own
schemas, and that every ``KB_*`` variable they set is a setting the server reads (a renamed
setting must not leave a manifest that silently configures nothing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
MANIFESTS = ["postgres.yaml", "storage.yaml", "kernel-bridge.yaml"]


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def known(var: str) -> bool:
    return var.startswith("KB_") and var[3:].lower() in Settings.model_fields


def test_the_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_manifests_match_kubernetes_schemas() -> None:
    out = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet",
                          *MANIFESTS], cwd=K8S, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_replicas_share_the_database_and_storage_root() -> None:
    deployment = next(d for d in docs("kernel-bridge.yaml") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {e["name"]: e for e in server["env"]}
    kb_vars = [name for name in env if name.startswith("KB_")]
    assert kb_vars and all(known(v) for v in kb_vars), kb_vars
    # Each replica advertises its own pod address; the database URL comes from the secret
    # the database manifest defines.
    assert env["KB_ADVERTISE_URL"]["value"] == "http://$(POD_IP):8002"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ref = env["KB_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    secret = next(d for d in docs("postgres.yaml") if d["kind"] == "Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # Every replica mounts one ReadWriteMany claim where --data-dir points.
    args = server["args"]
    data_dir = args[args.index("--data-dir") + 1]
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == data_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = next(d for d in docs("storage.yaml") if d["kind"] == "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The sandbox's privileges are granted, not left to a default that breaks bwrap.
    assert server["securityContext"]["privileged"] is True
    assert pod["terminationGracePeriodSeconds"] > float(env["KB_SHUTDOWN_GRACE_S"]["value"])


def test_the_image_sets_only_real_settings() -> None:
    text = (ROOT / "Dockerfile").read_text()
    block = re.search(r"^ENV (.*?)(?=^\S)", text, re.S | re.M)
    assert block is not None
    names = re.findall(r"(KB_[A-Z_]+)=", block.group(1))
    assert names and all(known(n) for n in names), names
