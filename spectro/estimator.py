"""The susceptibility estimator, from per-chain moments accumulated in float64.

For a component C with draws of `sampling_loss` s and per-token `probe_loss`
l_xy (docs/method.md):

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
  chain alone (with the same E_full).
- Chains are grouped into independent *units*: single chains, or antithetic
  pairs (two chains that share minibatches and whose injected noise is
  mirrored, `sampler.antithetic`), whose draws are correlated by design and so
  count as one unit. Every uncertainty figure resamples units, never chains
  of one pair separately.
- `chi_se` is a delete-one-unit jackknife over the component's units plus one
  over the `full` run's units (the two runs are independent, so their
  variances add): it includes the noise of E_full[D], which every estimate of
  the peer form shares. It needs only the per-chain sums. Intervals use
  Student's t with `se_dof` degrees of freedom (Welch-Satterthwaite; with few
  units the normal quantile under-covers).
- `chi_half` splits the units of both runs into two halves and estimates chi
  from each half with its *own* half of `full`, so the two halves share no
  draw; their agreement is what an independent run would show at half the
  draws (`spectro.reliability`).
- `init_loss` is the sampling-set loss at w*, a single number shared by every
  component (same weights, same sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spectro.config import EstimatorConfig

_FORM = EstimatorConfig().form     # the schema's default

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
    chi_se: np.ndarray         # (tokens,) jackknife over the component's and full's units (module notes)
    mean_phi: float            # E_C[phi]
    mean_phi_per_chain: np.ndarray  # (chains,) E_c[phi]; the LLC estimate is nβ times this
    chi_half: np.ndarray = None     # (2, tokens) from each half of the units with its own half of full; NaN if < 2
    se_dof: np.ndarray = None       # (tokens,) degrees of freedom of chi_se (Welch-Satterthwaite)


def _pool(chains: list[ChainMoments]) -> ChainMoments:
    out = ChainMoments(chains[0].n_tokens)
    for m in chains:
        out = out.merge(m)
    return out


def mean_D(chains: list[ChainMoments]) -> np.ndarray:
    """E[D_xy] pooled over chains and draws: (tokens,)."""
    p = _pool(chains)
    return p.s_D / p.n


def mean_loss(chains: list[ChainMoments], init_loss: float) -> np.ndarray:
    """E[token loss] pooled over chains and draws: (tokens,). D = sampling loss - token loss and
    phi = sampling loss - init_loss, so the token loss is init_loss + E[phi] - E[D]; NaN without draws."""
    p = _pool(chains)
    return np.full(p.n_tokens, np.nan) if p.n == 0 else init_loss + (p.s_phi - p.s_D) / p.n


def _chi(m: ChainMoments, full_mean_D: np.ndarray, form: str) -> np.ndarray:
    e_phiD = m.s_phiD / m.n
    e_phi = m.s_phi / m.n
    centre = full_mean_D if form == "peer" else m.s_D / m.n
    return e_phiD - e_phi * centre


def units_of(n_chains: int, antithetic: bool = False) -> list[list[int]]:
    """Independent units of `n_chains` chains: antithetic pairs (2p, 2p+1) or single chains."""
    if antithetic:
        return [list(range(c, min(c + 2, n_chains))) for c in range(0, n_chains, 2)]
    return [[c] for c in range(n_chains)]


def _sums(chains: list[ChainMoments]) -> tuple[float, float, np.ndarray, np.ndarray]:
    p = _pool(chains)
    return float(p.n), p.s_phi, p.s_phiD, p.s_D


def _chi_from_sums(c, f, form: str) -> np.ndarray:
    """chi from pooled sums c = (n, s_phi, s_phiD, s_D) of the component and f of full (f unused for covariance)."""
    n, s_phi, s_phiD, s_D = c
    centre = f[3] / f[0] if form == "peer" else s_D / n
    return s_phiD / n - (s_phi / n) * centre


def _jackknife(units_sums: list, other, form: str, component_side: bool):
    """Delete-one-unit jackknife variance (tokens,) over one run's units, the other run's sums fixed."""
    U = len(units_sums)
    if U < 2:
        return None
    total = [sum(u[i] for u in units_sums) for i in range(4)]
    loo = []
    for u in units_sums:
        rest = tuple(total[i] - u[i] for i in range(4))
        loo.append(_chi_from_sums(rest, other, form) if component_side else _chi_from_sums(other, rest, form))
    loo = np.stack(loo)                                                  # (units, tokens)
    return (U - 1) / U * ((loo - loo.mean(0)) ** 2).sum(0)


def susceptibility(component: list[ChainMoments], full: list[ChainMoments], form: str = _FORM,
                   component_units: list[list[int]] | None = None,
                   full_units: list[list[int]] | None = None) -> Susceptibility:
    """chi for one component from its chains' moments and the full run's.

    `component_units` / `full_units` group the chains (indices into the lists) into independent units;
    default: every chain its own unit."""
    if form not in FORMS:
        raise ValueError(f"unknown estimator form {form!r}; use one of {FORMS}")
    if not component or not full:
        raise ValueError("need at least one chain for the component and for the full run")
    if any(m.n == 0 for m in component + full):
        raise ValueError("a chain has no draws; exclude it before estimating")
    cu = component_units or [[i] for i in range(len(component))]
    fu = full_units or [[i] for i in range(len(full))]
    for units, chains in ((cu, component), (fu, full)):
        if sorted(i for u in units for i in u) != list(range(len(chains))):
            raise ValueError(f"units {units} must partition the {len(chains)} chains")
    e_full_D = mean_D(full)
    pooled = _pool(component)
    chi = _chi(pooled, e_full_D, form)
    per_chain = np.stack([_chi(m, e_full_D, form) for m in component])  # (chains, tokens)
    c_sums = [_sums([component[i] for i in u]) for u in cu]
    f_sums = [_sums([full[i] for i in u]) for u in fu]
    c_all, f_all = _sums(component), _sums(full)
    var_c = _jackknife(c_sums, f_all, form, component_side=True)
    var_f = _jackknife(f_sums, c_all, form, component_side=False) if form == "peer" else np.zeros_like(chi)
    if var_c is None or var_f is None:
        se = np.full_like(chi, np.nan)
        dof = np.full_like(chi, np.nan)
    else:
        se = np.sqrt(var_c + var_f)
        dc, df = len(cu) - 1, max(len(fu) - 1, 1)
        denom = var_c ** 2 / dc + (var_f ** 2 / df if form == "peer" else 0.0)
        dof = np.divide((var_c + var_f) ** 2, denom, out=np.full_like(chi, float(dc)), where=denom > 0)
    half = np.full((2, chi.size), np.nan)
    if len(cu) >= 2 and (len(fu) >= 2 or form == "covariance"):
        hc, hf = (len(cu) + 1) // 2, (len(fu) + 1) // 2
        for h, (cs, fs) in enumerate(((cu[:hc], fu[:hf]), (cu[hc:], fu[hf:] or fu))):
            c_h = _sums([component[i] for u in cs for i in u])
            f_h = _sums([full[i] for u in fs for i in u])
            half[h] = _chi_from_sums(c_h, f_h, form)
    return Susceptibility(chi=chi, chi_per_chain=per_chain, chi_se=se, mean_phi=pooled.s_phi / pooled.n,
                          mean_phi_per_chain=np.array([m.s_phi / m.n for m in component]),
                          chi_half=half, se_dof=dof)


def t_quantile(dof: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Two-sided Student-t quantile for an interval chi ± q · chi_se."""
    from scipy.stats import t
    return t.ppf(0.5 + level / 2, np.asarray(dof, dtype=np.float64))


def susceptibility_from_arrays(sampling_loss: np.ndarray, probe_loss: np.ndarray, init_loss: float,
                               full_sampling_loss: np.ndarray, full_probe_loss: np.ndarray,
                               form: str = _FORM, antithetic: bool = False) -> Susceptibility:
    """Convenience over dense arrays: sampling (chains, draws), probe (chains, draws, tokens)."""
    def moments(s, l):
        return [ChainMoments(l.shape[-1]).add(s[c], l[c], init_loss) for c in range(s.shape[0])]
    return susceptibility(moments(sampling_loss, probe_loss), moments(full_sampling_loss, full_probe_loss), form,
                          units_of(sampling_loss.shape[0], antithetic),
                          units_of(full_sampling_loss.shape[0], antithetic))
