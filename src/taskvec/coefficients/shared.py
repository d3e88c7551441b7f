"""Learned coefficients shared by all samples: aTLAS-style (task- or block-level, supervised
cross-entropy on labelled validation data) and AdaMerging-style (entropy minimisation on unlabeled
test inputs). The coefficient model is the composer method 'shared' of taskvec.variational."""

from taskvec.variational.shared import SharedCoefficients

__all__ = ["SharedCoefficients"]
