"""What both virtualenvs measure alike: resident memory while a run goes, segmentation quality.

Imported by run.py (voxblock's venv) and volara_bench.py (volara's): psutil and
scikit-image are imported on first use, both installed in each venv.
"""

from __future__ import annotations

import threading

import numpy as np

MIB = 1 << 20


class MemoryPoller:
    """Peak resident memory, polled every 20 ms while a run goes: this process (the driver),
    each of its descendants (the workers) and all of them together.

    Children of this process whose command line holds one of `skip` (voxblock's fork server: it
    serves no block, it holds the imports its forked workers share) count in no peak.
    """

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        import psutil

        self._me = psutil.Process()
        self._skip = skip
        self.driver = 0
        self.driver_start = 0
        self.workers: dict[int, int] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        driver = self._me.memory_info().rss
        self.driver = max(self.driver, driver)
        total = driver
        for child in self._me.children(recursive=True):
            try:
                if (
                    self._skip
                    and child.ppid() == self._me.pid
                    and any(s in " ".join(child.cmdline()) for s in self._skip)
                ):
                    continue  # the server; the workers forked from it (same command line) count
                rss = child.memory_info().rss
            except psutil.Error:
                continue
            self.workers[child.pid] = max(self.workers.get(child.pid, 0), rss)
            total += rss
        self.total = max(self.total, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.02)

    def __enter__(self) -> MemoryPoller:
        self.driver_start = self._me.memory_info().rss
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def worker(self) -> int:
        """The largest peak of any one worker process."""
        return max(self.workers.values(), default=0)

    def record(self) -> dict[str, float]:
        return {
            "driver_mib": self.driver / MIB,
            "driver_start_mib": self.driver_start / MIB,
            "worker_mib": self.worker / MIB,
            "total_mib": self.total / MIB,
            "processes": len(self.workers),
        }


def scores(truth: np.ndarray, segmentation: np.ndarray) -> dict[str, float]:
    """VOI split and merge (nats; sum = voi) and adapted Rand error of `segmentation` against
    `truth`, over the whole volume (scikit-image; no voxel ignored: the truth has no background)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    truth = np.asarray(truth)
    segmentation = np.asarray(segmentation)
    split, merge = variation_of_information(truth, segmentation)
    arand = adapted_rand_error(truth, segmentation)[0]
    return {
        "voi_split": float(split),
        "voi_merge": float(merge),
        "voi": float(split + merge),
        "arand": float(arand),
        "segments": int(np.unique(segmentation).size),
    }
