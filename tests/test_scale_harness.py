"""benchmarks/scale.py at its smallest size, so that the harness behind `nox -s scale` does not rot.

No timing is asserted (the machine may be busy): only that every case left its rows, that
the numbers are positive and the files were counted, and that the report was written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_scale_harness_smallest_size(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))  # scale.py imports its neighbours (measure, volumes)
    import scale

    results = tmp_path / "results"
    record = scale.main(
        [
            "--quick",
            "--blocks",
            "1000",
            "--fragments",
            "100000",
            "--output-size",
            "128",
            "--workdir",
            str(tmp_path / "work"),
            "--results",
            str(results),
        ]
    )

    rows = {r["system"]: r for r in record["scheduler"]}
    assert set(rows) == {"daisy", "voxblock", "voxblock batch=2"}
    for row in rows.values():
        assert row["blocks"] == 1000
        for key in ("seconds", "blocks_per_s", "rerun_seconds", "driver_mib", "first_block_seconds"):
            assert row[key] > 0, (row["system"], key)
        assert row["files"] > 0  # daisy's tracking files; voxblock's run directory
    assert {r["kind"] for r in record["solve"]} >= {"lut"}  # and "hierarchy" with solve_scale.py
    for solve in record["solve"]:
        assert solve["fragments"] > 50_000 and solve["seconds"] > 0 and solve["peak_rss_mib"] > 0
    outputs = {r["layout"]: r for r in record["outputs"]}
    assert len(outputs) == 3
    for layout, row in outputs.items():
        assert row["blocks"] == 8 and row["seconds"] > 0 and row["files"] > 0, layout
    sharded = next(r for layout, r in outputs.items() if "shards" in layout)
    many = next(r for layout, r in outputs.items() if "files per block" in layout and "64 files" in layout)
    assert sharded["files"] <= 8 < many["files"]  # one shard per block against 64 chunks per block

    extrapolation = record["extrapolation"]
    keys = ("blocks", "compute_hours", "scheduler_hours", "driver_gib", "output_files_sharded", "solve_hours")
    for key in keys:
        assert extrapolation[key] > 0, key
    assert extrapolation["solve"]["lut"]["gib"] > 0
    table = (results / "scale-quick.md").read_text()
    assert "| 1,000 |" in table and "10^15" in table
    assert json.loads((results / "scale-quick.json").read_text())["sections"]["scale"]
    assert (results / "scale-quick.png").stat().st_size > 0
