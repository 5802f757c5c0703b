"""The synthetic variants of Table 1: which guidance and whether Stage IV filters the pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from models.guidance import GuidanceMode
from models.sampling import SamplingParams

TAUS = {1: 1.0, 2: 0.5, 3: 1.0 / 3.0}
TAU_TEXT = {1: "1", 2: "1/2", 3: "1/3"}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    kind: str  # "origin" | "origin_epochs" | "duplicates" | "synthetic"
    guidance: str = "tau"
    tau: float = 1.0
    scale: float | None = None
    guided: bool = True  # w_cg > 0
    filtered: bool = False  # Stage IV at η (else η = 1: keep every pair)
    downstream: bool = True  # trained downstream (the s variants are generated for Fig. 2 only)

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"


def all_variants() -> dict[str, Variant]:
    v = [
        Variant("origin", "origin (equal steps)", "origin"),
        Variant("origin_epochs", "origin (equal epochs)", "origin_epochs"),
        Variant("duplicates", "origin + N duplicates", "duplicates"),
        Variant("cf", "CF", "synthetic", guided=False),
    ]
    for k in (1, 2, 3):
        v.append(Variant(f"cfcg_tau{k}", f"CF+CG τ={TAU_TEXT[k]}", "synthetic", tau=TAUS[k]))
    for k in (1, 2, 3):
        v.append(
            Variant(f"cfcgcs_tau{k}", f"CF+CG+CS τ={TAU_TEXT[k]}", "synthetic", tau=TAUS[k], filtered=True)
        )
    for k in (2, 3):
        v.append(
            Variant(
                f"cfcg_s{k}", f"CF+CG s={k}", "synthetic", guidance="scale", scale=float(k), downstream=False
            )
        )
    return {x.key: x for x in v}


VARIANTS = all_variants()
BASE_ROWS = ("origin", "origin_epochs", "duplicates")


def select_variants(keys: Sequence[str] | None) -> list[Variant]:
    """The requested variants in canonical order; ``origin`` is always included (it is the baseline)."""
    if not keys:
        return list(VARIANTS.values())
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    wanted = set(keys) | {"origin"}
    return [v for k, v in VARIANTS.items() if k in wanted]


def sampling_params(base: SamplingParams, v: Variant) -> SamplingParams:
    w_cg = (base.w_cg if base.w_cg > 0 else 1.0) if v.guided else 0.0
    if v.guidance == "scale":
        return base.updated(w_cg=w_cg, guidance=GuidanceMode.SCALE, scale=v.scale, tau=1.0 / (v.scale or 1.0))
    return base.updated(w_cg=w_cg, guidance=GuidanceMode.TAU, tau=v.tau, scale=None)
