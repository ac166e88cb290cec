"""The README's promises that can drift: metric names and the CLI it documents."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from tomolive.daemon.cli import build_parser
from tomolive.daemon.metrics import Metrics

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_metric_named_in_the_readme_exists():
    scrape = generate_latest(Metrics(devices=["cpu"]).registry).decode()
    exposed = set(re.findall(r"tomolive_[a-z_]+", scrape))
    named = set(re.findall(r"`(tomolive_[a-z_]+)", README))
    assert named and named <= exposed, named - exposed


def test_every_subcommand_in_the_readme_exists():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    block = README.split("## Command line", 1)[1].split("```")[1]
    documented = set(re.findall(r"^tomolive ([\w-]+)", block, re.MULTILINE))
    assert documented == set(subcommands), documented ^ set(subcommands)


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in README and ".venv/bin/python -m pytest" in ci
