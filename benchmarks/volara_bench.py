"""volara 1.0.5 on the same volumes, in its own virtualenv (it pins daisy<2): `nox -s bench_volara`.

Runs volara's Threshold, Argmax and Relabel tasks the way its docs show
(`Task(...).run_blockwise()`, dropping earlier results first) with the
same workers and block size as the voxblock benchmark, and writes the wall
times to benchmarks/results/volara-{quick,full}.json, which
`benchmarks/run.py` reads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import volumes  # noqa: E402


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
    args = parser.parse_args()
    mode = "full" if args.full else "quick"
    size_voxels = args.size or (512 if args.full else 256)
    repeats = args.repeats or (1 if args.full else 2)

    import volara
    from funlib.geometry import Coordinate
    from volara.blockwise import Argmax, Relabel, Threshold
    from volara.datasets import Labels, Raw
    from volara.logging import set_log_basedir
    from volara.lut import LUT

    workdir = args.workdir / mode
    workdir.mkdir(parents=True, exist_ok=True)
    set_log_basedir(workdir / "volara_logs")
    pred = volumes.ensure(workdir, "pred", size_voxels)
    probs = volumes.ensure(workdir, "probs", size_voxels)
    frags = volumes.ensure(workdir, "frags", size_voxels)
    lut = volumes.ensure_lut(workdir, size_voxels)
    out = workdir / "volara.zarr"
    block = Coordinate((args.block,) * 3)
    common = {"block_size": block, "num_workers": args.workers}

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
    results = {}
    for name, make in tasks.items():
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
    path = args.results / f"volara-{mode}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
