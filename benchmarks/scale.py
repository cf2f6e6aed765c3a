"""How voxblock behaves from 10^3 to 10^6 blocks: measured, plotted and extrapolated.

    python benchmarks/scale.py --quick    # 10^3 and 10^4 blocks, 10^5-10^6 fragments (~1 minute)
    python benchmarks/scale.py --full     # 10^3-10^5 blocks (10^6 if it fits), 10^5-10^7 fragments

Three cases, each size in a process of its own (`--child`), so that a driver's peak memory is
its own:

- scheduler: `run_blockwise` of a no-op worker against bare daisy 2 with a no-op block
  function (benchmarks/run.py's no-op case), 2 workers, 64^3 blocks of no data: blocks/s, the
  driver's peak RSS (psutil, every 20 ms), files left in the run directory (daisy's tracking
  directory for bare daisy), the time before the first block runs and a rerun with every block
  done; and voxblock with `batch=k` (`--batches`: daisy hands out one block per k^3), its
  blocks/s counted in voxblock blocks;
- fragments: the global solve of a segmentation on synthetic merge edges (a lattice of
  fragments numbered block by block, each lattice edge a merge with probability 0.2):
  benchmarks/solve_scale.py's `simulate_solve` where it exists, else today's
  `voxblock.segment.solve.segment_lut`;
- outputs: `run_blockwise("threshold")` into a large output, sharded (one shard per block)
  against unsharded chunks: files and time.

It prints a table and writes results/scale-MODE.{md,json,png}; the JSON's "sections" hold the
README's generated "scale" section (`python tools/readme_section.py scale
benchmarks/results/scale-full.json`), a paper extrapolation to a 10^15-voxel volume on a
100-node cluster computed from the measured rates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import measure  # noqa: E402
import volumes  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 64  # voxels per block edge in the scheduler case (no data is read)
STAMP_ENV = "VOXBLOCK_SCALE_STAMP"  # a folder: each worker process writes when its first block ran

# blocks per axis for the sizes measured; other sizes get the nearest cube
GRIDS = {
    1_000: (10, 10, 10),
    10_000: (20, 20, 25),
    100_000: (40, 50, 50),
    1_000_000: (100, 100, 100),
}
MODES = {
    "quick": {"blocks": [1_000, 10_000], "fragments": [100_000, 1_000_000], "output": 256, "batches": [2]},
    "full": {
        "blocks": [1_000, 10_000, 100_000, 1_000_000],
        "fragments": [100_000, 1_000_000, 10_000_000],
        "output": 512,
        "batches": [2, 4],
    },
}
# the paper cluster and volume of the extrapolation
CLUSTER = {"nodes": 100, "cores_per_node": 32, "memory_gib_per_node": 128}
TARGET_VOXELS = 10**15
TARGET_BLOCK = 128
TARGET_FRAGMENTS = 10**10
MERGE_PROBABILITY = 0.2  # below 3-D bond percolation (0.249): finite segments
FRAGMENTS_PER_BLOCK_EDGE = 10  # synthetic fragments are numbered in blocks of 10^3


# -- the no-op block functions (both sides stamp their first block per process) ---------------------

_stamped = False


def _stamp() -> None:
    global _stamped
    _stamped = True
    folder = os.environ.get(STAMP_ENV)
    if folder:
        Path(folder, str(os.getpid())).write_text(repr(time.time()))


def _noop_block(block: Any) -> None:
    if not _stamped:
        _stamp()


def _noop_worker_class() -> type:
    from dataclasses import dataclass as _dataclass

    from voxblock import Worker

    @_dataclass
    class NoOp(Worker):
        """A worker that does nothing with its blocks (it notes when its first one came)."""

        name = "noop"
        fit = "valid"

        def process(self, block: Any) -> None:
            if not self.__dict__.get("stamped"):
                self.__dict__["stamped"] = True
                _stamp()

    return NoOp


class DriverPoller(measure.MemoryPoller):
    """measure.MemoryPoller on the driver alone: walking the workers' /proc entries every 20 ms
    would take CPU from the two cores the no-op rows measure."""

    def _sample(self) -> None:
        rss = self._me.memory_info().rss
        self.driver = max(self.driver, rss)
        self.total = max(self.total, rss)


def grid(blocks: int) -> tuple[int, int, int]:
    if blocks in GRIDS:
        return GRIDS[blocks]
    edge = max(1, round(blocks ** (1 / 3)))
    return (edge, edge, edge)


def count_files(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(len(files) for _, _, files in os.walk(folder))


def first_block(stamps: Path, started: float) -> float | None:
    times = [float(p.read_text()) for p in stamps.iterdir()] if stamps.exists() else []
    return min(times) - started if times else None


# -- children: one size of one case in a process of its own ----------------------------------------


def scheduler_system(batch: int) -> str:
    """The name of a scheduler row: voxblock, or voxblock handing out batches of batch^3."""
    return "voxblock" if batch == 1 else f"voxblock batch={batch}"


def child_scheduler(
    system: str, blocks: int, workers: int, workdir: Path, profile: Path | None, batch: int = 1
) -> dict:
    """Run `blocks` no-op blocks twice (fresh, then all done) with bare daisy or voxblock (with
    `batch` > 1: daisy hands out batches of batch^3 blocks)."""
    import daisy.logging as daisy_logging
    import daisy.v2 as daisy
    from funlib.geometry import Roi

    shape = grid(blocks)
    total = Roi((0, 0, 0), tuple(BLOCK * n for n in shape))
    block = Roi((0, 0, 0), (BLOCK,) * 3)
    run_dir = workdir / f"{system}-{blocks}-{batch}"
    stamps = workdir / f"stamps-{system}-{blocks}-{batch}"

    if system == "daisy":
        daisy_logging.set_log_basedir(run_dir / "logs")

        def run() -> None:
            task = daisy.Task(
                "noop",
                total,
                block,
                block,
                process_function=_noop_block,
                read_write_conflict=False,
                fit="valid",
                max_workers=workers,
                max_retries=0,
                tracking_path=str(run_dir / "tracking"),
            )
            daisy.Server().run_blockwise(daisy.Pipeline([task], []), progress=False, summary=False)

    else:
        import voxblock

        importlib.import_module("voxblock.run")
        worker = _noop_worker_class()()

        def run(target: Path = run_dir, roi: Roi = total) -> None:
            ok = voxblock.run_blockwise(
                worker,
                roi,
                block,
                block,
                num_workers=workers,
                max_retries=0,
                run_dir=target,
                progress=False,
                **({"batch": batch} if batch != 1 else {}),
            )
            if not ok:
                raise RuntimeError(f"voxblock no-op run failed; see {target}")

        # as run.py's best-of-2 rows find it: the fork server started and warm
        warm = workdir / f"warm-{blocks}"
        shutil.rmtree(warm, ignore_errors=True)
        run(warm, Roi((0, 0, 0), (2 * BLOCK,) * 3))
        shutil.rmtree(warm, ignore_errors=True)

    for path in (run_dir, stamps):
        shutil.rmtree(path, ignore_errors=True)
    stamps.mkdir(parents=True)
    os.environ[STAMP_ENV] = str(stamps)
    load = os.getloadavg()[0]
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
    with DriverPoller() as memory:
        wall = time.time()
        cpu = time.process_time()  # the driver's CPU, daisy's server threads included
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        run()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if profiler is not None:
            profiler.disable()
    first = first_block(stamps, wall)
    files = count_files(run_dir)
    del os.environ[STAMP_ENV]
    started = time.perf_counter()
    with DriverPoller() as rerun_memory:
        run()
    rerun = time.perf_counter() - started
    if profiler is not None:
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(25)
        profile.write_text(text.getvalue())
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(stamps, ignore_errors=True)
    return {
        "system": system if system == "daisy" else scheduler_system(batch),
        "batch": batch,
        "blocks": int(np.prod(shape)),
        "grid": list(shape),
        "workers": workers,
        "seconds": seconds,
        "blocks_per_s": int(np.prod(shape)) / seconds,
        "first_block_seconds": first,
        "driver_cpu_seconds": cpu,
        "driver_cpu_us_per_block": cpu / int(np.prod(shape)) * 1e6,
        "rerun_seconds": rerun,
        "driver_mib": memory.driver / MIB,
        "driver_start_mib": memory.driver_start / MIB,
        "rerun_driver_mib": rerun_memory.driver / MIB,
        "files": files,
        "load": load,
    }


def synthetic_merges(fragments: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A lattice of about `fragments` fragments numbered block by block (10^3 per block, as a
    blockwise fragments pass numbers them), each lattice edge a merge with probability 0.2: the
    merges of neighbouring fragments, a quarter of them across block faces."""
    side = max(2, round(fragments ** (1 / 3)))
    b = FRAGMENTS_PER_BLOCK_EDGE
    coords = np.arange(side)
    blocks_per_axis = -(-side // b)
    block_index = coords // b
    local = coords % b
    z, y, x = np.meshgrid(coords, coords, coords, indexing="ij", sparse=True)
    ids = (
        ((block_index[z] * blocks_per_axis + block_index[y]) * blocks_per_axis + block_index[x]) * b**3
        + (local[z] * b + local[y]) * b
        + local[x]
        + 1
    ).astype(np.uint64)
    del z, y, x
    rng = np.random.default_rng(seed)
    pairs = []
    for axis in range(3):
        lo = np.moveaxis(ids, axis, 0)[:-1].ravel()
        hi = np.moveaxis(ids, axis, 0)[1:].ravel()
        keep = rng.random(lo.size) < MERGE_PROBABILITY
        pairs.append(np.stack([lo[keep], hi[keep]], axis=1))
    merges = np.concatenate(pairs)
    return ids.ravel(), merges


def hierarchical_solve_available() -> bool:
    return (HERE / "solve_scale.py").is_file()


def child_solve(fragments: int, workdir: Path, method: str = "lut") -> dict:
    """The solve at `fragments` fragments: "hierarchy", benchmarks/solve_scale.py's
    simulate_solve (the hierarchical solve, level by level); "lut", today's segment_lut on
    synthetic merges in one process (generation not timed)."""
    if method == "hierarchy":
        import solve_scale  # type: ignore[import-not-found]

        workdir.mkdir(parents=True, exist_ok=True)
        result = dict(solve_scale.simulate_solve(fragments, workdir))
        result.setdefault("method", "solve_scale.simulate_solve")
        result.pop("steps", None)
        result["fragments"] = fragments
        result.setdefault("edges", None)
        result.setdefault("segments", None)
        result["load"] = os.getloadavg()[0]
        return result
    from voxblock.segment.solve import segment_lut

    nodes, merges = synthetic_merges(fragments)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load = os.getloadavg()[0]
    started = time.perf_counter()
    lut = segment_lut(nodes, merges)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": "voxblock.segment.solve.segment_lut (one process, in memory)",
        "fragments": int(nodes.size),
        "edges": int(merges.shape[0]),
        "segments": int(lut[1].max()) if lut.size else 0,
        "seconds": seconds,
        "peak_rss_mib": peak / MIB,
        "input_mib": (nodes.nbytes + merges.nbytes) / MIB,
        "rss_before_mib": before / MIB,
        "levels": 1,
        "load": load,
    }


