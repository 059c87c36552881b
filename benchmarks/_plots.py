"""Figures the scripts publish: drawn off-screen at the docs' column width."""

from __future__ import annotations

from typing import Any, NamedTuple

from _machine import title


class Plot(NamedTuple):
    """A figure a script publishes: saved as `name.png` (`name_TAG.png` with a tag)."""

    name: str
    alt: str
    figure: Any


# The docs' content column is about 690 px wide and shows a figure at 100 dpi: a figure
# this many inches wide keeps its text at the size asked for. Saved at 200 dpi (sharp on
# dense screens), it is scaled down to the column, text and all.
FIGSIZE = (6.9, 4.0)
SAVE_DPI = 200


def pyplot() -> Any:
    """`matplotlib.pyplot` drawing off-screen with 9-point text, or None without it."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
        }
    )
    return plt


def plot_where(m: dict[str, Any]) -> str:
    """The machine in a plot's title: `CPU, jax 0.10.2`."""
    return f"{title(m)}, jax {m.get('jax')}"
