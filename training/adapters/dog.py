"""Dynamically Orthogonal Grouping (DOG): regroup N = K * r rank-1 components into K experts.

Pure tensor math, no knowledge of models. Each component i is described by a signal vector g_i
(its accumulated gradient), and the grouping follows the paper's Eqs. 11-14: spherical k-means for
an initial grouping, then repeatedly (a) take each group's centroid, (b) replace the centroids by the
closest orthonormal set, (c) reassign components to directions under an exact balance constraint
(every expert keeps exactly r components), until the labels stop changing.

Slot layout: slot j belongs to expert j // r. `labels_to_permutation` turns labels into the slot
permutation to apply to the factors (A_new = A_old[perm], B_new = B_old[:, perm]).
Where the math runs: on the CPU, in float64, whatever the device and dtype of the inputs. The problem is
small (K * r components per layer), the k-means++ draws then come from a seeded CPU `torch.Generator`
(identical on every machine and every data-parallel rank, never the global RNG), and the exact balanced
assignment needs numpy anyway. Every public function accepts tensors on any device and returns CPU tensors;
the caller moves the final permutation to the model's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def host64(x: Tensor) -> Tensor:
    """x detached, on the CPU, in float64: where all of DOG's math runs."""
    return x.detach().to(device="cpu", dtype=torch.float64)


def host_labels(labels: Tensor) -> Tensor:
    """Integer labels on the CPU as int64."""
    return labels.detach().to(device="cpu", dtype=torch.int64)


def normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm; rows with norm <= eps become (stay) zero."""
    norms = x.norm(dim=1, keepdim=True)  # (N, 1)
    return torch.where(norms > eps, x / norms.clamp_min(eps), torch.zeros_like(x))


def _kmeans_pp_init(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding on the sphere, with d = max(1 - max cos to chosen centres, 0).

    Each new centre is drawn with P(i) ∝ d_i^2; as in scikit-learn's greedy variant, 2 + ln(k)
    candidates are drawn and the one leaving the least total d^2 is kept (first on ties).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    best_cos = x @ x[first]  # (N,) cos to the nearest chosen centre
    chosen = [first]
    for _ in range(1, k):
        p = (1.0 - best_cos).clamp_min(0.0) ** 2  # (N,)
        if float(p.sum()) <= 0.0:
            p = torch.ones(n, dtype=x.dtype)  # every point already coincides with a centre: uniform
        cand = torch.multinomial(p, trials, replacement=True, generator=gen)  # (T,)
        cand_cos = torch.maximum(best_cos[None, :], x[cand] @ x.T)  # (T, N)
        potential = ((1.0 - cand_cos).clamp_min(0.0) ** 2).sum(dim=1)  # (T,)
        t = int(torch.argmin(potential))
        chosen.append(int(cand[t]))
        best_cos = cand_cos[t]
    return x[chosen].clone()  # (k, D)


def _reseed_empty(x: Tensor, labels: Tensor, centres: Tensor, empty: list[int]) -> Tensor:
    """Fill the given centres with the points farthest (lowest cos) from their own centroid."""
    own_cos = (x * centres[labels]).sum(dim=1)  # (N,)
    for c in empty:
        i = int(torch.argmin(own_cos))  # first index on ties
        centres[c] = x[i]
        own_cos[i] = math.inf  # never reuse a point for two empty clusters
    return centres


def spherical_kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> Tensor:
    """Cosine k-means with k-means++ seeding on unit rows x (N, D); returns int64 labels (N,).

    An empty cluster (or one whose mean is ~0) is re-seeded with the point farthest from its own
    centroid; several empty clusters take distinct points in order of increasing similarity.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N, got k={k}, x of shape {tuple(x.shape)}")
    x = host64(x)  # (N, D)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centres = _kmeans_pp_init(x, k, gen)  # (k, D)
    labels: Tensor | None = None
    for _ in range(iters):
        new_labels = (x @ centres.T).argmax(dim=1)  # (N,), first max on ties
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centres).index_add_(0, labels, x)  # (k, D)
        centres = normalize_rows(sums)
        empty = [c for c in range(k) if float(sums[c].norm()) <= 1e-12]
        if empty:
            centres = _reseed_empty(x, labels, centres, empty)
    if labels is None:  # iters == 0: a single assignment to the seeds
        labels = (x @ centres.T).argmax(dim=1)
    return labels.to(torch.int64)


