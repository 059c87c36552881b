"""Real processes for the many-process tests: a free port on 127.0.0.1, and a runner
that starts them together and fails the test with the failing one's stderr."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    commands: list[list[str]], env: dict[str, str], folder: Path, timeout: float = 120
) -> list[str]:
    """Runs the commands at once; their stdouts. When one fails or time runs out,
    the others are killed and the test fails with the failing one's stderr."""
    logs = [(folder / f"out{i}", folder / f"err{i}") for i in range(len(commands))]
    procs: list[subprocess.Popen] = []
    try:
        _start(commands, env, logs, procs)
        deadline = time.monotonic() + timeout
        while None in (codes := [p.poll() for p in procs]):
            if any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        killed = [p for p in procs if p.poll() is None]
        for p in killed:
            p.kill()
            p.wait()
    failed = [
        f"process {i} exited with {p.returncode}:\n{err.read_text()[-3000:]}"
        for i, (p, (_, err)) in enumerate(zip(procs, logs, strict=True))
        if p.returncode and p not in killed
    ]
    assert not failed and not killed, failed or f"timed out after {timeout} s"
    return [out.read_text() for out, _ in logs]


def reports(outs: list[str]) -> list[Any]:
    """Each process's report: the JSON value on the last line of its stdout."""
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def run_to_end(
    commands: list[list[str]], env: dict[str, str], folder: Path, timeout: float = 120
) -> list[tuple[int, str, str]]:
    """Runs the commands at once and waits for every one, however it ends; each
    one's exit code, stdout and stderr. The test fails if one outlives `timeout`."""
    logs = [(folder / f"out{i}", folder / f"err{i}") for i in range(len(commands))]
    procs: list[subprocess.Popen] = []
    try:
        _start(commands, env, logs, procs)
        deadline = time.monotonic() + timeout
        while None in [p.poll() for p in procs] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in hung:
            procs[i].kill()
            procs[i].wait()
    assert not hung, f"processes {hung} still ran after {timeout} s"
    return [
        (p.returncode, out.read_text(), err.read_text())
        for p, (out, err) in zip(procs, logs, strict=True)
    ]


def _start(
    commands: list[list[str]],
    env: dict[str, str],
    logs: list[tuple[Path, Path]],
    procs: list[subprocess.Popen],
) -> None:
    """Starts each command with its stdout and stderr in its pair of `logs`,
    appending to `procs` as it goes (so a failed start still kills the started)."""
    for cmd, (out, err) in zip(commands, logs, strict=True):
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen(cmd, stdout=o, stderr=e, env=env))
