"""Workers as jobs of a cluster scheduler (SLURM, LSF), and the cluster config file.

Each worker is one blocking job: `srun` (SLURM) or `bsub -K` (LSF) runs
`python -m voxblock.compute RUN_DIR` on a node, which loads the worker
from the run directory (a shared filesystem) and connects back to the
scheduler on this machine (`host=` / `DAISY_HOST` when the address daisy
detects is not the one the nodes reach). The launcher waits for its job,
so daisy sees the worker end; every job is named
`voxblock-TASK-TOKEN-wWORKER`, cancelled by its launcher when that is
stopped, and cancelled by `run_tasks` after the run if still there.

Resources are set once in a config file, `voxblock.toml` in the current
directory or the file named by `VOXBLOCK_CONFIG` (or `--cluster-config`):

    [cluster]
    kind = "slurm"          # local, slurm, lsf or command
    cpus = 4
    gpus = 1
    memory = "16G"
    partition = "gpu"       # queue for LSF
    time_limit = "2:00:00"
    flags = ["--account=lab"]
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from voxblock.compute import Command, Compute, Local, worker_command
from voxblock.errors import VoxblockError
from voxblock.job import Job
from voxblock.launcher import ServeByCommand, run_quietly

JOB_PREFIX = "voxblock"
CONFIG_FILE = "voxblock.toml"
CONFIG_ENV = "VOXBLOCK_CONFIG"
KINDS = ("local", "slurm", "lsf", "command")


def job_prefix(job: Job) -> str:
    """Every cluster job of one run of a task is named PREFIX + worker id."""
    return f"{JOB_PREFIX}-{job.name or Path(job.run_dir).name}-w"


def _check_resources(cpus: Any, gpus: Any, memory: Any, flags: Any) -> None:
    if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
        raise VoxblockError(f"cpus must be an integer >= 1; got {cpus!r}")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise VoxblockError(f"gpus must be an integer >= 0; got {gpus!r}")
    if memory is not None:
        megabytes(memory)
    if isinstance(flags, str) or not all(isinstance(f, str) for f in flags):
        raise VoxblockError(f"flags must be a list of strings; got {flags!r}")


def megabytes(memory: str | int) -> int:
    """Memory like "500M", "4G", "1T" or "2048" (MB), in MB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(memory), re.IGNORECASE)
    if not match:
        raise VoxblockError(f"memory must look like 500M, 4G or 1T; got {memory!r}")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2).upper()]
    return max(1, round(float(match.group(1)) * scale))


class BatchCompute(Compute):
    """A batch system that starts each worker as one blocking job.

    Subclasses give the launch command, the command that cancels one
    worker's job, and the files where the system writes a job's errors.
    """

    cpus: int
    gpus: int
    memory: str | None
    flags: Sequence[str]
    log_files: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        _check_resources(self.cpus, self.gpus, self.memory, self.flags)

    def launch_command(self, job: Job) -> list[str]:
        raise NotImplementedError

    def cancel_command(self, job: Job) -> tuple[str, ...]:
        raise NotImplementedError

    def process_function(self, job: Job) -> Callable[[], None]:
        job.save()
        return ServeByCommand(
            tuple(self.launch_command(job)),
            Path(job.run_dir),
            cancel=self.cancel_command(job),
            logs=self.log_files,
            announce=True,
            watch_server=True,
        )


@dataclass(frozen=True)
class Slurm(BatchCompute):
    """Each worker is a SLURM job started with `srun` (blocking), one task with these resources.

    `memory` like "4G"; `time_limit` in SLURM's format ("30", "2:00:00",
    "1-00:00:00"); `flags` go to srun as they are (["--account=lab",
    "--constraint=v100"]). The worker's stdout and stderr come back
    through srun into the run directory's logs/TASK/worker_N.out/.err.
    """

    cpus: int = 1
    gpus: int = 0
    memory: str | None = None
    partition: str | None = None
    time_limit: str | None = None
    flags: Sequence[str] = ()
    python: str = sys.executable
    srun: str = "srun"
    scancel: str = "scancel"
    squeue: str = "squeue"

    def launch_command(self, job: Job) -> list[str]:
        command = [self.srun, "--job-name", job_prefix(job) + "{worker_id}", "--ntasks", "1"]
        command += ["--cpus-per-task", str(self.cpus)]
        if self.memory is not None:
            command += ["--mem", f"{megabytes(self.memory)}M"]
        if self.partition:
            command += ["--partition", self.partition]
        if self.time_limit:
            command += ["--time", str(self.time_limit)]
        if self.gpus:
            command += ["--gres", f"gpu:{self.gpus}"]
        return [*command, *self.flags, *worker_command(job, self.python)]

    def cancel_command(self, job: Job) -> tuple[str, ...]:
        return (self.scancel, "--name", job_prefix(job) + "{worker_id}")

    def jobs(self, job: Job) -> list[str]:
        """IDs of this run's jobs that the scheduler still lists."""
        listed = run_quietly([self.squeue, "-h", "-u", getpass.getuser(), "-o", "%A %j %T"])
        if listed is None or listed.returncode != 0:
            return []
        prefix = job_prefix(job)
        found = []
        for line in listed.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].startswith(prefix):
                found.append(parts[0])
        return found

    def cleanup(self, job: Job, wait: float = 15.0) -> None:
        """Cancel this run's jobs still listed, and wait (up to `wait` s) until they are gone."""
        deadline = time.monotonic() + wait
        left = self.jobs(job)
        if left:
            run_quietly([self.scancel, *left])
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.jobs(job)


