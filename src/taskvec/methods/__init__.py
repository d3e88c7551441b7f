"""Static merge methods: one file each, collected in a registry."""

from taskvec.methods import dare, magnitude, negation, task_arithmetic, ties  # noqa: F401  (registers them)
from taskvec.methods.compose import compose
from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, get_method, list_methods, register

__all__ = ["MergeMethod", "MethodParams", "SliceContext", "compose", "get_method", "list_methods", "register"]
