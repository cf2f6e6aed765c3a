"""The hierarchical solve (voxblock.segment.hierarchy) on synthetic edges, without voxels.

    python benchmarks/solve_scale.py 1e6 1e7 1e8 [--workdir DIR] [--fanout 8] [--check]
    python benchmarks/solve_scale.py 1e9 --edges-per-fragment 3.05 --sample 4

Every block's edge record is generated straight into the pack format that pass 1 writes
(`segment.storage.EdgeWriter`): a cube grid of blocks, about 2,000 fragments each (fragment IDs
from the block's position, as `segment.ids.BlockGrid` gives them), merge edges with pass 1's
locality: 60% inside a block (random pairs), the rest to fragments of the three face
neighbours before it, recorded by one side only. The density is --edges-per-fragment: 0.75 by
default (0.45 inside, 0.1 to each neighbour: many small segments; what `nox -s scale` runs), 3
for the issue's 10^9 fragments / 3*10^9 edges (every edge a merge: one giant segment, and the
most crossing edges passed up). A block's record is a function of the block alone. Then every
step of the solve runs as the pipeline runs it, level by level, each level in a fresh process
that does all of that level's units one after another (as one worker would): its time and peak
RSS are the level's. The count step is the driver's share (a few integers per block). `--check`
compares the tables with `segment_lut` on the whole graph.

--sample K (`simulate_sampled`) runs a size whose edge records would not fit on disk: every
level-1 unit makes its blocks' records in memory except K sampled whole units, whose records
go through packs and whose up is timed alone; every unit of every level above runs on its real
inputs; down to level 1 and the labels for the sampled units. Peak RSS is measured for every
level; the level-1 steps' times are extrapolated from the sampled units'.

`simulate_solve(fragments, workdir)` is what benchmarks/scale.py (`nox -s scale`) calls.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20
FRAGMENTS_PER_BLOCK = 2000
EDGES_PER_FRAGMENT = 0.75  # `nox -s scale`'s density: 0.45 inside a block, 0.1 to each earlier face neighbour
INTERNAL_SHARE = 0.6  # of a fragment's edges, those inside its block (the rest: 3 face neighbours)


def grid_for(fragments: int, fanout: int | None = None) -> dict:
    """A cube grid of blocks holding about `fragments` fragments, ~FRAGMENTS_PER_BLOCK each."""
    side = max(1, round((fragments / FRAGMENTS_PER_BLOCK) ** (1 / 3)))
    per_block = max(1, round(fragments / side**3))
    return {"origin": [0, 0, 0], "stride": [1, 1, 1], "counts": [side] * 3, "id_range": per_block}


def block_record(
    grid: dict, block: int, edges_per_fragment: float = EDGES_PER_FRAGMENT, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One block's record (edges E x 5, fragment IDs) as pass 1 writes it: a function of
    (seed, block) alone, so that any block, or unit, can be made again without the others."""
    counts, per_block = tuple(grid["counts"]), grid["id_range"]
    rng = np.random.default_rng((seed, block))
    first = block * per_block + 1
    ids = np.arange(first, first + per_block, dtype=np.uint64)
    internal = int(per_block * edges_per_fragment * INTERNAL_SHARE)
    pairs = [first + rng.integers(0, per_block, (internal, 2))]
    position = np.unravel_index(block, counts)
    for axis in range(3):
        if position[axis] == 0:
            continue
        neighbour = list(position)
        neighbour[axis] -= 1
        other = int(np.ravel_multi_index(neighbour, counts)) * per_block + 1
        crossing = max(1, int(per_block * edges_per_fragment * (1 - INTERNAL_SHARE) / 3))
        pairs.append(
            np.stack(
                [first + rng.integers(0, per_block, crossing), other + rng.integers(0, per_block, crossing)],
                axis=1,
            )
        )
    merges = np.concatenate(pairs).astype(np.uint64)
    edges = np.empty((len(merges), 5), np.uint64)
    edges[:, :2] = merges
    # overlap and sizes in voxels, as wide as real ones (they set the record's size, not the
    # solve: every edge merges, as merge="any" takes any overlap)
    edges[:, 3:] = rng.integers(1 << 12, 1 << 20, (len(merges), 2))
    edges[:, 2] = rng.integers(1, 1 << 12, len(merges))
    return edges, ids


