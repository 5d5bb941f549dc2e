"""Integrations with training frameworks (imported on demand: ``sara_kernels.integrations.accelerate``)."""
