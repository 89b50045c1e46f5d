"""The `evev2` command line: every command's --help renders, and a user error ends the console script with one line
(`evev2: error: ...`, exit code 2) unless --debug asks for the traceback; `main` itself keeps raising."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest

from evev2.cli import COMMANDS, _add_function, _resolve, build_parser, console_main, main
from evev2.data.errors import TooManyBadSamplesError
from evev2.errors import UserError
from evev2.train.recipe import RecipeError

MALFORMED = """
name = "bad"
[model]
source = "nowhere"
[data]
sources = [{ name = "s", type = "llava", path = "x.json" }]
[optim]
lr = "fast"
[train]
trainable = ["patch_embed"]
steps = 1
global_batch = 1
"""


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_help_renders_for_every_command(words):
    target, _ = COMMANDS[words]
    fn = _resolve(target)
    parser = build_parser()[1][words]
    _add_function(parser, fn)
    text = parser.format_help()
    assert text.startswith(f"usage: evev2 {' '.join(words)}")
    assert (fn.__doc__ or "").split("\n")[0].strip()[:30] in " ".join(text.split())  # the docstring summary
    for name in inspect.signature(fn).parameters:
        assert ("KEY=VALUE" if name == "overrides" else name.replace("_", "-")) in text, name


def test_top_level_help_documents_debug(capsys):
    assert "--debug" in build_parser()[0].format_help()
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0 and "--debug" in capsys.readouterr().out


def run_console(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EVEV2_DEBUG"}
    return subprocess.run([sys.executable, "-m", "evev2.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_malformed_recipe_ends_with_one_line_and_exit_code_2(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(MALFORMED)
    result = run_console(["train", "--recipe", str(recipe)])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"evev2: error: {recipe}: optim.lr: expected float, got str 'fast'"]


def test_malformed_recipe_with_debug_shows_the_traceback(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(MALFORMED)
    result = run_console(["train", "--recipe", str(recipe), "--debug"])
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "RecipeError: " in result.stderr


@pytest.fixture
def fake_commands(tmp_path, monkeypatch):
    """A `boom` command that raises what it is told to, registered like a real one."""
    (tmp_path / "boom_cmd.py").write_text(textwrap.dedent("""
        from evev2.data.errors import TooManyBadSamplesError
        from evev2.train.recipe import RecipeError

        def boom_cli(*, kind: str) -> None:
            '''Raise an error of one kind.'''
            if kind == "recipe":
                raise RecipeError("train.steps must be positive, got 0")
            if kind == "missing":
                open("/nonexistent/model/config.json")
            if kind == "guard":
                raise TooManyBadSamplesError("9 of 10 samples were unusable: {'missing_image': 9}")
            raise RuntimeError("a bug")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, ("boom",), ("boom_cmd:boom_cli", "raise an error"))
    monkeypatch.delenv("EVEV2_DEBUG", raising=False)


def console(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["evev2", *args])
    console_main()


@pytest.mark.parametrize("kind,line", [
    ("recipe", "evev2: error: train.steps must be positive, got 0"),
    ("missing", "evev2: error: [Errno 2] No such file or directory: '/nonexistent/model/config.json'"),
    ("guard", "evev2: error: 9 of 10 samples were unusable: {'missing_image': 9}"),
])
def test_console_main_prints_one_line_for_user_errors(fake_commands, monkeypatch, capsys, caplog, kind, line):
    with caplog.at_level("DEBUG", logger="evev2.cli"), pytest.raises(SystemExit) as info:
        console(monkeypatch, "boom", "--kind", kind)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert caplog.records[-1].exc_info is not None  # the traceback goes to the log (DEBUG), not the terminal


def test_debug_flag_or_env_var_and_bugs_keep_the_traceback(fake_commands, monkeypatch):
    with pytest.raises(RecipeError):
        console(monkeypatch, "--debug", "boom", "--kind", "recipe")
    with pytest.raises(RecipeError):
        console(monkeypatch, "boom", "--kind", "recipe", "--debug")
    monkeypatch.setenv("EVEV2_DEBUG", "1")
    with pytest.raises(TooManyBadSamplesError):
        console(monkeypatch, "boom", "--kind", "guard")
    monkeypatch.delenv("EVEV2_DEBUG")
    with pytest.raises(RuntimeError, match="a bug"):
        console(monkeypatch, "boom", "--kind", "bug")


def test_main_keeps_raising_for_in_process_callers(fake_commands):
    with pytest.raises(RecipeError):
        main(["boom", "--kind", "recipe"])
    with pytest.raises(FileNotFoundError):
        main(["boom", "--kind", "missing"])


def test_user_errors_keep_their_builtin_bases():
    assert issubclass(RecipeError, UserError) and issubclass(RecipeError, ValueError)
    assert issubclass(TooManyBadSamplesError, UserError) and issubclass(TooManyBadSamplesError, RuntimeError)
