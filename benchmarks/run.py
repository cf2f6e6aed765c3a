"""voxblock side by side with the I/O floor, in-memory references, bare daisy 2 and volara.

    python benchmarks/run.py --quick      # 256^3 (the default), a few minutes
    python benchmarks/run.py --full       # 512^3, for the README

Every case runs on the same synthetic zarr volumes (benchmarks/volumes.py:
zarr's default codec, 64^3 chunks), with the same number of worker
processes and block size, in one run. It prints a table and the ratios
against the targets, and writes benchmarks/results/bench-MODE.json, a plot
(bench-MODE.png: throughput vs workers and vs block size) and a markdown
table (README-table.md for --full, README-table-quick.md for --quick).
volara's timings come from benchmarks/results/volara-MODE.json, written by
`nox -s bench_volara` (its own virtualenv: volara pins daisy<2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import floor  # noqa: E402
import measure  # noqa: E402
import volumes  # noqa: E402

MIB = 1 << 20


# -- results ----------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    system: str
    seconds: float
    blocks: int = 0
    voxels: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def blocks_per_s(self) -> float:
        return self.blocks / self.seconds if self.seconds else 0.0

    @property
    def mvox_per_s(self) -> float:
        return self.voxels / self.seconds / 1e6 if self.seconds else 0.0


@dataclass
class Target:
    name: str
    measured: float
    goal: str
    met: bool
    detail: str


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "full" if args.full else "quick"
        self.size = args.size or (512 if args.full else 256)
        self.workers = args.workers
        self.block = args.block
        self.repeats = args.repeats or 2
        self.workdir: Path = args.workdir / self.mode
        self.out = self.workdir / "out.zarr"
        self.runs = self.workdir / "runs"
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.sweep: dict[str, list[dict]] = {"workers": [], "block": []}
        self.memory: dict[str, Any] = {}
        self.load_before = [round(x, 2) for x in os.getloadavg()]

    # -- helpers --------------------------------------------------------------------------------

    def fresh(self, name: str) -> tuple[str, Path]:
        """An output array name and run directory, both removed."""
        shutil.rmtree(self.out / name, ignore_errors=True)
        run_dir = self.runs / name
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"{self.out}/{name}", run_dir

    def best(self, function, repeats: int | None = None) -> float:
        """The fastest of `repeats` runs of `function()` (which returns its own seconds)."""
        return min(function() for _ in range(repeats or self.repeats))

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        extra = f" ({row.blocks_per_s:.0f} blocks/s)" if row.blocks and not row.voxels else ""
        rate = f" {row.mvox_per_s:.1f} Mvox/s" if row.voxels else ""
        print(f"  {row.case:<10} {row.system:<34} {row.seconds:8.2f} s{rate}{extra} {row.note}", flush=True)
        return row

    def target(self, name: str, measured: float, goal: str, met: bool, detail: str) -> None:
        self.targets.append(Target(name, measured, goal, bool(met), detail))

    def blocks_of(self, size: int, block: int | None = None) -> int:
        return (-(-size // (block or self.block))) ** 3

    def voxblock_api(self, worker: str, input_name: str, name: str, size: int, **options: Any) -> float:
        from funlib.geometry import Roi

        import voxblock

        output, run_dir = self.fresh(name)
        block = options.pop("block", self.block)
        workers = options.pop("workers", self.workers)
        started = time.perf_counter()
        ok = voxblock.run_blockwise(
            worker,
            total_roi=Roi((0, 0, 0), (size,) * 3),
            read_roi=Roi((0, 0, 0), (block,) * 3),
            write_roi=Roi((0, 0, 0), (block,) * 3),
            num_workers=workers,
            max_retries=0,
            input=input_name,
            output=output,
            run_dir=run_dir,
            progress=False,
            **options,
        )
        seconds = time.perf_counter() - started
        if not ok:
            raise RuntimeError(f"voxblock {worker} failed; see {run_dir}")
        return seconds

    def voxblock_cli(self, worker: str, input_name: str, name: str, *options: str) -> float:
        output, run_dir = self.fresh(name)
        command = [
            str(Path(sys.executable).with_name("voxblock")),
            "run",
            worker,
            "--input",
            input_name,
            "--output",
            output,
            "--block-size",
            str(self.block),
            "--workers",
            str(self.workers),
            "--max-retries",
            "0",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *options,
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    def floor(self, op: str, input_name: str, name: str, dtype: Any, size: int, **kw: Any) -> float:
        output, _ = self.fresh(name)
        block = kw.pop("block", self.block)
        workers = kw.pop("workers", self.workers)
        channel_dims = kw.pop("channel_dims", 0)
        direct = kw.pop("direct", False)
        started = time.perf_counter()
        volumes._prepare(Path(output), (size,) * 3, (block,) * 3, dtype)
        floor.run(
            input_name, output, op, size, block, workers, channel_dims=channel_dims, options=kw, direct=direct
        )
        return time.perf_counter() - started

    def in_memory(self, input_name: str, name: str, compute, dtype: Any) -> dict[str, float]:
        """Read the whole volume, compute, write it (64^3 chunks): seconds of each step."""
        import zarr

        output, _ = self.fresh(name)
        t0 = time.perf_counter()
        data = zarr.open_array(input_name, mode="r")[...]
        t1 = time.perf_counter()
        result = compute(data)
        t2 = time.perf_counter()
        target = volumes._prepare(Path(output), result.shape, (volumes.CHUNK,) * 3, dtype)
        target._source_data[...] = result.astype(dtype, copy=False)
        t3 = time.perf_counter()
        return {"read": t1 - t0, "compute": t2 - t1, "write": t3 - t2, "total": t3 - t0}

    def best_in_memory(self, *args: Any) -> dict[str, float]:
        """Each step's best of at least 3 runs, summed: a run in a process can spend much of its
        time faulting in fresh memory on a VM (cc3d over 512^3: 2-3 s instead of 0.5), and
        voxblock's rows are compared with the warm reference, the harder one to meet. The sum of
        the best read, compute and write is at most the best run's total."""
        runs = [self.in_memory(*args) for _ in range(max(3, self.repeats))]
        best = {step: min(r[step] for r in runs) for step in ("read", "compute", "write")}
        return {**best, "total": sum(best.values()), "slowest": max(r["total"] for r in runs)}

    # -- cases ----------------------------------------------------------------------------------

    def noop(self) -> None:
        import daisy.v2 as daisy
        from funlib.geometry import Roi

        import voxblock

        size = 2 * self.size  # no data is read: more blocks, a steadier rate
        blocks = self.blocks_of(size)
        total = Roi((0, 0, 0), (size,) * 3)
        block = Roi((0, 0, 0), (self.block,) * 3)

        def bare() -> float:
            tracking = self.runs / "noop-daisy"
            shutil.rmtree(tracking, ignore_errors=True)
            task = daisy.Task(
                "noop",
                total,
                block,
                block,
                process_function=_noop_block,
                read_write_conflict=False,
                fit="valid",
                max_workers=self.workers,
                max_retries=0,
                tracking_path=str(tracking),
            )
            started = time.perf_counter()
            daisy.Server().run_blockwise(daisy.Pipeline([task], []), progress=False, summary=False)
            return time.perf_counter() - started

        run_dir = self.runs / "noop-voxblock"

        def vox_done() -> float:
            """The same task again: every block is done already."""
            started = time.perf_counter()
            ok = voxblock.run_blockwise(
                NoOp(),
                total,
                block,
                block,
                num_workers=self.workers,
                max_retries=0,
                run_dir=run_dir,
                progress=False,
            )
            assert ok
            return time.perf_counter() - started

        def vox() -> float:
            shutil.rmtree(run_dir, ignore_errors=True)
            return vox_done()

        d = self.add("no-op", "bare daisy 2 (no-op block function)", self.best(bare), blocks)
        v = self.add("no-op", "voxblock run_blockwise (no-op worker)", self.best(vox), blocks)
        r = self.add("no-op", "voxblock, rerun (all blocks done)", vox_done(), blocks, note="resume")
        ratio = v.blocks_per_s / d.blocks_per_s
        self.target(
            "no-op blocks/s vs bare daisy",
            ratio,
            ">= 80%",
            ratio >= 0.8,
            f"{v.blocks_per_s:.0f} vs {d.blocks_per_s:.0f} blocks/s ({blocks} blocks)",
        )
        self.memory["noop_rerun_seconds"] = r.seconds

    def array_ops(self, volara: dict[str, float] | None) -> None:
        import cc3d  # noqa: F401  (imported here so no case pays for it in its timing)
        import fastremap

        size = self.size
        voxels = size**3
        blocks = self.blocks_of(size)
        pred = volumes.ensure(self.workdir, "pred", size)
        probs = volumes.ensure(self.workdir, "probs", size)
        frags = volumes.ensure(self.workdir, "frags", size)
        lut = volumes.ensure_lut(self.workdir, size)
        with np.load(lut) as npz:
            table = npz["fragment_segment_lut"]
        lut_dict = dict(zip(table[0].tolist(), table[1].tolist()))

        cases = {
            "threshold": dict(
                input=pred,
                dtype=np.uint8,
                floor_kw={"threshold": volumes.THRESHOLD},
                api_kw={"threshold": volumes.THRESHOLD},
                cli=("--threshold", str(volumes.THRESHOLD)),
                compute=lambda d: (d > volumes.THRESHOLD).astype(np.uint8),
            ),
            "argmax": dict(
                input=probs,
                dtype=np.uint8,
                floor_kw={"channel_dims": 1},
                api_kw={},
                cli=(),
                compute=lambda d: np.argmax(d, axis=0).astype(np.uint8),
            ),
            "relabel": dict(
                input=frags,
                dtype=np.uint64,
                floor_kw={"lut": lut},
                api_kw={"lut": lut},
                cli=("--lut", lut),
                compute=lambda d: fastremap.remap(d, lut_dict, preserve_missing_labels=True, in_place=True),
            ),
        }
        for op, case in cases.items():
            memory = self.best_in_memory(case["input"], f"{op}-memory", case["compute"], case["dtype"])
            self.add(
                op,
                "in memory, 1 process (read+op+write)",
                memory["total"],
                blocks,
                voxels,
                note=f"read {memory['read']:.2f} op {memory['compute']:.2f} write {memory['write']:.2f}"
                f" (slowest run {memory['slowest']:.2f} s)",
            )
            z = self.add(
                op,
                f"I/O floor ({self.workers} processes, zarr chunk loop)",
                self.best(
                    lambda op=op, case=case: self.floor(
                        op, case["input"], f"{op}-floor", case["dtype"], size, **case["floor_kw"]
                    )
                ),
                blocks,
                voxels,
            )
            d = self.add(
                op,
                f"I/O floor ({self.workers} processes, direct chunk loop)",
                self.best(
                    lambda op=op, case=case: self.floor(
                        op, case["input"], f"{op}-floor", case["dtype"], size, direct=True, **case["floor_kw"]
                    )
                ),
                blocks,
                voxels,
                note="voxblock.chunks I/O",
            )
            f = min(z, d, key=lambda row: row.seconds)  # the faster loop is the floor
            v = self.add(
                op,
                "voxblock run_blockwise",
                self.best(
                    lambda op=op, case=case: self.voxblock_api(
                        op, case["input"], f"{op}-api", size, **case["api_kw"]
                    )
                ),
                blocks,
                voxels,
            )
            c = self.add(
                op,
                "voxblock CLI (voxblock run, subprocess)",
                self.best(
                    lambda op=op, case=case: self.voxblock_cli(op, case["input"], f"{op}-cli", *case["cli"])
                ),
                blocks,
                voxels,
            )
            ratio = v.seconds / f.seconds
            self.target(
                f"{op} wall vs I/O floor",
                ratio,
                "<= 1.25x",
                ratio <= 1.25,
                f"{v.seconds:.2f} s vs {f.seconds:.2f} s, the faster loop "
                f"(zarr loop {z.seconds:.2f} s; CLI {c.seconds:.2f} s = {c.seconds / f.seconds:.2f}x)",
            )
            if volara and op in volara:
                w = self.add(op, "volara 1.0.5 (daisy 1, own venv)", volara[op], blocks, voxels)
                speedup = w.seconds / v.seconds
                self.target(
                    f"{op} speed-up over volara",
                    speedup,
                    ">= 3x",
                    speedup >= 3,
                    f"{w.seconds:.2f} s vs {v.seconds:.2f} s",
                )
            else:
                self.target(f"{op} speed-up over volara", float("nan"), ">= 3x", False, "volara not measured")

    def segment(self) -> None:
        import cc3d
        from funlib.geometry import Roi

        import voxblock

        size = self.size
        pred = volumes.ensure(self.workdir, "pred", size)

        def compute(data: np.ndarray) -> np.ndarray:
            return cc3d.connected_components(
                (data > volumes.THRESHOLD).view(np.uint8), connectivity=6, out_dtype=np.uint64
            )

        memory = self.best_in_memory(pred, "segment-memory", compute, np.uint64)
        m = self.add(
            "segment",
            "in memory (read, cc3d, write)",
            memory["total"],
            self.blocks_of(size),
            size**3,
            note=f"read {memory['read']:.2f} cc3d {memory['compute']:.2f} write {memory['write']:.2f}"
            f" (slowest run {memory['slowest']:.2f} s)",
        )

        def vox() -> float:
            output, run_dir = self.fresh("segment")
            for suffix in ("_fragments", "_lut", "_edges"):
                shutil.rmtree(self.out / f"segment{suffix}", ignore_errors=True)
            started = time.perf_counter()
            ok = voxblock.segment_blockwise(
                "threshold-label",
                (1, 1, 1),
                Roi((0, 0, 0), (size,) * 3),
                Roi((0, 0, 0), (self.block,) * 3),
                Roi((0, 0, 0), (self.block,) * 3),
                num_workers=self.workers,
                max_retries=0,
                input=pred,
                output=output,
                parameters={"threshold": volumes.THRESHOLD},
                run_dir=run_dir,
                progress=False,
                overwrite=True,
            )
            assert ok
            return time.perf_counter() - started

        v = self.add("segment", "voxblock segment_blockwise", self.best(vox), self.blocks_of(size), size**3)
        ratio = v.seconds / m.seconds
        self.target(
            "segment (threshold+cc) vs in memory",
            ratio,
            "<= 1.5x",
            ratio <= 1.5,
            f"{v.seconds:.2f} s vs {m.seconds:.2f} s",
        )

    def shards(self) -> None:
        """threshold into sharded and unsharded outputs: one file per block instead of one per chunk."""
        size = self.size
        pred = volumes.ensure(self.workdir, "pred", size)
        blocks, voxels = self.blocks_of(size), size**3
        inner = self.block // 2
        layouts = {
            "unsharded": ({}, f"{self.block}^3 chunks, 1 file per block"),
            "unsharded-small": ({"chunk_shape": (inner,) * 3}, f"{inner}^3 chunks, 8 files per block"),
            "sharded": (
                {"shard_shape": (self.block,) * 3, "chunk_shape": (inner,) * 3},
                f"{self.block}^3 shards of {inner}^3 chunks, 1 file per block",
            ),
        }
        rows = {}
        for name, (layout, what) in layouts.items():
            rows[name] = self.add(
                "shards",
                f"voxblock threshold, {what}",
                self.best(
                    lambda name=name, layout=layout: self.voxblock_api(
                        "threshold", pred, f"shards-{name}", size, threshold=volumes.THRESHOLD, **layout
                    )
                ),
                blocks,
                voxels,
                note=f"{_files(self.out / f'shards-{name}')} files",
            )
        ratio = rows["sharded"].seconds / rows["unsharded"].seconds
        self.target(
            "sharded output vs unsharded",
            ratio,
            "<= 1.25x",
            ratio <= 1.25,
            f"{rows['sharded'].seconds:.2f} s vs {rows['unsharded'].seconds:.2f} s "
            f"({inner}^3 unsharded chunks: {rows['unsharded-small'].seconds:.2f} s)",
        )

    def raw_image(self, size: int) -> str:
        """A uint8 'raw' volume (the predictions times 255, rounded) as level s0 of an OME-NGFF image
        (64^3 chunks), written once; its s1 is made by the first downsample and removed again
        before every timed run (`reset_level`)."""
        from voxblock_workers.downsample import downsample_blockwise

        container = self.workdir / f"raw{size}.zarr"
        marker = self.workdir / f".raw{size}-image.done"
        image = container / "image"
        if not marker.exists():
            shutil.rmtree(container, ignore_errors=True)
            shutil.rmtree(f"{container}.voxblock", ignore_errors=True)
            import zarr

            pred = zarr.open_array(volumes.ensure(self.workdir, "pred", size), mode="r")
            plain = volumes._prepare(container / "plain", (size,) * 3, (volumes.CHUNK,) * 3, np.uint8)
            for z0, z1 in volumes._slabs(size):
                plain._source_data[z0:z1] = np.rint(pred[z0:z1] * 255).astype(np.uint8)
            pyramid = downsample_blockwise(
                f"{container}/plain",
                levels=1,
                factors=(2, 2, 2),
                mode="mean",
                output=str(image),
                progress=False,
            )
            if not pyramid.succeeded:
                raise RuntimeError(f"could not write the raw image {image}")
            shutil.rmtree(container / "plain")
            marker.write_text(json.dumps({"kind": "raw-image", "size": size}))
        return f"{image}/s0"

    def reset_level(self, image: Path) -> None:
        """Remove level s1 of `image` (its array, its run directory, its multiscales entry)."""
        shutil.rmtree(image / "s1", ignore_errors=True)
        shutil.rmtree(Path(f"{image.parent}.voxblock") / image.name / "s1", ignore_errors=True)
        meta = image / "zarr.json"
        doc = json.loads(meta.read_text())
        attrs = doc.get("attributes", {})
        multiscales = attrs["ome"]["multiscales"] if "ome" in attrs else attrs["multiscales"]
        multiscales[0]["datasets"] = multiscales[0]["datasets"][:1]
        meta.write_text(json.dumps(doc, indent=2))

    def downsample(self) -> None:
        """One pyramid level (factors 2,2,2, mean) of the uint8 raw volume: 64^3 output blocks, each
        reading 128^3 input voxels, against the I/O floor with the worker's own reduction."""
        import zarr

        from voxblock_workers.downsample import downsample_blockwise

        size = self.size
        level = size // 2
        blocks, voxels = self.blocks_of(level), size**3  # voxels: the input's, read once each
        s0 = self.raw_image(size)
        image = Path(s0).parent
        factors = [2, 2, 2]

        def api() -> float:
            self.reset_level(image)
            started = time.perf_counter()
            pyramid = downsample_blockwise(
                s0,
                levels=1,
                factors=tuple(factors),
                mode="mean",
                block_size=self.block,
                num_workers=self.workers,
                progress=False,
                max_retries=0,
            )
            seconds = time.perf_counter() - started
            if not pyramid.succeeded:
                raise RuntimeError(f"voxblock downsample failed on {s0}")
            return seconds

        def cli() -> float:
            self.reset_level(image)
            command = [
                str(Path(sys.executable).with_name("voxblock")),
                "downsample",
                s0,
                "--levels",
                "1",
                "--factors",
                ",".join(map(str, factors)),
                "--mode",
                "mean",
                "--block-size",
                ",".join([str(self.block)] * 3),
                "--workers",
                str(self.workers),
                "--max-retries",
                "0",
                "--no-progress",
            ]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - started

        floor_kw = {"factors": factors, "mode": "mean"}
        z = self.add(
            "downsample",
            f"I/O floor ({self.workers} processes, zarr chunk loop)",
            self.best(lambda: self.floor("downsample", s0, "downsample-floor", np.uint8, level, **floor_kw)),
            blocks,
            voxels,
        )
        d = self.add(
            "downsample",
            f"I/O floor ({self.workers} processes, direct chunk loop)",
            self.best(
                lambda: self.floor(
                    "downsample", s0, "downsample-floor", np.uint8, level, direct=True, **floor_kw
                )
            ),
            blocks,
            voxels,
            note="voxblock.chunks I/O",
        )
        f = min(z, d, key=lambda row: row.seconds)
        v = self.add("downsample", "voxblock downsample_blockwise", self.best(api), blocks, voxels)
        same = np.array_equal(
            zarr.open_array(str(image / "s1"), mode="r")[...],
            zarr.open_array(f"{self.out}/downsample-floor", mode="r")[...],
        )
        if not same:
            raise RuntimeError("voxblock's level s1 differs from the floor's output")
        c = self.add("downsample", "voxblock CLI (voxblock downsample)", self.best(cli), blocks, voxels)
        ratio = v.seconds / f.seconds
        self.target(
            "downsample wall vs I/O floor",
            ratio,
            "<= 1.25x",
            ratio <= 1.25,
            f"{v.seconds:.2f} s vs {f.seconds:.2f} s, the faster loop "
            f"(zarr loop {z.seconds:.2f} s; CLI {c.seconds:.2f} s = {c.seconds / f.seconds:.2f}x)",
        )

    def watershed(self) -> None:
        import mwatershed
        from funlib.geometry import Roi

        import voxblock

        size = 256 if self.mode == "full" else 128
        affs = volumes.ensure(self.workdir, "affs", size)
        bias = -0.5

        def compute(data: np.ndarray) -> np.ndarray:
            values = data.astype(np.float64) + bias
            return mwatershed.agglom(values, volumes.WS_OFFSETS)

        memory = self.in_memory(affs, "ws-memory", compute, np.uint64)
        m = self.add(
            f"watershed {size}^3",
            "in memory (read, mwatershed, write)",
            memory["total"],
            self.blocks_of(size),
            size**3,
            note=f"read {memory['read']:.2f} mws {memory['compute']:.2f} write {memory['write']:.2f}",
        )
        context = max(max(abs(v) for v in o) for o in volumes.WS_OFFSETS)

        def vox() -> float:
            output, run_dir = self.fresh("ws")
            for suffix in ("_fragments", "_lut", "_edges"):
                shutil.rmtree(self.out / f"ws{suffix}", ignore_errors=True)
            started = time.perf_counter()
            ok = voxblock.segment_blockwise(
                "watershed",
                (context,) * 3,
                Roi((0, 0, 0), (size,) * 3),
                Roi((0, 0, 0), (self.block,) * 3),
                Roi((0, 0, 0), (self.block,) * 3),
                num_workers=self.workers,
                max_retries=0,
                input=affs,
                output=output,
                parameters={"offsets": volumes.WS_OFFSETS, "bias": bias},
                merge="overlap",
                run_dir=run_dir,
                progress=False,
                overwrite=True,
            )
            assert ok
            return time.perf_counter() - started

        v = self.add(
            f"watershed {size}^3",
            "voxblock segment_blockwise(watershed)",
            vox(),
            self.blocks_of(size),
            size**3,
        )
        self.target(
            f"watershed {size}^3 via segment vs whole-volume mwatershed",
            v.seconds / m.seconds,
            "< 1x",
            v.seconds < m.seconds,
            f"{v.seconds:.2f} s vs {m.seconds:.2f} s",
        )

    def agglomerate(self, volara: dict[str, Any] | None) -> None:
        """affinities -> fragments -> region graph -> segmentation: agglomerate_blockwise, the same
        chain in memory over the whole volume, and volara's chain; wall time, memory, VOI."""
        import fastremap
        import mwatershed
        import zarr

        import voxblock
        from voxblock.agglomerate.rag import rag_partials
        from voxblock.agglomerate.solve import mws_lut
        from voxblock.rundir import RUN_DIR_SUFFIX

        size = 256 if self.mode == "full" else 128
        case = f"agglomerate {size}^3"
        blocks = self.blocks_of(size)
        affs = volumes.ensure(self.workdir, "agg-affs", size)
        truth_name = volumes.ensure(self.workdir, "agg-truth", size)
        offsets, bias, threshold = volumes.AGG_OFFSETS, volumes.AGG_BIAS, volumes.AGG_THRESHOLD
        context = volumes.AGG_CONTEXT

        def in_memory() -> tuple[dict[str, float], np.ndarray, np.ndarray]:
            """Read; mutex watershed over the whole volume (same bias and offsets); its region
            graph (voxblock's exact kernel on one block: the volume, zeros past it); graph mutex
            watershed (same threshold); relabel; write."""
            output, _ = self.fresh("agg-memory")
            t0 = time.perf_counter()
            data = zarr.open_array(affs, mode="r")[...]
            t1 = time.perf_counter()
            fragments = mwatershed.agglom(data.astype(np.float64) + bias, offsets)
            t2 = time.perf_counter()
            pad = max(max(o) for o in offsets)
            partials = rag_partials(
                np.pad(fragments, [(0, pad)] * 3),
                np.pad(data, [(0, 0)] + [(0, pad)] * 3),
                offsets,
                (slice(0, size),) * 3,
                (0, 0, 0),
            )
            t3 = time.perf_counter()
            lut = mws_lut(
                partials["ids"],
                partials["u"],
                partials["v"],
                partials["affinity_sum"] / partials["count"],
                threshold,
            )
            t4 = time.perf_counter()
            segmentation = fastremap.remap(
                fragments, dict(zip(lut[0].tolist(), lut[1].tolist())), preserve_missing_labels=True
            )
            target = volumes._prepare(Path(output), segmentation.shape, (volumes.CHUNK,) * 3, np.uint64)
            target._source_data[...] = segmentation
            t5 = time.perf_counter()
            steps = {"read": t1 - t0, "mws": t2 - t1, "graph": t3 - t2, "solve": t4 - t3, "relabel": t5 - t4}
            return {**steps, "total": t5 - t0}, fragments, segmentation

        truth = zarr.open_array(truth_name, mode="r")[...]
        memory, fragments, segmentation = in_memory()
        memory_scores = measure.scores(truth, segmentation)
        memory_fragment_scores = measure.scores(truth, fragments)
        del fragments, segmentation
        m = self.add(
            case,
            "in memory (read, mws, graph, graph mws, write)",
            memory["total"],
            blocks,
            size**3,
            note=", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total")
            + f"; {_quality(memory_scores)}; fragments "
            f"{memory_fragment_scores['segments']} (VOI {memory_fragment_scores['voi']:.3f})",
        )

        fragments_name = f"{self.out}/agg-fragments"
        output = f"{self.out}/agg-segmentation"
        db = self.workdir / "voxblock-agg.db"

        def vox() -> tuple[float, Any, measure.MemoryPoller]:
            for name in ("agg-fragments", "agg-segmentation"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            shutil.rmtree(Path(f"{self.out}{RUN_DIR_SUFFIX}") / "agg-segmentation", ignore_errors=True)
            shutil.rmtree(Path(f"{self.out}{RUN_DIR_SUFFIX}") / "agg-fragments", ignore_errors=True)
            shutil.rmtree(self.runs / "agg-fragments", ignore_errors=True)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            db.with_name(f"{db.stem}-meta.json").unlink(missing_ok=True)  # funlib's, beside the file
            shutil.rmtree(Path(f"{db}.voxblock"), ignore_errors=True)
            with measure.MemoryPoller(skip=("voxblock.forkserver",)) as poller:
                started = time.perf_counter()
                report = voxblock.agglomerate_blockwise(
                    affs,
                    fragments_name,
                    output,
                    db,
                    (self.block,) * 3,
                    context=(context,) * 3,
                    offsets=offsets,
                    method="mws",
                    threshold=threshold,
                    num_workers=self.workers,
                    bias=bias,
                    progress=False,
                    max_retries=0,
                )
                seconds = time.perf_counter() - started
            return seconds, report, poller

        runs = [vox() for _ in range(self.repeats)]
        seconds, report, poller = min(runs, key=lambda run: run[0])
        rss = poller.record()
        quality = measure.scores(truth, zarr.open_array(output, mode="r")[...])
        fragment_scores = measure.scores(truth, zarr.open_array(fragments_name, mode="r")[...])
        v = self.add(
            case,
            "voxblock agglomerate_blockwise (mws)",
            seconds,
            blocks,
            size**3,
            note=", ".join(f"{k} {s:.2f}" for k, s in report.seconds.items())
            + f"; {_quality(quality)}; {report.graph.nodes} fragments (VOI {fragment_scores['voi']:.3f}),"
            f" {report.graph.edges} edges, {report.segments} segments; peak RSS driver "
            f"{rss['driver_mib']:.0f} MiB (from {rss['driver_start_mib']:.0f}), "
            f"worker {rss['worker_mib']:.0f} MiB (runs: {', '.join(f'{r[0]:.2f}' for r in runs)})",
        )
        self.memory["agglomerate"] = {
            "size": size,
            "voxblock": {
                "seconds": seconds,
                "passes": report.seconds,
                "memory": rss,
                "scores": quality,
                "fragments_scores": fragment_scores,
            },
            "in_memory": {
                "seconds": memory,
                "scores": memory_scores,
                "fragments_scores": memory_fragment_scores,
            },
        }
        print(
            f"  {case}: voxblock / in memory = {v.seconds / m.seconds:.2f}x "
            f"({v.seconds:.2f} s vs {m.seconds:.2f} s; "
            f"VOI {quality['voi']:.3f} vs {memory_scores['voi']:.3f})"
        )
        theirs = (volara or {}).get("agglomerate")
        if theirs and theirs.get("size") == size:
            passes = ", ".join(f"{k} {s:.2f}" for k, s in theirs["passes"].items())
            q = theirs["scores"]
            w = self.add(
                case,
                "volara 1.0.5 chain (daisy 1, own venv)",
                theirs["seconds"],
                blocks,
                size**3,
                note=f"{passes}; {_quality(q)}; {theirs['fragments']} fragments; peak RSS driver "
                f"{theirs['memory']['driver_mib']:.0f} MiB, worker {theirs['memory']['worker_mib']:.0f} MiB",
            )
            self.memory["agglomerate"]["volara"] = theirs
            speedup = w.seconds / v.seconds
            print(f"  {case}: volara / voxblock = {speedup:.2f}x")
            self.target(
                f"agglomerate {size}^3 speed-up over volara at <= its VOI",
                speedup,
                ">= 5x",
                speedup >= 5 and quality["voi"] <= q["voi"] + 1e-9,
                f"{w.seconds:.2f} s vs {v.seconds:.2f} s; "
                f"VOI (split + merge) {quality['voi']:.3f} vs {q['voi']:.3f}",
            )
        else:
            self.target(
                f"agglomerate {size}^3 speed-up over volara at <= its VOI",
                float("nan"),
                ">= 5x",
                False,
                "volara not measured at this size",
            )

    def predict(self) -> None:
        import torch
        from funlib.geometry import Roi

        import voxblock

        size = self.size
        pred = volumes.ensure(self.workdir, "pred", size)
        model_path = self.workdir / "tiny_cnn.pt"
        model = TinyCNN()
        torch.jit.save(torch.jit.script(model.eval()), str(model_path))
        context = TinyCNN.context
        blocks = self.blocks_of(size)

        # pure forward: the same blocks, already in memory, in `workers` processes with one
        # thread each (as voxblock sets them); only the forward loops are timed
        import zarr

        data = np.pad(zarr.open_array(pred, mode="r")[...], context)
        sample = floor.block_slices(size, self.block)[:: max(1, blocks // 64)]  # <= 64 blocks, extrapolated
        inputs = []
        for slices in sample:
            read = tuple(slice(s.start, s.stop + 2 * context) for s in slices)
            inputs.append(np.ascontiguousarray(data[read]))
        del data
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        shares = [inputs[i :: self.workers] for i in range(self.workers)]
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(self.workers) as pool:
            loops = pool.starmap(floor.forward_loop, [(str(model_path), share, threads) for share in shares])
        del inputs
        ideal = max(loops) * blocks / len(sample)
        p = self.add(
            "predict",
            f"pure forward, {self.workers} processes",
            ideal,
            blocks,
            size**3,
            note=f"forward loops only ({len(sample)} of {blocks} blocks timed, extrapolated)",
        )

        def vox() -> float:
            output, run_dir = self.fresh("predict")
            started = time.perf_counter()
            ok = voxblock.run_blockwise(
                "predict",
                Roi((0, 0, 0), (size,) * 3).grow((context,) * 3, (context,) * 3),
                Roi((0, 0, 0), (self.block,) * 3).grow((context,) * 3, (context,) * 3),
                Roi((0, 0, 0), (self.block,) * 3),
                num_workers=self.workers,
                max_retries=0,
                input=pred,
                output=output,
                model=str(model_path),
                device="cpu",
                run_dir=run_dir,
                progress=False,
            )
            assert ok
            return time.perf_counter() - started

        v = self.add("predict", "voxblock run_blockwise(predict)", self.best(vox, 1), blocks, size**3)
        # throughput as the pure forward rows measure it: the block loops, after each worker's
        # set-up (torch import, model load), which the report gives per run
        report = json.loads((self.runs / "predict" / "report.json").read_text())
        rate, setup = report["serving_blocks_per_second"], report["worker_setup_seconds"]
        s = self.add(
            "predict",
            "voxblock run_blockwise(predict), serving",
            blocks / rate,
            blocks,
            size**3,
            note=f"block loops after worker set-up ({setup:.1f} s: torch import, model load)",
        )
        ratio = s.blocks_per_s / p.blocks_per_s
        self.target(
            "predict throughput vs pure forward",
            ratio,
            ">= 85%",
            ratio >= 0.85,
            f"{s.blocks_per_s:.1f} vs {p.blocks_per_s:.1f} blocks/s "
            f"(end to end with set-up: {p.seconds / v.seconds:.0%})",
        )

    def peak_memory(self) -> None:
        small, large = (256, 768) if self.mode == "full" else (128, 256)
        peaks = {}
        for size in (small, large):
            pred = volumes.ensure(self.workdir, "pred", size)
            poller = RssPoller()
            poller.start()
            seconds = self.voxblock_api("threshold", pred, f"mem{size}", size, threshold=volumes.THRESHOLD)
            poller.stop()
            peaks[size] = poller.peak_per_worker()
            self.add(
                "memory",
                f"voxblock threshold {size}^3: peak worker RSS",
                seconds,
                self.blocks_of(size),
                size**3,
                note=f"{peaks[size] / MIB:.0f} MiB per worker ({poller.workers_seen} workers seen)",
            )
        growth = peaks[large] / peaks[small] - 1
        self.memory.update(
            {"small": small, "large": large, "peak_small": peaks[small], "peak_large": peaks[large]}
        )
        self.target(
            f"peak worker RSS growth {small}^3 -> {large}^3",
            growth,
            "< 10%",
            growth < 0.10,
            f"{peaks[small] / MIB:.0f} -> {peaks[large] / MIB:.0f} MiB "
            f"({(large / small) ** 3:.0f}x the voxels)",
        )

    def sweeps(self) -> None:
        """Threshold throughput vs workers and vs block size: voxblock and the floor."""
        size = self.size
        pred = volumes.ensure(self.workdir, "pred32", size)  # 32^3 chunks: every block size aligns
        voxels = size**3

        def point(axis: str, value: int) -> None:
            """One point of a sweep: the floor and voxblock with `axis` (workers or block) set."""
            f = self.floor(
                "threshold",
                pred,
                "sweep-floor",
                np.uint8,
                size,
                direct=True,
                threshold=volumes.THRESHOLD,
                **{axis: value},
            )
            v = self.voxblock_api(
                "threshold", pred, "sweep-api", size, threshold=volumes.THRESHOLD, **{axis: value}
            )
            rates = {"floor": voxels / f / 1e6, "voxblock": voxels / v / 1e6}
            self.sweep[axis].append({axis: value, **rates})
            print(
                f"  sweep {axis}={value}: floor {rates['floor']:.0f}, voxblock {rates['voxblock']:.0f} Mvox/s"
            )

        for workers in sorted({1, self.workers, 2 * self.workers}):
            point("workers", workers)
        for block in (32, 64, 128):
            point("block", block)

    # -- output ---------------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        import psutil

        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        versions = {}
        for package in ("daisy", "zarr", "numpy", "torch", "mwatershed", "connected-components-3d"):
            try:
                from importlib.metadata import version

                versions[package] = version(package)
            except Exception:
                versions[package] = "?"
        return {
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "load_before": self.load_before,
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}",
            "versions": versions,
        }

    def markdown(self, machine: dict[str, Any]) -> str:
        lines = [
            f"Measured by `benchmarks/run.py --{self.mode}` on {machine['cpu']}, {machine['cores']} cores, "
            f"{machine['memory_gib']} GiB, Python {machine['python']} "
            f"(daisy {machine['versions']['daisy']}, zarr {machine['versions']['zarr']}); volume "
            f"{self.size}^3, {self.block}^3 blocks and zarr chunks, {self.workers} workers, "
            f"best of {self.repeats} run(s) "
            f"(in-memory references: each step's best of {max(3, self.repeats)}). "
            f"Load average (1 min) {machine['load_before'][0]} before, "
            f"{machine['load_average'][0]} after: other work on the machine slowed the rows unevenly.",
            "",
            "| case | system | seconds | Mvoxel/s | blocks/s | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.case} | {row.system} | {row.seconds:.2f} | "
                f"{row.mvox_per_s:.1f} | {row.blocks_per_s:.0f} | {row.note} |"
            )
        lines += ["", "| target | goal | measured | met | detail |", "|---|---|---:|---|---|"]
        for t in self.targets:
            measured = "n/a" if np.isnan(t.measured) else _fmt(t)
            lines.append(
                f"| {t.name} | {t.goal} | {measured} | {'yes' if t.met else '**no**'} | {t.detail} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in (
            (axes[0], "workers", "worker processes"),
            (axes[1], "block", "block edge (voxels)"),
        ):
            points = self.sweep[key]
            if not points:
                continue
            xs = [p[key] for p in points]
            ax.plot(xs, [p["floor"] for p in points], "o-", label="I/O floor (direct chunk loop)")
            ax.plot(xs, [p["voxblock"] for p in points], "s-", label="voxblock run_blockwise")
            ax.set_xlabel(label)
            ax.set_ylabel("threshold throughput (Mvoxel/s)")
            ax.set_xticks(xs)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0].set_title(f"{self.size}^3, {self.block}^3 blocks")
        axes[1].set_title(f"{self.size}^3, {self.workers} workers")
        fig.tight_layout()
        fig.savefig(path, dpi=100)

    def report(self) -> None:
        machine = self.machine()
        results = self.args.results
        results.mkdir(parents=True, exist_ok=True)
        print()
        print(self.markdown(machine))
        record = {
            "mode": self.mode,
            "size": self.size,
            "block": self.block,
            "workers": self.workers,
            "repeats": self.repeats,
            "machine": machine,
            "rows": [
                {
                    "case": r.case,
                    "system": r.system,
                    "seconds": r.seconds,
                    "blocks": r.blocks,
                    "voxels": r.voxels,
                    "blocks_per_s": r.blocks_per_s,
                    "mvox_per_s": r.mvox_per_s,
                    "note": r.note,
                }
                for r in self.rows
            ],
            "targets": [
                {
                    "name": t.name,
                    "goal": t.goal,
                    "measured": None if np.isnan(t.measured) else t.measured,
                    "met": t.met,
                    "detail": t.detail,
                }
                for t in self.targets
            ],
            "sweep": self.sweep,
            "memory": self.memory,
        }
        (results / f"bench-{self.mode}.json").write_text(json.dumps(record, indent=2))
        table = "README-table.md" if self.mode == "full" else "README-table-quick.md"
        (results / table).write_text(self.markdown(machine))
        if self.sweep["workers"] or self.sweep["block"]:
            self.plot(results / f"bench-{self.mode}.png")
        met = sum(t.met for t in self.targets)
        print(f"{met} of {len(self.targets)} targets met; results in {results}/")


def _fmt(t: Target) -> str:
    if "%" in t.goal and "RSS" in t.name:
        return f"{t.measured * 100:+.1f}%"
    if "%" in t.goal:
        return f"{t.measured * 100:.0f}%"
    return f"{t.measured:.2f}x"


# -- things the worker processes need (pickled by value from __main__) ------------------------------


def _quality(scores: dict[str, float]) -> str:
    return (
        f"VOI {scores['voi']:.3f} (split {scores['voi_split']:.3f}, merge {scores['voi_merge']:.3f}), "
        f"ARAND {scores['arand']:.3f}"
    )


def _files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file() and path.name != "zarr.json")


