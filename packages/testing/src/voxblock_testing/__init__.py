"""Synthetic zarr volumes, hypothesis strategies and property checks for blockwise runs.

- `voxblock_testing.volumes`: seeded synthetic arrays (labels, blobs, affinities, predictions).
- `voxblock_testing.workers`: `Recorder` and `Flaky`, test-support workers.
- `voxblock_testing.strategies`: hypothesis strategies for block geometry (`blockings()`).
- `voxblock_testing.properties`: `check_blocks`, `check_fit_mode`, `check_retries`, `check_resume`.
"""
