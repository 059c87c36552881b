"""What every benchmark sets before JAX starts; import it before `jax`.

The benchmark scripts run as plain scripts (`python benchmarks/bench_scan.py`) and import
their shared modules from this folder; those import the models of the repository's
`examples/`, which this puts on `sys.path`. A `--quick` run (a smoke run, which checks
that everything runs, not how fast) gets cheaper XLA compiles.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if os.path.join(ROOT, "examples") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "examples"))

if "--quick" in sys.argv[1:] and "--xla_backend_optimization_level" not in (
    os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()
