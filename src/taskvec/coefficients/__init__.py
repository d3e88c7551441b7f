"""Learned-coefficient baselines shared by all samples (aTLAS- and AdaMerging-style).

Training and evaluation go through taskvec.variational.train (one loop, one functional forward):
`train_shared(...)` is `train_composer` with method 'shared'."""

from taskvec.coefficients.shared import SharedCoefficients
from taskvec.coefficients.train import train_adamerging, train_atlas

__all__ = ["SharedCoefficients", "train_adamerging", "train_atlas"]
