"""What the kernel says about this process and the machine, from /proc: memory
(`VmRSS`, `VmHWM`), bytes read and written (`rchar`, `wchar`) and memory available;
and the runner of a benchmark's child processes joined by `jax.distributed`."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from typing import Any


def _field(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} in {path}")


def status_bytes(key: str) -> int:
    """A memory figure of `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes."""
    return _field("/proc/self/status", key) * 1024


def io_bytes(key: str) -> int:
    """A counter of `/proc/self/io` (`rchar`, `wchar`): bytes through read/write calls."""
    return _field("/proc/self/io", key)


def available() -> int:
    """The memory the kernel could give without swapping (`MemAvailable`), in bytes."""
    try:
        return _field("/proc/meminfo", "MemAvailable") * 1024
    except KeyError:
        return 0


def run_processes(
    command: Callable[[dict[str, Any]], list[str]],
    config: dict[str, Any],
    what: str,
    timeout: float = 600,
    count: int = 2,
) -> list[dict[str, Any]]:
    """`count` processes of `command(config)` joined by `jax.distributed` on a free
    port of 127.0.0.1 (`port`, `processes` and `process` added to `config`): the
    JSON each printed last, in process order. A failing one fails the run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            command({**config, "port": port, "processes": count, "process": i}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a process of the {what} failed:\n{err[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
