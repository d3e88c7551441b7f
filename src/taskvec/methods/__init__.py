"""Static merge methods: one file each, collected in a registry (`METHODS`)."""

from taskvec.methods.compose import compose
from taskvec.methods.registry import (
    METHODS,
    MergeMethod,
    MethodParams,
    SliceContext,
    get_method,
    list_methods,
    register,
)

__all__ = [
    "METHODS",
    "MergeMethod",
    "MethodParams",
    "SliceContext",
    "compose",
    "get_method",
    "list_methods",
    "register",
]
