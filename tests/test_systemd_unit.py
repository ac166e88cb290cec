"""systemd/tomolive.service (issue 5): `systemd-analyze verify` passes, and the unit has the
settings the daemon relies on (notify protocol, watchdog, restart, a dedicated user) with
hardening that CUDA tolerates."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tomolive.daemon.config import Config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "tomolive.service"
SHIPPED_EXEC = "/opt/tomolive/venv/bin/tomolive"

pytestmark = pytest.mark.timeout(60)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; keys may repeat (DeviceAllow=), so no configparser."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"{UNIT}: bad line {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= set {len(found)} times in {UNIT}"
    return found[0]


def seconds(value: str) -> float:
    """A systemd time span with plain units ("120", "2min", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        assert unit in units, f"time unit {unit!r} in {value!r}"
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def service() -> list[tuple[str, str]]:
    return parse_unit(UNIT.read_text())["Service"]


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    tomolive = Path(sys.prefix) / "bin" / "tomolive"
    assert tomolive.is_file(), f"{tomolive}: the venv has no tomolive entry point"
    # verify checks that ExecStart's program exists: point it at this venv's, nothing else.
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1, "ExecStart changed: update this test"
    copy = tmp_path / "tomolive.service"
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={tomolive} "))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=45)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and unparsable values are only warnings ("..., ignoring.") with status 0.
    problems = [line for line in output.splitlines()
                if copy.name in line or "ignoring" in line.lower()]
    assert problems == [], output


def test_unit_uses_notify_watchdog_and_restarts(service) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "Restart") == "on-failure"
    watchdog_s = seconds(one(service, "WatchdogSec"))
    assert watchdog_s > 0
    # SIGTERM waits up to shutdown_grace_seconds for running tomograms: systemd must wait longer.
    grace_s = Config.model_fields["shutdown_grace_seconds"].default
    assert seconds(one(service, "TimeoutStopSec")) > grace_s
    exec_start = one(service, "ExecStart").split()
    assert exec_start[:2] == [SHIPPED_EXEC, "run"], exec_start


def test_unit_runs_as_a_dedicated_user(service) -> None:
    user = one(service, "User")
    assert user and user not in ("root", "0"), user


def test_hardening_is_compatible_with_cuda(service) -> None:
    # PrivateDevices hides /dev/nvidia*; MemoryDenyWriteExecute breaks the CUDA driver's JIT.
    for key in ("PrivateDevices", "MemoryDenyWriteExecute"):
        assert values(service, key) in ([], ["no"], ["false"]), f"{key}= must not be enabled"
    allowed = " ".join(values(service, "DeviceAllow"))
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm"):
        assert device in allowed, f"DeviceAllow= lacks {device}: {allowed}"
    # The GPUs themselves, /dev/nvidia0..N: by the driver's device class or a glob.
    assert re.search(r"char-nvidia-frontend|/dev/nvidia\[0-9\]|/dev/nvidia\*", allowed), allowed
    read_write = " ".join(values(service, "ReadWritePaths")).split()
    assert read_write and all(path.lstrip("-").startswith("/") for path in read_write), read_write
