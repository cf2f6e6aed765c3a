"""Synthetic zarr volumes, hypothesis strategies and property checks for blockwise runs."""
