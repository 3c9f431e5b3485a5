"""The README stays true: every setting is in its table, and it starts with the two set-up commands."""

from __future__ import annotations

from pathlib import Path

from pictrace.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name for name in Settings.model_fields if f"`PICTRACE_{name.upper()}`" not in README]
    assert missing == []


def test_readme_starts_with_install_and_test_commands() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert lines[0] == "pip install -r requirements.txt && python app.py"
    assert lines[1] == "bash scripts/test.sh"
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "\nbash scripts/test.sh\n" in ci
