"""The README's quickstart runs and does what its comments say."""

import contextlib
import io
import re
from pathlib import Path

import jax

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_and_prints_what_it_says():
    code = python_blocks()[0]
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out), jax.numpy_rank_promotion("allow"):
        exec(compile(code, "README.md", "exec"), namespace)
    promised = re.search(r"print\(describe\(layers\)\)  # (.*)", code).group(1)
    assert out.getvalue().strip() == promised
    assert namespace["y"].shape == (4, 16)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = (
        re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    )
    assert first_block[0].endswith("python examples/llama_decoder.py")
    assert first_block[1].endswith("python -m pytest")


def _between(text: str, tag: str) -> str:
    return text.split(f"<!-- {tag} -->")[1].split(f"<!-- /{tag} -->")[0].strip()


def _headline(path: Path) -> str:
    text = path.read_text()
    return text.split("## Headline")[1].split("## Runs")[0].strip()


def test_readme_headline_tables_match_the_published_results():
    text = README.read_text()
    bench = README.parent / "benchmarks"
    assert _between(text, "headline:cpu") == _headline(bench / "results.md")
    gpu_rows = [
        row
        for row in _headline(bench / "results_gpu.md").splitlines()
        if "n/a" not in row
    ]
    assert _between(text, "headline:gpu").splitlines() == gpu_rows
