"""Per-layer checkpoints <-> stacked checkpoints.

Name-level stacking (`stack_by_name`), pytree naming (`flatten_names`), atomic
safetensors/npz input and output (`load_flat`, `save_flat`), stacked checkpoints on
disk (`save_stacked`, `load_stacked`) and streaming conversion (`convert_stack`,
`convert_unstack`), which the `stackedtree` command runs.
"""

from ._convert import Conversion as Conversion
from ._convert import convert_stack as convert_stack
from ._convert import convert_unstack as convert_unstack
from ._convert import load_stacked as load_stacked
from ._convert import save_stacked as save_stacked
from ._inspect import inspect_checkpoint as inspect_checkpoint
from ._io import load_flat as load_flat
from ._io import save_flat as save_flat
from ._names import detect_pattern as detect_pattern
from ._names import flatten_names as flatten_names
from ._names import stack_by_name as stack_by_name
from ._names import unflatten_names as unflatten_names
from ._names import unstack_by_name as unstack_by_name

__all__ = [
    "Conversion",
    "convert_stack",
    "convert_unstack",
    "detect_pattern",
    "flatten_names",
    "inspect_checkpoint",
    "load_flat",
    "load_stacked",
    "save_flat",
    "save_stacked",
    "stack_by_name",
    "unflatten_names",
    "unstack_by_name",
]
