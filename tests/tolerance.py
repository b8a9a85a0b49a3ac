"""The one tolerance rule for low-precision results (DESIGN.md, "Tests").

A fast path in float16/bfloat16 is right when its error against a float64 reference is at most
twice the error of the plain implementation (the math path, or the single-process spec) run in
the same low-precision dtype: exactness cannot be asked of low precision, but being no worse than
the obvious implementation can.
"""

import torch


def assert_within_2x(fast: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, *,
                     name: str = "output", slack: float = 0.0) -> None:
    """Assert ``max|fast - exact| <= 2 * max|plain - exact| + slack``.

    Args:
        fast: the fast path's result (any dtype).
        plain: the plain implementation's result in the same low-precision dtype.
        exact: the float64 reference.
        name: what is compared, for the message.
        slack: an absolute allowance (e.g. for fused kernels whose rounding differs).
    """
    exact = exact.double()
    error = (fast.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    assert error <= 2 * plain_error + slack, (
        f"{name}: error {error:.3g} > 2 x the plain implementation's {plain_error:.3g}")
