"""The method registry: importing this package registers every built-in method."""

from tensormerge.methods import (  # noqa: F401
    average, dare, fisher, gta, mats, model_stock, regmean, slerp, task_arithmetic, ties, ubgm,
)
from tensormerge.methods.base import REGISTRY, get_method  # noqa: F401
