"""Experiments: Hydra entry point, workloads, simulation, metrics, reports."""
