"""Take the README's screenshots: the home page and a results page, on the bundled demo gallery only.

Runs the real app (uvicorn, 127.0.0.1, a temporary data dir) over db.json and drives Debian's headless
Chromium with Playwright. Writes docs/screenshot-home.png, docs/screenshot-results.png,
docs/screenshot-evidence.png and docs/screenshot-duplicates.png.

    python scripts/screenshots.py [--query demo/queries/coffee-screenshot.jpg]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.web import create_app

ROOT = Path(__file__).resolve().parent.parent

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--query", type=Path, default=ROOT / "demo" / "queries" / "coffee-screenshot.jpg")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp), db=ROOT / "db.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        while not server.started:
            time.sleep(0.1)
        while (h := httpx.get(f"{base}/api/health").json()["images"])["pending"] or not h["indexed"]:
            time.sleep(0.3)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(base)
                page.screenshot(path=str(args.out / "screenshot-home.png"))
                page.set_input_files("#file", str(args.query))
                page.click("#search-button")
                page.wait_for_selector("#results-title")
                page.screenshot(path=str(args.out / "screenshot-results.png"), full_page=True)
                evidence = page.locator("#section-copy a.evidence, a.evidence").first.get_attribute("href")
                png = httpx.get(f"{base}{evidence}")
                (args.out / "screenshot-evidence.png").write_bytes(png.content)
                page.goto(f"{base}/duplicates")
                page.screenshot(path=str(args.out / "screenshot-duplicates.png"), full_page=True)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    print(f"wrote {args.out}/screenshot-home.png, screenshot-results.png, screenshot-evidence.png, "
          "screenshot-duplicates.png")


if __name__ == "__main__":
    main()
