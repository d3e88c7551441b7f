"""Learned-coefficient baselines shared by all samples (aTLAS- and AdaMerging-style).

Training and evaluation go through taskvec.variational.train (one loop, one functional forward):
`train_shared(..., objective=...)` is `train_composer` with method 'shared' (the atlas or adamerging
preset); `train_atlas` and `train_adamerging` are it with the objective fixed."""

from taskvec.coefficients.shared import SharedCoefficients
from taskvec.coefficients.train import train_adamerging, train_atlas, train_shared

__all__ = ["SharedCoefficients", "train_adamerging", "train_atlas", "train_shared"]
