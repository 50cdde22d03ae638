"""Routing statistics as pure numpy, accumulated batch by batch in memory that does not grow
with the number of tokens: count tables of fixed shape, plus per layer and domain a table of
the top-k expert sets seen (at most C(E, k) entries).

Shapes: L MoE layers, B rows, S tokens per row, k choices per token, E experts, D domains,
C token classes, V vocabulary. Information is in bits; every estimate is the plug-in one from
the counts (see `mutual_information`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


# ---- pure functions ----------------------------------------------------------------------
def entropy(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution proportional to `counts` (any shape)."""
    p = np.asarray(counts, np.float64).ravel()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-np.sum(p * np.log2(p)))


def mutual_information(joint_xy: np.ndarray) -> float:
    """I(X; Y) in bits from a joint count table [X, Y]: H(X) + H(Y) - H(X, Y).

    The plug-in estimate is biased upwards by about (X - 1)(Y - 1) / (2 N ln 2) bits for N
    counts (Miller-Madow); `miller_madow_bias` gives it for the observed support.
    """
    joint = np.asarray(joint_xy, np.float64)
    return max(entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint), 0.0)


def conditional_mutual_information(joint_zxy: np.ndarray) -> float:
    """I(X; Y | Z) in bits from a count table [Z, X, Y]: sum_z p(z) I(X; Y | Z = z)."""
    joint = np.asarray(joint_zxy, np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    return float(sum(m.sum() / total * mutual_information(m) for m in joint if m.sum() > 0))


def miller_madow_bias(joint_xy: np.ndarray) -> float:
    """Expected upward bias (bits) of the plug-in mutual information of `joint_xy`."""
    joint = np.asarray(joint_xy)
    n = joint.sum()
    if n <= 0:
        return 0.0
    cells = (
        np.count_nonzero(joint) - np.count_nonzero(joint.sum(1)) - np.count_nonzero(joint.sum(0))
    )
    return float((cells + 1) / (2.0 * n * math.log(2)))


def js_divergence(p_de: np.ndarray) -> float:
    """Generalised Jensen-Shannon divergence (bits) of D distributions [D, E], equal weights:
    H(mean) - mean(H). 0 when all are equal; at most log2(D)."""
    p = np.asarray(p_de, np.float64)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return max(entropy(p.mean(0)) - float(np.mean([entropy(row) for row in p])), 0.0)


def repeat_counts(ids_bsk: np.ndarray, pair_bs: np.ndarray) -> tuple[int, int, int]:
    """(pairs, same top-1, overlapping top-k sets) over consecutive tokens (t-1, t) of each row.

    pair_bs[b, t] (t >= 1) says whether (t-1, t) counts: both tokens scored and in one document.
    Choice 0 is the top-1 expert; the top-k sets overlap when they share any expert (Mixtral's
    "first or second choice" column of Table 5).
    """
    prev, cur = ids_bsk[:, :-1], ids_bsk[:, 1:]
    pair = pair_bs[:, 1:]
    same_top1 = prev[..., 0] == cur[..., 0]
    overlap = np.any(prev[..., :, None] == cur[..., None, :], axis=(-2, -1))
    return int(pair.sum()), int((same_top1 & pair).sum()), int((overlap & pair).sum())


def top1_chance(top1_counts_e: np.ndarray) -> float:
    """P(two independent tokens share the top-1 expert) = sum_e p_e^2 for the observed load."""
    p = np.asarray(top1_counts_e, np.float64)
    total = p.sum()
    return float(np.sum((p / total) ** 2)) if total > 0 else float("nan")


def topk_chance(set_counts: dict[tuple[int, ...], int]) -> float:
    """P(two independent tokens' top-k sets overlap), the sets drawn from the observed set
    distribution: 1 - sum over disjoint pairs (S, S') of q_S q_S'."""
    if not set_counts:
        return float("nan")
    sets = np.array(list(set_counts), np.int64)  # [U, k]
    q = np.array(list(set_counts.values()), np.float64)
    q /= q.sum()
    disjoint = 0.0
    for start in range(0, len(sets), 512):  # [512, U, k, k] booleans at a time
        a = sets[start : start + 512]
        share = np.any(a[:, None, :, None] == sets[None, :, None, :], axis=(-2, -1))
        disjoint += float(q[start : start + 512] @ (~share) @ q)
    return 1.0 - disjoint


def uniform_top1_chance(num_experts: int) -> float:
    """Chance that two uniform top-1 choices agree."""
    return 1.0 / num_experts


def uniform_topk_chance(num_experts: int, k: int) -> float:
    """Overlap of two uniformly random k-sets of E experts: 1 - C(E-k, k) / C(E, k)."""
    return 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


# ---- streaming accumulator ---------------------------------------------------------------
class RoutingStats:
    """Counts routing decisions of L MoE layers over labelled tokens, batch by batch."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        k: int,
        domains: Sequence[str],
        class_names: Sequence[str],
        vocab_size: int,
    ):
        self.num_layers, self.num_experts, self.k = num_layers, num_experts, k
        self.domains, self.class_names = list(domains), list(class_names)
        self.vocab_size = v = vocab_size
        l, e, d, c = num_layers, num_experts, len(self.domains), len(self.class_names)
        self.assign_lde = np.zeros((l, d, e), np.int64)  # top-k assignments
        self.top1_ldce = np.zeros((l, d, c, e), np.int64)  # top-1 by domain and token class
        self.top1_lev = np.zeros((l, e, v), np.int32)  # for top tokens and I(expert; token)
        self.class_dc = np.zeros((d, c), np.int64)  # token classes of each domain
        self.pairs_ld = np.zeros((l, d), np.int64)
        self.same_top1_ld = np.zeros((l, d), np.int64)
        self.overlap_ld = np.zeros((l, d), np.int64)
        self.sets_ld = [[Counter() for _ in range(d)] for _ in range(l)]
        self.gate_top1_sum_l = np.zeros((l,), np.float64)
        self.tokens = 0

    def update(
        self,
        ids_lbsk: np.ndarray,
        gates_lbsk: np.ndarray,
        tokens_bs: np.ndarray,
        classes_bs: np.ndarray,
        scored_bs: np.ndarray,
        pair_bs: np.ndarray,
        domain_b: np.ndarray,
    ) -> None:
        """Adds one batch. classes_bs: each token's class index; scored_bs: tokens that count;
        pair_bs: see `repeat_counts`; domain_b: each row's domain index."""
        ids_lbsk = np.asarray(ids_lbsk, np.int64)
        e, v = self.num_experts, self.vocab_size
        scored_bs = np.asarray(scored_bs, bool)
        domain_bs = np.broadcast_to(np.asarray(domain_b)[:, None], scored_bs.shape)
        dom_n = domain_bs[scored_bs]  # [N] over scored tokens
        tok_n = np.asarray(tokens_bs)[scored_bs]
        cls_n = np.asarray(classes_bs, np.int64)[scored_bs]
        d, c = len(self.domains), len(self.class_names)
        self.class_dc += np.bincount(dom_n * c + cls_n, minlength=d * c).reshape(d, c)
        self.tokens += int(scored_bs.sum())
        for layer in range(self.num_layers):
            ids_nk = ids_lbsk[layer][scored_bs]
            top1_n = ids_nk[:, 0]
            flat = (dom_n[:, None] * e + ids_nk).ravel()
            self.assign_lde[layer] += np.bincount(flat, minlength=d * e).reshape(d, e)
            flat = (dom_n * c + cls_n) * e + top1_n
            self.top1_ldce[layer] += np.bincount(flat, minlength=d * c * e).reshape(d, c, e)
            self.top1_lev[layer] += np.bincount(top1_n * v + tok_n, minlength=e * v).reshape(e, v)
            self.gate_top1_sum_l[layer] += float(
                np.asarray(gates_lbsk[layer])[scored_bs][:, 0].sum()
            )
            sets_nk = np.sort(ids_nk, axis=-1)
            for dom in np.unique(dom_n):
                rows, counts = np.unique(sets_nk[dom_n == dom], axis=0, return_counts=True)
                self.sets_ld[layer][dom].update(
                    {tuple(r): int(n) for r, n in zip(rows.tolist(), counts, strict=True)}
                )
            for dom in np.unique(domain_b):
                in_dom = np.asarray(domain_b) == dom
                pairs, same, overlap = repeat_counts(ids_lbsk[layer][in_dom], pair_bs[in_dom])
                self.pairs_ld[layer, dom] += pairs
                self.same_top1_ld[layer, dom] += same
                self.overlap_ld[layer, dom] += overlap

    # ---- results ---------------------------------------------------------------------------
    @property
    def top1_lde(self) -> np.ndarray:
        """Top-1 counts per [layer, domain, expert] (classes summed)."""
        return self.top1_ldce.sum(2)

    @property
    def top1_lce(self) -> np.ndarray:
        """Top-1 counts per [layer, class, expert] (domains summed)."""
        return self.top1_ldce.sum(1)

    def repeat_rates(self) -> dict[str, list]:
        """Per layer: repeat rates pooled over domains and the chance rates for pairs drawn
        independently within one domain (pair-weighted mean of each domain's chance)."""
        out = {k: [] for k in ("top1", "top1_chance", "topk", "topk_chance")}
        per_domain = {dom: {k: [] for k in out} for dom in self.domains}
        top1_lde = self.top1_lde
        for layer in range(self.num_layers):
            pairs = self.pairs_ld[layer]
            weights = pairs / max(pairs.sum(), 1)
            chance1 = [top1_chance(top1_lde[layer, d]) for d in range(len(self.domains))]
            chancek = [topk_chance(self.sets_ld[layer][d]) for d in range(len(self.domains))]
            out["top1"].append(_ratio(self.same_top1_ld[layer].sum(), pairs.sum()))
            out["topk"].append(_ratio(self.overlap_ld[layer].sum(), pairs.sum()))
            out["top1_chance"].append(float(np.nansum(weights * np.array(chance1))))
            out["topk_chance"].append(float(np.nansum(weights * np.array(chancek))))
            for d, dom in enumerate(self.domains):
                per_domain[dom]["top1"].append(_ratio(self.same_top1_ld[layer, d], pairs[d]))
                per_domain[dom]["topk"].append(_ratio(self.overlap_ld[layer, d], pairs[d]))
                per_domain[dom]["top1_chance"].append(chance1[d])
                per_domain[dom]["topk_chance"].append(chancek[d])
        out["per_domain"] = per_domain
        return out

    def expert_distributions(self) -> np.ndarray:
        """[L, D, E]: each domain's share of top-k assignments per expert."""
        return self.assign_lde / np.maximum(self.assign_lde.sum(-1, keepdims=True), 1)

    def top_tokens(self, layer: int, expert: int, n: int) -> list[tuple[int, int, float]]:
        """The expert's n most frequent top-1 tokens: (token id, count, share of that token's
        occurrences routed to this expert first)."""
        counts_v = self.top1_lev[layer, expert]
        totals_v = self.top1_lev[layer].sum(0)
        order = np.argsort(-counts_v, kind="stable")[:n]
        return [
            (int(t), int(counts_v[t]), float(counts_v[t] / totals_v[t]))
            for t in order
            if counts_v[t] > 0
        ]

    def summary(self) -> dict:
        """Per-layer lists (JSON-ready) of every metric; see the README of the analysis."""
        rates = self.repeat_rates()
        dist = self.expert_distributions()
        d = len(self.domains)
        pairwise = []
        for layer in range(self.num_layers):
            pairwise.append(
                [[js_divergence(dist[layer, [i, j]]) for j in range(d)] for i in range(d)]
            )
        top1_lde, top1_lce = self.top1_lde, self.top1_lce
        top1_le = top1_lde.sum(1)
        e, k = self.num_experts, self.k
        return {
            "num_moe_layers": self.num_layers,
            "num_experts": e,
            "k": k,
            "tokens": self.tokens,
            "domains": self.domains,
            "tokens_per_domain": self.class_dc.sum(1).tolist(),
            "token_classes": self.class_names,
            "class_share_per_domain": _rows(self.class_dc).tolist(),
            "repeat_rate_top1": rates["top1"],
            "repeat_rate_chance": rates["top1_chance"],
            "repeat_rate_topk": rates["topk"],
            "repeat_rate_topk_chance": rates["topk_chance"],
            "repeat_rate_chance_uniform": uniform_top1_chance(e),
            "repeat_rate_topk_chance_uniform": uniform_topk_chance(e, k),
            "repeat_rate_per_domain": rates["per_domain"],
            "mi_token_class": [mutual_information(m.T) for m in top1_lce],
            "mi_domain": [mutual_information(m.T) for m in top1_lde],
            # what each label tells about the expert beyond the other one
            "mi_token_class_given_domain": [
                conditional_mutual_information(m) for m in self.top1_ldce
            ],
            "mi_domain_given_token_class": [
                conditional_mutual_information(m.transpose(1, 0, 2)) for m in self.top1_ldce
            ],
            "mi_token_id": [mutual_information(m) for m in self.top1_lev],
            "mi_token_id_bias": [miller_madow_bias(m) for m in self.top1_lev],
            "entropy_expert": [entropy(m) for m in top1_le],
            "entropy_token_class": entropy(self.class_dc.sum(0)),
            "entropy_domain": entropy(self.class_dc.sum(1)),
            "js_domains": [js_divergence(dist[layer]) for layer in range(self.num_layers)],
            "js_domains_pairwise": pairwise,
            "expert_share_per_domain": dist.tolist(),
            "expert_share_top1": _rows(top1_le).tolist(),
            "class_share_per_expert": [_rows(m.T).tolist() for m in top1_lce],
            "gate_top1_mean": (self.gate_top1_sum_l / max(self.tokens, 1)).tolist(),
        }


def _ratio(num, den) -> float:
    return float(num / den) if den else float("nan")


def _rows(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1)
