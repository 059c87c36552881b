"""Hostile and unlucky checkpoint files: one clear refusal, nothing read outside, nothing left.

One table of bad inputs is driven through the `stackedtree` command (exit 2, one line
naming the file and the problem) and through the Python API (a `ValueError`,
`TypeError` or `OSError` with the same message), each under a hang guard, each
checked to leave nothing in the output folder. Then the cases that need their own
set-up (symlinked caches, escaped names, write failures, signals, closed pipes,
memory bounds), and a fuzz property over mutated headers and files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptgen import assert_same_flat

import stackedtree
from stackedtree.checkpoint import (
    convert_stack,
    convert_unstack,
    inspect_checkpoint,
    load_flat,
    load_stacked,
    save_flat,
)
from stackedtree.cli import main

SRC_ROOT = str(Path(stackedtree.__file__).resolve().parent.parent)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fails with TimeoutError if the block runs longer: a hang guard, not a timing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def st_bytes(header: dict[str, Any] | bytes, body: bytes = b"") -> bytes:
    """A safetensors file from a header (a dict, or raw JSON bytes) and its data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def llama(n: int = 2) -> dict[str, np.ndarray]:
    flat = {"model.embed_tokens.weight": np.arange(8, dtype=np.float32).reshape(2, 4)}
    for i in range(n):
        flat[f"model.layers.{i}.mlp.w"] = np.full((2, 2), i, np.float16)
        flat[f"model.layers.{i}.norm"] = np.full(2, i, np.int8)
    return flat


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def good(folder: Path, name: str = "good.safetensors") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_flat(folder / name, llama())
    return str(folder / name)


def index(folder: Path, weight_map: dict[str, str]) -> str:
    return write(
        folder / "model.safetensors.index.json",
        json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
    )


def npz_with_meta(folder: Path, meta: str) -> str:
    np.savez(folder / "m.npz", w=np.ones(2), __stackedtree__=np.asarray(meta))
    return str(folder / "m.npz")


def patch_central_directory(path: Path, offset: int, fmt: str, value: int) -> None:
    """Rewrites a field of the first entry of a zip's central directory."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + offset
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def npz_encrypted(folder: Path) -> str:
    path = folder / "e.npz"
    np.savez(path, w=np.ones(2))
    patch_central_directory(path, 8, "<H", 0x1)  # general purpose flags: encrypted
    return str(path)


def npz_bzip2(folder: Path) -> str:
    path = folder / "b.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        with zf.open("w.npy", "w") as m:
            np.lib.format.write_array(m, np.ones(2))
    return str(path)


def npz_bad_crc(folder: Path) -> str:
    path = folder / "c.npz"
    layer = np.arange(50_000, dtype=np.uint8)
    np.savez(path, **{"h.0.w": layer, "h.1.w": layer})
    data = bytearray(path.read_bytes())
    data[40_000] ^= 0xFF  # deep inside the member's data, far past its header
    path.write_bytes(bytes(data))
    return str(path)


def npz_claims(folder: Path, shape: tuple[int, ...], payload: bytes) -> str:
    """An npz whose one member's .npy header claims `shape` over `payload`."""
    path = folder / "claim.npz"
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w") as zf, zf.open("w.npy", "w") as m:
        np.lib.format.write_array_header_1_0(m, header)
        m.write(payload)
    return str(path)


def npz_huge_size_claim(folder: Path) -> str:
    path = folder / "z.npz"
    np.savez_compressed(path, w=np.zeros(1000, np.uint8))
    patch_central_directory(path, 24, "<I", 0xFFFF_FFF0)  # uncompressed size
    return str(path)


def stacked_with_layers(folder: Path, n: int) -> str:
    header = {
        "__metadata__": {
            "stackedtree.pattern": "h.{i}.",
            "stackedtree.num_layers": str(n),
        },
        "h.{i}.w": {"dtype": "U8", "shape": [n, 0], "data_offsets": [0, 0]},
    }
    return write(folder / "s.safetensors", st_bytes(header))


