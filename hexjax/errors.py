"""Exceptions that carry what went wrong, where, and how to fix it."""


class HexjaxError(Exception):
    """Base class of every error hexjax raises on purpose."""


class ConfigError(HexjaxError, ValueError):
    """A configuration file or value is malformed or unsupported."""


class PlanError(HexjaxError, ValueError):
    """A plan is invalid for the given model and cluster, or none can be found."""
