"""The `stackedtree` command: end to end through `python -m stackedtree`, and its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import ckptgen
import ml_dtypes
import numpy as np
import pytest
from ckptgen import assert_same_flat, run_command, unwritable_dir

from stackedtree.checkpoint import load_flat, load_stacked, save_flat, stack_by_name
from stackedtree.cli import main

run = run_command


KEYS = {
    "self_attn.q_proj.weight": ((4, 4), np.float16),
    "input_layernorm.weight": ((4,), np.int8),
}


def llama(n: int = 3) -> dict[str, np.ndarray]:
    return ckptgen.llama(n, KEYS, vocab=8, norm=False, head=True)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_flat(path, llama(3))
    return path


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("stackedtree: error: "), stderr
    return lines[0]


# --------------------------------------------------------------- end to end, subprocess


def test_inspect_stack_unstack_end_to_end(tmp_path: Path, ckpt: Path) -> None:
    r = run("inspect", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:5] == [
        "1 file, 8 tensors, 364 B (364 bytes)",
        "layer pattern: 'model.layers.{i}.' (detected), 3 layers of 2 tensors (36 B each)",
        "layer 0:",
        "  input_layernorm.weight   i8[4]",
        "  self_attn.q_proj.weight  f16[4,4]",
    ]

    stacked_path = tmp_path / "stacked.safetensors"
    r = run("stack", str(ckpt), "-o", str(stacked_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"wrote {stacked_path}: 4 tensors, 364 B, 3 layers by pattern 'model.layers.{{i}}.'"
    )
    assert "Traceback" not in r.stderr
    stacked, rest, pattern, kinds = load_stacked(stacked_path)
    assert kinds is None
    want_stacked, want_rest = stack_by_name(llama(3), "model.layers.{i}.")
    assert pattern == "model.layers.{i}."
    assert_same_flat(stacked, want_stacked)
    assert_same_flat(rest, want_rest)

    r = run("inspect", str(stacked_path))
    assert "stacked checkpoint: pattern 'model.layers.{i}.', 3 layers" in r.stdout

    back = tmp_path / "back.safetensors"
    r = run("unstack", str(stacked_path), "-o", str(back), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_flat(load_flat(back), llama(3))


def test_bad_input_exits_2_with_one_line(tmp_path: Path, ckpt: Path) -> None:
    r = run(
        "stack",
        str(tmp_path / "missing.safetensors"),
        "-o",
        str(tmp_path / "o.safetensors"),
    )
    assert r.returncode == 2
    assert "No such file or directory" in one_error_line(r.stderr)
    assert "Traceback" not in r.stderr
    r = run("stack", str(ckpt), "-o", str(ckpt))
    assert r.returncode == 2
    assert "already exists; pass overwrite=True (--force)" in one_error_line(r.stderr)


# ---------------------------------------------------------------- errors, in process


def cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_existing_output_is_refused_without_force(
    tmp_path: Path, ckpt: Path, capsys: Any
) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code, _, err = cli(capsys, "stack", str(ckpt), "-o", str(out))
    assert code == 2 and "already exists" in one_error_line(err)
    assert out.read_bytes() == b"precious"
    code, _, err = cli(capsys, "stack", str(ckpt), "-o", str(out), "--force", "-q")
    assert code == 0, err
    assert load_stacked(out)[2] == "model.layers.{i}."


def test_unwritable_folder(tmp_path: Path, ckpt: Path, capsys: Any) -> None:
    folder = Path(unwritable_dir(tmp_path))
    code, _, err = cli(capsys, "stack", str(ckpt), "-o", str(folder / "o.safetensors"))
    assert code == 2
    assert "permission denied in folder" in one_error_line(err)
    assert not (folder / "o.safetensors").exists()
    code, _, err = cli(
        capsys, "stack", str(ckpt), "-o", str(tmp_path / "no" / "o.safetensors")
    )
    assert code == 2 and "does not exist" in one_error_line(err)


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (
            lambda p: p.write_bytes(b"\x10\x00"),
            ["inspect"],
            "fewer than the 8-byte header",
        ),
        (lambda p: p.write_bytes(b"junk"), ["stack"], "fewer than the 8-byte header"),
        (lambda p: save_flat(p, llama(3)), ["unstack"], "is not a stacked checkpoint"),
        (
            lambda p: save_flat(
                p, {**llama(2), "enc.0.w": np.zeros(1), "enc.1.w": np.zeros(1)}
            ),
            ["stack"],
            r"ambiguous, candidates are 'model.layers.{i}.' (2 layers: 0-1); 'enc.{i}.'",
        ),
        (
            lambda p: save_flat(p, llama(2)),
            ["stack", "--pattern", "layers"],
            "exactly one `{i}`",
        ),
        (
            lambda p: save_flat(
                p, {k: v for k, v in llama(3).items() if ".1." not in k}
            ),
            ["stack"],
            "missing layers 1; found layers 0, 2",
        ),
        (
            lambda p: save_flat(
                p, {"model.layers.0.w": np.zeros(2), "model.layers.1.w": np.zeros(3)}
            ),
            ["stack"],
            "tensors differ in shape or dtype across layers: "
            "`model.layers.1.w` has shape (3,) dtype float64, expected shape (2,)",
        ),
    ],
)
def test_bad_input_messages(
    tmp_path: Path, capsys: Any, make: Any, args: list[str], message: str
) -> None:
    src = tmp_path / "in.safetensors"
    make(src)
    out = tmp_path / "out.safetensors"
    argv = [args[0], str(src), *args[1:]] + (
        [] if args[0] == "inspect" else ["-o", str(out)]
    )
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert message in one_error_line(err)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_inspect_without_a_pattern_lists_tensors(tmp_path: Path, capsys: Any) -> None:
    save_flat(tmp_path / "a.npz", {"w": np.zeros((2, 3), np.float32)})
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "a.npz"))
    assert code == 0
    assert out.splitlines()[1:] == [
        "layer pattern: none (found no layer pattern (no name prefix is followed by two or "
        "more layer indices); give one explicitly, e.g. --pattern 'model.layers.{i}.')",
        "tensors:",
        "  w  f32[2,3]",
    ]


def test_usage_errors_exit_2(capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        main(["stack", "x.safetensors"])
    assert e.value.code == 2
    assert (
        "the following arguments are required: -o/--output" in capsys.readouterr().err
    )


def test_command_starts_without_importing_jax():
    # jax's import would dominate the command's start-up; conversion needs numpy only.
    code = "import sys, stackedtree.cli; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_converting_does_not_import_ml_dtypes(tmp_path: Path) -> None:
    # Importing ml_dtypes takes most of a second, as long as copying a large part
    # of a gigabyte: `inspect`, `stack` and `unstack` copy bytes and need no dtype,
    # bfloat16 included, so the command never imports it (nor tqdm, with `-q`).
    flat = ckptgen.llama(2, {"mlp.up_proj.weight": ((4, 2), ml_dtypes.bfloat16)})
    save_flat(tmp_path / "model.safetensors", flat)
    code = (
        "import sys; from stackedtree.cli import main\n"
        "for argv in (['inspect', 'model.safetensors'],\n"
        "             ['stack', 'model.safetensors', '-o', 's.safetensors', '-q'],\n"
        "             ['unstack', 's.safetensors', '-o', 'u.safetensors', '-q']):\n"
        "    assert main(argv) == 0, argv\n"
        "print(sorted(m for m in sys.modules if m.startswith(('ml_dtypes', 'jax', 'tqdm'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert_same_flat(load_flat(tmp_path / "u.safetensors"), flat)
    # With a progress bar (the default), the same bytes.
    assert (
        main(
            [
                "stack",
                str(tmp_path / "model.safetensors"),
                "-o",
                str(tmp_path / "p.safetensors"),
            ]
        )
        == 0
    )
    assert (tmp_path / "p.safetensors").read_bytes() == (
        tmp_path / "s.safetensors"
    ).read_bytes()
