"""dacapo and daisy-1 conventions, kept apart from the design.

voxblock's own way to write a worker is `voxblock.workers` (a dataclass of options with
prepare/setup/process); what is here exists so that code written for dacapo and daisy 1
runs unchanged, as daisy keeps its `v1_compat.py` apart:

- dacapo's worker files: a Python file whose `spawn_worker(*args, **kwargs)` returns the
  0-arg function daisy runs in each worker process, with module-level `fit`,
  `read_write_conflict`, `check_function` and `init_callback_fn` (`WorkerFile`,
  `load_worker_module`; its arguments checked before the run, `spawn_argument_problem`;
  the arrays among them, `array_arguments`; the CLI's --input/--output passed as the
  parameters it takes, dacapo's container + dataset pairs and identifiers included,
  `file_arrays`, `ArrayIdentifier`). `make_worker` is where a worker file, a registered
  worker's name and a `Worker` instance meet.
- daisy 1's `check_function`: one function that checks before and after a block, or a
  (pre, post) pair (`split_check`).
- daisy 1's `init_callback_fn`: called once in the driver when the task starts, with a
  context that reaches the scheduler. daisy 2 has no such callback: the first worker offers
  its context in the run directory and every worker waits (`AfterInit`, worker side) until
  the driver has called it (`InitCallbacks`, driver side).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from voxblock.errors import VoxblockError
from voxblock.geometry import Fit
from voxblock.rundir import RunDirectory
from voxblock.workers import (
    Preparation,
    Worker,
    _jsonable,
    check_existing_output,
    stable_hash,
    worker_class,
)

# -- a worker from a name, a file or an instance --------------------------------


def make_worker(worker: str | Path | Worker, *args: Any, **kwargs: Any) -> Worker:
    """A configured worker from a registered name, a worker file, or an instance."""
    if isinstance(worker, Worker):
        if args or kwargs:
            raise VoxblockError("options cannot be added to a worker instance; set them on it")
        return worker
    text = str(worker)
    if text.endswith(".py") or Path(text).is_file():
        return WorkerFile.load(Path(text), args, kwargs)
    cls = worker_class(text)
    if args:
        raise VoxblockError(f"worker {text!r} takes options by keyword only; got {args!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise VoxblockError(
            f"worker {text!r} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(known))}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise VoxblockError(f"worker {text!r}: {error}") from error


# -- dacapo's worker files ----------------------------------------------------


@dataclass
class WorkerFile(Worker):
    """A dacapo-style worker file: `spawn_worker(*args, **kwargs)` returns the
    0-arg function daisy runs in each worker process."""

    path: str = ""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, args: tuple, kwargs: Mapping[str, Any]) -> WorkerFile:
        module = load_worker_module(path)
        if not callable(getattr(module, "spawn_worker", None)):
            raise VoxblockError(f"worker file {path} defines no spawn_worker()")
        # a missing or unknown argument would fail in every worker process, after the run started
        problem = spawn_argument_problem(inspect.signature(module.spawn_worker), tuple(args), kwargs)
        if problem is not None:
            raise VoxblockError(f"worker file {path}: spawn_worker() {problem}")
        instance = cls(path=str(path.resolve()), args=tuple(args), kwargs=dict(kwargs))
        instance._module = module
        return instance

    @staticmethod
    def parameters(path: Path) -> SpawnParameters:
        """What the spawn_worker() of a worker file takes: the CLI passes `input`/`output` only then."""
        module = load_worker_module(path)
        if not callable(getattr(module, "spawn_worker", None)):
            raise VoxblockError(f"worker file {path} defines no spawn_worker()")
        return SpawnParameters.of(inspect.signature(module.spawn_worker))

    def arguments(self) -> dict[str, Any]:
        """spawn_worker's arguments by parameter name (positional ones too; **kwargs flattened)."""
        return named_arguments(inspect.signature(self.module.spawn_worker), self.args, self.kwargs)

    @property
    def module(self) -> ModuleType:
        if getattr(self, "_module", None) is None:
            self._module = load_worker_module(Path(self.path))
        return self._module

    @property
    def worker_name(self) -> str:
        return Path(self.path).stem

    def default_fit(self) -> Fit:
        return getattr(self.module, "fit", "valid")

    def default_read_write_conflict(self) -> bool:
        return bool(getattr(self.module, "read_write_conflict", False))

    def options(self) -> dict[str, Any]:
        return {"path": self.path, "args": _jsonable(self.args), "kwargs": _jsonable(self.kwargs)}

    def prepare(self, preparation: Preparation) -> None:
        """The file writes its outputs itself; voxblock still refuses blocks that would share
        the write units of those that exist (their writes would lose each other's voxels)."""
        from voxblock import arrays

        for name in self.outputs():
            if arrays.ArrayName.parse(name).path.exists():
                check_existing_output(name, preparation.blocking, preparation.num_workers)

    def outputs(self) -> list[str]:
        """The arrays given to parameters named output... or prediction... (dacapo's names)."""
        found = array_arguments(self.arguments())
        names = [name for role, name in found.items() if role.startswith(OUTPUT_ROLES)]
        return list(dict.fromkeys(names))

    def spawn_function(self, serve: Callable[[], None]) -> Callable[[], None]:
        function = self.module.spawn_worker(*self.args, **self.kwargs)
        if not callable(function):
            raise VoxblockError(f"spawn_worker() in {self.path} did not return a function")
        if inspect.signature(function).parameters:
            required = [
                p
                for p in inspect.signature(function).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind != p.KEYWORD_ONLY
            ]
            if required:
                raise VoxblockError(f"spawn_worker() in {self.path} must return a function of no arguments")
        return function

    def check_function(self) -> Any:
        return getattr(self.module, "check_function", None)

    def init_callback_fn(self) -> Callable[[Any], None] | None:
        return getattr(self.module, "init_callback_fn", None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_module", None)
        return state


# parameters of a worker file's spawn_worker that name arrays it writes: dacapo's output_container +
# output_dataset, output_array_identifier, prediction_array_identifier; also output_path, output...
OUTPUT_ROLES = ("output", "prediction")


@dataclass(frozen=True)
class ArrayIdentifier:
    """What dacapo's worker files take for an array (its LocalArrayIdentifier): a container and a
    dataset. The CLI gives one to a spawn_worker parameter named ..._array_identifier."""

    container: Path
    dataset: str

    @classmethod
    def parse(cls, name: str) -> ArrayIdentifier:
        from voxblock.arrays import ArrayName

        parsed = ArrayName.parse(name)
        return cls(parsed.container, parsed.dataset)

    def __str__(self) -> str:
        return f"{self.container}/{self.dataset}"


@dataclass(frozen=True)
class SpawnParameters:
    """The parameters of a spawn_worker(): their names, the required ones, and **kwargs."""

    names: tuple[str, ...]
    required: tuple[str, ...]
    any_keyword: bool

    @classmethod
    def of(cls, signature: inspect.Signature) -> SpawnParameters:
        named = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return cls(
            names=tuple(p.name for p in named),
            required=tuple(p.name for p in named if p.default is p.empty),
            any_keyword=any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()),
        )

    def takes(self, name: str) -> bool:
        return self.any_keyword or name in self.names


