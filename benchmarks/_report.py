"""The command line every benchmark takes, and how results are written and shown:
JSON, markdown tables, figures in text."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes; a script adds its own to it."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: a CI smoke run, not a measurement",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument(
        "--device-label",
        metavar="LABEL",
        help="name for the device in the results (default: jax.devices()[0].device_kind)",
    )
    return p


def start(
    p: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict[str, Any], float]:
    """Parses a script's arguments and logs the machine: `(args, machine, start time)`."""
    args = p.parse_args(argv)
    from _machine import machine_info, machine_line  # imports jax

    machine = machine_info(args.device_label)
    log("machine:", machine_line(machine))
    return args, machine, time.perf_counter()


def finish(
    args: argparse.Namespace,
    results: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
) -> None:
    """Writes the results (`--json`) and prints the script's report of them."""
    write_json(args.json, results)
    log("")
    log(report(results))
    if "wall_s" in results:
        log(f"\ndone in {results['wall_s']:.0f}s")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def log(*args: Any) -> None:
    print(*args, flush=True)


def dig(d: Any, *keys: Any) -> Any:
    """`d[k0][k1]...`, or None when a key is absent (results of older runs lack some)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(a: Any, b: Any) -> float | None:
    """`a / b`, or None when either is missing or `b` is zero."""
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return a / b


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers get 3 significant digits and are right-aligned.

    Published tables must fit the docs' content column: about 80 characters of text in
    a row, so few columns, short headers with the unit in them.
    """
    numeric = [
        all(isinstance(r[j], int | float) or r[j] is None for r in rows) and rows
        for j in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "".join("---:|" if num else "---|" for num in numeric),
    ]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: Any, digits: int = 3) -> str:
    """A cell or a figure in text: 3 significant digits, `n/a` for a missing value."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or not isinstance(x, float):
        return str(x)
    if x == 0 or abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    text = f"{x:#.{digits}g}"
    return f"{x:.{digits - 1}e}" if "e" in text else text.rstrip(".")


def mb(b: Any) -> float | None:
    """Bytes as MB (10^6), for tables."""
    return b / 1e6 if isinstance(b, int | float) else None


def ms(s: Any) -> float | None:
    """Seconds as milliseconds, for tables."""
    return s * 1e3 if isinstance(s, int | float) else None
