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
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ckptgen
import numpy as np
import pytest
from ckptgen import assert_same_flat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stackedtree
from stackedtree.checkpoint import (
    _convert,
    _files,
    convert_stack,
    convert_unstack,
    inspect_checkpoint,
    load_flat,
    load_stacked,
    save_flat,
)
from stackedtree.checkpoint._io import read_checkpoint
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
    keys = {"mlp.w": ((2, 2), np.float16), "norm": ((2,), np.int8)}
    return ckptgen.llama(n, keys, vocab=2, norm=False)


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


def npz_patched(folder: Path, offset: int, fmt: str, value: int) -> str:
    path = folder / "p.npz"
    np.savez(path, w=np.ones(2))
    patch_central_directory(path, offset, fmt, value)
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


def npz_claims(
    folder: Path, shape: tuple[int, ...], payload: bytes, descr: Any = "|u1"
) -> str:
    """An npz whose one member's .npy header claims `shape` over `payload`."""
    path = folder / "claim.npz"
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w") as zf, zf.open("w.npy", "w") as m:
        np.lib.format.write_array_header_1_0(m, header)
        m.write(payload)
    return str(path)


def zip64_listing(folder: Path, count: int) -> str:
    """An archive whose zip64 end record lists `count` members."""
    record = b"PK\x06\x06" + struct.pack(
        "<QHHIIQQQQ", 44, 45, 45, 0, 0, count, count, 0, 0
    )
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 1)
    end = b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 2**32 - 1, 2**32 - 1, 0
    )
    return write(folder / "many.npz", record + locator + end)


def npz_huge_size_claim(folder: Path) -> str:
    path = folder / "z.npz"
    np.savez_compressed(path, w=np.zeros(1000, np.uint8))
    patch_central_directory(path, 24, "<I", 0xFFFF_FFF0)  # uncompressed size
    return str(path)


def object_npz(folder: Path, name: str) -> str:
    path = folder / "o.npz"
    np.savez(path, **{name: np.array([{"a": 1}], dtype=object)})
    return str(path)


