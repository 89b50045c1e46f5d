"""The README's Python example runs as written, on a locally built tiny Qwen2 folder."""

import re
from pathlib import Path

from PIL import Image


def test_readme_python_example_runs(tiny_vlm_dir, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", Path("README.md").read_text(), re.S).group(1)
    Image.new("RGB", (200, 150), (200, 30, 30)).save(tmp_path / "cat.jpg")
    llm = tiny_vlm_dir.parent / "llm"  # the tiny Qwen2 folder (with tokenizer) the fixture converted
    code = code.replace("path/to/Qwen2.5-0.5B-Instruct", str(llm)).replace('"models/eve-0.5b"', repr(str(tmp_path / "eve")))
    code = code.replace('"cat.jpg"', repr(str(tmp_path / "cat.jpg")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape[0] == 1 and namespace["out"].shape[1] > namespace["batch"]["input_ids"].shape[1]
