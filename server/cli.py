"""``textserve``: one CLI, one subcommand per module.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``;
this file only dispatches, importing the module (and so TensorFlow) only when it is used. Any
:class:`~server.errors.TextserveError` (and a missing file) becomes one line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from server import __version__
from server.errors import TextserveError, UsageError

# name → (module, one-line help). Keep alphabetical within each group.
COMMANDS: dict[str, tuple[str, str]] = {
    # serving
    "serve": ("server.commands.serve", "serve a model repository over HTTP"),
    "import-graph": ("server.commands.import_graph", "add a frozen GraphDef made elsewhere"),
    # toolchain
    "build-demo": ("models.commands.build_demo", "train and export the demo model set"),
    "compress": ("models.commands.compress", "write compressed embeddings / pruned models"),
    "export": ("models.commands.export", "export a trained model in every format"),
    "gen-embedding": ("models.commands.gen_embedding", "write a shared embedding artifact"),
    "train": ("models.commands.train", "train the shallow CNN on a dataset"),
    # reports
    "bench": ("models.commands.bench", "load benchmark: ceiling vs textserve vs a naive server"),
    "memory-report": ("models.commands.memory_report", "compare memory of compression strategies"),
}


class _Command(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _load(name: str) -> _Command:
    return cast(_Command, importlib.import_module(COMMANDS[name][0]))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="textserve", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"textserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(name).configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    try:
        if command is not None and command not in COMMANDS:
            raise UsageError(f"unknown command {command!r} (try: textserve --help)")
        args = build_parser(command).parse_args(args_list)
        if args.command is None:
            build_parser().print_help()
            return 2
        return _load(args.command).run(args)
    except UsageError as exc:
        print(f"textserve: error: {exc.message}", file=sys.stderr)
        return 2
    except TextserveError as exc:
        print(f"textserve: error: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"textserve: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("textserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
