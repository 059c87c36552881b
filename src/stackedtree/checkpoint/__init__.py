"""Per-layer checkpoints <-> stacked checkpoints.

Name-level stacking (`stack_by_name`), pytree naming (`flatten_names`), name rules
between a checkpoint and a pytree (`unflatten_by_rules`, `flatten_by_rules`), atomic
safetensors/npz input and output (`load_flat`, `save_flat`), stacked checkpoints on
disk (`save_stacked`, `load_stacked`), streaming conversion (`convert_stack`,
`convert_unstack`), which the `stackedtree` command runs, and loading straight into
sharded jax arrays (`load_sharded`) and back (`save_sharded`). Names load on first
use, so the command never imports jax.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from .._tree import flatten_names as flatten_names
    from .._tree import unflatten_names as unflatten_names
    from ._convert import Conversion as Conversion
    from ._convert import convert_stack as convert_stack
    from ._convert import convert_unstack as convert_unstack
    from ._experts import detect_experts as detect_experts
    from ._files import PathLike as PathLike
    from ._files import Paths as Paths
    from ._inspect import inspect_checkpoint as inspect_checkpoint
    from ._io import load_flat as load_flat
    from ._io import save_flat as save_flat
    from ._layer_pattern import detect_pattern as detect_pattern
    from ._mapping import Rule as Rule
    from ._mapping import Transform as Transform
    from ._mapping import flatten_by_rules as flatten_by_rules
    from ._mapping import split_axis as split_axis
    from ._mapping import transpose as transpose
    from ._mapping import unflatten_by_rules as unflatten_by_rules
    from ._names import detect_kinds as detect_kinds
    from ._names import missing_keys as missing_keys
    from ._names import stack_by_name as stack_by_name
    from ._names import unstack_by_name as unstack_by_name
    from ._save_sharded import save_sharded as save_sharded
    from ._sharded import Shardings as Shardings
    from ._sharded import load_sharded as load_sharded
    from ._stacked import StackedCheckpoint as StackedCheckpoint
    from ._stacked import load_stacked as load_stacked
    from ._stacked import save_stacked as save_stacked

_SOURCES = {
    "Conversion": "._convert",
    "PathLike": "._files",
    "Paths": "._files",
    "Rule": "._mapping",
    "Shardings": "._sharded",
    "StackedCheckpoint": "._stacked",
    "Transform": "._mapping",
    "convert_stack": "._convert",
    "convert_unstack": "._convert",
    "detect_experts": "._experts",
    "detect_kinds": "._names",
    "detect_pattern": "._layer_pattern",
    "flatten_by_rules": "._mapping",
    "flatten_names": ".._tree",
    "inspect_checkpoint": "._inspect",
    "load_flat": "._io",
    "load_sharded": "._sharded",
    "load_stacked": "._stacked",
    "missing_keys": "._names",
    "save_flat": "._io",
    "save_sharded": "._save_sharded",
    "save_stacked": "._stacked",
    "split_axis": "._mapping",
    "stack_by_name": "._names",
    "transpose": "._mapping",
    "unflatten_by_rules": "._mapping",
    "unflatten_names": ".._tree",
    "unstack_by_name": "._names",
}

__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_names(__name__, _SOURCES, globals())
