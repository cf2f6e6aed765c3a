"""The standard voxblock workers, each registered in the `voxblock.workers` entry-point group."""