def generate(
    grid: dict, edge_dir: Path, edges_per_fragment: float = EDGES_PER_FRAGMENT, seed: int = 0
) -> int:
    """Every block's record, in a pack as pass 1 writes it; the edge count."""
    from voxblock.segment.storage import EdgeWriter

    writer = EdgeWriter(edge_dir)
    total = 0
    for block in range(int(np.prod(grid["counts"]))):
        edges, ids = block_record(grid, block, edges_per_fragment, seed)
        writer.save(block, edges, ids)
        total += len(edges)
    return total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Keeping:
    """A store that drops the `frag` records of level-1 units outside `keep` (the sampled run:
    only those units go down to level 1 and label, and the rest would be disk for nothing)."""

    def __init__(self, store: Any, keep: set[int] | None) -> None:
        self.store, self.keep = store, keep

    def get(self, kind: str, key: int) -> bytes | None:
        return self.store.get(kind, key)

    def put(self, kind: str, key: int, payload: bytes) -> None:
        from voxblock.segment.hierarchy import LEVEL_SHIFT

        if kind == "frag" and self.keep is not None and key & ((1 << LEVEL_SHIFT) - 1) not in self.keep:
            return
        self.store.put(kind, key, payload)


def partial_offsets(h: Any, store: Any, units: Iterable[int]) -> np.ndarray:
    """hierarchy.offsets from the count records of `units` only (zeros elsewhere): the sampled
    run's labels step, whose segment IDs are then off, not its work."""
    from voxblock.segment.hierarchy import U64, decode, key

    counts = np.zeros((3, h.num_blocks + 1), dtype=U64)
    for unit in units:
        blocks, fragments, edges, roots = decode(store.get("count", key(1, unit)))
        where = blocks.astype(np.int64) + 1
        counts[0, where], counts[1, where], counts[2, where] = fragments, edges, roots
    return np.cumsum(counts, axis=1, dtype=U64)


def run_step(
    step: str, level: int, workdir: Path, grid: dict, fanout: int, options: dict | None = None
) -> dict:
    """One level of one step, all its units in this process (the child's body). `options`:
    edges_per_fragment; in a sampled run (`sample` given) every level-1 unit's records are made
    on the fly except the sampled ones', which go through packs as pass 1 writes them (their up
    is timed alone), and only the `keep` units go down to level 1, only the sampled ones label."""
    from voxblock.packfile import PackIndex
    from voxblock.segment import hierarchy
    from voxblock.segment.edges import select_edges
    from voxblock.segment.ids import BlockGrid
    from voxblock.segment.storage import EDGES, EdgeWriter, read_edge_record

    options = options or {}
    density = options.get("edges_per_fragment", EDGES_PER_FRAGMENT)
    sample = options.get("sample")
    keep = set(options.get("keep", [])) | set(sample or []) if sample is not None else None
    h = hierarchy.Hierarchy(BlockGrid.from_dict(grid), fanout)
    store = Keeping(hierarchy.PackStore(str(workdir / "tables")), keep)
    before = peak_rss_mib()
    started = time.perf_counter()
    cpu = time.process_time()
    units = list(range(h.num_units(level)))
    if "units" in options and level == int(options.get("units_level", 1)):
        units = list(options["units"])  # a part of the level (one unit's inputs below it)
    timed: dict[int, float] = {}  # unit -> seconds, of the units that ran as the pipeline runs them
    ran = len(units)
    if step == "up" and level == 1:
        index = PackIndex(workdir / "edges", EDGES)
        if sample is None:
            index.refresh()
        writer = EdgeWriter(workdir / "edges")

        def from_pack(block: int) -> tuple[np.ndarray, int, np.ndarray]:
            edges, ids = read_edge_record(index.get(block) or b"")
            return select_edges(edges), len(edges), ids

        def on_the_fly(block: int) -> tuple[np.ndarray, int, np.ndarray]:
            edges, ids = block_record(grid, block, density)
            return select_edges(edges), len(edges), ids

        for unit in units:
            if sample is not None and unit in sample:
                for block in h.children(1, unit):
                    writer.save(block, *block_record(grid, block, density))
                index.refresh()
            at = time.perf_counter()
            hierarchy.up(h, 1, unit, store, from_pack if sample is None or unit in sample else on_the_fly)
            if sample is None or unit in sample:
                timed[unit] = time.perf_counter() - at
    elif step == "up":
        for unit in units:
            at = time.perf_counter()
            hierarchy.up(h, level, unit, store)
            timed[unit] = time.perf_counter() - at
    elif step == "down":
        chosen = units if level > 1 or keep is None else sorted(keep)
        ran = len(chosen)
        for unit in chosen:
            at = time.perf_counter()
            hierarchy.down(h, level, unit, store)
            if level > 1 or sample is None or unit in sample:
                timed[unit] = time.perf_counter() - at
    elif step == "count":
        units, ran = [0], 1
        if sample is None:
            prefix = hierarchy.offsets(h, store)
        else:
            prefix = partial_offsets(h, store, sorted(keep or ()))
        np.save(workdir / "tables" / "offsets.npy", prefix)
    elif step == "labels":
        prefix = np.load(workdir / "tables" / "offsets.npy")
        ran = len(units if sample is None else sample)
        for unit in units if sample is None else sample:
            at = time.perf_counter()
            hierarchy.labels(h, unit, store, prefix)
            timed[unit] = time.perf_counter() - at
    return {
        "step": step if step in ("count", "labels") else f"{step}-{level}",
        "units": len(units),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": before,
        "ran_units": ran,
        "timed_units": len(timed),
        "unit_seconds_max": max(timed.values(), default=0.0),
        "unit_seconds_mean": float(np.mean(list(timed.values()))) if timed else 0.0,
        "slowest_unit": max(timed, key=timed.__getitem__) if timed else None,
    }


