"""The options every ``backbeat-trio`` command shares are spelled the same on every command.

The cluster id is ``-c/--cluster`` wherever a command has one (``--cluster-id``, the ``cluster``
command's old spelling, is accepted everywhere and not shown in ``--help``), the NATS URL is
``-s/--nats-url`` and the agent id ``-a/--agent``. No subprocess and no server: the parser
itself is asked.
"""

from __future__ import annotations

import argparse
import re
from types import ModuleType
from typing import cast

import pytest

from backbeat_trio._cli.commands import COMMANDS
from backbeat_trio._cli.main import build_parser

#: Arguments a command cannot be parsed without.
REQUIRED: dict[str, list[str]] = {"tempo": ["120"]}

#: (the ``args`` attribute, its short option, its canonical long option, accepted aliases)
SHARED = (
    ("cluster", "-c", "--cluster", ("--cluster-id",)),
    ("nats_url", "-s", "--nats-url", ()),
    ("agent", "-a", "--agent", ()),
)

#: Which commands have which shared option: a command that gains or loses one updates this.
HAVE = {
    "cluster": {"demo", "cluster", "pulse", "reverb", "tail", "emit", "tempo", "health"},
    "nats_url": {"pulse", "reverb", "tail", "emit", "tempo", "health"},
    "agent": {"tail", "emit", "tempo", "health", "keygen"},
}


def command_names() -> list[str]:
    names = [cast(ModuleType, mod).__name__.rsplit(".", 1)[-1] for mod in COMMANDS]
    assert len(names) == 10, names  # every module of _cli/commands is a command
    return names


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # the parser's defaults come from BACKBEAT_* variables; a wide terminal keeps help unwrapped
    for var in ("BACKBEAT_NATS_URL", "BACKBEAT_CLUSTER_ID", "BACKBEAT_AGENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")


def parse(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *REQUIRED.get(command, []), *argv])


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("dest", [dest for dest, *_ in SHARED])
def test_the_commands_that_have_each_shared_option(dest: str) -> None:
    having = {name for name in command_names() if dest in vars(parse(name))}
    assert having == HAVE[dest]


@pytest.mark.parametrize(
    ("command", "dest", "short", "long", "aliases"),
    [(command, *option) for option in SHARED for command in sorted(HAVE[option[0]])],
)
def test_every_spelling_of_a_shared_option_is_accepted(
    command: str, dest: str, short: str, long: str, aliases: tuple[str, ...]
) -> None:
    value = "nats://127.0.0.1:4299" if dest == "nats_url" else "some-id"
    for spelling in (short, long, *aliases):
        assert getattr(parse(command, spelling, value), dest) == value, spelling
    assert getattr(parse(command, f"{long}={value}"), dest) == value


@pytest.mark.parametrize("command", command_names())
def test_help_shows_one_spelling_of_each_shared_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    for dest, short, long, aliases in SHARED:
        metavar = "URL" if dest == "nats_url" else "ID"
        shown = f"{short} {metavar}, {long} {metavar}"
        assert (shown in text) == (command in HAVE[dest]), (command, shown)
        for alias in aliases:
            assert alias not in text, (command, alias)
    # no other spelling of the same thing: --cluster-name, --url, --agent-id, --nats ...
    longs = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
    assert {o for o in longs if "cluster" in o} <= {"--cluster"}
    assert {o for o in longs if "url" in o or "nats" in o} <= {"--nats-url"}
    assert {o for o in longs if o.startswith("--agent")} <= {"--agent", "--agents"}


def test_the_cluster_id_alias_does_not_replace_the_default() -> None:
    # the alias shares ``args.cluster``: had it a default of its own, it would overwrite the
    # visible option's default (or the BACKBEAT_CLUSTER_ID one) when neither is given
    assert parse("pulse").cluster == "default"
    assert parse("cluster").cluster == "local"
    assert parse("demo").cluster == "demo"


def test_the_cluster_id_default_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKBEAT_CLUSTER_ID", "from-env")
    assert parse("tail").cluster == "from-env"
    assert parse("tail", "--cluster-id", "given").cluster == "given"
