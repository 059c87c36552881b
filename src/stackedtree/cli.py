"""The `stackedtree` command: inspect, stack and unstack checkpoints.

```
stackedtree inspect PATH... [--pattern P] [--experts P]
stackedtree stack SRC... -o OUT [--pattern P] [--experts P] [--kinds K] [--force]
                  [--quiet]
stackedtree unstack SRC... -o OUT [--force] [--quiet]
```

Bad input prints one line, `stackedtree: error: ...`, on stderr and exits with 2; names
read from files are printed escaped (`\\x1b`), so a file cannot drive the terminal.
Ctrl-C, SIGTERM and SIGHUP stop a conversion cleanly: its temporary file is removed,
nothing is left under the output name, and the exit status is 128 + the signal's
number. A closed pipe (`stackedtree inspect ... | head -1`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from stackedtree.checkpoint import convert_stack, convert_unstack, inspect_checkpoint
from stackedtree.checkpoint._text import human_bytes, printable, ranges

_PROG = "stackedtree"
_EXPERTS_HELP = (
    "expert pattern with one {e}, relative to the per-layer key, e.g. "
    "'mlp.experts.{e}.': experts stacked on an axis of their own (detected; "
    "'none' keeps experts apart)"
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoint files or a model folder"
    )
    p.add_argument("--pattern", help="layer pattern, e.g. 'model.layers.{i}.'")
    p.add_argument("--experts", help=_EXPERTS_HELP)

    p = sub.add_parser(
        "stack",
        help="per-layer checkpoint -> stacked checkpoint",
        description="Stack the per-layer tensors of a checkpoint into tensors with a "
        "leading layer axis, streaming tensor by tensor. Layers holding different "
        "keys (dense and MoE layers) form kinds, labelled A, B, ... in the order of "
        "their first layers, each stacked on its own.",
    )
    p.add_argument(
        "src", nargs="+", metavar="SRC", help="files, shards, an index or a folder"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    p.add_argument(
        "--pattern",
        help="layer pattern with one {i}, e.g. 'model.layers.{i}.' "
        "(detected when unambiguous)",
    )
    p.add_argument("--experts", help=_EXPERTS_HELP)
    p.add_argument(
        "--kinds",
        type=_positive,
        metavar="K",
        help="insist that the layers form K kinds (1: all layers hold the same "
        "keys), and refuse otherwise",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "unstack",
        help="stacked checkpoint -> per-layer checkpoint",
        description="Undo `stackedtree stack`; the pattern is read from the file.",
    )
    p.add_argument(
        "src", nargs="+", metavar="SRC", help="stacked checkpoint files or a folder"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f": `{e.filename}`" if e.filename else "")
    else:
        text = str(e) or type(e).__name__
    text = text.replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", " ")
    return printable(text, backslash=False)  # names in messages come escaped


class _Stopped(BaseException):
    """A signal asked the command to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turns SIGINT, SIGTERM and SIGHUP into exceptions, so that cleanup runs.

    A signal that is ignored (as `nohup` ignores SIGHUP) or handled by someone else
    stays as it was. After the first signal the others are ignored, so that a second
    one cannot cut the removal of the temporary file short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    signums = [getattr(signal, n) for n in names if hasattr(signal, n)]
    ours = {signal.SIGINT: signal.default_int_handler}

    def stop(signum: int, frame: Any) -> None:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Stopped(signum)

    old = {
        s: signal.getsignal(s)
        for s in signums
        if signal.getsignal(s) in (signal.SIG_DFL, ours.get(s))
    }
    for s in old:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _print(text: str) -> int:
    """Prints to stdout; 0, or 141 (as SIGPIPE would) when the reader has gone."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null, so that the interpreter's final flush is quiet.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    return 0


def _error(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"{_PROG}: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `stackedtree` command.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status: 0 on success, 2 on bad input (after printing one line,
        `stackedtree: error: ...`, on stderr), 128 + the signal's number when
        stopped by SIGINT (130), SIGTERM or SIGHUP, 141 when stdout is a closed
        pipe.
    """
    args = _parser().parse_args(argv)
    try:
        with _stop_on_signals():
            if args.command == "inspect":
                return _print(
                    inspect_checkpoint(
                        args.paths, pattern=args.pattern, experts=args.experts
                    )
                )
            if args.command == "stack":
                done = convert_stack(
                    args.src,
                    args.output,
                    pattern=args.pattern,
                    experts=args.experts,
                    kinds=args.kinds,
                    overwrite=args.force,
                    progress=not args.quiet,
                )
            else:
                done = convert_unstack(
                    args.src,
                    args.output,
                    overwrite=args.force,
                    progress=not args.quiet,
                )
    except (ValueError, TypeError, OSError) as e:
        _error(f"error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted; no output written")
        return 128 + signal.SIGINT
    except _Stopped as e:
        _error(f"stopped by {signal.Signals(e.signum).name}; no output written")
        return 128 + e.signum
    kinds = "" if done.kinds is None else f" in {len(done.kinds)} kinds: "
    if done.kinds is not None:
        kinds += ", ".join(
            f"{label} ({ranges(layers)})" for label, layers in done.kinds.items()
        )
    experts = "" if done.experts is None else f", experts by '{done.experts}'"
    for line in done.gaps:
        _error(f"warning: {printable(line)}")
    return _print(
        printable(
            f"wrote {args.output}: {done.num_tensors} tensors, "
            f"{human_bytes(done.nbytes)}, {done.num_layers} layers by pattern "
            f"'{done.pattern}'{kinds}{experts}"
        )
    )