def stacked_with_layers(
    folder: Path, n: int, pattern: str = "h.{i}.", shape: list[int] | None = None
) -> str:
    header = {
        "__metadata__": {
            "stackedtree.pattern": pattern,
            "stackedtree.num_layers": str(n),
        },
        "h.{i}.w": {"dtype": "U8", "shape": shape or [n, 0], "data_offsets": [0, 0]},
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


def index_of(folder: Path, shard: str) -> list[str]:
    """A good file, and an index in a subfolder that names it by `shard`."""
    good(folder)
    return [index(folder / "model", {"model.embed_tokens.weight": shard})]


def fifo_shard(folder: Path) -> list[str]:
    fifo(folder, "a.safetensors")
    return [index(folder, {"w": "a.safetensors"})]


def existing_output(folder: Path) -> list[str]:
    good(folder.parent / "out", "o.safetensors")
    return [fifo(folder, "in.safetensors")]


def dangling_output(folder: Path) -> list[str]:
    dangling(folder.parent / "out" / "o.safetensors")
    return [good(folder)]


def several_files(folder: Path) -> list[str]:
    good(folder, "a.safetensors")
    good(folder, "b.safetensors")
    return [str(folder)]


def no_checkpoint(folder: Path) -> list[str]:
    write(folder / "config.json", b"{}")
    return [str(folder)]


@dataclass(frozen=True)
class Case:
    """A hostile input: `make(folder)` returns the sources; `refused` the commands
    (`inspect`, `load`, `stack`, `unstack`) that must refuse it with `message`,
    raised in the checkpoint module `module` (`_safetensors`, `_npz`, ...): the
    test ids start with it, so `pytest -k _npz` runs the threats `_npz` refuses."""

    id: str
    module: str
    make: Callable[[Path], list[str]]
    message: str
    refused: tuple[str, ...] = ("inspect", "load", "stack")
    output: str = "o.safetensors"


CASES = [
    # ------------------------------------------------------------------ security
    Case(
        "index-names-parent",
        "_io",
        lambda d: index_of(d, "../good.safetensors"),
        "outside the index's folder; an index may only name files beside it",
    ),
    Case(
        "index-names-absolute-path",
        "_io",
        lambda d: index_of(d, str(d / "good.safetensors")),
        "outside the index's folder; an index may only name files beside it",
    ),
    # ------------------------------------------------------------ hangs, blow-ups
    Case(
        "fifo-input",
        "_files",
        lambda d: [fifo(d, "in.safetensors")],
        "is a named pipe, not a regular file",
    ),
    Case(
        "fifo-shard",
        "_files",
        fifo_shard,
        "is a named pipe, not a regular file",
    ),
    Case(
        "two-million-empty-layers",
        "_convert",
        lambda d: [stacked_with_layers(d, 2_000_000)],
        "would unstack its 1 stacked tensors into 2000000 tensors, more than the "
        "250000",
        refused=("unstack",),
    ),
    Case(
        "layers-beyond-int64",
        "_stacked",
        lambda d: [stacked_with_layers(d, 2**63, shape=[0])],
        "metadata `stackedtree.num_layers` must be a positive integer below 2**63, "
        "got `9223372036854775808`",
        refused=("inspect", "unstack"),
    ),
    Case(
        "stacked-pattern-without-layer-index",
        "_stacked",
        lambda d: [stacked_with_layers(d, 2, pattern="h.")],
        "metadata `stackedtree.pattern` must contain exactly one `{i}`",
        refused=("inspect", "unstack"),
    ),
    Case(
        "escaped-member-name",
        "_npz",
        lambda d: [object_npz(d, "w\nx\x1b")],
        "array `w\\nx\\x1b` holds Python objects",
        refused=("inspect", "load", "stack"),
    ),
    Case(
        "65-dimensions",
        "_safetensors",
        lambda d: [one_tensor(d, shape=[1] * 65, data_offsets=[0, 1])],
        "`shape` must be a list of at most 64 non-negative integers",
    ),
    Case(
        "four-million-dimensions",
        "_safetensors",
        lambda d: [one_tensor(d, shape=[1] * 4_100_000, data_offsets=[0, 1])],
        "JSON values, more than the 4000000 this reader parses",
    ),
    Case(
        "260-thousand-tensors",
        "_safetensors",
        lambda d: [many_tensors(d, 260_000)],
        "declares 260000 tensors, more than the 250000 a file may hold",
        refused=("inspect",),
    ),
    Case(
        "output-typo-checked-first",
        "_files",
        lambda d: [fifo(d, "in.safetensors")],
        "unknown output format; name a .safetensors or .npz file",
        refused=("stack", "unstack"),
        output="o.safetensor",
    ),
    Case(
        "existing-output-checked-first",
        "_files",
        existing_output,
        "already exists; pass overwrite=True (--force)",
        refused=("stack", "unstack"),
    ),
    Case(
        "missing-output-folder-checked-first",
        "_files",
        lambda d: [fifo(d, "in.safetensors")],
        "does not exist",
        refused=("stack", "unstack"),
        output="missing/o.safetensors",
    ),
    Case(
        "dangling-symlink-output",
        "_files",
        dangling_output,
        "already exists; pass overwrite=True (--force)",
        refused=("stack",),
    ),
    # ----------------------------------------------------------------- tracebacks
    Case(
        "nested-header",
        "_safetensors",
        lambda d: [
            write(d / "n.safetensors", st_bytes(b'{"a":' + nested(100_000) + b"}"))
        ],
        "nested too deeply",
    ),
    Case(
        "nested-index",
        "_io",
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
        "_npz",
        lambda d: [npz_with_meta(d, nested(100_000).decode())],
        "nested too deeply",
    ),
    Case(
        "dimension-of-2**64",
        "_safetensors",
        lambda d: [one_tensor(d, shape=[2**64], data_offsets=[0, 2])],
        "needs 18446744073709551616 bytes",
    ),
    Case(
        "empty-dimension-beside-2**64",
        "_safetensors",
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
        "_npz",
        lambda d: [npz_encrypted(d)],
        "member `w.npy` is encrypted",
    ),
    Case(
        "npz-member-needs-a-newer-zip",
        "_npz",
        lambda d: [npz_patched(d, 6, "<H", 109)],  # version needed to extract
        "is not a valid .npz archive: zip file version 10.9",
    ),
    Case(
        "npz-member-outside-the-file",
        "_npz",
        lambda d: [npz_patched(d, 42, "<I", 10**9)],  # offset of the local header
        "member `w.npy` starts at byte 1000000000, outside the file",
    ),
    Case(
        "npz-unknown-compression",
        "_npz",
        lambda d: [npz_bzip2(d)],
        "uses compression method 12; numpy archives are stored or deflated",
    ),
    Case(
        "npz-crc-error-deep-in-member",
        "_npz",
        lambda d: [npz_bad_crc(d)],
        "array `h.0.w` is corrupt: Bad CRC-32",
        refused=("load", "stack"),
    ),
    Case(
        "npz-metadata-is-a-list",
        "_npz",
        lambda d: [npz_with_meta(d, "[]")],
        "`__stackedtree__` must be a JSON object",
    ),
    Case(
        "npy-header-claims-10**12-elements",
        "_npz",
        lambda d: [npz_claims(d, (10**12,), bytes(8))],
        "needs 1000000000000 bytes but its member holds 8",
    ),
    Case(
        "npz-directory-lists-three-million-members",
        "_npz",
        lambda d: [zip64_listing(d, 3_000_000)],
        "it lists 3000000 members, more than the 250000 a file may hold",
    ),
    Case(
        "npy-subarray-dtype",
        "_npz",
        lambda d: [npz_claims(d, (2,), bytes(8), descr=("|u1", (4,)))],
        "its .npy header has the subarray dtype",
    ),
    Case(
        "npz-size-claim-beyond-deflate",
        "_npz",
        lambda d: [npz_huge_size_claim(d)],
        "more than deflate can produce",
    ),
    # -------------------------------------------------- corrupt files, refused now
    Case(
        "byte-size-over-64-bits",
        "_safetensors",
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
        "_safetensors",
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
        "_safetensors",
        lambda d: [one_tensor(d, shape=[True, 2])],
        "`shape` must be a list of at most 64 non-negative integers, got [true, 2]",
    ),
    Case(
        "duplicate-names",
        "_safetensors",
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
        "_safetensors",
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
        "_safetensors",
        lambda d: [one_tensor(d, dtype=["F32"])],
        'tensor `a` has dtype ["F32"], which stackedtree does not read',
    ),
    Case(
        "header-size-over-the-limit",
        "_safetensors",
        lambda d: [
            write(d / "big.safetensors", struct.pack("<Q", 200_000_000) + b"{}")
        ],
        "its header size 200000000 is over the format's limit of 100000000 bytes",
    ),
    Case(
        "lone-surrogate-name",
        "_safetensors",
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
        "_files",
        several_files,
        "holds 2 .safetensors files (`a.safetensors`, `b.safetensors`) and no "
        "*.safetensors.index.json",
    ),
    Case(
        "folder-with-no-checkpoint",
        "_files",
        no_checkpoint,
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.module}-{c.id}")
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.module}-{c.id}")
def test_python_api_refuses(case: Case, tmp_path: Path) -> None:
    srcs, out, before = _prepare(case, tmp_path)
    for command in case.refused:
        with deadline(30), pytest.raises((ValueError, TypeError, OSError)) as e:
            _api(command, srcs, out)
        assert case.message in str(e.value), (command, str(e.value))
        assert "\n" not in str(e.value)
        assert sorted((tmp_path / "out").iterdir()) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.module}-{c.id}")
