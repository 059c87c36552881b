"""stackedtree: stack per-layer pytrees and scan over them with `jax.lax.scan`."""

from ._describe import describe as describe
from ._index import concat_layers as concat_layers
from ._index import get_layer as get_layer
from ._index import group_layers as group_layers
from ._index import set_layer as set_layer
from ._index import slice_layers as slice_layers
from ._index import ungroup_layers as ungroup_layers
from ._scan import scan_layers as scan_layers
from ._stack import init_stacked as init_stacked
from ._stack import layer_keys as layer_keys
from ._stack import num_layers as num_layers
from ._stack import stack as stack
from ._stack import unstack as unstack
from ._tree import PyTree as PyTree
from ._validate import assert_stacked as assert_stacked

__version__ = "0.1.0"

__all__ = [
    "PyTree",
    "assert_stacked",
    "concat_layers",
    "describe",
    "get_layer",
    "group_layers",
    "init_stacked",
    "layer_keys",
    "num_layers",
    "scan_layers",
    "set_layer",
    "slice_layers",
    "stack",
    "ungroup_layers",
    "unstack",
]
