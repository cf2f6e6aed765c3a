"""volara 1.0.5 on the same volumes, in its own virtualenv (it pins daisy<2): `nox -s bench_volara`.

Runs volara's Threshold, Argmax and Relabel tasks the way its docs show
(`Task(...).run_blockwise()`, dropping earlier results first) with the
same workers and block size as the voxblock benchmark, and its agglomeration
chain (ExtractFrags -> AffAgglom -> GraphMWS -> Relabel, one SQLite graph,
128^3; 256^3 with --full), and writes the wall times (and for the chain its
memory and its segmentation's VOI against the ground truth) to
benchmarks/results/volara-{quick,full}.json, which `benchmarks/run.py` reads.
`--only agglomerate` runs the chain alone and keeps the other tasks' last
timings in that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
import volumes  # noqa: E402

TASKS = ("threshold", "argmax", "relabel", "agglomerate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="256^3 (default)")
    size.add_argument("--full", action="store_true", help="512^3")
    parser.add_argument("--size", type=int, default=None, help="override the volume size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=HERE / ".work")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument(
        "--only", default=",".join(TASKS), help=f"comma-separated tasks of {', '.join(TASKS)}"
    )
    args = parser.parse_args()
    mode = "full" if args.full else "quick"
    size_voxels = args.size or (512 if args.full else 256)
    repeats = args.repeats or (1 if args.full else 2)
    only = set(args.only.split(","))
    if only - set(TASKS):
        parser.error(f"unknown tasks {', '.join(sorted(only - set(TASKS)))}")

    import volara
    from funlib.geometry import Coordinate
    from volara.blockwise import Argmax, Relabel, Threshold
    from volara.datasets import Labels, Raw
    from volara.logging import set_log_basedir
    from volara.lut import LUT

    workdir = args.workdir / mode
    workdir.mkdir(parents=True, exist_ok=True)
    set_log_basedir(workdir / "volara_logs")
    out = workdir / "volara.zarr"
    block = Coordinate((args.block,) * 3)
    common = {"block_size": block, "num_workers": args.workers}
    path = args.results / f"volara-{mode}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = dict(previous.get("tasks", {})) if previous.get("size") == size_voxels else {}
    if "agglomerate" in only:
        results["agglomerate"] = agglomerate(args, workdir, out, 256 if args.full else 128, repeats)
    ops = [name for name in ("threshold", "argmax", "relabel") if name in only]
    if ops:
        pred = volumes.ensure(workdir, "pred", size_voxels)
        probs = volumes.ensure(workdir, "probs", size_voxels)
        frags = volumes.ensure(workdir, "frags", size_voxels)
        lut = volumes.ensure_lut(workdir, size_voxels)

    tasks = {
        "threshold": lambda: Threshold(
            in_data=Raw(store=pred),
            mask=Labels(store=out / "threshold"),
            threshold=volumes.THRESHOLD,
            **common,
        ),
        "argmax": lambda: Argmax(
            probs_data=Raw(store=probs), sem_data=Labels(store=out / "argmax"), **common
        ),
        "relabel": lambda: Relabel(
            frags_data=Labels(store=frags),
            seg_data=Labels(store=out / "relabel"),
            lut=LUT(path=lut),
            **common,
        ),
    }
    for name, make in tasks.items():
        if name not in ops:
            continue
        times = []
        for _ in range(repeats):
            task = make()
            task.drop()  # forget done blocks and the output: every block runs
            started = time.perf_counter()
            task.run_blockwise(multiprocessing=True)
            times.append(time.perf_counter() - started)
        results[name] = {"seconds": min(times), "all": times}
        print(f"volara {name}: {min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})", flush=True)

    args.results.mkdir(parents=True, exist_ok=True)
    record = {
        "volara": volara.__version__ if hasattr(volara, "__version__") else "1.0.5",
        "size": size_voxels,
        "block": args.block,
        "workers": args.workers,
        "python": platform.python_version(),
        "tasks": results,
    }
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def agglomerate(args: argparse.Namespace, workdir: Path, out: Path, size: int, repeats: int) -> dict:
    """volara's agglomeration chain as its docs show it, on the agglomeration volume of `size`^3:
    ExtractFrags (mutex watershed per block with its bias, the context around each block) ->
    AffAgglom (mean affinity of each fragment pair, over every offset, into an SQLite graph) ->
    GraphMWS (mutex watershed on the whole graph, weights {affs: (1, -threshold)}) -> Relabel.
    Each task is run (and timed) on its own after every task's output was dropped, the chain
    `repeats` times (the fastest kept); memory is polled across the chain; VOI and adapted Rand
    error of the segmentation against the truth."""
    import zarr
    from funlib.geometry import Coordinate, Roi
    from volara.blockwise import AffAgglom, ExtractFrags, GraphMWS, Relabel
    from volara.datasets import Affs, Labels
    from volara.dbs import SQLite
    from volara.lut import LUT

    affs_name = volumes.ensure(workdir, "agg-affs", size)
    truth_name = volumes.ensure(workdir, "agg-truth", size)
    offsets = [Coordinate(o) for o in volumes.AGG_OFFSETS]
    affs = Affs(store=affs_name, neighborhood=offsets)
    frags = Labels(store=out / "agg-fragments")
    segmentation = Labels(store=out / "agg-segmentation")
    db = SQLite(path=workdir / "volara-agg.db", edge_attrs={"affs": "float"})
    lut = LUT(path=workdir / "volara-agg-lut.npz")
    block = Coordinate((args.block,) * 3)
    context = Coordinate((volumes.AGG_CONTEXT,) * 3)
    tasks = {
        "extract_frags": ExtractFrags(
            db=db,
            affs_data=affs,
            frags_data=frags,
            block_size=block,
            context=context,
            bias=[volumes.AGG_BIAS] * len(offsets),
            num_workers=args.workers,
        ),
        "aff_agglom": AffAgglom(
            db=db,
            affs_data=affs,
            frags_data=frags,
            block_size=block,
            context=context,
            scores={"affs": offsets},
            num_workers=args.workers,
        ),
        "graph_mws": GraphMWS(
            db=db,
            lut=lut,
            weights={"affs": (1.0, -volumes.AGG_THRESHOLD)},
            roi=Roi((0, 0, 0), (size,) * 3),
        ),
        "relabel": Relabel(
            frags_data=frags, seg_data=segmentation, lut=lut, block_size=block, num_workers=args.workers
        ),
    }
    runs = []
    for _ in range(repeats):
        for task in reversed(tasks.values()):
            task.drop()  # forget done blocks, outputs, the graph and the table: every block runs
        seconds = {}
        with measure.MemoryPoller() as memory:
            for name, task in tasks.items():
                started = time.perf_counter()
                task.run_blockwise(multiprocessing=True)
                seconds[name] = time.perf_counter() - started
        runs.append((sum(seconds.values()), seconds, memory))
    total, seconds, memory = min(runs, key=lambda run: run[0])  # the outputs are the last run's: the same
    truth = zarr.open_array(truth_name, mode="r")[...]
    result = zarr.open_array(str(out / "agg-segmentation"), mode="r")[...]
    fragments = zarr.open_array(str(out / "agg-fragments"), mode="r")[...]
    quality = measure.scores(truth, result)
    record = {
        "seconds": total,
        "all": [run[0] for run in runs],
        "size": size,
        "passes": seconds,
        "memory": memory.record(),
        "fragments": int(np.unique(fragments[fragments > 0]).size),
        "fragments_scores": measure.scores(truth, fragments),
        "scores": quality,
        "bias": volumes.AGG_BIAS,
        "threshold": volumes.AGG_THRESHOLD,
        "context": volumes.AGG_CONTEXT,
    }
    passes = ", ".join(f"{name} {s:.2f}" for name, s in seconds.items())
    passes += f"; runs {', '.join(f'{run[0]:.2f}' for run in runs)}"
    print(
        f"volara agglomerate {size}^3: {total:.2f} s ({passes}); VOI {quality['voi']:.3f} "
        f"(split {quality['voi_split']:.3f}, merge {quality['voi_merge']:.3f}), "
        f"ARAND {quality['arand']:.3f}; peak RSS driver {record['memory']['driver_mib']:.0f} MiB, "
        f"worker {record['memory']['worker_mib']:.0f} MiB",
        flush=True,
    )
    return record


if __name__ == "__main__":
    main()
