"""The susceptibility estimator, from per-chain moments accumulated in float64.

For a component C with draws of `sampling_loss` s and per-token `probe_loss`
l_xy (DESIGN 1.2–1.3):

    phi   = s - init_loss                 (the component's observable)
    D_xy  = s - l_xy                      (per draw)

    peer form (default; devinterp 2.x `compute_susceptibilities`):
        chi[C, xy] = E_C[phi · D_xy] - E_C[phi] · E_full[D_xy]
    covariance form:
        chi[C, xy] = E_C[phi · D_xy] - E_C[phi] · E_C[D_xy]  =  -Cov_C(phi, l_xy - s)

The two differ only in where D is centred: the peer form takes E[D] from the
unrestricted run, so it carries an extra E_C[phi]·(E_C[D] - E_full[D]) term;
with E_C[phi] small (chains near w*) the two are close, and they agree exactly
when the restricted and full runs have the same mean D.

Non-obvious choices:
- Everything is a sum over draws kept per chain (`ChainMoments`), so chunks
  of a store can be reduced independently and merged in any order, and memory
  never holds a (draws x tokens) array.
- `chi` pools all chains' draws (as devinterp does); `chi_per_chain` uses each
  chain alone (with the same E_full); the standard error is the standard
  deviation of the per-chain values over sqrt(chains), which captures
  autocorrelation within a chain without an ESS model.
- `init_loss` is the sampling-set loss at w*, a single number shared by every
  component (same weights, same sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMS = ("peer", "covariance")


@dataclass
class ChainMoments:
    """Running sums over the draws of one chain. Arrays are float64."""

    n_tokens: int
    n: int = 0
    s_phi: float = 0.0
    s_phi2: float = 0.0
    s_phiD: np.ndarray = field(default=None)  # (tokens,)
    s_D: np.ndarray = field(default=None)     # (tokens,)

    def __post_init__(self) -> None:
        if self.s_phiD is None:
            self.s_phiD = np.zeros(self.n_tokens, dtype=np.float64)
        if self.s_D is None:
            self.s_D = np.zeros(self.n_tokens, dtype=np.float64)

    def add(self, sampling_loss: np.ndarray, probe_loss: np.ndarray, init_loss: float) -> "ChainMoments":
        """Add draws: sampling_loss (draws,), probe_loss (draws, tokens)."""
        s = np.asarray(sampling_loss, dtype=np.float64)                  # (draws,)
        l = np.asarray(probe_loss, dtype=np.float64)                     # (draws, tokens)
        phi = s - init_loss                                              # (draws,)
        D = s[:, None] - l                                               # (draws, tokens)
        self.n += s.shape[0]
        self.s_phi += float(phi.sum())
        self.s_phi2 += float((phi * phi).sum())
        self.s_phiD += phi @ D                                           # (tokens,)
        self.s_D += D.sum(axis=0)                                        # (tokens,)
        return self

    def merge(self, other: "ChainMoments") -> "ChainMoments":
        out = ChainMoments(self.n_tokens)
        out.n = self.n + other.n
        out.s_phi = self.s_phi + other.s_phi
        out.s_phi2 = self.s_phi2 + other.s_phi2
        out.s_phiD = self.s_phiD + other.s_phiD
        out.s_D = self.s_D + other.s_D
        return out


@dataclass(frozen=True)
class Susceptibility:
    chi: np.ndarray            # (tokens,) pooled over chains
    chi_per_chain: np.ndarray  # (chains, tokens)
    chi_se: np.ndarray         # (tokens,) std over chains / sqrt(chains)
    mean_phi: float            # E_C[phi]
    mean_phi_per_chain: np.ndarray  # (chains,) E_c[phi]; the LLC estimate is nβ times this


def _pool(chains: list[ChainMoments]) -> ChainMoments:
    out = ChainMoments(chains[0].n_tokens)
    for m in chains:
        out = out.merge(m)
    return out


def mean_D(chains: list[ChainMoments]) -> np.ndarray:
    """E[D_xy] pooled over chains and draws: (tokens,)."""
    p = _pool(chains)
    return p.s_D / p.n


def _chi(m: ChainMoments, full_mean_D: np.ndarray, form: str) -> np.ndarray:
    e_phiD = m.s_phiD / m.n
    e_phi = m.s_phi / m.n
    centre = full_mean_D if form == "peer" else m.s_D / m.n
    return e_phiD - e_phi * centre


def susceptibility(component: list[ChainMoments], full: list[ChainMoments], form: str = "peer") -> Susceptibility:
    """chi for one component from its chains' moments and the full run's."""
    if form not in FORMS:
        raise ValueError(f"unknown estimator form {form!r}; use one of {FORMS}")
    if not component or not full:
        raise ValueError("need at least one chain for the component and for the full run")
    if any(m.n == 0 for m in component + full):
        raise ValueError("a chain has no draws; exclude it before estimating")
    e_full_D = mean_D(full)
    pooled = _pool(component)
    chi = _chi(pooled, e_full_D, form)
    per_chain = np.stack([_chi(m, e_full_D, form) for m in component])  # (chains, tokens)
    k = per_chain.shape[0]
    se = per_chain.std(axis=0, ddof=1) / np.sqrt(k) if k > 1 else np.full_like(chi, np.nan)
    return Susceptibility(chi=chi, chi_per_chain=per_chain, chi_se=se, mean_phi=pooled.s_phi / pooled.n,
                          mean_phi_per_chain=np.array([m.s_phi / m.n for m in component]))


def susceptibility_from_arrays(sampling_loss: np.ndarray, probe_loss: np.ndarray, init_loss: float,
                               full_sampling_loss: np.ndarray, full_probe_loss: np.ndarray,
                               form: str = "peer") -> Susceptibility:
    """Convenience over dense arrays: sampling (chains, draws), probe (chains, draws, tokens)."""
    def moments(s, l):
        return [ChainMoments(l.shape[-1]).add(s[c], l[c], init_loss) for c in range(s.shape[0])]
    return susceptibility(moments(sampling_loss, probe_loss), moments(full_sampling_loss, full_probe_loss), form)