def spawn_argument_problem(
    signature: inspect.Signature, args: tuple, kwargs: Mapping[str, Any]
) -> str | None:
    """What is wrong with calling spawn_worker(*args, **kwargs), in words a user can act on; or None."""
    try:
        signature.bind(*args, **kwargs)
        return None
    except TypeError as error:
        reason = str(error)
    parameters = SpawnParameters.of(signature)
    positional = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    given = set(positional[: len(args)]) | set(kwargs)
    missing = [name for name in parameters.required if name not in given]
    unknown = sorted(k for k in kwargs if not parameters.takes(k))
    takes = ", ".join(parameters.names) or "no named parameters"
    if unknown:
        return f"takes no parameter {', '.join(unknown)}; it takes: {takes}"
    if missing:
        shown = " ".join(f"-o {name}=VALUE" for name in missing)
        return (
            f"needs {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} as {shown} "
            f"(voxblock run) or as keyword arguments (Python)"
        )
    return f"cannot take these arguments ({reason}); it takes: {takes}"


def named_arguments(signature: inspect.Signature, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments by parameter name, as spawn_worker would see them (**kwargs flattened)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind != inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def array_arguments(arguments: Mapping[str, Any]) -> dict[str, str]:
    """The arrays among a worker file's arguments, CONTAINER/DATASET by role.

    dacapo names an array by two arguments, `output_container` and
    `output_dataset` (role "output"), or by an identifier with `.container`
    and `.dataset`; others by one CONTAINER/DATASET string. Anything that
    is not an array name (a lone container, a dataset, a number) is no array.
    """
    from voxblock.arrays import ArrayName

    found: dict[str, str] = {}
    for key, value in arguments.items():
        role, text = key, None
        if key.endswith("_container") and f"{key[: -len('_container')]}_dataset" in arguments:
            role = key[: -len("_container")]
            text = f"{value}/{arguments[role + '_dataset']}"
        elif hasattr(value, "container") and hasattr(value, "dataset"):
            text = f"{value.container}/{value.dataset}"
        elif isinstance(value, (str, Path)):
            text = str(value)
        if text is None:
            continue
        try:
            found[role] = str(ArrayName.parse(text))
        except VoxblockError:
            continue
    return found


def file_arrays(
    path: Path, input_name: str | None, output_name: str | None, given: dict[str, Any]
) -> dict[str, Any]:
    """--input/--output as arguments of a worker file's spawn_worker, only where it takes them.

    Passed as `input`/`output` where spawn_worker names them (or takes
    **kwargs), else as dacapo's `input_container` + `input_dataset` pair or
    its `input_array_identifier` (an `ArrayIdentifier`, as is any
    ..._array_identifier given with -o); an argument given with -o wins.
    --input is also what the CLI reads the
    voxel size and ROI from, so a file that takes no input still runs; an
    --output it cannot take is refused: the user expects it to be written.
    """
    from voxblock.arrays import ArrayName

    parameters = WorkerFile.parameters(path)
    passed: dict[str, Any] = {}
    for role, name in (("input", input_name), ("output", output_name)):
        if name is None:
            continue
        pair = (f"{role}_container", f"{role}_dataset")
        if role in parameters.names or (parameters.any_keyword and not set(pair) <= set(parameters.names)):
            passed[role] = name
        elif set(pair) <= set(parameters.names):
            parsed = ArrayName.parse(name)
            passed.update({pair[0]: str(parsed.container), pair[1]: parsed.dataset})
        elif f"{role}_array_identifier" in parameters.names:
            passed[f"{role}_array_identifier"] = name
        elif role == "output":
            raise VoxblockError(
                f"worker file {path}: spawn_worker() takes no output, so --output would not be "
                f"written; give the array it writes with -o NAME=VALUE "
                f"(its parameters: {', '.join(parameters.names) or 'none'})"
            )
    passed = {k: v for k, v in passed.items() if k not in given}
    # dacapo's workers take an array as an identifier (.container, .dataset), not as a string
    named = {**given, **passed}
    strings = [k for k, v in named.items() if k.endswith("_array_identifier") and isinstance(v, str)]
    return {**passed, **{k: ArrayIdentifier.parse(named[k]) for k in strings}}


def load_worker_module(path: Path) -> ModuleType:
    """A Python file (a worker file, a segment function file) imported as a module, once."""
    if not path.is_file():
        raise VoxblockError(f"worker file {path} does not exist")
    name = f"voxblock_worker_file_{stable_hash(str(path.resolve()))[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise VoxblockError(f"worker file {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise VoxblockError(f"worker file {path} failed to import: {error!r}") from error
    import cloudpickle

    # not importable by name in a worker process: ship its functions by value
    cloudpickle.register_pickle_by_value(module)
    return module


# -- daisy 1's check_function -------------------------------------------------


def split_check(check: Any) -> tuple[Callable[[Any], bool] | None, Callable[[Any], bool] | None]:
    """daisy's convention: one function checks before and after; a pair splits them."""
    if check is None:
        return None, None
    if isinstance(check, (tuple, list)):
        if len(check) != 2:
            raise VoxblockError("check_function must be a function or a (pre, post) pair")
        pre, post = check
    else:
        pre = post = check
    for function in (pre, post):
        if function is not None and not callable(function):
            raise VoxblockError(f"check_function parts must be callable; got {function!r}")
    return pre, post


# -- daisy 1's init_callback_fn: a gate in the run directory ----------------------
#
#   <run_dir>/init/context.json   the first worker's scheduler context, offered to the callback
#   <run_dir>/init/done           the driver called it: workers go on
#   <run_dir>/init/failed         it raised (the message): workers fail


def announce_worker(run_dir: RunDirectory, context: dict[str, str]) -> None:
    """Worker side: offer this worker's scheduler context to the init callback (the first one wins)."""
    run_dir.init_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir.init_dir / "context.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as handle:
        json.dump(context, handle)


def wait_for_init(run_dir: RunDirectory, poll: float = 0.05, limit: float = 24 * 3600) -> None:
    """Worker side: return once the driver has called the init callback; raise if it failed."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (run_dir.init_dir / "done").exists():
            return
        failed = run_dir.init_dir / "failed"
        if failed.exists():
            raise RuntimeError(f"init_callback_fn failed: {failed.read_text()}")
        time.sleep(poll)
    raise TimeoutError("waited too long for init_callback_fn")


@dataclass(frozen=True)
class AfterInit:
    """Hold a worker process until the task's init callback has run in the driver.

    daisy 2 has no init callback; voxblock keeps daisy 1's promise (called
    once, when the task starts, with a context that reaches the scheduler)
    by having the first worker offer its context and every worker wait.
    """

    function: Callable[[], None]
    run_dir: Path

    def __call__(self) -> None:
        import daisy.v2 as daisy

        run_dir = RunDirectory(Path(self.run_dir))
        announce_worker(run_dir, dict(daisy.Context.from_env().items()))
        wait_for_init(run_dir)
        self.function()


class InitCallbacks:
    """Driver side of the init-callback gate (see `AfterInit`): a thread that calls each task's
    init_callback_fn with the context its first worker offered, and opens or fails the gate."""

    def __init__(self, tasks: Sequence[Any]) -> None:
        self.pending = {id(t): t for t in tasks}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if self.pending:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        import daisy.v2 as daisy

        while self.pending and not self._stop.is_set():
            for key, task in list(self.pending.items()):
                directory: RunDirectory = task.run_dir
                offered = directory.init_dir / "context.json"
                if not offered.exists():
                    continue
                try:
                    values = json.loads(offered.read_text())
                except json.JSONDecodeError:
                    continue  # still being written
                del self.pending[key]
                try:
                    assert task.init_callback_fn is not None
                    task.init_callback_fn(daisy.Context(**values))
                except Exception as error:
                    message = f"init_callback_fn of {task.task_id} failed: {error!r}"
                    self.errors.append(message)
                    (directory.init_dir / "failed").write_text(message)
                else:
                    (directory.init_dir / "done").write_text("ok")
            self._stop.wait(0.02)
