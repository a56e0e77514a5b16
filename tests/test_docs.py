"""The reference pages name every configuration key, metric and command the code has, so the
docs cannot fall behind the code unnoticed. (Links and pages are checked by `mkdocs build --strict`.)"""

from __future__ import annotations

import re
from pathlib import Path

import click
import typer.main

from dicomnode.cli import app
from dicomnode.config import Config
from dicomnode.metrics import Metrics

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def sections(page: str) -> dict[str, str]:
    """`## `[name]`` heading -> the text under it."""
    text = (REFERENCE / page).read_text()
    parts = re.split(r"^## `\[\[?([a-z_]+)\]\]?`\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_config_key_is_in_the_configuration_reference():
    documented = sections("configuration.md")
    missing = []
    for name, field in Config.model_fields.items():
        if field.exclude:
            continue
        section = field.annotation.__args__[0] if name == "destinations" else field.annotation
        text = documented.get(name, "")
        missing += [f"[{name}].{key}" for key in section.model_fields if f"| `{key}` |" not in text]
    assert missing == []


def test_every_metric_is_in_the_metrics_reference():
    text = (REFERENCE / "metrics.md").read_text()
    families = {m.name for m in Metrics().registry.collect()} | {"dicomnode_jobs", "dicomnode_deliveries",
                                                                 "dicomnode_spool_free_bytes"}
    counters = {m.name for m in Metrics().registry.collect() if m.type == "counter"}
    names = {f"{n}_total" if n in counters else n for n in families}
    assert sorted(n for n in names if f"`{n}`" not in text) == []


def test_every_command_is_in_the_cli_reference():
    text = (REFERENCE / "cli.md").read_text()

    def commands(group: click.Group, prefix: str) -> list[str]:
        out = []
        for name, cmd in group.commands.items():
            full = f"{prefix} {name}"
            out += commands(cmd, full) if isinstance(cmd, click.Group) else [full]
        return out

    names = commands(typer.main.get_command(app), "dicomnode")
    assert len(names) > 10
    missing = [n for n in names if f"`{n}" not in text]
    assert missing == []
    from training.__main__ import COMMANDS

    assert [n for n in COMMANDS if f"### `{n}`" not in text] == []  # python -m training's commands


def test_the_readme_links_point_at_files_that_exist():
    root = REFERENCE.parents[1]
    text = (root / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets and [t for t in targets if t and not (root / t).exists()] == []
    assert len(text.encode()) <= 10_000  # a landing page; the rest is in docs/
