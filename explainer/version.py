"""The library version: one place, read by setup.cfg, the service and the exported models."""
__version__ = "0.1.0"
