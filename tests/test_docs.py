"""The docs and the CLI agree: every flag README's command table names is one its command takes, and
every flag a command takes is named in README.md or docs/*.md."""

import argparse
import re
from pathlib import Path

from mixlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w-])")
FOREIGN = {"--tasks", "--nproc-per-node"}  # lm-eval's and torchrun's, in the eval and torchrun rows


def _commands() -> dict[str, set[str]]:
    """Each command ("train", "data prepare"; "" for `mixlab` itself) -> the flags its parser takes."""
    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
        out[prefix] = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}

    walk(build_parser(), "")
    return out


def test_readme_command_table_names_only_flags_its_commands_take():
    commands = _commands()
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"\| `(mixlab|torchrun) ", line)]
    assert len(rows) > 15
    for row in rows:
        head = row.split(" | ")[0]
        names = re.findall(r"mixlab ((?:[a-z][a-z-]*\\\|)*[a-z][a-z-]*(?: prepare)?)", head)
        cmds = [c for name in names for c in name.split("\\|")] or [""]
        taken = set().union(*(commands[c] for c in cmds))
        bad = set(FLAG.findall(row)) - taken - FOREIGN
        assert not bad, f"README's row for {cmds} names {sorted(bad)}, which they do not take"


def test_every_flag_is_documented():
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    named = set(FLAG.findall(docs))
    missing = {c or "mixlab": sorted(flags - named) for c, flags in _commands().items() if flags - named}
    assert not missing, f"flags no doc names: {missing}"


def test_every_command_that_shows_progress_takes_quiet():
    """--quiet was eval's and analyze's only; train, sft, dpo, data prepare and bench had no way to stop theirs."""
    commands = _commands()
    assert not [c for c in ("train", "sft", "dpo", "data prepare", "eval", "analyze", "bench", "convert", "upcycle")
                if "--quiet" not in commands[c]]
