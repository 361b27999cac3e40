"""Shipped sweep specs (``scalejepa-sweep plan NAME``)."""
