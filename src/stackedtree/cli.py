"""The `stackedtree` command: inspect, stack and unstack checkpoints.

```
stackedtree inspect PATH... [--pattern P]
stackedtree stack SRC... -o OUT [--pattern P] [--force] [--quiet]
stackedtree unstack SRC... -o OUT [--force] [--quiet]
```

Bad input prints one line, `stackedtree: error: ...`, on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stackedtree.checkpoint import convert_stack, convert_unstack, inspect_checkpoint
from stackedtree.checkpoint._inspect import human_bytes

_PROG = "stackedtree"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Inspect per-layer and stacked checkpoints, and convert between "
        "them. Files: .safetensors (one, several shards, or a *.safetensors.index.json)"
        " and .npz.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="tensors, bytes, layer pattern and one layer's shapes",
        description="Summarise a checkpoint from its headers: tensors, bytes, the "
        "layer pattern and N, one layer's names, shapes and dtypes.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files")
    p.add_argument("--pattern", help="layer pattern, e.g. 'model.layers.{i}.'")

    p = sub.add_parser(
        "stack",
        help="per-layer checkpoint -> stacked checkpoint",
        description="Stack the per-layer tensors of a checkpoint into tensors with a "
        "leading layer axis, streaming tensor by tensor.",
    )
    p.add_argument("src", nargs="+", metavar="SRC", help="files, shards or an index")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    p.add_argument(
        "--pattern",
        help="layer pattern with one {i}, e.g. 'model.layers.{i}.' "
        "(detected when unambiguous)",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "unstack",
        help="stacked checkpoint -> per-layer checkpoint",
        description="Undo `stackedtree stack`; the pattern is read from the file.",
    )
    p.add_argument("src", nargs="+", metavar="SRC", help="stacked checkpoint files")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: `{e.filename}`"
    text = str(e) or type(e).__name__
    return text.replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `stackedtree` command.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status: 0 on success, 2 on bad input (after printing one line,
        `stackedtree: error: ...`, on stderr), 130 when interrupted.
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_checkpoint(args.paths, pattern=args.pattern))
            return 0
        if args.command == "stack":
            done = convert_stack(
                args.src,
                args.output,
                pattern=args.pattern,
                overwrite=args.force,
                progress=not args.quiet,
            )
        else:
            done = convert_unstack(
                args.src, args.output, overwrite=args.force, progress=not args.quiet
            )
    except (ValueError, TypeError, OSError) as e:
        print(f"{_PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    print(
        f"wrote {args.output}: {done.num_tensors} tensors, {human_bytes(done.nbytes)}, "
        f"{done.num_layers} layers by pattern {done.pattern!r}"
    )
    return 0
