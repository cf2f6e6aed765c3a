"""The hierarchical solve (voxblock.segment.hierarchy) on synthetic edges, without voxels.

    python benchmarks/solve_scale.py 1e6 1e7 1e8 [--workdir DIR] [--fanout 8] [--check]

Every block's edge record is generated straight into the pack format that pass 1 writes
(`segment.storage.EdgeWriter`): a cube grid of blocks, about 2,000 fragments each (fragment IDs
from the block's position, as `segment.ids.BlockGrid` gives them), merge edges with pass 1's
locality: most inside a block (random pairs, about 0.45 per fragment: many small segments), the
rest to fragments of the three face neighbours before it (0.1 per fragment each), recorded by
one side only. Then every step of the solve runs as the pipeline runs it, level by level, each
level in a fresh process that does all of that level's units one after another (as one worker
would): its time and peak RSS are the level's. The count step is the driver's share (a few
integers per block). `--check` compares the tables with `segment_lut` on the whole graph.

`simulate_solve(fragments, workdir)` is what benchmarks/scale.py (`nox -s scale`) calls.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20
FRAGMENTS_PER_BLOCK = 2000
INTERNAL = 0.45  # merge edges inside a block, per fragment
CROSSING = 0.1  # merge edges to each earlier face neighbour, per fragment


def grid_for(fragments: int, fanout: int | None = None) -> dict:
    """A cube grid of blocks holding about `fragments` fragments, ~FRAGMENTS_PER_BLOCK each."""
    side = max(1, round((fragments / FRAGMENTS_PER_BLOCK) ** (1 / 3)))
    per_block = max(1, round(fragments / side**3))
    return {"origin": [0, 0, 0], "stride": [1, 1, 1], "counts": [side] * 3, "id_range": per_block}


def generate(grid: dict, edge_dir: Path, seed: int = 0) -> int:
    """Every block's record (edges E x 5, fragment IDs), as pass 1 writes it; the edge count."""
    from voxblock.segment.storage import EdgeWriter

    writer = EdgeWriter(edge_dir)
    counts, per_block = tuple(grid["counts"]), grid["id_range"]
    rng = np.random.default_rng(seed)
    total = 0
    for block in range(int(np.prod(counts))):
        first = block * per_block + 1
        ids = np.arange(first, first + per_block, dtype=np.uint64)
        internal = int(per_block * INTERNAL)
        pairs = [first + rng.integers(0, per_block, (internal, 2))]
        position = np.unravel_index(block, counts)
        for axis in range(3):
            if position[axis] == 0:
                continue
            neighbour = list(position)
            neighbour[axis] -= 1
            other = int(np.ravel_multi_index(neighbour, counts)) * per_block + 1
            crossing = max(1, int(per_block * CROSSING))
            pairs.append(
                np.stack(
                    [
                        first + rng.integers(0, per_block, crossing),
                        other + rng.integers(0, per_block, crossing),
                    ],
                    axis=1,
                )
            )
        merges = np.concatenate(pairs).astype(np.uint64)
        edges = np.ones((len(merges), 5), np.uint64)
        edges[:, :2] = merges
        writer.save(block, edges, ids)
        total += len(edges)
    return total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(step: str, level: int, workdir: Path, grid: dict, fanout: int) -> dict:
    """One level of one step, all its units in this process (the child's body)."""
    from voxblock.packfile import PackIndex
    from voxblock.segment import hierarchy
    from voxblock.segment.edges import select_edges
    from voxblock.segment.ids import BlockGrid
    from voxblock.segment.storage import EDGES, read_edge_record

    h = hierarchy.Hierarchy(BlockGrid.from_dict(grid), fanout)
    store = hierarchy.PackStore(str(workdir / "tables"))
    before = peak_rss_mib()
    started = time.perf_counter()
    cpu = time.process_time()
    units = h.num_units(level)
    if step == "up":
        index = PackIndex(workdir / "edges", EDGES)
        index.refresh()

        def record(block: int) -> tuple[np.ndarray, int, np.ndarray]:
            edges, ids = read_edge_record(index.get(block) or b"")
            return select_edges(edges), len(edges), ids

        for unit in range(units):
            hierarchy.up(h, level, unit, store, record)
    elif step == "down":
        for unit in range(units):
            hierarchy.down(h, level, unit, store)
    elif step == "count":
        units = 1
        np.save(workdir / "tables" / "offsets.npy", hierarchy.offsets(h, store))
    elif step == "labels":
        prefix = np.load(workdir / "tables" / "offsets.npy")
        for unit in range(units):
            hierarchy.labels(h, unit, store, prefix)
    return {
        "step": step if step in ("count", "labels") else f"{step}-{level}",
        "units": units,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": before,
    }