def test_each_threat_is_refused_by_its_module(case: Case, tmp_path: Path) -> None:
    srcs, out, _ = _prepare(case, tmp_path)
    for command in case.refused:
        with deadline(30), pytest.raises((ValueError, TypeError, OSError)) as e:
            _api(command, srcs, out)
        ours = [
            Path(f.filename).stem
            for f in traceback.extract_tb(e.value.__traceback__)
            if "stackedtree" in Path(f.filename).parts
        ]
        assert ours[-1] == case.module, (command, ours)


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
    assert load_stacked(tmp_path / "s.safetensors").pattern == "model.layers.{i}."


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
        tmp_path / "s.safetensors", {"h.0.\x1b": np.zeros(1), "h.1.\x1b": np.zeros(2)}
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


def test_inspect_lists_tensors_when_the_detected_pattern_does_not_fit(
    tmp_path: Path,
) -> None:
    save_flat(tmp_path / "a.safetensors", {"h.0.w": np.zeros(1), "h.1.w": np.zeros(2)})
    assert inspect_checkpoint(tmp_path / "a.safetensors").splitlines()[1:] == [
        "layer pattern: none (pattern 'h.{i}.': tensors differ in shape or dtype "
        "across layers: `h.1.w` has shape (2,) dtype float64, expected shape (1,) "
        "dtype float64 like `h.0.w`)",
        "tensors:",
        "  h.0.w  f64[1]",
        "  h.1.w  f64[2]",
    ]
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        inspect_checkpoint(tmp_path / "a.safetensors", pattern="h.{i}.")


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


