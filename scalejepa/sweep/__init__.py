"""Scaling-law sweeps: ``scalejepa-sweep plan|run|collect|fit|report``.

A sweep spec (YAML, ``scalejepa/configs/sweeps/``) names a base preset, a grid of model
shapes and compute budgets, seeds and the downstream metrics. ``plan`` expands it into
runs (``plan.json``), ``run`` trains and probes them (local subprocesses or a SLURM
array), ``collect`` gathers one row per finished run (``runs.jsonl``), ``fit`` fits
IsoFLOP, parametric and frontier laws with bootstrap intervals, ``report`` plots them.
"""
