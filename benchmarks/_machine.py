"""What produced a result: the machine, the software versions, the date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import _env
import jax
import numpy as np

import stackedtree


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", _env.ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(label: str | None = None) -> dict[str, Any]:
    """What produced a result: hardware, software versions, date and JAX device."""
    dev = jax.devices()[0]
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    mem = _memory_bytes()
    return {
        "device_label": label or dev.device_kind,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": cpus_usable,
        "memory_gb": round(mem / 2**30, 1) if mem else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "numpy": np.__version__,
        "flax": _version("flax"),
        "dm-haiku": _version("dm-haiku"),
        "equinox": _version("equinox"),
        "stackedtree": getattr(stackedtree, "__version__", None),
        "git": _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine, the versions and the date; fields not known are left out.

    A results file states it once, at its top.
    """
    host = ", ".join(
        x
        for x in (
            m.get("processor"),
            m.get("cpu_count_usable") and f"{m['cpu_count_usable']} CPUs",
            m.get("memory_gb") and f"{m['memory_gb']} GB",
        )
        if x
    )
    label, backend = m.get("device_label"), m.get("jax_backend")
    device = host if label in (None, "cpu") else f"{label} ({backend}), host {host}"
    versions = [
        f"{name} {m[key]}"
        for name, key in (
            ("python", "python"),
            ("jax", "jax"),
            ("jaxlib", "jaxlib"),
            ("numpy", "numpy"),
            ("flax", "flax"),
            ("haiku", "dm-haiku"),
            ("equinox", "equinox"),
            ("stackedtree", "stackedtree"),
        )
        if m.get(key)
    ]
    if m.get("git") and m.get("stackedtree"):
        versions[-1] += f" ({m['git']})"
    return "; ".join(x for x in (device, ", ".join(versions), m.get("date")) if x)


def title(m: dict[str, Any]) -> str:
    """What a results file is about, as a heading: `CPU`, `GPU: NVIDIA H100 ...`."""
    backend = m.get("jax_backend") or "cpu"
    label = m.get("device_label")
    if backend == "cpu" and label in (None, "cpu"):
        return "CPU"
    return f"{backend.upper()}: {label}" if label else backend.upper()
