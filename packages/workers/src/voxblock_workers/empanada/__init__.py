"""`empanada`: panoptic instance segmentation (MitoNet style) block by block.

- `worker.py`      the worker (`Empanada`, the entry point): options, checks, blocks;
- `config.py`      the model config (YAML/JSON) and the options, checked;
- `model.py`       the TorchScript model: loaded once per process, run on stacks of planes;
- `postprocess.py` the heads -> instances, pure functions of arrays.
"""

from voxblock_workers.empanada.worker import Empanada

__all__ = ["Empanada"]
