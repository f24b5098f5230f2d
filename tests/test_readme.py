"""The README's command blocks run as written in order on a fresh `detox up`: every shell
variable a block uses is set before it (by an earlier line, or by the one set-up the README asks
for: `export DETOX_API_KEY=<the key> AUTH="Authorization: Bearer $DETOX_API_KEY"`), and no block
refers to a placeholder the reader would have to replace."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SET_UP = {"DETOX_API_KEY", "AUTH"}  # what the README asks the reader to export first
SHELL = {"HOME", "PATH", "PWD", "USER"}
_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
_USE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_SET = re.compile(r"(?:^|[\s;(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")


def command_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def unset_variables(blocks: list[str]) -> list[tuple[int, str]]:
    """(block number, variable) for each use of a variable no earlier line sets."""
    known = SET_UP | SHELL
    missing = []
    for n, block in enumerate(blocks, 1):
        for line in block.splitlines():
            code = line.split(" # ", 1)[0]
            # Set on this line, e.g. `ID=$(curl ...)`: known from the next line on.
            missing += [(n, name) for name in _USE.findall(code) if name not in known]
            known |= set(_SET.findall(code))
    return missing


def test_every_variable_a_readme_command_uses_is_set_before_it():
    blocks = command_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 10
    assert unset_variables(blocks) == []


def test_no_readme_command_holds_a_placeholder():
    for block in command_blocks((ROOT / "README.md").read_text()):
        for line in block.splitlines():
            code = line.split(" # ", 1)[0]
            assert not re.search(r"\b(ID|NAME|KEY)\b(?!=)", code.replace("$ID", "")), line


def test_the_checks_themselves_catch_an_unset_variable():
    assert unset_variables(["curl localhost/v1/jobs/$ID\n"]) == [(1, "ID")]
    assert unset_variables(["ID=$(curl -s localhost | jq -r .id)\ncurl x/$ID\n"]) == []