def _child(step: str, level: int, workdir: Path, grid: dict, fanout: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            step,
            str(level),
            str(workdir),
            json.dumps(grid),
            str(fanout),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(workdir: Path, grid: dict, fanout: int) -> None:
    """The tables against segment_lut on the whole graph (small sizes only)."""
    from voxblock.segment import hierarchy
    from voxblock.segment.edges import select_edges
    from voxblock.segment.ids import BlockGrid
    from voxblock.segment.solve import segment_lut
    from voxblock.segment.storage import load_edges

    edges, fragments, _ = load_edges(workdir / "edges")
    expected = segment_lut(fragments, select_edges(edges))
    h = hierarchy.Hierarchy(BlockGrid.from_dict(grid), fanout)
    store = hierarchy.PackStore(str(workdir / "tables"))
    got = np.concatenate([np.stack(hierarchy.block_lut(store, b)) for b in range(h.num_blocks)], axis=1)
    assert np.array_equal(got, expected), "the hierarchical solve differs from segment_lut"


def simulate_solve(fragments: int, workdir: str | Path, fanout: int = 8, verify: bool = False) -> dict:
    """Generate ~`fragments` fragments' edge records under `workdir`, solve them level by level
    (each level in a fresh process); seconds (all steps, not the generation), the largest peak
    RSS of any step, the levels, and every step's time and peak RSS."""
    from voxblock.segment.hierarchy import Hierarchy
    from voxblock.segment.ids import BlockGrid

    workdir = Path(workdir) / f"solve-{fragments}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    grid = grid_for(int(fragments))
    started = time.perf_counter()
    edges = generate(grid, workdir / "edges")
    generated = time.perf_counter() - started
    h = Hierarchy(BlockGrid.from_dict(grid), fanout)
    top = h.levels
    plan = [("up", level) for level in range(1, top + 1)] + [("down", level) for level in range(top, 0, -1)]
    plan += [("count", 1), ("labels", 1)]
    steps = [_child(step, level, workdir, grid, fanout) for step, level in plan]
    if verify:
        check(workdir, grid, fanout)
    segments = int(np.load(workdir / "tables" / "offsets.npy")[2, -1])
    disk = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "method": f"segment.hierarchy (fan-out {fanout}^3 blocks, a process per level)",
        "fragments": h.num_blocks * grid["id_range"],
        "blocks": h.num_blocks,
        "edges": edges,
        "segments": segments,
        "seconds": sum(s["seconds"] for s in steps),
        "cpu_seconds": sum(s["cpu_seconds"] for s in steps),
        "peak_rss_mib": max(s["peak_rss_mib"] for s in steps),
        "levels": top,
        "steps": steps,
        "generate_seconds": generated,
        "disk_mib": disk / MIB,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("fragments", nargs="*", type=float, default=[1e6, 1e7])
    parser.add_argument("--workdir", default="/tmp/solve_scale")
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="compare with segment_lut (small sizes)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = []
    print(
        "| fragments | blocks | edges | segments | levels | solve (s) | CPU (s) | peak RSS (MiB) "
        "| per step (s / MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for fragments in args.fragments:
        r = simulate_solve(int(fragments), args.workdir, args.fanout, args.check)
        results.append(r)
        steps = ", ".join(f"{s['step']} {s['seconds']:.1f}/{s['peak_rss_mib']:.0f}" for s in r["steps"])
        print(
            f"| {r['fragments']:,} | {r['blocks']:,} | {r['edges']:,} | {r['segments']:,} | {r['levels']} | "
            f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {steps} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        step, level, workdir, grid, fanout = sys.argv[2:7]
        print(json.dumps(run_step(step, int(level), Path(workdir), json.loads(grid), int(fanout))))
    else:
        main()
