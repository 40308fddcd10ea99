"""Dynamically orthogonal grouping: pure tensor math (fast, no models)."""

from __future__ import annotations

import itertools

import pytest
import torch

from training.adapters.dog import (
    balanced_assign,
    cohesion,
    dog_grouping,
    gradient_angles,
    labels_to_permutation,
    match_groups,
    normalize_rows,
    orthogonal_directions,
    spherical_kmeans,
)


def _orthonormal(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))  # (D, K)
    return q.T.contiguous()  # (K, D)


def _planted(sizes: list[int], d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit signals around orthonormal directions, shuffled; returns (signal (N, D), planted labels)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = _orthonormal(len(sizes), d, gen)
    truth = torch.cat([torch.full((s,), g, dtype=torch.int64) for g, s in enumerate(sizes)])  # (N,)
    x = dirs[truth] + noise * torch.randn(len(truth), d, generator=gen, dtype=torch.float64)
    order = torch.randperm(len(truth), generator=gen)
    return normalize_rows(x[order]), truth[order]


def _partition(labels: torch.Tensor) -> set[frozenset[int]]:
    return {frozenset((labels == g).nonzero().flatten().tolist()) for g in labels.unique().tolist()}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k,r", [(8, 8), (4, 16), (16, 4), (32, 2)])
def test_dog_recovers_planted_orthogonal_groups(k: int, r: int, seed: int) -> None:
    x, truth = _planted([r] * k, d=64, noise=0.05, seed=seed)
    res = dog_grouping(x, num_groups=k, group_size=r)
    assert res.converged
    assert 1 <= res.iterations <= 10
    assert _partition(res.labels) == _partition(truth)
    assert torch.equal(match_groups(truth, res.labels, k), truth)
    assert res.labels.dtype == torch.int64 and res.kmeans_labels.dtype == torch.int64


def test_dog_repairs_a_kmeans_local_optimum() -> None:
    # Noisier planted groups where k-means++ merges two planted groups (sizes 3..16); DOG repairs it.
    x, truth = _planted([8] * 8, d=64, noise=0.1, seed=6)
    res = dog_grouping(x, num_groups=8, group_size=8)
    assert _partition(res.kmeans_labels) != _partition(truth)
    assert _partition(res.labels) == _partition(truth)
    assert res.converged and res.iterations >= 2


def test_dog_balances_unequal_natural_groups() -> None:
    k, r = 4, 6
    x, truth = _planted([12, 6, 4, 2], d=32, noise=0.05, seed=3)
    res = dog_grouping(x, num_groups=k, group_size=r)
    assert torch.bincount(res.kmeans_labels, minlength=k).tolist() != [r] * k  # k-means alone is unbalanced
    assert torch.bincount(res.labels, minlength=k).tolist() == [r] * k
    assert res.converged and res.iterations >= 2  # the first balanced step must change the labels
    once = dog_grouping(x, num_groups=k, group_size=r, max_iters=1)
    assert not once.converged and once.iterations == 1
    assert torch.bincount(once.labels, minlength=k).tolist() == [r] * k
    # The planted group of exactly r members is kept intact.
    assert frozenset((truth == 1).nonzero().flatten().tolist()) in _partition(res.labels)


def test_dog_is_deterministic_and_leaves_global_rng_alone() -> None:
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(7))
    state = torch.get_rng_state()
    a = dog_grouping(x, num_groups=4, group_size=8, seed=5)
    torch.manual_seed(12345)
    b = dog_grouping(x, num_groups=4, group_size=8, seed=5)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.kmeans_labels, b.kmeans_labels)
    assert (a.iterations, a.converged) == (b.iterations, b.converged)
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    c = dog_grouping(x, num_groups=4, group_size=8, seed=6)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.bincount(c.labels, minlength=4).tolist() == [8] * 4


def test_dog_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(10, 4\)"):
        dog_grouping(torch.randn(10, 4), num_groups=3, group_size=3)
    with pytest.raises(ValueError, match="D >= K"):
        dog_grouping(torch.randn(8, 2), num_groups=4, group_size=2)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_assign_is_optimal(seed: int) -> None:
    n, k, cap = 6, 3, 2
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    best, best_labels = -float("inf"), None
    for combo in itertools.product(range(k), repeat=n):
        if all(combo.count(g) == cap for g in range(k)):
            total = sum(float(scores[i, g]) for i, g in enumerate(combo))
            if total > best:
                best, best_labels = total, combo
    labels = balanced_assign(scores, cap)
    assert torch.bincount(labels, minlength=k).tolist() == [cap] * k
    assert float(scores[torch.arange(n), labels].sum()) == pytest.approx(best, abs=1e-12)
    assert labels.tolist() == list(best_labels)  # continuous random scores: the optimum is unique


def test_balanced_assign_ties_are_deterministic() -> None:
    scores = torch.zeros(8, 4)
    first = balanced_assign(scores, 2)
    assert torch.bincount(first, minlength=4).tolist() == [2] * 4
    assert all(torch.equal(balanced_assign(scores, 2), first) for _ in range(3))
    with pytest.raises(ValueError):
        balanced_assign(torch.zeros(7, 4), 2)


def test_orthogonal_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    q = orthogonal_directions(c)
    assert q.shape == (5, 12)
    assert torch.allclose(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-10)
    # Polar factor maximises trace(Q C^T) over orthonormal row sets: beats another orthonormal set.
    other = _orthonormal(5, 12, gen)
    assert float((q * c).sum()) >= float((other * c).sum())
    ortho = _orthonormal(6, 10, gen)
    assert torch.allclose(orthogonal_directions(ortho), ortho, atol=1e-10)
    with pytest.raises(ValueError):
        orthogonal_directions(torch.randn(4, 3))


