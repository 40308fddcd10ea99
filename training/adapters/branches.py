"""Per-task LoRA branches for continual learning: O-LoRA (summed) and GainLoRA (gated).

Branch b of a layer is rows [b*r, (b+1)*r) of A and the same columns of B (r = spec.branch_rank); stage t
of a run trains branch `branches_done` only, earlier and later ones stay as they are.

O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"):
    y = W x + s * sum_b B_b A_b x,   loss += lambda * sum_layers sum_{b' < b} |A_b' A_b^T|_1   (b current)
All branches have weight 1, so the layer is one LoRA of rank branches x r: servable as it is.

GainLoRA (Liang et al., 2025, arXiv 2505.15424): each branch gets a gate a_b(x) in [0, 1),
    y = W x + s * sum_b a_b(x) B_b A_b x,   a_b(x) = |2 sigmoid(4 cos(x, k_b)) - 1|
with the key k_b chosen (initialisation constraint) and kept (updating constraint) orthogonal to the
subspace of earlier tasks' inputs, so a new branch's gate is 0 on them. Simplification, for want of a
sequence-level gate in a per-layer adapter: the gate reads each token's layer input x instead of the
paper's pooled input embedding passed through a small MLP (see docs of `GatedBranchLinear`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from training.adapters.layer import LayerSpec, RoutedAdapterLinear, float32_region


def branch_rows(branch: int, rank: int) -> slice:
    """Rows of A (columns of B) that hold `branch`."""
    return slice(branch * rank, (branch + 1) * rank)


def orthogonality_loss(lora_a: torch.Tensor, branch: int, rank: int) -> torch.Tensor:
    """O-LoRA's |A_earlier A_current^T|_1 for A (branches*r, d_in): zero for branch 0 or orthogonal rows."""
    earlier = lora_a[: branch * rank]  # (b*r, d_in)
    current = lora_a[branch_rows(branch, rank)]  # (r, d_in)
    return (earlier @ current.t()).abs().sum()  # ()


def gain_gate(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """GainLoRA's gate per branch: |2 sigmoid(4 cos(x, k_b)) - 1| for tokens x (T, d) and keys (K, d) -> (T, K)."""
    cos = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(keys, dim=-1).t()  # (T, K)
    return (2 * torch.sigmoid(4 * cos) - 1).abs()


def project_out(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the span of the orthonormal columns of basis (d, m) from vectors (..., d)."""
    return vectors - (vectors @ basis) @ basis.t()


def extend_basis(basis: torch.Tensor, gram: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM: add the fewest new directions (top eigenvectors of the residual Gram) so that basis (d, m)
    captures `energy` of the new inputs' total energy trace(gram); returns the new basis (d, m')."""
    total = torch.trace(gram)
    captured = torch.trace(basis.t() @ gram @ basis) if basis.shape[1] else gram.new_zeros(())
    target = float(energy * total - captured)
    if target <= 0:
        return basis
    proj = torch.eye(gram.shape[0], dtype=gram.dtype) - basis @ basis.t()  # (d, d)
    values, vectors = torch.linalg.eigh(proj @ gram @ proj)  # ascending
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)  # descending
    need = int(torch.searchsorted(torch.cumsum(values, 0), torch.tensor(target, dtype=values.dtype))) + 1
    need = min(need, gram.shape[0] - basis.shape[1])
    return torch.cat([basis, vectors[:, :need]], dim=1)


def top_direction(gram: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The direction orthogonal to basis (d, m) that carries most of `gram`'s energy (d,) (a new key)."""
    proj = torch.eye(gram.shape[0], dtype=gram.dtype) - basis @ basis.t()  # (d, d)
    vectors: torch.Tensor = torch.linalg.eigh(proj @ gram @ proj).eigenvectors  # (d, d) ascending
    return vectors[:, -1]


class BranchLinear(RoutedAdapterLinear):
    """O-LoRA's layer: a LoRA of rank branches x r whose branches train one stage each (module docstring).

    Buffer `branches_done` () counts the stages trained so far, i.e. the branch the next stage trains.
    """

    branches_done: torch.Tensor

    def __init__(
        self, base: nn.Linear, spec: LayerSpec, generator: torch.Generator | None = None, stored: None = None
    ):
        super().__init__(base, spec, generator)  # LoRA-initialised: no stored SVD factors to reuse
        self.register_buffer("branches_done", torch.zeros((), dtype=torch.long))

    @property
    def num_branches(self) -> int:
        return self.lora_a.shape[0] // self.spec.branch_rank

    def trainable_rows(self) -> slice:
        """Rows of A / columns of B (and, gated, rows of the key matrix) the current stage trains."""
        return branch_rows(int(self.branches_done), self.spec.branch_rank)


class GatedBranchLinear(BranchLinear):
    """GainLoRA's layer: K = branches experts of rank r; `router.weight` (K, d_in) holds the gate keys.

    Routing is `gain_gate` instead of a softmax, which badit_serve's routed math does not compute, so
    these layers train and evaluate here but the export refuses them (`servable = False`). Buffers
    `gate_basis` (d_in, d_in) and `gate_basis_rank` (): the first rank columns are an orthonormal basis
    of earlier tasks' inputs (GPM), kept with the adapter state so a resumed run continues it.
    """

    servable: ClassVar[bool] = False
    gate_basis: torch.Tensor
    gate_basis_rank: torch.Tensor

    def __init__(
        self, base: nn.Linear, spec: LayerSpec, generator: torch.Generator | None = None, stored: None = None
    ):
        super().__init__(base, spec, generator)
        d_in = base.weight.shape[1]
        self.register_buffer("gate_basis", torch.zeros(d_in, d_in))
        self.register_buffer("gate_basis_rank", torch.zeros((), dtype=torch.long))

    def basis(self) -> torch.Tensor:
        """Orthonormal basis (d_in, m) of earlier tasks' inputs."""
        return self.gate_basis[:, : int(self.gate_basis_rank)]

    def set_basis(self, basis: torch.Tensor) -> None:
        self.gate_basis.zero_()
        self.gate_basis[:, : basis.shape[1]] = basis
        self.gate_basis_rank.fill_(basis.shape[1])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate values as dense weights (T, K); every branch is 'selected' (its gate may be 0)."""
        assert self.router is not None  # the gate keys: GainLoRA's router is 'dense', never 'none'
        keys = self.router.weight.float()  # (K, d_in)
        with float32_region(x):
            logits = x.float() @ keys.t()  # (T, K), kept for the routing statistics only
            weights = gain_gate(x.float(), keys)  # (T, K)
        return logits, weights, torch.ones_like(weights, dtype=torch.bool)
