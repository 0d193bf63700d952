"""The method registry: importing this package registers every built-in method."""

from tensormerge.methods import average, dare, fisher, mats, regmean, task_arithmetic, ties, ubgm  # noqa: F401
from tensormerge.methods.base import REGISTRY, get_method  # noqa: F401
