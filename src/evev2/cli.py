"""The `evev2` command line: a table of typed functions.

Every subcommand is a plain Python function whose signature is its flag set and whose docstring is its help.
Parameters without a default become positional arguments, keyword-only ones without a default become required
`--flags`, and the others optional `--flags`. A function may take a
trailing `overrides: list[str]` to accept free `key=value` arguments. A command's module is imported only when that
command runs (training, serving and evaluation stacks stay out of each other's start-up).

A user error (`evev2.errors.UserError`: a malformed recipe, broken data; or a missing file) ends the `evev2` console
script with one line, `evev2: error: <message>`, and exit code 2; `evev2 --debug ...` (or `EVEV2_DEBUG=1`) shows the
traceback instead (`--debug` goes before or after the command words).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from evev2.errors import UserError

logger = logging.getLogger(__name__)

DEBUG_HELP = ("on a user error (bad recipe, missing file) show the traceback instead of one line "
              "(also: EVEV2_DEBUG=1)")

# command words -> ("module:function", one-line help). Keep sorted by command.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("ablate",): ("evev2.ablate.pipeline:ablate_cli", "train EVEv1.0/1.2/1.5/2.0 on the same tokens and compare them (Figure 5)"),
    ("chat",): ("evev2.infer.chat:chat_cli", "chat with a model folder, one-shot or interactive (streams tokens)"),
    ("convert", "llm"): ("evev2.model.convert:convert_llm_cli", "Qwen2-family LLM folder -> EVEv2 model folder"),
    ("convert", "merge"): ("evev2.model.convert:merge_reparam_cli", "EVEv1.2 folder -> the equivalent merged EVEv1.5 folder"),
    ("convert", "official"): ("evev2.model.convert:convert_official_cli", "official EVEv2 checkpoint <-> ours"),
    ("data", "synth"): ("evev2.synth.world:synth_cli", "render the synthetic world (LLaVA JSON, WebDataset, text)"),
    ("demo",): ("evev2.demo.pipeline:demo_cli", "train a tiny EVEv2 end to end on the synthetic world (CPU) and evaluate it"),
    ("eval", "report"): ("evev2.eval.commands:report_cli", "tasks x models table from result folders"),
    ("eval", "run"): ("evev2.eval.run:run_cli", "run a model on a benchmark (resumable, torchrun-aware) and score it"),
    ("eval", "score"): ("evev2.eval.commands:score_cli", "score a predictions JSONL on a benchmark"),
    ("recap",): ("evev2.recap.cli:recap_cli", "re-caption image shards with a captioner model, filtered and resumable"),
    ("serve",): ("evev2.serve.cli:serve_cli", "OpenAI-compatible HTTP server with continuous batching and a web page"),
    ("train",): ("evev2.train.engine:train_cli", "train one stage from a TOML recipe"),
}


def _doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and its `Args:` entries."""
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\nArgs:\n")
    params: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if line.startswith("    ") and not line.startswith("        ") and ":" in stripped:
            current, _, text = stripped.partition(":")
            params[current.strip()] = text.strip()
        elif current:
            params[current] += " " + stripped
    return summary.strip(), params


def _add_function(parser: argparse.ArgumentParser, fn: Callable) -> None:
    summary, param_help = _doc_parts(fn)
    parser.description = summary
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind = hints.get(name, str)
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":  # Optional[X] / X | None
            kind = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        help_text = param_help.get(name, "")
        flag = "--" + name.replace("_", "-")
        if name == "overrides":
            parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help_text or "config overrides")
            continue
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=param.default,
                                help=help_text)
            continue
        is_list = origin in (list, tuple)
        elem = args[0] if is_list and args else kind
        elem = Path if elem is Path else elem
        typ = elem if elem in (int, float, Path) else str
        choices = list(typing.get_args(elem)) if typing.get_origin(elem) is typing.Literal else None
        common: dict[str, Any] = {"type": typ if choices is None else type(choices[0]), "help": help_text}
        if choices:
            common["choices"] = choices
        if is_list:
            common["nargs"] = "+"
        if param.default is inspect.Parameter.empty and param.kind is inspect.Parameter.KEYWORD_ONLY:
            parser.add_argument(flag, dest=name, required=True, **common)
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(name, **common)
        else:
            parser.add_argument(flag, dest=name, default=param.default, **common)


def build_parser() -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
    """The `evev2` parser and the subparser of every command (keyed like COMMANDS), flags not yet attached."""
    parser = argparse.ArgumentParser(prog="evev2", description="Encoder-free vision-language models (EVEv2.0).")
    parser.add_argument("--debug", dest="_debug", action="store_true", help=DEBUG_HELP)
    tree = {(): parser.add_subparsers(dest="command", required=True)}  # command prefix -> its subparsers action
    commands: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for words, (target, help_text) in sorted(COMMANDS.items()):
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in tree:
                group = tree[prefix[:-1]].add_parser(prefix[-1], help=f"{' '.join(prefix)} commands")
                tree[prefix] = group.add_subparsers(dest="_".join(prefix), required=True)
        commands[words] = tree[words[:-1]].add_parser(words[-1], help=help_text)
        commands[words].set_defaults(_target=target)
    return parser, commands


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    # Find the subcommand the words name, then attach its typed flags before the full parse.
    words = tuple(a for a in argv if not a.startswith("-"))
    for n in range(len(words), 0, -1):
        if words[:n] in COMMANDS:
            sub = commands[words[:n]]
            _add_function(sub, _resolve(COMMANDS[words[:n]][0]))
            sub.add_argument("--debug", dest="_debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
            break
    ns = vars(parser.parse_args(argv))
    ns.pop("_debug", None)
    fn = _resolve(ns.pop("_target"))
    kwargs = {k: v for k, v in ns.items() if k in inspect.signature(fn).parameters}
    return fn(**kwargs)


def _wants_debug(argv: list[str]) -> bool:
    """`--debug` before or after the command words, or `EVEV2_DEBUG=1`."""
    return "--debug" in argv or os.environ.get("EVEV2_DEBUG", "") not in ("", "0")


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def console_main() -> None:
    """The `evev2` console script: commands return values for in-process callers, not exit codes.

    A user error ends with one line on stderr and exit code 2 (as argparse's usage errors do), with the traceback
    logged at DEBUG level for a run's log file; a bug, or `--debug`, keeps the traceback.
    """
    argv = sys.argv[1:]
    try:
        main(argv)
    except (UserError, FileNotFoundError) as err:
        if _wants_debug(argv):
            raise
        logger.debug("evev2 %s failed", " ".join(argv), exc_info=True)
        print(f"evev2: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console_main()
