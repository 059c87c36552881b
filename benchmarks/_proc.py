"""What the kernel says about this process and the machine, from /proc: memory
(`VmRSS`, `VmHWM`), bytes read and written (`rchar`, `wchar`) and memory available."""

from __future__ import annotations


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
