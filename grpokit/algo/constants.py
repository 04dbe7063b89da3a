"""Named numerical constants shared by the `grpokit.algo` modules (SPEC section 0).

Each one is a documented default, never a literal buried inside a function.
"""
from __future__ import annotations

#: Log-ratios (ℓ − ℓ°, ℓ − ℓʳ, ...) are clamped to [−LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before `exp`,
#: so that exp never overflows float32 (e^20 ≈ 4.9e8) and gradients stay finite (SPEC section 0).
LOG_RATIO_CLAMP: float = 20.0

#: ε added to a standard deviation before dividing by it (SPEC section 1, GRPO).
STD_EPS: float = 1e-6

#: Smallest count a global denominator is clamped to, so that an all-masked batch gives 0, not NaN.
MIN_COUNT: float = 1.0