def _noop_block(block: Any) -> None:
    pass


def _voxblock_classes():
    from dataclasses import dataclass as _dataclass

    import torch

    from voxblock import Worker

    @_dataclass
    class NoOp(Worker):
        """A worker that does nothing with its blocks."""

        name = "noop"
        fit = "valid"

        def process(self, block: Any) -> None:
            pass

    class TinyCNN(torch.nn.Module):
        """Three valid 3^3 convolutions, 1 -> 8 -> 8 -> 1 channels: 3 voxels of context."""

        context = 3

        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Conv3d(1, 8, 3),
                torch.nn.ReLU(),
                torch.nn.Conv3d(8, 8, 3),
                torch.nn.ReLU(),
                torch.nn.Conv3d(8, 1, 3),
                torch.nn.Sigmoid(),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    return NoOp, TinyCNN


class RssPoller:
    """The peak resident memory of each child process of this one, polled every 20 ms.

    voxblock's fork server is left out: it serves no block, it only holds the
    imports that the workers forked from it share.
    """

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            for child in self._me.children(recursive=True):
                try:
                    if child.ppid() == self._me.pid and "voxblock.forkserver" in " ".join(child.cmdline()):
                        continue  # the server itself; the workers forked from it count
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                self._peaks[child.pid] = max(self._peaks.get(child.pid, 0), rss)
            self._stop.wait(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def workers_seen(self) -> int:
        return len(self._peaks)

    def peak_per_worker(self) -> int:
        return max(self._peaks.values(), default=0)


def load_volara(results: Path, mode: str, size: int) -> dict[str, float] | None:
    path = results / f"volara-{mode}.json"
    if not path.exists():
        print(f"no {path}: run `nox -s bench_volara` for volara's timings")
        return None
    record = json.loads(path.read_text())
    if record.get("size") != size:
        print(f"{path} is for {record.get('size')}^3, not {size}^3: volara not compared")
        return None
    return {name: task["seconds"] for name, task in record["tasks"].items() if name != "agglomerate"}


def load_volara_record(results: Path, mode: str) -> dict[str, Any] | None:
    """volara's whole record of `mode` (its agglomeration chain carries its own size)."""
    path = results / f"volara-{mode}.json"
    if not path.exists():
        print(f"no {path}: run `nox -s bench_volara` for volara's timings")
        return None
    return json.loads(path.read_text()).get("tasks", {})


CASES = (
    "noop",
    "ops",
    "shards",
    "downsample",
    "segment",
    "watershed",
    "agglomerate",
    "predict",
    "memory",
    "sweep",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="256^3 volumes (the default)")
    mode.add_argument("--full", action="store_true", help="512^3 volumes, for the README")
    parser.add_argument("--size", type=int, default=None, help="override the volume edge (voxels)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (2)")
    parser.add_argument(
        "--only", default=",".join(CASES), help=f"comma-separated cases of {', '.join(CASES)}"
    )
    parser.add_argument("--workdir", type=Path, default=HERE / ".work", help="volumes and outputs")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    bench = Bench(args)
    only = set(args.only.split(","))
    unknown = only - set(CASES)
    if unknown:
        parser.error(f"unknown cases {', '.join(sorted(unknown))}")
    bench.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"voxblock benchmark ({bench.mode}): {bench.size}^3, {bench.block}^3 blocks, {bench.workers} workers"
    )
    # voxblock imports its modules on first use; import the driver's side now, as the bare daisy
    # rows have `import daisy` done before they are timed (a one-off cost per process, not per run)
    for module in ("voxblock.run", "voxblock.segment.pipeline", "voxblock.agglomerate.pipeline"):
        importlib.import_module(module)

    started = time.perf_counter()
    if "noop" in only:
        bench.noop()
    if "ops" in only:
        bench.array_ops(load_volara(args.results, bench.mode, bench.size))
    if "shards" in only:
        bench.shards()
    if "downsample" in only:
        bench.downsample()
    if "segment" in only:
        bench.segment()
    if "watershed" in only:
        bench.watershed()
    if "agglomerate" in only:
        bench.agglomerate(load_volara_record(args.results, bench.mode))
    if "predict" in only:
        bench.predict()
    if "memory" in only:
        bench.peak_memory()
    if "sweep" in only:
        bench.sweeps()
    print(f"benchmark took {time.perf_counter() - started:.0f} s")
    bench.report()


if __name__ == "__main__":
    NoOp, TinyCNN = _voxblock_classes()
    main()
