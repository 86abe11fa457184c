"""What users read (every command's --help, the presets, the config's key descriptions) speaks of flags and the
tools whose conventions they follow, never of this project's internal seed numbers."""

import json
import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from lmdistill.cli import PRESETS, app, preset_text
from lmdistill.config import PipelineConfig

SEED_WORD = re.compile(r"\bseeds? ?\d|\bseed-\d", re.IGNORECASE)


def _help_texts() -> dict[str, str]:
    runner = CliRunner()
    commands = [[]] + [[name] for name in get_command(app).commands]
    return {" ".join(args) or "lmdistill": runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"}).output
            for args in commands}


def test_no_seed_numbers_in_help_presets_or_config_descriptions():
    texts = _help_texts()
    assert len(texts) > 8 and all("Usage" in text for text in texts.values())
    texts |= {f"preset {name}": preset_text(name) for name in PRESETS}
    texts["config descriptions"] = json.dumps(PipelineConfig.model_json_schema())
    found = {where: SEED_WORD.findall(text) for where, text in texts.items() if SEED_WORD.search(text)}
    assert not found


@pytest.mark.parametrize("text", ["(seed 003's --create_config)", "seeds 000/001", "Seed-002 sugar", "seed 2"])
def test_the_scan_catches_seed_numbers(text):
    assert SEED_WORD.search(text)


def test_flags_show_as_plain_flags_saying_what_they_do():
    texts = _help_texts()
    assert not {where for where, text in texts.items() if "<bool>" in text}
    rows = texts["wizard"].splitlines()
    for flag, says in (("--yes", "Take every default answer without asking"),
                       ("--restart", "Start over: replace an earlier config file")):
        row = next(line for line in rows if flag in line)
        assert says in row, row
    assert "KEY=VALUE" in next(line for line in rows if "--set" in line)