# ------------------------------------------------------------------ write failures


def test_a_full_disk_names_the_output(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    save_flat(tmp_path / "in.safetensors", llama())

    def full(self: Any, src: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_convert._Copier, "copy", full)
    out = tmp_path / "out.safetensors"
    assert main(["stack", str(tmp_path / "in.safetensors"), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stackedtree: error: cannot write `{out}`: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_a_read_only_file_system_names_the_output(
    tmp_path: Path, monkeypatch: Any
) -> None:
    out = tmp_path / "out.safetensors"
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path: Any) -> None:
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    with monkeypatch.context() as m:
        m.setattr(os, "statvfs", ReadOnly)
        # On a read-only file system `access` denies writing too.
        m.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(
            OSError, match=r"cannot write `.*out\.safetensors`: the file system is"
        ):
            save_flat(out, llama())

    def read_only(path: Any, mode: str) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(_files, "open", read_only, raising=False)
    with pytest.raises(OSError) as e:
        save_flat(out, llama())
    assert e.value.errno == errno.EROFS
    assert e.value.strerror == f"cannot write `{out}`: Read-only file system"
    assert list(tmp_path.iterdir()) == []


def test_a_file_too_large_names_the_output(tmp_path: Path) -> None:
    flat = {f"h.{i}.w": np.zeros(50_000, np.uint8) for i in range(2)}
    save_flat(tmp_path / "in.safetensors", flat)
    out = tmp_path / "out.safetensors"
    code = (
        "import resource, sys; from stackedtree.cli import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
        "sys.exit(main(sys.argv[1:]))"
    )
    r = run_python(
        code, "stack", str(tmp_path / "in.safetensors"), "-o", str(out), "-q"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"stackedtree: error: cannot write `{out}`: File too large"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_a_long_output_name_is_written(tmp_path: Path) -> None:
    save_flat(tmp_path / "in.safetensors", llama())
    out = tmp_path / ("o" * 238 + ".safetensors")  # 250 characters: legal
    convert_stack(tmp_path / "in.safetensors", out)
    assert load_stacked(out)[2] == "model.layers.{i}."
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.safetensors", out.name]
    )
    too_long = tmp_path / ("o" * 250 + ".safetensors")
    with pytest.raises(OSError, match="its name is longer than the file system allows"):
        convert_stack(tmp_path / "in.safetensors", too_long)


# ---------------------------------------------------------------- signals, pipes


def run_python(code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": SRC_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        **kw,
    )


# Stacks with a copy that announces itself, then waits: a conversion to stop midway.
SLOW_STACK = """
import signal, sys, time
from pathlib import Path
from stackedtree.checkpoint import _convert
from stackedtree.cli import main

real = _convert._Copier.copy

def slow(self, *args):
    Path(sys.argv[3]).touch()
    time.sleep(float(sys.argv[4]))
    real(self, *args)

_convert._Copier.copy = slow
if sys.argv[5:] == ["nohup"]:  # started as `nohup` starts a command
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
sys.exit(main(["stack", sys.argv[1], "-o", sys.argv[2]]))
"""


@pytest.mark.parametrize(
    ("signum", "said"),
    [
        (signal.SIGTERM, "stopped by SIGTERM"),
        (signal.SIGHUP, "stopped by SIGHUP"),
        (signal.SIGINT, "interrupted"),
    ],
)
def test_a_signal_during_a_conversion_leaves_nothing(
    tmp_path: Path, signum: int, said: str
) -> None:
    src, out, started = (tmp_path / n for n in ("in.safetensors", "out", "started"))
    out.mkdir()
    save_flat(src, llama())
    env = {
        **os.environ,
        "PYTHONPATH": SRC_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    target = out / "o.safetensors"
    argv = [sys.executable, "-c", SLOW_STACK, str(src), str(target), str(started), "60"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with deadline(60):
            while not started.exists() and proc.poll() is None:
                threading.Event().wait(0.02)
        assert next(p.name for p in out.iterdir()).startswith(".o.safetensors.")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"stackedtree: {said}; no output written"
    assert list(out.iterdir()) == []


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    # As under `nohup`: the conversion goes on.
    src, out, started = (tmp_path / n for n in ("in.safetensors", "o.safetensors", "s"))
    save_flat(src, llama())
    env = {
        **os.environ,
        "PYTHONPATH": SRC_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    argv = [sys.executable, "-c", SLOW_STACK, str(src), str(out), str(started), "1"]
    proc = subprocess.Popen(
        [*argv, "nohup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with deadline(60):
            while not started.exists() and proc.poll() is None:
                threading.Event().wait(0.02)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert load_stacked(out)[2] == "model.layers.{i}."


def test_an_interrupt_right_after_the_temporary_file_is_made(
    tmp_path: Path, monkeypatch: Any
) -> None:
    real_open = open

    def open_then_interrupt(path: Any, mode: str) -> Any:
        real_open(path, mode).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(_files, "open", open_then_interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_flat(tmp_path / "a.safetensors", llama())
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_inspect_quietly(tmp_path: Path) -> None:
    save_flat(tmp_path / "in.safetensors", llama())
    read, write = os.pipe()
    os.close(read)  # as `head -1` does once it has its line
    try:
        r = run_python(
            "import sys; from stackedtree.cli import main; sys.exit(main(sys.argv[1:]))",
            "inspect",
            str(tmp_path / "in.safetensors"),
            stdout=write,
        )
    finally:
        os.close(write)
    assert r.returncode == 141
    assert r.stderr == ""


# -------------------------------------------------------------------- memory bounds


def peak_memory(fn: Callable[[], Any]) -> int:
    """The peak bytes Python and numpy allocate while `fn` runs (or fails)."""
    tracemalloc.start()
    try:
        with contextlib.suppress(ValueError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_inspect_reads_only_the_headers_of_npz_version_3(tmp_path: Path) -> None:
    path = tmp_path / "v3.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("h.0.w", "h.1.w"):
            with zf.open(name + ".npy", "w", force_zip64=True) as m:
                np.lib.format.write_array(m, np.zeros(10**7, np.uint8), version=(3, 0))
    assert path.stat().st_size < 10**6
    text = inspect_checkpoint(path)
    assert "2 layers of 1 tensors (9.5 MiB each)" in text
    assert peak_memory(lambda: inspect_checkpoint(path)) < 10**6
    assert all((a == 0).all() and a.shape == (10**7,) for a in load_flat(path).values())


@pytest.mark.parametrize(
    "make",
    [
        lambda d: stacked_with_layers(d, 2_000_000),
        lambda d: one_tensor(d, shape=[1] * 4_100_000, data_offsets=[0, 1]),
    ],
    ids=["two-million-empty-layers", "four-million-dimensions"],
)
def test_refusals_take_little_memory(tmp_path: Path, make: Any) -> None:
    src = Path(make(tmp_path))
    peak = peak_memory(lambda: convert_unstack(src, tmp_path / "o.safetensors"))
    assert peak < 2 * src.stat().st_size + 10**6


# --------------------------------------------------------------------------- fuzz

FUZZ_FLAT = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "h.0.w": np.asarray([1, 2, 3, 4], np.uint16),
    "h.1.w": np.asarray([5, 6, 7, 8], np.uint16),
    "empty": np.zeros((0, 5), np.uint8),
    "s": np.asarray(7, np.int64),
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 80)
    | st.sampled_from([2**63, 2**64, -(2**63), 10**40, 3 * 2**62])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["F32", "U16", "BF16", "I64", "U8", "", "\ud800"])
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets", "x"]), inner
        )
    ),
    max_leaves=6,
)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@st.composite
def mutated_safetensors(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid file, truncated, with bytes flipped, or with a header field rewritten."""
    how = draw(
        st.sampled_from(["truncate", "flip", "field", "field", "length", "rename"])
    )
    data = bytearray(valid)
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + bytes(data[8:])
    header, body = _split(valid)
    name = draw(st.sampled_from(sorted(header)))
    if how == "field":
        if name == "__metadata__" or draw(st.booleans()):
            header[name] = draw(json_values)
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "x"]))
            if draw(st.booleans()):
                header[name].pop(field, None)
            else:
                header[name][field] = draw(json_values)
    else:
        header[draw(st.sampled_from(["a", "h.1.w", "__metadata__", "z"]))] = header.pop(
            name
        )
    raw = json.dumps(header).encode()
    keep_length = draw(st.booleans())
    n = struct.unpack("<Q", valid[:8])[0] if keep_length else len(raw)
    return struct.pack("<Q", n) + raw + body


def _clear_refusal(e: Exception, path: Path) -> None:
    assert isinstance(e, ValueError | TypeError), repr(e)
    assert f"`{path}`" in str(e), str(e)
    assert "\n" not in str(e), str(e)


def _check_load(path: Path, data: bytes) -> None:
    """The file loads exactly as its header says, or is refused clearly."""
    try:
        with deadline(20):
            loaded = load_flat(path)
    except Exception as e:
        _clear_refusal(e, path)
        return
    header, body = _split(data)
    header.pop("__metadata__", None)
    assert set(loaded) == set(header)
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        assert loaded[name].shape == tuple(entry["shape"])
        assert loaded[name].tobytes() == body[begin:end]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_safetensors_load_exactly_or_are_refused(data: Any) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        path = folder / "f.safetensors"
        save_flat(path, FUZZ_FLAT, metadata={"k": "v"})
        mutated = data.draw(mutated_safetensors(path.read_bytes()))
        path.write_bytes(mutated)
        _check_load(path, mutated)
        try:
            with deadline(20):
                inspect_checkpoint(path)
        except Exception as e:
            _clear_refusal(e, path)
    finally:
        shutil.rmtree(folder)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), compressed=st.booleans())
def test_fuzzed_npz_load_or_are_refused(data: Any, compressed: bool) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        path = folder / "f.npz"
        save = np.savez_compressed if compressed else np.savez
        save(path, **FUZZ_FLAT)
        raw = bytearray(path.read_bytes())
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(
                    st.integers(1, 255)
                )
        path.write_bytes(bytes(raw))
        for read in (read_checkpoint, load_flat, inspect_checkpoint):
            try:
                with deadline(20):
                    got = read(path)
            except Exception as e:
                _clear_refusal(e, path)
                continue
            if read is load_flat:
                header = read_checkpoint(path).tensors
                assert set(got) == set(header)
                for name, arr in got.items():
                    assert (arr.shape, arr.dtype) == (
                        header[name].shape,
                        header[name].dtype,
                    )
    finally:
        shutil.rmtree(folder)