def run_child(args: list[str], timeout: float | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"scale child {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the harness ------------------------------------------------------------------------------------


@dataclass
class Options:
    mode: str
    blocks: list[int]
    fragments: list[int]
    output: int
    workers: int
    workdir: Path
    results: Path
    budget: float  # seconds the largest scheduler size may take (estimated), else extrapolated
    batches: list[int]  # voxblock's batch sizes measured besides batch=1 (the scheduler case)
    profile: bool
    cases: list[str]


class Scale:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.scheduler: list[dict] = []
        self.skipped: list[dict] = []
        self.solve: list[dict] = []
        self.outputs: list[dict] = []
        self.profile_text = ""
        self.load_before = [round(x, 2) for x in os.getloadavg()]

    def run_scheduler(self) -> None:
        work = self.o.workdir / "scheduler"
        work.mkdir(parents=True, exist_ok=True)
        largest = max(self.o.blocks)
        for blocks in sorted(self.o.blocks):
            if self.scheduler and blocks > 10 * 1_000 and blocks == largest:
                estimate = self.estimate_seconds(blocks)
                if estimate > self.o.budget:
                    self.skipped.append({"blocks": blocks, "estimated_seconds": estimate})
                    print(
                        f"  scheduler {blocks:>9} blocks: skipped, estimated {estimate:.0f} s "
                        f"> budget {self.o.budget:.0f} s (extrapolated instead)",
                        flush=True,
                    )
                    continue
            runs = [("daisy", 1), ("voxblock", 1)] + [("voxblock", k) for k in self.o.batches if k != 1]
            for system, batch in runs:
                args = ["scheduler", system, str(blocks), "--workers", str(self.o.workers)]
                args += ["--workdir", str(work), "--batch", str(batch)]
                result = run_child(args)
                self.scheduler.append(result)
                print(
                    f"  scheduler {result['system']:<16} {result['blocks']:>9} blocks "
                    f"{result['seconds']:8.2f} s "
                    f"{result['blocks_per_s']:7.0f} blocks/s, driver {result['driver_mib']:6.0f} MiB, "
                    f"{result['files']:>7} files, first block {_num(result['first_block_seconds'])} s, "
                    f"rerun {result['rerun_seconds']:.2f} s (load {result['load']:.2f})",
                    flush=True,
                )

        if self.o.profile and self.scheduler:
            # a run of its own: cProfile slows the driver, so the rows above are not profiled
            blocks = min(100_000, max(r["blocks"] for r in self.scheduler))
            args = ["scheduler", "voxblock", str(blocks), "--workers", str(self.o.workers)]
            run_child([*args, "--workdir", str(work), "--profile-to", str(work / "profile.txt")])
            self.profile_text = (work / "profile.txt").read_text()
            print(f"  profiled the voxblock driver at {blocks} blocks", flush=True)

    def estimate_seconds(self, blocks: int) -> float:
        """Both systems' runs and reruns at `blocks`, from the largest size measured (linear)."""
        measured = max(r["blocks"] for r in self.scheduler)
        rows = [r for r in self.scheduler if r["blocks"] == measured]
        per = sum(r["seconds"] + r["rerun_seconds"] for r in rows)
        return per * blocks / measured

    def run_solve(self) -> None:
        work = self.o.workdir / "solve"
        methods = ["lut"] + (["hierarchy"] if hierarchical_solve_available() else [])
        for method, fragments in ((m, f) for m in methods for f in self.o.fragments):
            result = run_child(["solve", str(fragments), "--workdir", str(work), "--method", method])
            result["kind"] = method
            self.solve.append(result)
            print(
                f"  solve {result['fragments']:>12} fragments {result['seconds']:8.2f} s, peak "
                f"{result['peak_rss_mib']:7.0f} MiB, {result.get('levels')} level(s) "
                f"[{result['method']}] (load {result['load']:.2f})",
                flush=True,
            )

    def run_outputs(self) -> None:
        """threshold into a new output three ways: files and time (run.py's shards case, larger)."""
        from funlib.geometry import Roi

        import voxblock

        size = self.o.output
        work = self.o.workdir / "outputs"
        work.mkdir(parents=True, exist_ok=True)
        pred = volumes.ensure(work, "pred", size)
        block, small = 64, 16
        layouts = {
            "unsharded 64^3 chunks (1 file per block)": {},
            f"unsharded {small}^3 chunks ({(block // small) ** 3} files per block)": {
                "chunk_shape": (small,) * 3
            },
            f"64^3 shards of {small}^3 chunks (1 file per block)": {
                "shard_shape": (block,) * 3,
                "chunk_shape": (small,) * 3,
            },
        }
        blocks = (-(-size // block)) ** 3
        for n, (what, layout) in enumerate(layouts.items()):
            output = work / "out.zarr" / f"layout{n}"
            run_dir = work / "runs" / f"layout{n}"
            best = None
            for _ in range(2):
                shutil.rmtree(output, ignore_errors=True)
                shutil.rmtree(run_dir, ignore_errors=True)
                load = os.getloadavg()[0]
                started = time.perf_counter()
                ok = voxblock.run_blockwise(
                    "threshold",
                    Roi((0, 0, 0), (size,) * 3),
                    Roi((0, 0, 0), (block,) * 3),
                    Roi((0, 0, 0), (block,) * 3),
                    num_workers=self.o.workers,
                    max_retries=0,
                    input=pred,
                    output=str(output),
                    run_dir=run_dir,
                    progress=False,
                    threshold=volumes.THRESHOLD,
                    **layout,
                )
                seconds = time.perf_counter() - started
                if not ok:
                    raise RuntimeError(f"threshold into {what} failed; see {run_dir}")
                best = seconds if best is None else min(best, seconds)
            files = sum(
                1 for p in output.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zattrs")
            )
            row = {
                "layout": what,
                "size": size,
                "blocks": blocks,
                "voxels": size**3,
                "seconds": best,
                "mvox_per_s": size**3 / best / 1e6,
                "files": files,
                "files_per_block": files / blocks,
                "run_dir_files": count_files(run_dir),
                "load": load,
            }
            self.outputs.append(row)
            print(
                f"  output {size}^3 {what:<44} {best:7.2f} s {row['mvox_per_s']:6.1f} Mvox/s "
                f"{files:>7} files (load {load:.2f})",
                flush=True,
            )

    # -- extrapolation ------------------------------------------------------------------------------

    def rows(self, system: str) -> list[dict]:
        return sorted((r for r in self.scheduler if r["system"] == system), key=lambda r: r["blocks"])

    def extrapolate(self) -> dict[str, Any]:
        """The paper 10^15-voxel run, from the measured rates (fits over the measured sizes)."""
        nodes, cores_per_node = CLUSTER["nodes"], CLUSTER["cores_per_node"]
        cores = nodes * cores_per_node
        blocks = TARGET_VOXELS / TARGET_BLOCK**3
        vox = self.rows("voxblock")
        daisy_rows = self.rows("daisy")
        out: dict[str, Any] = {
            "voxels": TARGET_VOXELS,
            "block": TARGET_BLOCK,
            "blocks": blocks,
            "fragments": TARGET_FRAGMENTS,
            "cluster": dict(CLUSTER, cores=cores),
        }
        if vox:
            xs = [r["blocks"] for r in vox]
            largest = vox[-1]
            out["scheduler_blocks_per_s"] = largest["blocks_per_s"]
            out["scheduler_blocks_per_s_daisy"] = daisy_rows[-1]["blocks_per_s"] if daisy_rows else None
            out["driver_cpu_us_per_block"] = largest["driver_cpu_us_per_block"]
            out["driver_core_blocks_per_s"] = 1e6 / largest["driver_cpu_us_per_block"]
            out["scheduler_exponent"] = fit(xs, [r["seconds"] for r in vox])[0]
            out["scheduler_hours"] = predict(xs, [r["seconds"] for r in vox], blocks) / 3600
            out["driver_gib"] = linear(xs, [r["driver_mib"] for r in vox], blocks) / 1024
            out["driver_bytes_per_block"] = slope(xs, [r["driver_mib"] for r in vox]) * MIB
            out["run_dir_files"] = linear(xs, [r["files"] for r in vox], blocks)
            out["run_dir_files_per_block"] = slope(xs, [r["files"] for r in vox])
            out["resume_hours"] = predict(xs, [r["rerun_seconds"] for r in vox], blocks, 0.0) / 3600
            firsts = [r["first_block_seconds"] or 0.0 for r in vox]
            out["first_block_hours"] = predict(xs, firsts, blocks, 0.0) / 3600
            out["largest_measured_blocks"] = largest["blocks"]
            # voxblock handing out batches of k^3 blocks: its rate at the largest size measured
            out["batched"] = {}
            for r in self.scheduler:
                k = r.get("batch", 1)
                if r["system"] != "daisy" and k != 1 and r["blocks"] == largest["blocks"]:
                    out["batched"][k] = {
                        "blocks_per_s": r["blocks_per_s"],
                        "hours": blocks / r["blocks_per_s"] / 3600,
                    }
        if self.outputs:
            sharded = next(r for r in self.outputs if "shards" in r["layout"])
            unsharded = self.outputs[0]
            # voxels per core-second of threshold into 64^3 chunks, the paper run's chunks
            per_core = unsharded["voxels"] / unsharded["seconds"] / self.o.workers
            core_hours = TARGET_VOXELS / per_core / 3600
            block_seconds = TARGET_BLOCK**3 / per_core  # one 128^3 block on one core
            out["threshold_core_hours"] = core_hours
            out["compute_hours"] = core_hours / cores
            out["needed_blocks_per_s"] = cores / block_seconds
            out["output_files_sharded"] = blocks * sharded["files_per_block"]
            # one 128^3 shard per block: 8x fewer files than 64^3 unsharded chunks
            out["output_files_unsharded_64"] = TARGET_VOXELS / 64**3 * unsharded["files_per_block"]
            out["output_files_unsharded_16"] = TARGET_VOXELS / 16**3
        out["solve"] = {}
        for kind in ("lut", "hierarchy"):
            rows = sorted(
                (r for r in self.solve if r.get("kind", "lut") == kind), key=lambda r: r["fragments"]
            )
            if not rows:
                continue
            xs = [r["fragments"] for r in rows]
            seconds = [r["seconds"] for r in rows]
            rss = [r["peak_rss_mib"] for r in rows]
            out["solve"][kind] = {
                "method": rows[-1]["method"],
                "exponent": fit(xs, seconds)[0],
                "hours": predict(xs, seconds, TARGET_FRAGMENTS) / 3600,
                "gib": linear(xs, rss, TARGET_FRAGMENTS) / 1024,
                "bytes_per_fragment": slope(xs, rss) * MIB,
                "largest": xs[-1],
            }
        if out["solve"]:
            best = out["solve"].get("hierarchy") or out["solve"]["lut"]
            out["solve_hours"] = best["hours"]
        stored = stored_solve()
        if stored is not None:
            out["stored_solve"] = stored
        if "scheduler_hours" in out and "compute_hours" in out:
            slowest = max(out["scheduler_hours"], out["compute_hours"])
            out["wall_hours"] = slowest + out.get("solve_hours", 0.0)
            if out.get("batched"):
                k, best = min(out["batched"].items(), key=lambda item: item[1]["hours"])
                out["batched_wall"] = {
                    "batch": k,
                    "hours": max(best["hours"], out["compute_hours"]) + out.get("solve_hours", 0.0),
                }
        return out

    # -- report -------------------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        import psutil

        cpu = platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        from importlib.metadata import version

        return {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
            "python": platform.python_version(),
            "daisy": version("daisy"),
            "zarr": version("zarr"),
            "load_before": self.load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        }

    def tables(self, machine: dict[str, Any]) -> str:
        lines = [
            f"Measured by `benchmarks/scale.py --{self.o.mode}` on {machine['cpu']}, {machine['cores']} "
            f"cores, {machine['memory_gib']} GiB, Python {machine['python']} (daisy {machine['daisy']}, "
            f"zarr {machine['zarr']}); {self.o.workers} workers, {BLOCK}^3 blocks of no data; one run "
            f"per size, each in a process of its own. Load average (1 min) "
            f"{machine['load_before'][0]} before, {machine['load_after'][0]} after; each row gives "
            "its own.",
            "",
            "| blocks | bare daisy 2 blocks/s | voxblock blocks/s | vs daisy | driver RSS daisy / "
            "voxblock (MiB) | files daisy / voxblock | first block daisy / voxblock (s) | "
            "rerun, all done daisy / voxblock (s) | load |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        daisy_rows = {r["blocks"]: r for r in self.rows("daisy")}
        for v in self.rows("voxblock"):
            d = daisy_rows.get(v["blocks"])
            if d is None:
                continue
            lines.append(
                f"| {v['blocks']:,} | {d['blocks_per_s']:.0f} | {v['blocks_per_s']:.0f} | "
                f"{v['blocks_per_s'] / d['blocks_per_s']:.0%} | {d['driver_mib']:.0f} / "
                f"{v['driver_mib']:.0f} | {d['files']:,} / {v['files']:,} | "
                f"{_num(d['first_block_seconds'])} / {_num(v['first_block_seconds'])} | "
                f"{d['rerun_seconds']:.2f} / {v['rerun_seconds']:.2f} | "
                f"{d['load']:.2f} / {v['load']:.2f} |"
            )
        for s in self.skipped:
            lines.append(
                f"| {s['blocks']:,} | not run: both runs estimated at {s['estimated_seconds']:.0f} s, "
                "over the budget; extrapolated below | | | | | | | |"
            )
        lines += self.batch_table(daisy_rows)
        if self.solve:
            lines += [
                "",
                "| fragments | merge edges | segments | solve (s) | peak RSS (MiB) | levels | method "
                "| load |",
                "|---:|---:|---:|---:|---:|---:|---|---:|",
            ]
            for r in self.solve:
                lines.append(
                    f"| {r['fragments']:,} | {_int(r.get('edges'))} | {_int(r.get('segments'))} | "
                    f"{r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r.get('levels')} | "
                    f"{r['method']} | {r['load']:.2f} |"
                )
        if self.outputs:
            lines += [
                "",
                "| output (threshold) | blocks | seconds | Mvoxel/s | files | files/block | load |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for r in self.outputs:
                lines.append(
                    f"| {r['size']}^3, {r['layout']} | {r['blocks']} | {r['seconds']:.2f} | "
                    f"{r['mvox_per_s']:.1f} | {r['files']:,} | {r['files_per_block']:.0f} | {r['load']:.2f} |"
                )
        return "\n".join(lines) + "\n"

    def batch_table(self, daisy_rows: dict[int, dict]) -> list[str]:
        """voxblock's no-op blocks/s with batch=k (blocks, not batches) against bare daisy's."""
        batches = sorted({r.get("batch", 1) for r in self.scheduler if r["system"] != "daisy"} - {1})
        if not batches:
            return []
        by = {(r["blocks"], r.get("batch", 1)): r for r in self.scheduler if r["system"] != "daisy"}
        names = " | ".join(f"batch={k} blocks/s | vs daisy" for k in batches)
        lines = [
            "",
            "voxblock handing out batches (`batch=k`: one daisy block per k^3 blocks, run one "
            "after another in a worker); blocks/s counts voxblock blocks.",
            "",
            f"| blocks | bare daisy 2 blocks/s | voxblock blocks/s | {names} | load |",
            "|---:" * (3 + 2 * len(batches)) + "|---:|",
        ]
        for blocks in sorted({b for b, _ in by}):
            d, v = daisy_rows.get(blocks), by.get((blocks, 1))
            if d is None or v is None:
                continue
            cells = []
            for k in batches:
                r = by.get((blocks, k))
                cells += (
                    [f"{r['blocks_per_s']:.0f}", f"{r['blocks_per_s'] / d['blocks_per_s']:.1f}x"]
                    if r
                    else ["", ""]
                )
            loads = "/".join(f"{r['load']:.1f}" for r in [d, v, *(by.get((blocks, k)) for k in batches)] if r)
            rates = f"{d['blocks_per_s']:.0f} | {v['blocks_per_s']:.0f}"
            lines.append(f"| {blocks:,} | {rates} | {' | '.join(cells)} | {loads} |")
        return lines

    def paper(self, e: dict[str, Any], machine: dict[str, Any]) -> str:
        """The README's extrapolation, in words and one table."""
        c = e["cluster"]
        lines = [
            f"Extrapolated by `benchmarks/scale.py --{self.o.mode}` from the rates it measured "
            f"(2 workers on {machine['cores']} shared cores, load {machine['load_before'][0]}-"
            f"{machine['load_after'][0]}): a {_sci(e['voxels'])}-voxel volume in {e['block']}^3 "
            f"blocks ({_sci(e['blocks'])} blocks), ~{_sci(e['fragments'])} fragments, on "
            f"{c['nodes']} nodes of {c['cores_per_node']} cores and {c['memory_gib_per_node']} GiB "
            f"({c['cores']} workers), one driver on one of them.",
            "",
            "| quantity | extrapolated | from |",
            "|---|---:|---|",
        ]
        if "compute_hours" in e:
            lines.append(
                f"| threshold compute, {c['cores']} cores | {e['compute_hours']:.1f} h "
                f"({e['threshold_core_hours']:,.0f} core-h) | the 64^3-chunk output row's voxels "
                "per core-second, start-up included (local disk; a cluster file system is slower) |"
            )
            lines.append(
                f"| blocks/s the driver must hand out to keep {c['cores']} cores busy | "
                f"{e['needed_blocks_per_s']:,.0f} | one {e['block']}^3 block per core at that rate |"
            )
        if "scheduler_hours" in e:
            lines.append(
                f"| scheduler alone (one daisy server) | {e['scheduler_hours']:.1f} h "
                f"({e['scheduler_blocks_per_s']:,.0f} blocks/s) | no-op blocks, 2 workers, the "
                f"largest size measured ({e['largest_measured_blocks']:,} blocks); t ~ "
                f"blocks^{e['scheduler_exponent']:.2f} over all sizes, taken as linear |"
            )
            for k, b in sorted(e.get("batched", {}).items()):
                lines.append(
                    f"| scheduler with `batch={k}` (one daisy block per {k}^3 blocks) | "
                    f"{b['hours']:.1f} h ({b['blocks_per_s']:,.0f} blocks/s) | no-op blocks, 2 workers, "
                    f"{e['largest_measured_blocks']:,} blocks, taken as linear |"
                )
            lines.append(
                f"| the driver's CPU per block (daisy's server included) | "
                f"{e['driver_cpu_us_per_block']:.0f} µs | at most "
                f"{e['driver_core_blocks_per_s']:,.0f} blocks/s per driver core, if the server "
                "kept to one core and the workers' round trips did not limit it |"
            )
            lines.append(
                f"| peak driver memory | {e['driver_gib']:,.1f} GiB | linear in blocks: "
                f"{e['driver_bytes_per_block']:,.0f} bytes per block |"
            )
            lines.append(
                f"| files in the run directory | {e['run_dir_files']:,.0f} | linear: "
                f"{e['run_dir_files_per_block']:.4f} per block (with 2 workers) |"
            )
            lines.append(
                f"| time before the first block | {_hours(e['first_block_hours'])} | power law "
                "of the two largest sizes measured |"
            )
            lines.append(
                f"| rerun with every block done | {_hours(e['resume_hours'])} | power law of the "
                "two largest sizes measured |"
            )
        if "output_files_sharded" in e:
            lines.append(
                f"| output files, one {e['block']}^3 shard per block | "
                f"{e['output_files_sharded']:,.0f} | 1 file per block, measured |"
            )
            lines.append(
                f"| output files, unsharded 64^3 / 16^3 chunks | {e['output_files_unsharded_64']:,.0f}"
                f" / {e['output_files_unsharded_16']:,.0f} | 1 file per chunk |"
            )
        for kind, solve in e.get("solve", {}).items():
            fits = solve["gib"] <= c["memory_gib_per_node"]
            where = "one node" if kind == "lut" else "one process per level (the largest level's peak)"
            lines.append(
                f"| segment solve, {_sci(e['fragments'])} fragments: {solve['method']} | "
                f"{solve['hours']:.1f} h, {solve['gib']:,.0f} GiB "
                f"({'fits' if fits else '**does not fit**'} in {where}) | serial time "
                f"~ fragments^{solve['exponent']:.2f} to {solve['largest']:,}, taken as at least linear; "
                f"{solve['bytes_per_fragment']:.0f} bytes per fragment of peak RSS |"
            )
        stored = e.get("stored_solve")
        if stored is not None:
            lines.append(
                f"| segment solve, {_rounded(stored['fragments'])} fragments and "
                f"{_rounded(stored['edges'])} "
                f"edges, one worker | {stored['hours']:.1f} h ({stored['measured_hours']:.1f} h measured),"
                f" largest unit {stored['peak_gib']:.1f} GiB | a run of its own "
                f"(`{STORED_SOLVE.name}`, see below) |"
            )
        if "wall_hours" in e:
            lines += [
                "",
                f"Wall time {e['wall_hours']:.1f} h: the larger of compute and scheduler, plus the "
                "solve as one worker would do it (its units run in parallel: less with more workers).",
            ]
            if "batched_wall" in e:
                b = e["batched_wall"]
                bound = (
                    "the scheduler still bounds it"
                    if e["batched"][b["batch"]]["hours"] > e["compute_hours"]
                    else "the compute bounds it, no longer the scheduler"
                )
                lines.append(
                    f"Handing out blocks in batches of {b['batch']}^3 (`batch={b['batch']}`): "
                    f"{b['hours']:.1f} h; {bound}."
                )
        if stored is not None:
            lines += ["", *stored_solve_lines(stored)]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        (t_ax, m_ax), (f_ax, s_ax) = axes
        for system, marker in (("daisy", "o"), ("voxblock", "s")):
            rows = self.rows(system)
            if not rows:
                continue
            xs = [r["blocks"] for r in rows]
            label = "bare daisy 2" if system == "daisy" else "voxblock run_blockwise"
            t_ax.plot(xs, [r["seconds"] for r in rows], marker + "-", label=f"{label}: run")
            reruns = [r["rerun_seconds"] for r in rows]
            t_ax.plot(xs, reruns, marker + "--", label=f"{label}: rerun, all done")
            firsts = [(x, r["first_block_seconds"]) for x, r in zip(xs, rows) if r["first_block_seconds"]]
            if firsts:
                t_ax.plot(*zip(*firsts), marker + ":", label=f"{label}: first block")
            m_ax.plot(xs, [r["driver_mib"] for r in rows], marker + "-", label=label)
            f_ax.plot(xs, [max(r["files"], 1) for r in rows], marker + "-", label=f"{label}: run directory")
        for k in sorted({r.get("batch", 1) for r in self.scheduler} - {1}):
            rows = sorted(
                (r for r in self.scheduler if r["system"] != "daisy" and r.get("batch", 1) == k),
                key=lambda r: r["blocks"],
            )
            xs = [r["blocks"] for r in rows]
            t_ax.plot(xs, [r["seconds"] for r in rows], "d-", label=f"voxblock batch={k}: run")
        for r, marker in zip(self.outputs, "^v<"):
            f_ax.plot([r["blocks"]], [r["files"]], marker, label=f"output {r['size']}^3, {r['layout']}")
        t_ax.set(xlabel="blocks", ylabel="seconds", title="no-op blocks, 2 workers")
        m_ax.set(xlabel="blocks", ylabel="driver peak RSS (MiB)", title="driver memory")
        f_ax.set(xlabel="blocks", ylabel="files", title="files created")
        if self.solve:
            s2 = s_ax.twinx()
            for n, kind in enumerate(("lut", "hierarchy")):
                rows = [r for r in self.solve if r.get("kind", "lut") == kind]
                if not rows:
                    continue
                xs = [r["fragments"] for r in rows]
                s_ax.plot(xs, [r["seconds"] for r in rows], "o-", color=f"C{2 * n}", label=f"{kind}: seconds")
                s2.plot(
                    xs, [r["peak_rss_mib"] for r in rows], "s--", color=f"C{2 * n + 1}", label=f"{kind}: MiB"
                )
            stored = stored_solve()
            if stored is not None:  # the 10^9 run of its own (3 edges per fragment)
                s_ax.plot([stored["fragments"]], [stored["hours"] * 3600], "*", color="C2", markersize=12)
                s2.plot([stored["fragments"]], [stored["peak_gib"] * 1024], "X", color="C3", markersize=10)
                s_ax.annotate(
                    f"{_rounded(stored['fragments'])}, {_rounded(stored['edges'])} edges\n(run of its own)",
                    (stored["fragments"], stored["hours"] * 3600),
                    textcoords="offset points",
                    xytext=(-150, -4),
                    fontsize=7,
                )
            s_ax.set(xlabel="fragments", ylabel="seconds", title="segment solve (lut: one process)")
            s2.set_yscale("log")
            s2.set_ylabel("peak RSS (MiB)")
            s2.legend(loc="lower right", fontsize=8)
        for ax in (t_ax, m_ax, f_ax, s_ax):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def report(self, measured_on: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tables, extrapolation, plot; `measured_on`: the machine record of the run whose rows
        these are, when none was measured now (`--cases ''` renders the last results again)."""
        machine = measured_on or self.machine()
        extrapolation = self.extrapolate()
        tables = self.tables(machine)
        paper = self.paper(extrapolation, machine)
        markdown = tables + "\n" + paper
        if self.profile_text:
            markdown += f"\nDriver profile (cProfile, 10^5 blocks): `scale-{self.o.mode}-profile.txt`.\n"
        print()
        print(markdown)
        results = self.o.results
        results.mkdir(parents=True, exist_ok=True)
        stem = results / f"scale-{self.o.mode}"
        record = {
            "mode": self.o.mode,
            "workers": self.o.workers,
            "machine": machine,
            "scheduler": self.scheduler,
            "skipped": self.skipped,
            "solve": self.solve,
            "outputs": self.outputs,
            "extrapolation": extrapolation,
            "table": markdown,
            "sections": {"scale": readme_section(markdown, self.o.mode)},
        }
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
        stem.with_suffix(".md").write_text(markdown)
        if self.profile_text:
            results.joinpath(f"scale-{self.o.mode}-profile.txt").write_text(self.profile_text)
        self.plot(stem.with_suffix(".png"))
        print(f"results in {stem}.{{md,json,png}}")
        return record


def readme_section(markdown: str, mode: str) -> str:
    return markdown + f"\n![scale](benchmarks/results/scale-{mode}.png)\n"


# -- fits -------------------------------------------------------------------------------------------


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Power law y = a * x^k through the points (least squares in log-log): (k, log a)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(points) < 2:
        return 1.0, (points[0][1] - points[0][0]) if points else 0.0
    lx, ly = np.array(points).T
    k, log_a = np.polyfit(lx, ly, 1)
    return float(k), float(log_a)


def predict(xs: list[float], ys: list[float], x: float, least: float = 1.0) -> float:
    """From the largest size measured to x along the power law of the two largest sizes, its
    exponent at least `least` (for run times, linear: fixed costs flatten the small sizes'
    curve, they do not shrink per block)."""
    if not ys or not ys[-1]:
        return 0.0
    k = max(least, fit(xs[-2:], ys[-2:])[0])
    return float(ys[-1] * (x / xs[-1]) ** k)


def slope(xs: list[float], ys: list[float]) -> float:
    """Growth per unit between the two largest sizes (0 if it did not grow)."""
    if len(xs) < 2:
        return ys[-1] / xs[-1] if xs else 0.0
    return max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))


def linear(xs: list[float], ys: list[float], x: float) -> float:
    return ys[-1] + slope(xs, ys) * (x - xs[-1])


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _int(value: Any) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _sci(value: float) -> str:
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent
    return f"10^{exponent}" if abs(mantissa - 1) < 0.05 else f"{mantissa:.1f}·10^{exponent}"


def _rounded(value: float) -> str:
    """10^9 for 999,883,092: a count near a power of ten, in the README's words."""
    return _sci(float(f"{value:.1g}"))


# a hierarchical solve too large for `nox -s scale` (about an hour), run on its own:
# `python benchmarks/solve_scale.py 1e9 --edges-per-fragment 3 --sample 4 --json ...`
STORED_SOLVE = Path(__file__).parent / "results" / "solve-1e9.json"


def stored_solve() -> dict[str, Any] | None:
    """That run's figures: time (measured, and with unsampled units' times extrapolated) and
    peak RSS of each step's largest unit (a re-measure of a step replaces its peak)."""
    try:
        run = json.loads(STORED_SOLVE.read_text())
    except (OSError, ValueError):
        return None
    peaks = {step["step"]: step["peak_rss_mib"] for step in run["steps"]}
    for again in run.get("remeasured", []):
        peaks[again["step"]] = again["peak_rss_mib"]
    return {
        "fragments": run["fragments"],
        "edges": run["edges"],
        "blocks": run["blocks"],
        "units": run["units"],
        "hours": run["extrapolated_seconds"] / 3600,
        "measured_hours": run["measured_seconds"] / 3600,
        "peak_gib": max(peaks.values()) / 1024,
        "first_peak_gib": run["peak_rss_mib"] / 1024,
        "peaks": peaks,
        "steps": run["steps"],
        "command": run.get("command", ""),
        "date": run.get("date", ""),
        "load": run.get("load", ""),
        "method": run["method"],
    }


def stored_solve_lines(stored: dict[str, Any]) -> list[str]:
    """The stored 10^9-fragment run, step by step, as the README shows it."""
    lines = [
        f"The hierarchical solve at {stored['fragments']:,} fragments and {stored['edges']:,} merge "
        f"edges ({stored['blocks']:,} blocks; units per level {stored['units']}), synthetic edges "
        f"and no voxels, by `{stored['command']}` on {stored['date']} (load {stored['load']}): "
        f"{stored['method']}. Every level-1 unit ran; the times of the unsampled ones are "
        "extrapolated from the sampled ones (level-1 units are all the same size). Peak RSS is "
        "the largest unit's of each step, each step a process of its own.",
        "",
        "| step | units | time (s) | peak RSS (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for step in stored["steps"]:
        name = step["step"]
        seconds = step.get("extrapolated_seconds", step["seconds"])
        peak = stored["peaks"][name]
        note = (
            f" (re-measured after a memory fix; first run: {step['peak_rss_mib']:.0f})"
            if peak != step["peak_rss_mib"]
            else ""
        )
        lines.append(f"| {name} | {step['units']:,} | {seconds:.1f} | {peak:.0f}{note} |")
    return lines


def _hours(hours: float) -> str:
    return f"{hours * 3600:.1f} s" if hours < 0.1 else f"{hours:.1f} h"


# -- entry points -----------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="10^3, 10^4 blocks (the default)")
    mode.add_argument("--full", action="store_true", help="10^3-10^6 blocks, for the README")
    parser.add_argument("--blocks", default=None, help="comma-separated block counts (override)")
    parser.add_argument("--fragments", default=None, help="comma-separated fragment counts (override)")
    parser.add_argument("--output-size", type=int, default=None, help="output case volume edge (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--batches",
        default=None,
        help="comma-separated batch sizes of voxblock's no-op rows besides 1, '' for none "
        "[default: 2 (--quick), 2,4 (--full)]",
    )
    parser.add_argument(
        "--budget", type=float, default=600.0, help="seconds the largest block count may take (estimated)"
    )
    parser.add_argument(
        "--cases",
        default="scheduler,solve,outputs",
        help="cases to run; the others' rows are kept from the last results/scale-MODE.json",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the voxblock driver, largest size")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "scale")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    name = "full" if args.full else "quick"
    defaults = MODES[name]

    def counts(text: str | None, default: list[int]) -> list[int]:
        return default if text is None else [int(float(t)) for t in text.split(",") if t]

    return Options(
        mode=name,
        blocks=counts(args.blocks, defaults["blocks"]),
        fragments=counts(args.fragments, defaults["fragments"]),
        output=defaults["output"] if args.output_size is None else args.output_size,
        workers=args.workers,
        workdir=args.workdir,
        results=args.results,
        budget=args.budget,
        batches=counts(args.batches, defaults["batches"]),
        profile=args.profile,
        cases=[c for c in args.cases.split(",") if c],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse(argv)
    options.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"voxblock scale ({options.mode}): blocks {options.blocks}, fragments {options.fragments}, "
        f"output {options.output}^3, {options.workers} workers",
        flush=True,
    )
    scale = Scale(options)
    previous = options.results / f"scale-{options.mode}.json"
    kept = {}
    if set(options.cases) != {"scheduler", "solve", "outputs"} and previous.is_file():
        kept = json.loads(previous.read_text())
    started = time.perf_counter()
    if "scheduler" in options.cases and options.blocks:
        scale.run_scheduler()
    else:
        scale.scheduler, scale.skipped = kept.get("scheduler", []), kept.get("skipped", [])
    if "solve" in options.cases and options.fragments:
        scale.run_solve()
    else:
        scale.solve = kept.get("solve", [])
    if "outputs" in options.cases and options.output:
        scale.run_outputs()
    else:
        scale.outputs = kept.get("outputs", [])
    print(f"scale took {time.perf_counter() - started:.0f} s")
    return scale.report(kept.get("machine") if kept and not options.cases else None)


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=("scheduler", "solve"))
    parser.add_argument("rest", nargs="+")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--profile-to", type=Path, default=None)
    parser.add_argument("--method", choices=("lut", "hierarchy"), default="lut")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.case == "scheduler":
        system, blocks = args.rest
        result = child_scheduler(system, int(blocks), args.workers, args.workdir, args.profile_to, args.batch)
    else:
        result = child_solve(int(args.rest[0]), args.workdir, args.method)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        main()