def _child(
    step: str, level: int, workdir: Path, grid: dict, fanout: int, options: dict | None = None
) -> dict:
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
            json.dumps(options or {}),
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


def simulate_solve(
    fragments: int,
    workdir: str | Path,
    fanout: int = 8,
    verify: bool = False,
    edges_per_fragment: float = EDGES_PER_FRAGMENT,
) -> dict:
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
    edges = generate(grid, workdir / "edges", edges_per_fragment)
    generated = time.perf_counter() - started
    h = Hierarchy(BlockGrid.from_dict(grid), fanout)
    top = h.levels
    plan = [("up", level) for level in range(1, top + 1)] + [("down", level) for level in range(top, 0, -1)]
    plan += [("count", 1), ("labels", 1)]
    options = {"edges_per_fragment": edges_per_fragment}
    steps = [_child(step, level, workdir, grid, fanout, options) for step, level in plan]
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


def sample_units(h: Any, count: int, seed: int = 1) -> tuple[list[int], list[int]]:
    """`count` whole level-1 units away from the grid's faces (the largest: all have
    fanout^3 blocks and edges on every face), and the units their labels may need: the ones
    before them on each axis (a segment's smallest fragment lies there or in unit 0)."""
    shape = h.unit_counts(1)
    whole = [
        u
        for u in range(h.num_units(1))
        if all(p > 0 and (p + 1) * h.fanout <= c for p, c in zip(np.unravel_index(u, shape), h.grid.counts))
    ] or [0]
    rng = np.random.default_rng(seed)
    sample = sorted(int(u) for u in rng.choice(whole, min(count, len(whole)), replace=False))
    keep = {0, *sample}
    for unit in sample:
        position = np.array(np.unravel_index(unit, shape))
        for step in itertools.product((0, 1), repeat=len(shape)):
            keep.add(int(np.ravel_multi_index(tuple(np.maximum(position - step, 0)), shape)))
    return sample, sorted(keep)


