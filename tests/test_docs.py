"""The README stays true and short: it starts with the two set-up commands, lists exactly the operator
settings, and every relative link in it and in docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from pictrace.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# What an operator sets, as environment variables; the fitted constants live in pictrace/tuning.py instead.
OPERATOR_SETTINGS = (
    # serving
    "host", "port", "db", "data_dir", "index_on_start", "watch",
    # model
    "backbone", "model_path", "resnet50_weights", "embed_threads",
    # search and evidence
    "top_k", "explain_ttl_s",
    # limits
    "max_upload_bytes", "max_download_bytes", "max_pixels", "max_metadata_bytes", "fetch_timeout_s",
    "fetch_connect_timeout_s", "fetch_retries", "fetch_concurrency", "fetch_per_host", "fetch_allow",
    # work and writes
    "workers", "queue_limit", "api_token", "gallery_public_details", "keep_queries",
    # scaling out
    "index_mode", "database_url", "milvus_uri", "milvus_token", "sync_interval_s",
)  # fmt: skip

# Environment variables the README may name that are not settings.
OTHER_VARIABLES = {"PICTRACE_TEST_TENSORFLOW"}


def test_the_settings_are_the_operator_settings() -> None:
    """At most 32, each documented: fitted constants belong in pictrace/tuning.py."""
    assert sorted(Settings.model_fields) == sorted(OPERATOR_SETTINGS)
    assert len(OPERATOR_SETTINGS) <= 32


def test_every_operator_setting_is_documented() -> None:
    missing = [name for name in OPERATOR_SETTINGS if f"| `PICTRACE_{name.upper()}` |" not in README]
    assert missing == []


def test_the_readme_names_no_other_variable() -> None:
    named = set(re.findall(r"PICTRACE_[A-Z0-9_]+", README))
    allowed = {f"PICTRACE_{name.upper()}" for name in OPERATOR_SETTINGS} | OTHER_VARIABLES
    assert sorted(named - allowed) == []


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 250


def test_readme_starts_with_install_and_test_commands() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert lines[0] == "pip install -r requirements.txt && python app.py"
    assert lines[1] == "bash scripts/test.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nbash scripts/test.sh\n" in ci


def test_relative_links_lead_to_files() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", page.read_text()):
            link = (target[0] or target[1]).split("#", 1)[0]
            if link and "://" not in link and not (page.parent / link).exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert broken == []