def many_tensors(folder: Path, n: int) -> str:
    entries = ",".join(
        f'"{i}":{{"dtype":"U8","shape":[],"data_offsets":[{i},{i + 1}]}}'
        for i in range(n)
    )
    return write(
        folder / "many.safetensors", st_bytes(f"{{{entries}}}".encode(), bytes(n))
    )


def one_tensor(folder: Path, **entry: Any) -> str:
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2], **entry}}
    return write(folder / "bad.safetensors", st_bytes(header, b"xy"))


def dangling(path: Path) -> str:
    path.symlink_to(path.parent / "nowhere")
    return str(path)


def fifo(folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / name)
    return str(folder / name)


@dataclass(frozen=True)
class Case:
    """A hostile input: `make(folder)` returns the sources; `refused` the commands
    (`inspect`, `load`, `stack`, `unstack`) that must refuse it with `message`."""

    id: str
    make: Callable[[Path], list[str]]
    message: str
    refused: tuple[str, ...] = ("inspect", "load", "stack")
    output: str = "o.safetensors"


CASES = [
    # ------------------------------------------------------------------ security
    Case(
        "index-names-parent",
        lambda d: (
            [index(d / "model", {"model.embed_tokens.weight": "../good.safetensors"})]
            if good(d)
            else []
        ),
        "not a file name inside the index's folder",
    ),
    Case(
        "index-names-absolute-path",
        lambda d: [index(d / "model", {"model.embed_tokens.weight": good(d)})],
        "not a file name inside the index's folder",
    ),
    # ------------------------------------------------------------ hangs, blow-ups
    Case(
        "fifo-input",
        lambda d: [fifo(d, "in.safetensors")],
        "is a named pipe, not a regular file",
    ),
    Case(
        "fifo-shard",
        lambda d: (
            [index(d, {"w": "a.safetensors"})] if fifo(d, "a.safetensors") else []
        ),
        "is a named pipe, not a regular file",
    ),
    Case(
        "two-million-empty-layers",
        lambda d: [stacked_with_layers(d, 2_000_000)],
        "would unstack its 1 stacked tensors into 2000000 tensors, more than the "
        "250000",
        refused=("unstack",),
    ),
    Case(
        "65-dimensions",
        lambda d: [one_tensor(d, shape=[1] * 65, data_offsets=[0, 1])],
        "`shape` must be a list of at most 64 non-negative integers",
    ),
    Case(
        "four-million-dimensions",
        lambda d: [one_tensor(d, shape=[1] * 4_100_000, data_offsets=[0, 1])],
        "JSON values, more than the 4000000 this reader parses",
    ),
    Case(
        "260-thousand-tensors",
        lambda d: [many_tensors(d, 260_000)],
        "declares 260000 tensors, more than the 250000 a file may hold",
        refused=("inspect",),
    ),
    Case(
        "output-typo-checked-first",
        lambda d: [fifo(d, "in.safetensors")],
        "unknown output format; name a .safetensors or .npz file",
        refused=("stack", "unstack"),
        output="o.safetensor",
    ),
    Case(
        "existing-output-checked-first",
        lambda d: (
            [fifo(d, "in.safetensors")]
            if good(d.parent / "out", "o.safetensors")
            else []
        ),
        "already exists; pass overwrite=True (--force)",
        refused=("stack", "unstack"),
    ),
    Case(
        "missing-output-folder-checked-first",
        lambda d: [fifo(d, "in.safetensors")],
        "does not exist",
        refused=("stack", "unstack"),
        output="missing/o.safetensors",
    ),
    Case(
        "dangling-symlink-output",
        lambda d: [good(d)] if dangling(d.parent / "out" / "o.safetensors") else [],
        "already exists; pass overwrite=True (--force)",
        refused=("stack",),
    ),
    # ----------------------------------------------------------------- tracebacks
    Case(
        "nested-header",
        lambda d: [
            write(d / "n.safetensors", st_bytes(b'{"a":' + nested(100_000) + b"}"))
        ],
        "nested too deeply",
    ),
    Case(
        "nested-index",
        lambda d: [
            write(
                d / "m.safetensors.index.json",
                b'{"weight_map":' + nested(100_000) + b"}",
            )
        ],
        "nested too deeply",
    ),
    Case(
        "nested-npz-metadata",
        lambda d: [npz_with_meta(d, nested(100_000).decode())],
        "nested too deeply",
    ),
    Case(
        "dimension-of-2**64",
        lambda d: [one_tensor(d, shape=[2**64], data_offsets=[0, 2])],
        "needs 18446744073709551616 bytes",
    ),
    Case(
        "empty-dimension-beside-2**64",
        lambda d: [
            write(
                d / "z.safetensors",
                st_bytes(
                    {"a": {"dtype": "U8", "shape": [0, 2**64], "data_offsets": [0, 0]}}
                ),
            )
        ],
        "more elements than numpy can index",
    ),
    Case(
        "npz-encrypted-member",
        lambda d: [npz_encrypted(d)],
        "member `w.npy` is encrypted",
    ),
    Case(
        "npz-unknown-compression",
        lambda d: [npz_bzip2(d)],
        "uses compression method 12; numpy archives are stored or deflated",
    ),
    Case(
        "npz-crc-error-deep-in-member",
        lambda d: [npz_bad_crc(d)],
        "array `h.0.w` is corrupt: Bad CRC-32",
        refused=("load", "stack"),
    ),
    Case(
        "npz-metadata-is-a-list",
        lambda d: [npz_with_meta(d, "[]")],
        "`__stackedtree__` must be a JSON object",
    ),
    Case(
        "npy-header-claims-10**12-elements",
        lambda d: [npz_claims(d, (10**12,), bytes(8))],
        "needs 1000000000000 bytes but its member holds 8",
    ),
    Case(
        "npz-size-claim-beyond-deflate",
        lambda d: [npz_huge_size_claim(d)],
        "more than deflate can produce",
    ),
    # -------------------------------------------------- corrupt files, refused now
    Case(
        "byte-size-over-64-bits",
        lambda d: [
            write(
                d / "o.safetensors",
                st_bytes(
                    {
                        "a": {
                            "dtype": "U8",
                            "shape": [2**32, 2**32],
                            "data_offsets": [0, 0],
                        }
                    }
                ),
            )
        ],
        "needs 18446744073709551616 bytes but its data_offsets [0, 0] span 0",
    ),
    Case(
        "byte-size-negative-in-int64",
        lambda d: [
            write(
                d / "o.safetensors",
                st_bytes(
                    {
                        "a": {
                            "dtype": "U8",
                            "shape": [3 * 2**62],
                            "data_offsets": [0, 0],
                        },
                        "b": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]},
                    },
                    b"x",
                ),
            )
        ],
        "needs 13835058055282163712 bytes",
    ),
    Case(
        "boolean-dimension",
        lambda d: [one_tensor(d, shape=[True, 2])],
        "`shape` must be a list of at most 64 non-negative integers, got [true, 2]",
    ),
    Case(
        "duplicate-names",
        lambda d: [
            write(
                d / "dup.safetensors",
                st_bytes(
                    b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                    b'"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}',
                    b"wxyz",
                ),
            )
        ],
        "the header names `a` twice",
    ),
    Case(
        "gap-between-tensors",
        lambda d: [
            write(
                d / "gap.safetensors",
                st_bytes(
                    {
                        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                        "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
                    },
                    bytes(12),
                ),
            )
        ],
        "the 4 bytes before tensor `b` (data_offsets [8, 12]) belong to no tensor",
    ),
    # ------------------------------------------------------------------- messages
    Case(
        "dtype-given-as-a-list",
        lambda d: [one_tensor(d, dtype=["F32"])],
        'tensor `a` has dtype ["F32"], which stackedtree does not read',
    ),
    Case(
        "header-size-over-the-limit",
        lambda d: [
            write(d / "big.safetensors", struct.pack("<Q", 200_000_000) + b"{}")
        ],
        "its header size 200000000 is over the format's limit of 100000000 bytes",
    ),
    Case(
        "lone-surrogate-name",
        lambda d: [
            write(
                d / "u.safetensors",
                st_bytes(
                    b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"
                ),
            )
        ],
        "holds a lone surrogate (U+D800), which is not valid UTF-8",
    ),
    # -------------------------------------------------------------- model folders
    Case(
        "folder-with-several-files-and-no-index",
        lambda d: (
            [str(d)] if good(d, "a.safetensors") and good(d, "b.safetensors") else []
        ),
        "holds 2 .safetensors files (`a.safetensors`, `b.safetensors`) and no "
        "*.safetensors.index.json",
    ),
    Case(
        "folder-with-no-checkpoint",
        lambda d: [str(d)] if write(d / "config.json", b"{}") else [],
        "holds no .safetensors file and no *.safetensors.index.json (it holds "
        "`config.json`)",
    ),
]