def simulate_sampled(
    fragments: int,
    workdir: str | Path,
    fanout: int = 8,
    edges_per_fragment: float = EDGES_PER_FRAGMENT,
    samples: int = 4,
) -> dict:
    """The solve of ~`fragments` fragments without their edge records on disk: every level-1
    unit makes its blocks' records on the fly (a function of the block alone) except `samples`
    sampled whole units, whose records go through packs as pass 1 writes them and whose up is
    timed alone. Every unit of every level above runs on its real inputs (peak RSS measured);
    down to level 1 and the labels run for the sampled units (and the units their labels
    read). Times of the level-1 steps are extrapolated from the sampled units' (every whole
    unit has the same blocks, fragments and edges; the others fewer)."""
    from voxblock.segment.hierarchy import Hierarchy
    from voxblock.segment.ids import BlockGrid

    workdir = Path(workdir) / f"sampled-{fragments}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    grid = grid_for(int(fragments))
    h = Hierarchy(BlockGrid.from_dict(grid), fanout)
    sample, keep = sample_units(h, samples)
    options = {"edges_per_fragment": edges_per_fragment, "sample": sample, "keep": keep}
    top = h.levels
    plan = [("up", level) for level in range(1, top + 1)] + [("down", level) for level in range(top, 0, -1)]
    plan += [("count", 1), ("labels", 1)]
    steps = []
    for step, level in plan:
        steps.append(_child(step, level, workdir, grid, fanout, options))
        print(json.dumps(steps[-1]), flush=True)
    units = h.num_units(1)
    extrapolated = 0.0
    for s in steps:
        if s["step"] in ("up-1", "down-1", "labels"):
            s["extrapolated_seconds"] = s["unit_seconds_mean"] * units
        elif s["step"] == "count":
            s["extrapolated_seconds"] = s["seconds"] * units / len(keep)
        else:
            s["extrapolated_seconds"] = s["seconds"]
        extrapolated += s["extrapolated_seconds"]
    sizes = {
        part: sum(p.stat().st_size for p in (workdir / part).rglob("*") if p.is_file())
        for part in ("edges", "tables")
    }
    block_edges = [len(block_record(grid, b, edges_per_fragment)[0]) for b in h.children(1, sample[0])]
    edges = int(np.mean(block_edges) * h.num_blocks)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "method": f"segment.hierarchy, sampled ({len(sample)} of {units} level-1 units timed)",
        "fragments": h.num_blocks * grid["id_range"],
        "blocks": h.num_blocks,
        "edges": edges,
        "edges_per_fragment": edges_per_fragment,
        "levels": top,
        "units": [h.num_units(level) for level in range(1, top + 1)],
        "sample": sample,
        "keep": keep,
        "measured_seconds": sum(s["seconds"] for s in steps),
        "extrapolated_seconds": extrapolated,
        "peak_rss_mib": max(s["peak_rss_mib"] for s in steps),
        "steps": steps,
        "edge_pack_bytes_per_unit": sizes["edges"] / len(sample),
        "edge_pack_bytes_extrapolated": sizes["edges"] / len(sample) * units,
        "table_bytes": sizes["tables"],
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
    parser.add_argument(
        "--edges-per-fragment",
        type=float,
        default=EDGES_PER_FRAGMENT,
        help=f"edges recorded per fragment, all merges, {INTERNAL_SHARE * 100:.0f}%% inside a block "
        f"(default {EDGES_PER_FRAGMENT}: nox -s scale's; the issue's 10^9 / 3*10^9 is 3)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        help="time this many level-1 units, make the others' records on the fly (no edges on "
        "disk), run every level above on its real inputs; 0: the whole run",
    )
    args = parser.parse_args(argv)
    results = []
    if args.sample:
        for fragments in args.fragments:
            r = simulate_sampled(
                int(fragments), args.workdir, args.fanout, args.edges_per_fragment, args.sample
            )
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "steps"}), flush=True)
            for s in r["steps"]:
                print(
                    f"| {s['step']} | {s['units']} | {s['timed_units']} | {s['seconds']:.1f} | "
                    f"{s['unit_seconds_mean']:.2f} / {s['unit_seconds_max']:.2f} | "
                    f"{s['extrapolated_seconds']:.0f} | {s['peak_rss_mib']:.0f} |",
                    flush=True,
                )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    print(
        "| fragments | blocks | edges | segments | levels | solve (s) | CPU (s) | peak RSS (MiB) "
        "| per step (s / MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for fragments in args.fragments:
        r = simulate_solve(int(fragments), args.workdir, args.fanout, args.check, args.edges_per_fragment)
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
        step, level, workdir, grid, fanout, options = sys.argv[2:8]
        result = run_step(step, int(level), Path(workdir), json.loads(grid), int(fanout), json.loads(options))
        print(json.dumps(result))
    else:
        main()
