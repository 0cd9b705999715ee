"""The whitening transform T = diag(s1) (P1 ⊗ P2) diag(s2) of LiftQuant (paper section 3.2).

A layer's weight W [out, n] is coded in the whitened space W' = W T, where the codec's
N(0, 1) assumption holds far better: the Kronecker mixing P1 ⊗ P2 spreads outlier
columns over all inputs, s1 (activation-aware, AWQ-like) moves error away from inputs
that carry large activations, and s2 (constant over each coding block of d inputs)
equalises the variance of the mixed columns. At inference the activation is mapped by
T^-1 instead (`apply_inverse`), which costs O(n (n1 + n2)) rather than O(n^2).

Factor sizes: n = n1 * n2 with n1 <= n2 as close to sqrt(n) as the divisors allow.
Each factor is a Hadamard matrix where one can be built (Sylvester 2^k, Paley I for
q + 1 with q a prime = 3 mod 4, and Kronecker products of those), with random column
signs; otherwise a random orthogonal matrix (QR of a Gaussian). All are seeded.

This module owns the transform's construction and algebra. Choosing s1 from
calibration statistics and coding the whitened weight belong to
`liftedge.quantize.liftquant`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def kron_factors(n: int) -> tuple[int, int]:
    """Split n into n1 * n2 (n1 <= n2): near-square, preferring Hadamard-friendly factors.

    Storage and mixing cost grow with n1^2 + n2^2, so only pairs within 1.5x of the most
    balanced pair's cost are considered; among those, more Hadamard factors win, then balance.
    """
    pairs = [(a, n // a) for a in range(1, math.isqrt(n) + 1) if n % a == 0]
    cheapest = min(a * a + b * b for a, b in pairs)
    near = [p for p in pairs if p[0] ** 2 + p[1] ** 2 <= 1.5 * cheapest]
    return max(near, key=lambda p: (sum(_hadamard_exists(f) for f in p if f > 1), p[0]))


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley_order(n: int) -> bool:
    return n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3


def _hadamard_exists(n: int) -> bool:
    if n in (1, 2):
        return True
    while n % 2 == 0 and not _paley_order(n):
        n //= 2
    return n == 1 or _paley_order(n)


def _paley(n: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order n = q + 1, q prime, q = 3 mod 4."""
    q = n - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if k in residues else -1 for k in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(n, dtype=torch.float64)


@lru_cache(maxsize=64)
def hadamard(n: int) -> torch.Tensor | None:
    """An unnormalised n x n Hadamard matrix (entries ±1, H H^T = n I), or None."""
    if not _hadamard_exists(n):
        return None
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _paley_order(n):
        return _paley(n)
    half = hadamard(n // 2)
    return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)


def orthogonal_factor(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A seeded n x n orthogonal matrix: randomised Hadamard if one exists, else random QR."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    h = hadamard(n)
    if h is not None:
        return h * signs[None, :] / math.sqrt(n), "hadamard"
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :], "random-orthogonal"


@dataclass
class Whitening:
    """T = diag(s1) (P1 ⊗ P2) diag(s2) for an input dimension n = n1 * n2.

    `s2` holds one value per coding block of `block` mixed inputs (the last block may be
    short when block does not divide n). All tensors are float32.
    """

    s1: torch.Tensor  # [n]
    p1: torch.Tensor  # [n1, n1]
    p2: torch.Tensor  # [n2, n2]
    s2: torch.Tensor  # [ceil(n / block)]
    block: int

    @property
    def n(self) -> int:
        return self.s1.numel()

    def s2_expanded(self) -> torch.Tensor:
        return self.s2.repeat_interleave(self.block)[: self.n]

    def apply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W T for W [out, n]."""
        x = (w * self.s1).reshape(w.shape[0], self.p1.shape[0], self.p2.shape[0])
        x = torch.einsum("ij,oik,kl->ojl", self.p1, x, self.p2).reshape(w.shape[0], self.n)
        return x * self.s2_expanded()

    def unapply_to_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' T^-1 for W' [out, n] (inverse of `apply_to_weight`)."""
        p1_inv, p2_inv = torch.linalg.inv(self.p1), torch.linalg.inv(self.p2)
        x = (w / self.s2_expanded()).reshape(w.shape[0], self.p1.shape[0], self.p2.shape[0])
        x = torch.einsum("ij,oik,kl->ojl", p1_inv, x, p2_inv).reshape(w.shape[0], self.n)
        return x / self.s1


def mixing_matrices(whitening: Whitening) -> tuple[torch.Tensor, torch.Tensor]:
    """(mix1, mix2) such that (P1 ⊗ P2)^-1 a == vec(mix1 @ A @ mix2^T).

    A is the activation a of length n reshaped row-major to [n1, n2]; mix_i = P_i^-1
    (= P_i^T while the factors stay orthogonal).
    """
    return torch.linalg.inv(whitening.p1).contiguous(), torch.linalg.inv(whitening.p2).contiguous()


def apply_inverse(a: torch.Tensor, in_scale: torch.Tensor, mix1: torch.Tensor, mix2: torch.Tensor,
                  block_scale: torch.Tensor) -> torch.Tensor:
    """T^-1 applied to activations a [..., n], given the runtime-facing factors.

    in_scale = 1/s1 [n], block_scale = 1/s2 expanded to [n]. This is the operation every
    target reproduces; `targets/reference` uses it as the oracle.
    """
    n1, n2 = mix1.shape[0], mix2.shape[0]
    x = (a * in_scale).reshape(*a.shape[:-1], n1, n2)
    x = torch.matmul(torch.matmul(mix1, x), mix2.T).reshape(*a.shape[:-1], n1 * n2)
    return x * block_scale