def _api(command: str, srcs: list[str], out: Path) -> None:
    if command == "inspect":
        inspect_checkpoint(srcs)
    elif command == "load":
        load_flat(srcs)
    elif command == "stack":
        convert_stack(srcs, out)
    else:
        convert_unstack(srcs, out)


def _prepare(case: Case, tmp_path: Path) -> tuple[list[str], Path, list[Path]]:
    (tmp_path / "out").mkdir(parents=True)
    (tmp_path / "in").mkdir()
    with deadline(30):
        srcs = case.make(tmp_path / "in")
    before = sorted((tmp_path / "out").iterdir())
    return srcs, tmp_path / "out" / case.output, before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_command_refuses_in_one_line(case: Case, tmp_path: Path, capsys: Any) -> None:
    srcs, out, before = _prepare(case, tmp_path)
    for command in case.refused:
        if command == "load":
            continue
        argv = [command, *srcs] + (
            [] if command == "inspect" else ["-o", str(out), "-q"]
        )
        with deadline(30):
            code = main(argv)
        captured = capsys.readouterr()
        assert code == 2, (command, captured)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith("stackedtree: error: "), lines
        assert case.message in lines[0], lines[0]
        assert "Traceback" not in captured.err
        assert sorted((tmp_path / "out").iterdir()) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_python_api_refuses(case: Case, tmp_path: Path) -> None:
    srcs, out, before = _prepare(case, tmp_path)
    for command in case.refused:
        with deadline(30), pytest.raises((ValueError, TypeError, OSError)) as e:
            _api(command, srcs, out)
        assert case.message in str(e.value), (command, str(e.value))
        assert "\n" not in str(e.value)
        assert sorted((tmp_path / "out").iterdir()) == before


