"""Per-level channel projection of the stored features (``precompute --pca K``).

Per FPN level s, the teacher's channel vectors x ∈ R^C (one per position of a map) are
projected on the K leading principal directions of the fit set:

    μ = E[x],   Σ = E[(x − μ)(x − μ)ᵀ] = V Λ Vᵀ (λ_1 ≥ … ≥ λ_C),   W = V[:, :K]ᵀ  (K × C)
    stored:  z = W (x − μ)   (K components, in the store's dtype)
    read:    x̂ = μ + Wᵀ z

The squared error over the fit positions is Σ_pos ‖x − x̂‖² = n · Σ_{j>K} λ_j (the discarded
eigenvalues), so the kept fraction is exact on the fit set (Pearson 1901; any PCA text):

    variance_kept = Σ_{j≤K} λ_j / Σ_j λ_j
    energy_kept   = 1 − Σ_{j>K} λ_j / (tr Σ + ‖μ‖²)       (= 1 − ‖x − x̂‖² / ‖x‖², pooled)

relative RMSE = sqrt(1 − energy_kept). The fit set, its size (``FIT_IMAGES``) and fitting on
every view except ``adv`` are our choice (docs/store.md). The basis is fitted ONCE, before the
store exists, and stored in it (array ``pca/{s}``: row 0 = μ, rows 1..K = W, float32, crc32c):
a resumed run, a repair or another shard reads it from the store instead of fitting again, so
every image of a store is projected on the same basis.

Per written image, view and level the writer also keeps ``pca_stat/{v}/{s}`` (K + 2 float32):
mean over the valid positions of |z_k| (what ``cache verify`` checks the decoded components
against), then Σ‖x − x̂‖² and Σ‖x‖² of that map before quantisation (the energy kept over the
written images, pooled, reported by ``cache info``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from dfmsd_cli.errors import UserError

FIT_IMAGES = 128  # our choice: images fitting the basis (the first ones of the split)


class PcaAccumulator:
    """Running first and second moments of the channel vectors, per level (float64)."""

    def __init__(self) -> None:
        self.n: dict[int, int] = {}
        self.sum: dict[int, torch.Tensor] = {}
        self.outer: dict[int, torch.Tensor] = {}

    def add(self, features: dict[int, torch.Tensor]) -> None:
        """Add the positions of one map per level: ``{stride: (C, h, w)}``."""
        for s, f in features.items():
            x = f.detach().double().reshape(f.shape[0], -1)  # (C, positions)
            if s not in self.n:
                c = x.shape[0]
                self.n[s] = 0
                self.sum[s] = torch.zeros(c, dtype=torch.float64)
                self.outer[s] = torch.zeros(c, c, dtype=torch.float64)
            self.n[s] += x.shape[1]
            self.sum[s] += x.sum(dim=1)
            self.outer[s] += x @ x.T

    def fit(self, k: int) -> tuple[dict[int, np.ndarray], dict[str, dict[str, float]]]:
        """``({stride: (K+1, C) float32 [μ; W]}, {str(stride): {variance_kept, energy_kept}})``."""
        bases, report = {}, {}
        for s in sorted(self.n):
            n = self.n[s]
            mu = self.sum[s] / n
            cov = self.outer[s] / n - torch.outer(mu, mu)
            cov = (cov + cov.T) / 2
            lam, vec = torch.linalg.eigh(cov)  # ascending
            lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
            w = vec[:, :k].T.clone()  # (K, C)
            # a fixed sign per direction (largest |entry| positive): the basis is reproducible
            lead = w.gather(1, w.abs().argmax(dim=1, keepdim=True))
            w *= torch.where(lead < 0, -1.0, 1.0).to(w)
            total = float(lam.sum())
            dropped = float(lam[k:].sum())
            energy = total + float(mu @ mu)
            bases[s] = torch.cat([mu[None], w]).float().numpy()
            report[str(s)] = {
                "variance_kept": 1 - dropped / total if total > 0 else 1.0,
                "energy_kept": 1 - dropped / energy if energy > 0 else 1.0,
                "positions": int(n),
            }
        return bases, report


def check_components(k: int | None, channels: int) -> None:
    """``--pca K`` needs 1 <= K < C (K = C stores more than the features themselves)."""
    if k is None:
        return
    if not 0 < k < channels:
        raise UserError(
            f"--pca {k}: the teacher has {channels} channels per level; use 1..{channels - 1} "
            "components (or drop --pca)"
        )


def split_basis(basis: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[μ; W]`` (K+1, C) -> (μ (C,), W (K, C)) as float32 tensors."""
    b = torch.as_tensor(np.asarray(basis), dtype=torch.float32)
    return b[0], b[1:]


def project(x: torch.Tensor, mu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z = W (x − μ): (C, h, w) -> (K, h, w)."""
    c, h, wd = x.shape
    z = w @ (x.float().reshape(c, -1) - mu[:, None])
    return z.reshape(w.shape[0], h, wd)


def reconstruct(z: torch.Tensor, mu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x̂ = μ + Wᵀ z: (K, h, w) -> (C, h, w)."""
    k, h, wd = z.shape
    return (w.T @ z.float().reshape(k, -1) + mu[:, None]).reshape(w.shape[1], h, wd)


def image_stat(x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """``pca_stat`` row of one map: [mean |z_k| (K), Σ‖x − x̂‖², Σ‖x‖²] (float32).

    W has orthonormal rows, so ‖x − x̂‖² = ‖x − μ‖² − ‖z‖² per position: no reconstruction
    is needed at write time (sums in float64)."""
    c = x.shape[0]
    xd = x.double().reshape(c, -1)
    centred = float((xd - mu.double()[:, None]).pow(2).sum())
    err = max(0.0, centred - float(z.double().pow(2).sum()))
    mean_abs = z.abs().reshape(z.shape[0], -1).mean(dim=1)
    return np.concatenate([mean_abs.numpy(), [err, float(xd.pow(2).sum())]]).astype(np.float32)


def pooled_energy(rows: Iterable[np.ndarray]) -> float:
    """1 − Σ residual / Σ energy over ``pca_stat`` rows (NaN without any energy)."""
    err = tot = 0.0
    for r in rows:
        err += float(r[-2])
        tot += float(r[-1])
    return 1 - err / tot if tot > 0 else float("nan")


def fit_basis(
    batches: Iterable[list[int]], run, k: int
) -> tuple[dict[int, np.ndarray], dict[str, dict[str, float]]]:
    """Fit the basis on the teacher's features of ``batches`` (lists of image indices);
    ``run(batch)`` returns the batch's ``ImageResult``s (every view's features)."""
    acc = PcaAccumulator()
    for batch in batches:
        for r in run(batch):
            for vr in r.views.values():
                acc.add(vr.features)
    if not acc.n:
        raise UserError("--pca: no readable image to fit the channel projection on")
    return acc.fit(k)
