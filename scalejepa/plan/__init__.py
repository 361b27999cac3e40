"""``scalejepa-plan``: memory, step time and GPU-hours of a preset on a cluster, predicted
from the real training step traced on a CPU (:mod:`scalejepa.plan.trace`), priced against
achievable GPU rates (:mod:`scalejepa.plan.hardware`) with a schedule of compute and
FSDP2's collectives (:mod:`scalejepa.plan.timeline`)."""
