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


def _published_headline(path: Path) -> str:
    """A results file's machine line and headline table, as the README shows them."""
    text = path.read_text()
    (machine,) = [line for line in text.splitlines() if line.startswith("_Machine:")]
    return machine + "\n\n" + _between(text, "headline")


def test_readme_headline_tables_match_the_published_results():
    text = README.read_text()
    bench = README.parent / "benchmarks"
    assert _between(text, "headline:cpu") == _published_headline(bench / "results.md")
    assert _between(text, "headline:gpu") == _published_headline(
        bench / "results_gpu.md"
    )
