"""The README's runnable snippet must keep running."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "class Model" in b]
    assert len(runnable) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(runnable[0], "README.md", "exec"), namespace)
    report = namespace["pruning"].report()
    assert (report["net.0"].zero_blocks, report["net.0"].num_blocks) == (48, 64)
    assert [layer.name for layer in report.layers] == ["net.0"]