def test_refusals_name_the_file(tmp_path: Path) -> None:
    # Every refusal of a bad file names it (the table's messages need not).
    for case in CASES:
        if case.refused[0] != "inspect":
            continue
        folder = tmp_path / case.id
        srcs, _, _ = _prepare(case, folder)
        with pytest.raises((ValueError, TypeError, OSError)) as e:
            inspect_checkpoint(srcs)
        assert f"`{folder / 'in'}" in str(e.value), str(e.value)


# ------------------------------------------------------------------------ security


def test_symlinked_shards_of_a_hugging_face_cache_are_read(tmp_path: Path) -> None:
    # The cache keeps each file once in blobs/ and links it from snapshots/<rev>/.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    flat = llama(3)
    names = list(flat)
    save_flat(blobs / "1111.safetensors", {k: flat[k] for k in names[:3]})
    save_flat(blobs / "2222.safetensors", {k: flat[k] for k in names[3:]})
    (blobs / "1111.safetensors").rename(blobs / "1111")  # blobs have no suffix
    (snap / "model-1.safetensors").symlink_to("../../blobs/1111")
    (snap / "model-2.safetensors").symlink_to("../../blobs/2222.safetensors")
    weight_map = {k: "model-1.safetensors" for k in names[:3]}
    weight_map |= {k: "model-2.safetensors" for k in names[3:]}
    (blobs / "3333").write_text(json.dumps({"weight_map": weight_map}))
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/3333")
    assert_same_flat(load_flat(snap), flat)
    assert_same_flat(load_flat(snap / "model.safetensors.index.json"), flat)
    convert_stack(snap, tmp_path / "s.safetensors")
    assert load_stacked(tmp_path / "s.safetensors")[2] == "model.layers.{i}."