@dataclass(frozen=True)
class Lsf(BatchCompute):
    """Each worker is an LSF job started with `bsub -K` (blocking).

    `memory` like "4G" is requested as `-R "rusage[mem=MB]"` (LSF's
    default unit, MB); `time_limit` is bsub's -W ([HH:]MM); `gpus` is
    `-gpu num=N`; `flags` go to bsub as they are. The job's output goes
    to the run directory's logs/TASK/worker_N.lsf.out/.err.
    """

    cpus: int = 1
    gpus: int = 0
    memory: str | None = None
    queue: str | None = None
    time_limit: str | None = None
    flags: Sequence[str] = ()
    python: str = sys.executable
    bsub: str = "bsub"
    bkill: str = "bkill"
    log_files: ClassVar[tuple[str, ...]] = ("{logdir}/{task_id}/worker_{worker_id}.lsf.err",)

    def launch_command(self, job: Job) -> list[str]:
        log = "{logdir}/{task_id}/worker_{worker_id}.lsf"
        command = [self.bsub, "-K", "-J", job_prefix(job) + "{worker_id}", "-n", str(self.cpus)]
        command += ["-R", "span[hosts=1]", "-o", log + ".out", "-e", log + ".err"]
        if self.memory is not None:
            command += ["-R", f"rusage[mem={megabytes(self.memory)}]"]
        if self.queue:
            command += ["-q", self.queue]
        if self.time_limit:
            command += ["-W", str(self.time_limit)]
        if self.gpus:
            command += ["-gpu", f"num={self.gpus}"]
        return [*command, *self.flags, *worker_command(job, self.python)]

    def cancel_command(self, job: Job) -> tuple[str, ...]:
        return (self.bkill, "-J", job_prefix(job) + "{worker_id}", "0")

    def cleanup(self, job: Job) -> None:
        """Kill this run's jobs still known to LSF (a job-name pattern)."""
        run_quietly([self.bkill, "-J", job_prefix(job) + "*", "0"])


# -- configuration --------------------------------------------------------------------------------

COMPUTES: dict[str, type[Compute]] = {"local": Local, "slurm": Slurm, "lsf": Lsf, "command": Command}
ALIASES = {"queue": "partition", "partition": "queue", "command_template": "template"}


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The config file in use: `explicit`, else $VOXBLOCK_CONFIG, else ./voxblock.toml if present."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise VoxblockError(f"cluster config {path} does not exist")
        return path
    if os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
        if not path.is_file():
            raise VoxblockError(f"{CONFIG_ENV}={path}: no such file")
        return path
    path = Path.cwd() / CONFIG_FILE
    return path if path.is_file() else None


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The `[cluster]` section of the config file (see `config_path`); {} if there is none."""
    found = config_path(path)
    if found is None:
        return {}
    try:
        data = tomllib.loads(found.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise VoxblockError(f"cannot read cluster config {found}: {error}") from error
    section = data.get("cluster", {})
    if not isinstance(section, dict):
        raise VoxblockError(f"{found}: [cluster] must be a table")
    return dict(section)


def make_compute(settings: Mapping[str, Any]) -> tuple[Compute, str | None]:
    """A Compute and the scheduler host from settings: `kind` plus that kind's fields.

    Keys are the dataclass fields (`cpus`, `memory`, `partition`/`queue`,
    `time_limit`, `flags`, `template`, `python`...) plus `host`, the
    address workers connect to. Unknown keys are refused with the ones known.
    """
    values = {k.replace("-", "_"): v for k, v in settings.items() if v is not None}
    host = values.pop("host", None)
    kind = str(values.pop("kind", "local")).lower()
    if kind not in COMPUTES:
        raise VoxblockError(f"cluster kind must be one of {', '.join(KINDS)}; got {kind!r}")
    cls = COMPUTES[kind]
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in list(values):
        if key not in known and ALIASES.get(key) in known:
            values[ALIASES[key]] = values.pop(key)
    unknown = sorted(set(values) - known)
    if unknown:
        allowed = ", ".join(sorted(known | {"kind", "host"})) or "kind, host"
        raise VoxblockError(f"cluster kind {kind!r} takes no {', '.join(unknown)}; it takes {allowed}")
    for key in ("flags", "template"):
        if key in values:
            values[key] = tuple(values[key])
    try:
        return cls(**values), (str(host) if host else None)
    except TypeError as error:
        raise VoxblockError(f"bad cluster settings for {kind!r}: {error}") from error


def compute_from_config(path: str | Path | None = None, **overrides: Any) -> tuple[Compute, str | None]:
    """The config file's `[cluster]` section with `overrides` (None: not given) on top.

    A different `kind` in the overrides drops the file's resources only if
    they do not apply to it.
    """
    settings = load_config(path)
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    if "kind" in given and given["kind"] != settings.get("kind", "local"):
        cls = COMPUTES.get(str(given["kind"]).lower())
        if cls is not None:
            known = {f.name for f in fields(cls)} | {"host"}  # type: ignore[arg-type]
            known |= {a for a, b in ALIASES.items() if b in known}
            settings = {k: v for k, v in settings.items() if k.replace("-", "_") in known}
    settings.update(given)
    return make_compute(settings)


__all__ = [
    "CONFIG_ENV",
    "CONFIG_FILE",
    "Lsf",
    "Slurm",
    "compute_from_config",
    "config_path",
    "load_config",
    "make_compute",
    "megabytes",
]
