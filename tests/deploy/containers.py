"""Reading the container files without Docker: the Dockerfile's instructions, the compose file
with its `${VAR}` interpolation (the subset of compose's syntax it uses), and the compose
file's short and long forms of volumes, ports and environments."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# `$$` (a literal `$`), or `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, ...
_VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


class MissingVariable(LookupError):
    """A `${NAME:?error}` whose variable is unset (compose refuses the file)."""


def variables(text: str) -> set[str]:
    """The names of the variables that `text` interpolates."""
    return {match["name"] for match in _VARIABLE.finditer(text) if match["name"]}


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """`value` (a parsed compose file or a part of it) with every variable substituted."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: _substitute(match, env), value)
    return value


def _substitute(match: re.Match[str], env: Mapping[str, str]) -> str:
    if match["dollar"]:
        return "$"
    name, op, arg = match["name"], match["op"], match["arg"] or ""
    value = env.get(name)
    unset = value is None or (value == "" and op is not None and op.startswith(":"))
    if op in (":-", "-"):
        return arg if unset else str(value)
    if op in (":?", "?") and unset:
        raise MissingVariable(f"{name}: {arg}")
    return value or ""


def load_compose(env: Mapping[str, str], text: str | None = None) -> dict[str, Any]:
    """The compose file, parsed (YAML anchors and merge keys resolved) and interpolated."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)
    return interpolate({key: raw[key] for key in raw if not key.startswith("x-")}, env)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, from either form (mapping or list of `KEY=VALUE`)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str | None
    target: str

    @property
    def named(self) -> bool:
        """A named volume (not a bind mount of a host path, not anonymous)."""
        return bool(self.source) and not self.source.startswith(("/", ".", "~", "$"))


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    found = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            found.append(Mount(item.get("source"), item["target"]))
            continue
        parts = item.split(":")
        found.append(Mount(parts[0], parts[1]) if len(parts) > 1 else Mount(None, parts[0]))
    return found


def published_ports(service: Mapping[str, Any]) -> list[tuple[str | None, int]]:
    """(host side, container port) of each published port."""
    found: list[tuple[str | None, int]] = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            found.append((str(item.get("published")), int(item["target"])))
            continue
        host, _, container = str(item).rpartition(":")
        found.append((host or None, int(container.split("/")[0])))
    return found


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined
    stage: int  # index of the build stage (the FROM above it); -1 before the first FROM

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK, None for shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":  # options first: HEALTHCHECK --interval=... CMD [...]
            text = text[text.find("CMD ") + 4 :] if "CMD " in text else ""
        start = text.find("[")
        if start < 0:
            return None
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: comments and blank lines dropped, `\\` continuations joined."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical, pending = pending + line, ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    if pending:
        raise ValueError("the Dockerfile ends inside a line continuation")
    return instructions


def stage_names(instructions: list[Instruction]) -> dict[int, str]:
    """Stage index -> its `AS` name (when it has one)."""
    names = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            lowered = [word.lower() for word in words]
            if "as" in lowered:
                names[ins.stage] = words[lowered.index("as") + 1]
    return names


def env_assignments(ins: Instruction) -> dict[str, str]:
    """`ENV A=1 B=2` (or the legacy `ENV A 1`) as a mapping."""
    words = shlex.split(ins.args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def arg_defaults(instructions: list[Instruction], stage: int) -> dict[str, str | None]:
    """The ARGs declared in `stage`, with their defaults."""
    found: dict[str, str | None] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and ins.stage == stage:
            name, eq, default = ins.args.partition("=")
            found[name.strip()] = default.strip() if eq else None
    return found