def orthogonal_directions(centroids: Tensor) -> Tensor:
    """Polar factor U @ Vh of C = U S Vh (K, D), K <= D: the orthonormal rows closest to C."""
    k, d = centroids.shape
    if k > d:
        raise ValueError(f"need K <= D for {k} orthonormal directions in dimension {d}")
    u, _, vh = torch.linalg.svd(host64(centroids), full_matrices=False)  # (K, K), (K, D)
    directions: Tensor = (u @ vh).to(centroids.dtype)  # (K, D) on the CPU
    return directions


def balanced_assign(scores: Tensor, capacity: int) -> Tensor:
    """Labels (N,) maximising sum_i scores[i, label_i] with exactly `capacity` members per group.

    Solved exactly as a linear assignment on the column-repeated matrix; the solver is deterministic,
    so identical scores give identical labels (ties resolve the same way every time).
    """
    n, k = scores.shape
    if n != k * capacity:
        raise ValueError(f"scores of shape {(n, k)} need N == K * capacity = {k} * {capacity}")
    scores = host64(scores)  # (N, K)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf")
    cost = scores.repeat_interleave(capacity, dim=1)  # (N, K * capacity)
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    labels = torch.empty(n, dtype=torch.int64)
    labels[torch.from_numpy(rows)] = torch.from_numpy(cols // capacity).to(torch.int64)
    return labels


def _group_centroids(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """Mean of each group's unit rows (K, D).

    Fallback for an empty group (possible only after unbalanced k-means): the unit signal with the
    least total |cos| to the centroids already present, so the direction is data-driven, distinct
    and deterministic (first index on ties).
    """
    counts = torch.bincount(labels, minlength=k).to(x.dtype)  # (K,)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)  # (K, D)
    centroids = sums / counts.clamp_min(1.0)[:, None]  # (K, D)
    used = torch.zeros(x.shape[0], dtype=torch.bool)  # (N,)
    for g in (counts == 0).nonzero().flatten().tolist():
        present = centroids[counts > 0]  # (K', D)
        penalty = (x @ present.T).abs().sum(dim=1)  # (N,)
        penalty[used] = math.inf
        i = int(torch.argmin(penalty))
        centroids[g], counts[g], used[i] = x[i], 1.0, True
    return centroids


def cohesion(x: Tensor, labels: Tensor, num_groups: int) -> float:
    """sum_g ||sum_{i in g} x_i|| over unit rows x: the spherical k-means objective (the paper's Eq. 10,
    larger when members point the same way); used to pick the best of several restarts."""
    sums = torch.zeros(num_groups, x.shape[1], dtype=torch.float64).index_add_(
        0, host_labels(labels), host64(x)
    )  # (K, D)
    return float(sums.norm(dim=1).sum())


@dataclass
class GroupingResult:
    """Outcome of `dog_grouping`."""

    labels: Tensor  # (N,) int64, exactly group_size members per group
    iterations: int  # orthogonalise-and-reassign iterations performed (>= 1)
    converged: bool  # labels stopped changing within max_iters
    kmeans_labels: Tensor  # (N,) int64 initial spherical k-means grouping (may be unbalanced)


def dog_grouping(
    signal: Tensor,
    num_groups: int,
    group_size: int,
    max_iters: int = 10,
    kmeans_iters: int = 50,
    seed: int = 0,
    restarts: int = 1,
) -> GroupingResult:
    """Group the N component signals (N, D) into num_groups balanced, mutually orthogonal groups.

    With `restarts` > 1 the whole procedure runs from seeds seed, seed+1, ... and the result with the
    highest `cohesion` wins (first on ties), which escapes most k-means local optima."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    results = [
        _dog_grouping_once(signal, num_groups, group_size, max_iters, kmeans_iters, seed + i)
        for i in range(restarts)
    ]
    x = normalize_rows(host64(signal))  # (N, D)
    scores = [cohesion(x, r.labels, num_groups) for r in results]
    return results[scores.index(max(scores))]


def _dog_grouping_once(
    signal: Tensor, num_groups: int, group_size: int, max_iters: int, kmeans_iters: int, seed: int
) -> GroupingResult:
    if signal.ndim != 2 or signal.shape[0] != num_groups * group_size:
        raise ValueError(
            f"signal of shape {tuple(signal.shape)} must be (num_groups * group_size, D) "
            f"= ({num_groups} * {group_size}, D)"
        )
    if num_groups > signal.shape[1]:
        raise ValueError(
            f"num_groups={num_groups} orthogonal directions need D >= K, got D={signal.shape[1]}"
        )
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    x = normalize_rows(host64(signal))  # (N, D)
    kmeans_labels = spherical_kmeans(x, num_groups, iters=kmeans_iters, seed=seed)
    labels, converged, iterations = kmeans_labels, False, 0
    while not converged and iterations < max_iters:
        iterations += 1
        dirs = orthogonal_directions(_group_centroids(x, labels, num_groups))  # (K, D)
        new_labels = balanced_assign(x @ dirs.T, group_size)  # scores (N, K)
        converged = torch.equal(new_labels, labels)
        labels = new_labels
    return GroupingResult(labels, iterations, converged, kmeans_labels)


def match_groups(old_labels: Tensor, new_labels: Tensor, num_groups: int) -> Tensor:
    """Relabel new groups to the old labels they overlap most (max total overlap, Hungarian)."""
    old_labels, new_labels = host_labels(old_labels), host_labels(new_labels)  # (N,), (N,)
    overlap = torch.zeros(num_groups, num_groups, dtype=torch.int64)  # (K_new, K_old)
    overlap.index_put_((new_labels, old_labels), torch.ones_like(new_labels), accumulate=True)
    rows, cols = linear_sum_assignment(overlap.numpy(), maximize=True)
    mapping = torch.empty(num_groups, dtype=torch.int64)
    mapping[torch.from_numpy(rows)] = torch.from_numpy(cols).to(torch.int64)
    return mapping[new_labels]


def labels_to_permutation(labels: Tensor, num_groups: int, group_size: int) -> Tensor:
    """perm (N,): new slot j (expert j // group_size) holds old component perm[j], ascending per expert."""
    n = num_groups * group_size
    labels = host_labels(labels)  # (N,)
    if labels.shape != (n,):
        raise ValueError(f"labels of shape {tuple(labels.shape)}, expected ({n},)")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_groups):
        raise ValueError(f"labels must lie in [0, {num_groups})")
    counts = torch.bincount(labels, minlength=num_groups)  # (K,)
    for g, c in enumerate(counts.tolist()):
        if c != group_size:
            raise ValueError(f"group {g} has {c} members, expected {group_size}")
    return torch.argsort(labels, stable=True)


def _mean_pairwise_angle_deg(x: Tensor) -> tuple[float, int]:
    """(sum of pairwise angles in degrees, number of pairs) over distinct rows of unit x (M, D)."""
    m = x.shape[0]
    i, j = torch.triu_indices(m, m, offset=1)  # (2, M * (M - 1) / 2)
    cos = (x[i] * x[j]).sum(dim=1).clamp(-1.0, 1.0)  # (P,)
    return float(torch.rad2deg(torch.acos(cos)).sum()), int(cos.numel())


def gradient_angles(signal: Tensor, labels: Tensor, num_groups: int) -> tuple[float, float]:
    """(intra_deg, inter_deg): mean angle between same-group signals, and between group directions.

    intra averages over all same-group pairs pooled across groups; a group direction is the normalised
    sum of its members' unit signals (empty groups are skipped). NaN when there are no pairs.
    """
    x, labels = normalize_rows(host64(signal)), host_labels(labels)  # (N, D), (N,)
    total, pairs = 0.0, 0
    for g in range(num_groups):
        s, p = _mean_pairwise_angle_deg(x[labels == g])
        total, pairs = total + s, pairs + p
    intra = total / pairs if pairs else math.nan
    sums = torch.zeros(num_groups, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)  # (K, D)
    present = torch.bincount(labels, minlength=num_groups) > 0  # (K,)
    s, p = _mean_pairwise_angle_deg(normalize_rows(sums[present]))
    inter = s / p if p else math.nan
    return intra, inter
