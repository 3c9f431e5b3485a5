"""What the duplicate groups hold in memory once built on an existing catalogue, apart from the rest of a
serving process (the local index and the vectors dominate that: scale_quality.py and scale_million.py report
the whole process).

    python bench/duplicates_memory.py DATA_DIR [--out bench/results/duplicates_memory.json]

Opens the catalogue alone, builds the partition as a start does (read back from the catalogue where a previous
start stored it, the rest placed), and reports the time and this process's resident set before and after:
anonymous (the groups' structures) and file-backed (the pages of the catalogue that SQLite's memory map
touched while reading every link: page cache the kernel drops under pressure). Nothing is written.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_quality import RESULTS, _memory_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "duplicates_memory.json")
    args = ap.parse_args()

    from pictrace.duplicates import DuplicateGroups
    from pictrace.store.catalogue import Catalogue

    path = args.data_dir / "catalogue.sqlite3"
    if not path.is_file():
        raise SystemExit(f"no catalogue at {path}")
    catalogue = Catalogue(path)
    before = _memory_mb()
    started = time.perf_counter()
    groups = DuplicateGroups(catalogue)
    groups.refresh()
    gc.collect()
    after = _memory_mb()
    grouping = groups._grouping
    assert grouping is not None
    result: dict[str, Any] = {
        "data_dir": str(args.data_dir),
        "images": len(grouping.shapes),
        "copy_links": grouping.tally()[0],
        "groups": sum(1 for _ in grouping.groups()),
        "build_s": round(time.perf_counter() - started, 1),
        "before_mb": {k: round(v, 1) for k, v in before.items()},
        "after_mb": {k: round(v, 1) for k, v in after.items()},
    }
    grown = {k: after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")}
    print(f"{result['images']:,} images, {result['copy_links']:,} copy links, {result['groups']:,} groups")
    print(f"built in {result['build_s']:.1f} s")
    print(
        f"resident set grew {grown['VmRSS']:.0f} MB:"
        f" anonymous {grown['RssAnon']:.0f}, file-backed {grown['RssFile']:.0f}"
    )
    print(f"peak {after['VmHWM']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    catalogue.close()


if __name__ == "__main__":
    main()
