"""stackedtree: stack per-layer pytrees and scan over them with `jax.lax.scan`.

The names below load on first use (see `_lazy.py`), so the `stackedtree` command, which
converts checkpoints with numpy alone, starts without importing jax.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_names

if TYPE_CHECKING:
    from ._describe import describe as describe
    from ._index import concat_layers as concat_layers
    from ._index import get_layer as get_layer
    from ._index import group_layers as group_layers
    from ._index import set_layer as set_layer
    from ._index import slice_layers as slice_layers
    from ._index import ungroup_layers as ungroup_layers
    from ._muon import muon_dims as muon_dims
    from ._pipeline import pipeline_layers as pipeline_layers
    from ._pipeline import stage_layers as stage_layers
    from ._pipeline import unstage_layers as unstage_layers
    from ._pipeline_train import pipeline_value_and_grad as pipeline_value_and_grad
    from ._scan import Remat as Remat
    from ._scan import scan_layers as scan_layers
    from ._scan_pattern import scan_pattern as scan_pattern
    from ._sharding import AxisName as AxisName
    from ._sharding import layer_shardings as layer_shardings
    from ._sharding import layer_specs as layer_specs
    from ._sharding import shard_layers as shard_layers
    from ._stack import init_stacked as init_stacked
    from ._stack import layer_keys as layer_keys
    from ._stack import num_layers as num_layers
    from ._stack import stack as stack
    from ._stack import unstack as unstack
    from ._tree import PyTree as PyTree
    from ._validate import assert_stacked as assert_stacked

__version__ = "0.1.0"

_SOURCES = {
    "AxisName": "._sharding",
    "PyTree": "._tree",
    "Remat": "._scan",
    "assert_stacked": "._validate",
    "concat_layers": "._index",
    "describe": "._describe",
    "get_layer": "._index",
    "group_layers": "._index",
    "init_stacked": "._stack",
    "layer_keys": "._stack",
    "layer_shardings": "._sharding",
    "layer_specs": "._sharding",
    "muon_dims": "._muon",
    "num_layers": "._stack",
    "pipeline_layers": "._pipeline",
    "pipeline_value_and_grad": "._pipeline_train",
    "scan_layers": "._scan",
    "scan_pattern": "._scan_pattern",
    "set_layer": "._index",
    "shard_layers": "._sharding",
    "slice_layers": "._index",
    "stack": "._stack",
    "stage_layers": "._pipeline",
    "ungroup_layers": "._index",
    "unstack": "._stack",
    "unstage_layers": "._pipeline",
}

__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_names(__name__, _SOURCES, globals())
