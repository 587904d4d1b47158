"""pass@k: the chance that at least one of k samples passes, estimated without bias from n >= k samples.

Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374, eq. 1: with n samples of
a problem of which c pass,

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]

and, for numerical stability (the binomials overflow for n in the hundreds), the product form of the paper's
figure 3: C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i); it is 0 when n - c < k (every k-subset
holds a passing sample). Taking 1 - (1 - c/n)^k instead (k draws with replacement) is biased low.
"""

from __future__ import annotations

from llmlab.common import LlmlabError


def pass_at_k(n: int, c: int, k: int) -> float:
    """One problem's unbiased pass@k from n samples, c of them correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise LlmlabError(f"pass@{k} needs 1 <= k <= n samples and 0 <= c <= n correct; got n {n}, c {c}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n samples, c correct)."""
    if not counts:
        raise LlmlabError("pass@k of no problems: evaluate at least one")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
