"""The 2-D test functions of the paper's Figure 2 (appendix A.1), as torch functions."""

from __future__ import annotations

import torch

__all__ = ["FUNCTIONS", "beale", "beale_rosenbrock", "ellipse", "rosenbrock"]


def ellipse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x^2 + 100 y^2``: convex, minimum 0 at (0, 0)."""
    return x**2 + 100 * y**2


def beale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Beale's function, minimum 0 at (3, 0.5)."""
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's function ``100 (y - x^2)^2 + (1 - x)^2``, minimum 0 at (1, 1)."""
    return 100 * (y - x**2) ** 2 + (1 - x) ** 2


def beale_rosenbrock(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Beale(x, 0.5) + Rosenbrock(1, y)``: minimum 0 at (3, 1)."""
    return beale(x, torch.full_like(y, 0.5)) + rosenbrock(torch.ones_like(x), y)


# name -> (function, start, minimizer)
FUNCTIONS = {
    "ellipse": (ellipse, (50.0, 1.0), (0.0, 0.0)),
    "beale_rosenbrock": (beale_rosenbrock, (4.0, 3.0), (3.0, 1.0)),
}
