"""Human byte sizes: "4GiB", "5GB", "512MiB", "1e9"."""

import math
import re

from tensormerge.errors import ParameterError, short

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}


def parse_size(text: str | int, what: str = "size") -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ParameterError(f"{what}: must be positive, got {text}")
        return text
    if isinstance(text, float):  # a YAML recipe's 4.0e+9
        number = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text) if isinstance(text, str) else None
        if not m or m.group(2).lower() not in _UNITS:
            raise ParameterError(f"{what}: cannot read {short(text)} as a size (examples: 4GiB, 5GB, 512MiB)")
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(number):  # 1e400 reads as infinity, which no integer holds
        raise ParameterError(f"{what}: {short(text)} is not a finite size (examples: 4GiB, 5GB, 512MiB)")
    value = int(number)
    if value <= 0:
        raise ParameterError(f"{what}: must be positive, got {short(text)}")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
