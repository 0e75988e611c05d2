"""Healing a MoEfied layer without training: refit its ``down`` matrices by ridge regression.

Cutting a SwiGLU FFN into experts and running only the top-k drops real work: SwiGLU activations
are dense, so the dropped experts' outputs are far from zero (on Qwen2.5-Coder-1.5B about 40% of
each token's FFN output energy at top-8 of 64 plus a 768-neuron shared expert). Part of what is
dropped is predictable from what is kept. With the router fixed, the MoE output is *linear* in the
``down`` matrices: ``out = Phi @ D^T`` where ``Phi`` holds each neuron's activation times the factor
its expert gets (``ffn.mixed_activations``). So the down matrices of all experts (shared and routed)
are refitted jointly, towards the dense output ``y``, by ridge regression pulled towards the dense
``down`` (``D0``)::

    D^T = (Phi^T Phi + lam I)^-1 (Phi^T y + lam D0^T),   lam = ridge * mean(diag(Phi^T Phi))

The fit is for one ``k`` (the file's default); with a different k at run time the refitted
weights still help but are no longer optimal, and k = E no longer gives back the dense model.
"""

from __future__ import annotations

import numpy as np


def refit_down(phi: np.ndarray, y: np.ndarray, down0: np.ndarray, ridge: float) -> np.ndarray:
    """Refitted ``down`` ``[n_embd, n_ff]`` from mixed activations ``phi [tokens, n_ff]`` and targets ``y``."""
    phi32 = np.ascontiguousarray(phi, dtype=np.float32)
    gram = phi32.T @ phi32  # float32: the n_ff^2 x tokens product dominates the cost
    lam = ridge * float(np.trace(gram)) / len(gram)
    gram[np.diag_indices_from(gram)] += lam
    rhs = phi32.T @ y.astype(np.float32) + lam * down0.T.astype(np.float32)
    # the ridge term keeps the system well conditioned, so a float32 solve is accurate enough
    return np.linalg.solve(gram, rhs).T.astype(np.float32)