def test_labels_to_permutation() -> None:
    k, r = 3, 4
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 1, 2])
    perm = labels_to_permutation(labels, k, r)
    assert sorted(perm.tolist()) == list(range(k * r))
    for g in range(k):
        assert perm[g * r : (g + 1) * r].tolist() == (labels == g).nonzero().flatten().tolist()
    a = torch.arange(k * r, dtype=torch.float64)[:, None].repeat(1, 3)  # (N, 3) rows tagged by index
    assert torch.equal(labels[a[perm][:, 0].long()], torch.arange(k).repeat_interleave(r))
    with pytest.raises(ValueError, match="group 0 has 5 members"):
        labels_to_permutation(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]), k, r)


def test_match_groups_pure_relabelling_maps_back() -> None:
    gen = torch.Generator().manual_seed(1)
    k = 5
    old = torch.randperm(20, generator=gen) % k
    pi = torch.randperm(k, generator=gen)
    assert torch.equal(match_groups(old, pi[old], k), old)


def test_match_groups_is_optimal_bijective_relabelling() -> None:
    gen = torch.Generator().manual_seed(2)
    k = 4
    old = torch.randperm(24, generator=gen) % k
    new = torch.randperm(24, generator=gen) % k
    out = match_groups(old, new, k)
    assert _partition(out) == _partition(new)
    mapping = {int(n): int(o) for n, o in zip(new, out, strict=True)}
    assert len(mapping) == k and sorted(mapping.values()) == list(range(k))
    best = max(
        sum(int((old[new == g] == p[g]).sum()) for g in range(k)) for p in itertools.permutations(range(k))
    )
    assert int((out == old).sum()) == best


def test_gradient_angles_planted_and_random() -> None:
    x, truth = _planted([4, 4, 4], d=16, noise=0.0, seed=0)
    intra, inter = gradient_angles(x * 3.0, truth, 3)  # unnormalised input is fine
    assert intra == pytest.approx(0.0, abs=1e-4)
    assert inter == pytest.approx(90.0, abs=1e-6)
    rnd = torch.randn(32, 4096, generator=torch.Generator().manual_seed(0))
    intra, inter = gradient_angles(rnd, torch.arange(4).repeat_interleave(8), 4)
    assert intra == pytest.approx(90.0, abs=3.0)
    assert inter == pytest.approx(90.0, abs=3.0)


def test_spherical_kmeans_recovers_clusters() -> None:
    x, truth = _planted([5, 9, 3], d=24, noise=0.05, seed=4)
    assert _partition(spherical_kmeans(x, 3, seed=0)) == _partition(truth)


def test_spherical_kmeans_degenerate_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    base = normalize_rows(torch.randn(3, 8, generator=gen, dtype=torch.float64))
    dup = base[torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])]  # (8, 8) with duplicates
    for k in (3, 5, 8):
        labels = spherical_kmeans(dup, k, seed=1)
        assert labels.shape == (8,) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < k
        assert len(_partition(labels[[0, 1, 2]])) == 1  # identical points share a cluster
    distinct = normalize_rows(torch.randn(6, 8, generator=gen, dtype=torch.float64))
    assert sorted(spherical_kmeans(distinct, 6).tolist()) == list(range(6))
    same = torch.ones(5, 4, dtype=torch.float64) / 2.0
    assert spherical_kmeans(same, 5).tolist() == [0] * 5
    with pytest.raises(ValueError):
        spherical_kmeans(distinct, 7)


def test_restarts_escape_a_local_optimum() -> None:
    """Noise 0.1, K=16 x r=4: one start settles on a wrong partition; the most cohesive of 4 is exact."""
    x, truth = _planted([4] * 16, d=64, noise=0.1, seed=6)
    single = dog_grouping(x, 16, 4, seed=0)
    assert not torch.equal(match_groups(truth, single.labels, 16), truth)
    best = dog_grouping(x, 16, 4, seed=0, restarts=4)
    assert torch.equal(match_groups(truth, best.labels, 16), truth)
    assert cohesion(normalize_rows(x), best.labels, 16) >= cohesion(normalize_rows(x), single.labels, 16)
    with pytest.raises(ValueError, match="restarts"):
        dog_grouping(x, 16, 4, restarts=0)


def test_epoch_first_half_regroups_at_epoch_ends_in_the_first_half() -> None:
    """The paper's schedule: 10 epochs of 3 steps regroup after epochs 1-5 (steps 3..15), never later."""
    from training.adapters import DogConfig
    from training.schedule import regroup_due

    dog = DogConfig(schedule="epoch_first_half")
    assert [s for s in range(1, 31) if regroup_due(s, 30, 3, dog)] == [3, 6, 9, 12, 15]
    # an odd number of epochs: the middle epoch ends after the half-way point (21 > 17.5)
    assert [s for s in range(1, 36) if regroup_due(s, 35, 7, dog)] == [7, 14]
    # one epoch only: the last step is never a regroup (it could no longer matter)
    assert [s for s in range(1, 5) if regroup_due(s, 4, 4, dog)] == []
    every = DogConfig(schedule="every_n_steps", every_n_steps=4)
    assert [s for s in range(1, 13) if regroup_due(s, 12, 3, every)] == [4, 8]
