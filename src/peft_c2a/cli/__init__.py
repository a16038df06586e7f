"""The `peft-c2a` command line: `peft-c2a <command> [flags]`, one module per command.

    peft-c2a federate --help     # the main job: federated fine-tuning over non-IID clients (also `peft-c2a-federate`)
    peft-c2a export --help       # one client's C2A adapter as a static (bottleneck or LoRA) adapter folder

Each command is a module with `main(argv, prog) -> int` (its exit status), listed in `COMMANDS` and imported only when
it is chosen, so `peft-c2a --help` does not load what the other commands need. A command parses its own flags: the
dispatcher hands it everything after its name untouched. To add one, write `peft_c2a/cli/<name>.py` and add a line
to `COMMANDS` (and, if wanted, a `peft-c2a-<name>` alias under `[project.scripts]`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional

from .. import __version__

PROG = "peft-c2a"
# command name -> (module under peft_c2a.cli, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "federate": (
        "peft_c2a.cli.federate",
        "federated fine-tuning of a text classifier over non-IID clients (the main job; `federate --help`)",
    ),
    "export": (
        "peft_c2a.cli.export",
        "one client's C2A adapter as a static bottleneck or (C2A-LoRA) plain LoRA adapter folder",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it only chooses the command (its `--help` lists them)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="C2A: hypernetwork-generated, client-customized adapters for federated fine-tuning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `peft-c2a <command> ...` (default: the command line) and return the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # --help, --version, or an error naming the commands: each exits
        parser.print_usage(sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"{PROG} {argv[0]}")
