"""Task vector bases (after Zeng et al., 2025, "Efficient Model Editing with Task Vector Bases"):
keep M << T bases of T task vectors and compose tasks from those.

- `gram`, `cosine_from_gram`, `affinity`, `eigengap`: streamed similarity analysis.
- `fit_bases` / `reconstruct_tasks`: bases in memory ('cluster', 'learned', 'pca').
- `build_bank` / `Bank`: bases on disk (one safetensors file per basis + a JSON manifest),
  lazy reconstruction, task addition and negation, continual `add`, exact memory accounting.
"""

from taskvec.bases.analysis import affinity, cosine_from_gram, eigengap, gram, laplacian_eigenvalues, spectral_assign
from taskvec.bases.bank import Bank, Memory, build_bank, storage_dtype, task_bytes
from taskvec.bases.fit import METHODS, BasisFit, fit_bases, fit_learned, fit_pca, reconstruct_tasks, relative_errors

__all__ = [
    "METHODS",
    "Bank",
    "BasisFit",
    "Memory",
    "affinity",
    "build_bank",
    "cosine_from_gram",
    "eigengap",
    "fit_bases",
    "fit_learned",
    "fit_pca",
    "gram",
    "laplacian_eigenvalues",
    "reconstruct_tasks",
    "relative_errors",
    "spectral_assign",
    "storage_dtype",
    "task_bytes",
]