def test_inspect_prints_names_escaped(tmp_path: Path, capsys: Any) -> None:
    evil = {
        "a\x1b[2J\x07\rb": np.zeros(2, np.float32),
        "rtl\u202etxt": np.zeros(1, np.int8),
        "back\\slash": np.zeros(1, np.int8),
        "caf\u00e9": np.zeros(1, np.int8),
    }
    save_flat(tmp_path / "e.safetensors", evil, metadata={"k\x1b": "v\x1b"})
    assert main(["inspect", str(tmp_path / "e.safetensors")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e")
    assert "  a\\x1b[2J\\x07\\rb  f32[2]" in out
    assert (
        "  rtl\\u202etxt" in out and "  back\\\\slash" in out and "  caf\u00e9" in out
    )
    assert "metadata: k\\x1b='v\\x1b'" in out
    # An error that quotes a name escapes it too.
    save_flat(
        tmp_path / "s.safetensors", {"h.0.\x1b": np.zeros(1), "h.1.w": np.zeros(1)}
    )
    assert (
        main(["stack", str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "o.npz")])
        == 2
    )
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b" in err


# ------------------------------------------------------------------- model folders


def test_model_folders_are_read_through_their_index_or_one_file(
    tmp_path: Path, capsys: Any
) -> None:
    flat = llama(3)
    names = sorted(flat, reverse=True)  # shards in reverse name order
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    one.mkdir()
    sharded.mkdir()
    save_flat(one / "model.safetensors", flat)
    (one / "config.json").write_text("{}")
    save_flat(sharded / "b.safetensors", {k: flat[k] for k in names[:4]})
    save_flat(sharded / "a.safetensors", {k: flat[k] for k in names[4:]})
    weight_map = {k: "b.safetensors" for k in names[:4]}
    weight_map |= {k: "a.safetensors" for k in names[4:]}
    index(sharded, weight_map)
    for folder in (one, sharded):
        assert_same_flat(load_flat(folder), flat)
        assert_same_flat(load_flat([folder]), flat)
        assert main(["inspect", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "layer pattern: 'model.layers.{i}.' (detected), 3 layers" in out
        assert out.splitlines()[-2:] == [
            "other tensors (1):",
            "  model.embed_tokens.weight  f32[2,4]",
        ]
    text = inspect_checkpoint(sharded)
    assert text.splitlines()[2:5] == ["layer 0:", "  mlp.w  f16[2,2]", "  norm   i8[2]"]
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    assert (
        main(["stack", str(sharded), "-o", str(stacked / "s.safetensors"), "-q"]) == 0
    )
    assert (
        main(["unstack", str(stacked), "-o", str(tmp_path / "back.safetensors")]) == 0
    )
    assert_same_flat(load_flat(tmp_path / "back.safetensors"), flat)


def test_inspect_lists_names_in_order_whatever_the_shard_order(tmp_path: Path) -> None:
    flat = {name: np.zeros(1, np.int8) for name in ("c", "a", "d", "b")}
    save_flat(tmp_path / "1.safetensors", {"c": flat["c"], "a": flat["a"]})
    save_flat(tmp_path / "2.safetensors", {"d": flat["d"], "b": flat["b"]})
    texts = [
        inspect_checkpoint(
            [tmp_path / f"{i}.safetensors", tmp_path / f"{j}.safetensors"]
        )
        for i, j in ((1, 2), (2, 1))
    ]
    assert texts[0] == texts[1]
    assert texts[0].splitlines()[-4:] == [
        "  a  i8[1]",
        "  b  i8[1]",
        "  c  i8[1]",
        "  d  i8[1]",
    ]
