"""Fitted constants: frozen, validated, and replaceable as a whole from one JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pictrace.config import unknown_environment
from pictrace.errors import ConfigurationError
from pictrace.tuning import KEYPOINT_BITS, Tuning


def test_groups_are_frozen() -> None:
    tuning = Tuning()
    with pytest.raises(ValidationError):
        tuning.cascade.candidates = 3  # type: ignore[misc]


def test_a_file_replaces_only_the_fields_it_names(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"cascade": {"candidates": 25}, "fusion": {"orb": 0.7}}))
    tuning = Tuning.from_file(path)
    assert tuning.cascade.candidates == 25
    assert tuning.fusion.orb == 0.7
    assert tuning.cascade.local_candidates == Tuning().cascade.local_candidates
    assert tuning.verdicts == Tuning().verdicts


def test_written_file_reads_back_the_same(tmp_path: Path) -> None:
    tuning = Tuning().replace(local={"cell_lists": 1024}, check={"ratio": 0.8})
    tuning.to_file(tmp_path / "t.json")
    assert Tuning.from_file(tmp_path / "t.json") == tuning


@pytest.mark.parametrize(
    "overrides",
    [
        {"orb": {"features": (1 << KEYPOINT_BITS) + 1}},  # would not fit a local descriptor's id
        {"cascade": {"candidatez": 3}},  # a typo is refused, not ignored
        {"fusion": {"embedding": 0, "ssim": 0, "orb": 0}},
        {"check": {"ratio": 1.5}},
        {"nope": {}},
        [1, 2],
    ],
)
def test_bad_overrides_are_refused_with_a_message(overrides: object) -> None:
    with pytest.raises(ConfigurationError):
        Tuning.from_overrides(overrides)


def test_unreadable_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match=r"bad\.json"):
        Tuning.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigurationError):
        Tuning().replace(nonsense={"x": 1})


def test_unknown_pictrace_variables_are_named() -> None:
    """A constant that used to be a setting (or a typo) is reported, not silently ignored."""
    environ = {"PICTRACE_PORT": "1", "PICTRACE_CANDIDATES": "20", "PICTRACE_TOPK": "3", "HOME": "/root"}
    assert unknown_environment(environ) == ["PICTRACE_CANDIDATES", "PICTRACE_TOPK"]
