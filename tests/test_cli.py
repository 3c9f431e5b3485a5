"""`python -m pictrace index|search` as a user runs them: a real subprocess, a summary, the API's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ImageServer, crop, encode, resize, screenshot

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
    env["PICTRACE_DATA_DIR"] = str(cwd / "data")
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pictrace", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_index_then_search(tmp_path: Path, image_server: ImageServer, photos: dict[str, np.ndarray]) -> None:
    entries = [{"id": n, "url": image_server.add(f"{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")]
    entries.append({"id": "gone", "url": image_server.url("gone.jpg")})
    entries.append({"no": "url"})
    (tmp_path / "db.json").write_text(json.dumps(entries))

    first = run_cli("index", "db.json", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "added 2" in first.stdout and "failed 1" in first.stdout and "invalid 1" in first.stdout
    assert "failed entry 2" in first.stdout and "404" in first.stdout
    assert "invalid entry 3" in first.stdout

    again = run_cli("index", "db.json", "--quiet", cwd=tmp_path)
    assert "added 0" in again.stdout and "unchanged 2" in again.stdout

    (tmp_path / "q.jpg").write_bytes(encode(crop(photos["rocket"], 0.6, 0.2)))
    found = run_cli("search", "q.jpg", "--top-k", "2", "--json", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    body = json.loads(found.stdout)
    assert [r["id"] for r in body["results"]] == ["rocket"]  # coffee is unrelated: not shown
    assert body["results"][0]["verdict"] == "copy"
    assert set(body["results"][0]["scores"]) >= {"embedding", "ssim", "orb"}

    text = run_cli("search", "q.jpg", cwd=tmp_path)
    assert text.returncode == 0 and "rocket" in text.stdout.splitlines()[1]
    (tmp_path / "screen.jpg").write_bytes(encode(screenshot(resize(photos["coffee"], 0.4))))
    screen = run_cli("search", "screen.jpg", cwd=tmp_path)
    assert screen.returncode == 0 and "it holds a picture (" in screen.stdout.splitlines()[1], screen.stdout
    assert "coffee" in screen.stdout.splitlines()[2]

    bad = run_cli("search", "missing.jpg", cwd=tmp_path)
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_tuning_file_replaces_constants_and_guards_the_stored_features(
    tmp_path: Path, image_server: ImageServer, photos: dict[str, np.ndarray]
) -> None:
    """``--tuning FILE`` reaches the search; one that would extract ORB features unlike the stored ones is
    refused in one line before anything is mixed; an unreadable one is refused too."""
    entries = [{"id": n, "url": image_server.add(f"{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")]
    (tmp_path / "db.json").write_text(json.dumps(entries))
    assert run_cli("index", "db.json", "--quiet", cwd=tmp_path).returncode == 0
    (tmp_path / "q.jpg").write_bytes(encode(crop(photos["rocket"], 0.6, 0.2)))

    (tmp_path / "strict.json").write_text(json.dumps({"verdicts": {"copy_min_inliers": 100000}}))
    strict = run_cli("--tuning", "strict.json", "search", "q.jpg", "--json", cwd=tmp_path)
    assert strict.returncode == 0, strict.stderr
    (rocket,) = json.loads(strict.stdout)["results"]
    assert rocket["id"] == "rocket" and rocket["verdict"] == "similar"  # no fit has 100,000 inliers

    (tmp_path / "orb.json").write_text(json.dumps({"orb": {"features": 500}}))
    other = run_cli("--tuning", "orb.json", "search", "q.jpg", cwd=tmp_path)
    assert other.returncode == 2
    (line,) = [line for line in other.stderr.splitlines() if line.startswith("pictrace:")]
    assert "ORB features extracted with" in line and "'features': 1000" in line and "python -m pictrace index" in line

    (tmp_path / "typo.json").write_text(json.dumps({"cascade": {"candidatez": 3}}))
    typo = run_cli("--tuning", "typo.json", "search", "q.jpg", cwd=tmp_path)
    assert typo.returncode == 2 and "candidatez" in typo.stderr
