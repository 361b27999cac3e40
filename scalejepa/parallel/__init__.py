"""Parallelism applied from outside the model code (torchtitan's ``parallelize`` pattern).

``build_engine`` (``build.py``) builds the models once and lets the configured backend wrap
them: ``fsdp.py`` (FSDP2) or ``deepspeed.py`` (ZeRO). ``blocks.py`` holds the per-block
options every backend shares, ``precision.py`` the compute dtypes, ``engine.py`` the
:class:`Engine` protocol that the loop talks to.
"""

from scalejepa.parallel.build import build_engine
from scalejepa.parallel.engine import Engine
from scalejepa.parallel.precision import autocast_dtype

__all__ = ["Engine", "autocast_dtype", "build_engine"]
