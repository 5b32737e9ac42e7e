"""PathIndex, edge -> affinity, affinity targets and the sparse random walk against brute force and dense math."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import core.random_walk as random_walk_module
from core.path_index import PathIndex, affinity_targets, direction_path, edge_to_affinity, search_directions
from core.random_walk import normalize_rw, random_walk, transition_matrix, transition_stencil

REPO_ROOT = Path(__file__).resolve().parents[1]


def brute_force_pairs(radius: int, height: int, width: int) -> set[tuple[int, int]]:
    """Every (src, dst) neighbour pair of the half-disc, src in the source block, both on the grid."""
    reach = radius - 1
    pairs = set()
    for sy in range(height - reach):
        for sx in range(reach, width - reach):
            for dy in range(0, reach + 1):
                for dx in range(-reach, reach + 1):
                    if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= radius * radius:
                        continue
                    ty, tx = sy + dy, sx + dx
                    if 0 <= ty < height and 0 <= tx < width:
                        pairs.add((sy * width + sx, ty * width + tx))
    return pairs


# ----------------------------------------------------------------------------- PathIndex
@pytest.mark.parametrize(("radius", "n_dirs", "lengths"), [
    (10, 152, [*range(2, 17), *range(18, 23)]),
    (5, 34, [2, 3, 4, 5, 6, 7, 8, 10, 11]),
])
def test_directions_and_groups_match_the_documented_counts(radius, n_dirs, lengths):
    index = PathIndex(radius, (2 * radius + 3, 2 * radius + 5))
    assert len(search_directions(radius)) == n_dirs == index.n_dirs
    assert [paths.shape[1] for paths in index.paths] == lengths
    if radius == 10:
        assert sum(paths.shape[0] * paths.shape[1] for paths in index.paths) == 2134


def test_source_count_at_128():
    index = PathIndex(10, (128, 128))
    assert index.n_src == 119 * 110 == 13090
    assert index.dst_indices.shape == (152, 13090)
    assert index.src_indices.dtype == index.dst_indices.dtype == torch.int64
    assert [tuple(indices.shape) for indices in index.path_indices] == [
        (len(paths), paths.shape[1], 13090) for paths in index.paths
    ]


@pytest.mark.parametrize(("radius", "size"), [(5, (14, 23)), (10, (24, 31)), (3, (7, 9))])
def test_pairs_match_brute_force_enumeration(radius, size):
    index = PathIndex(radius, size)
    pairs = {
        (int(src), int(dst))
        for row in index.dst_indices
        for src, dst in zip(index.src_indices.tolist(), row.tolist())
    }
    assert len(pairs) == index.n_dirs * index.n_src  # no pair twice
    assert pairs == brute_force_pairs(radius, *size)


def test_destinations_follow_the_grouped_direction_order():
    height, width = 20, 26
    index = PathIndex(5, (height, width))
    expected = torch.stack([index.src_indices + dy * width + dx for dy, dx in index.directions.tolist()])
    assert torch.equal(index.dst_indices, expected)
    grouped = [tuple(d) for paths in index.paths for d in paths[:, 0].tolist()]
    assert sorted(grouped) == sorted(search_directions(5))


def test_paths_by_hand():
    assert direction_path(0, 3) == [(0, 3), (0, 2), (0, 1), (0, 0)]
    assert direction_path(1, 1) == [(1, 1), (0, 1), (1, 0), (0, 0)]
    # 2x + y with (2x + y)^2 < 5 keeps the whole 3x2 box; ties keep the row-major order.
    assert direction_path(2, -1) == [(2, -1), (1, -1), (2, 0), (0, -1), (1, 0), (0, 0)]
    # x + 3y with (x + 3y)^2 < 10 keeps all 8 points of the 2x4 box, (0, -3) at distance 3/sqrt(10).
    assert direction_path(1, -3) == [(1, -3), (0, -3), (1, -2), (0, -2), (1, -1), (0, -1), (1, 0), (0, 0)]
    assert direction_path(3, 0) == [(3, 0), (2, 0), (1, 0), (0, 0)]


def test_path_indices_are_the_shifted_source_block():
    height, width = 12, 17
    index = PathIndex(4, (height, width))
    for paths, indices in zip(index.paths, index.path_indices):
        offsets = torch.as_tensor(paths[..., 0] * width + paths[..., 1])
        assert torch.equal(indices, index.src_indices + offsets[..., None])
        assert (paths[:, -1] == 0).all()  # the source closes every path


def test_rejects_a_grid_smaller_than_the_radius():
    with pytest.raises(ValueError, match="too small"):
        PathIndex(10, (9, 40))


# ----------------------------------------------------------------------------- edge -> affinity, targets
def test_edge_to_affinity_matches_a_loop():
    torch.manual_seed(0)
    height, width = 10, 13
    index = PathIndex(5, (height, width))
    edge = torch.rand(2, height * width)
    aff = edge_to_affinity(edge, index)
    assert aff.shape == (2, index.n_dirs, index.n_src)

    points = [path for paths in index.paths for path in paths.tolist()]
    sources = [(s // width, s % width) for s in index.src_indices.tolist()]
    expected = torch.empty_like(aff)
    for b in range(2):
        for d, path in enumerate(points):
            for s, (sy, sx) in enumerate(sources):
                on_path = [edge[b, (sy + py) * width + sx + px] for py, px in path]
                expected[b, d, s] = 1 - max(on_path)
    assert torch.equal(aff, expected)


def test_edge_to_affinity_checks_the_map_size():
    with pytest.raises(ValueError, match="pixels per image"):
        edge_to_affinity(torch.rand(1, 50), PathIndex(3, (8, 8)))


def hand_made_label() -> torch.Tensor:
    label = torch.zeros(12, 15, dtype=torch.int64)
    label[2:7, 3:8] = 1
    label[5:11, 7:12] = 3  # touches class 1: fg-fg pairs of different classes
    label[:, 13:] = 255
    label[9, 0:4] = 255
    return label


@pytest.mark.parametrize("num_classes", [4, 3])
def test_affinity_targets_match_a_loop(num_classes):
    label = hand_made_label()
    height, width = label.shape
    index = PathIndex(4, (height, width))
    bg_pos, fg_pos, neg = affinity_targets(label, index, num_classes)
    flat = label.reshape(-1).tolist()
    expected = torch.zeros(3, index.n_dirs, index.n_src)
    for d, row in enumerate(index.dst_indices.tolist()):
        for s, (src, dst) in enumerate(zip(index.src_indices.tolist(), row)):
            a, b = flat[src], flat[dst]
            if a >= num_classes or b >= num_classes:
                continue
            if a != b:
                expected[2, d, s] = 1
            elif a == 0:
                expected[0, d, s] = 1
            else:
                expected[1, d, s] = 1
    for target, want in zip((bg_pos, fg_pos, neg), expected):
        assert target.dtype == torch.float32
        assert torch.equal(target, want)
    assert (bg_pos + fg_pos + neg).max() == 1
    # Pairs touching 255 are never counted; different foreground classes are negatives (if valid).
    source = label.reshape(-1)[index.src_indices].expand_as(index.dst_indices)
    destination = label.reshape(-1)[index.dst_indices]
    touches_ignore = (source == 255) | (destination == 255)
    assert (bg_pos + fg_pos + neg)[touches_ignore].sum() == 0
    fg_fg = (source == 1) & (destination == 3)
    assert fg_fg.any()
    assert bool((neg[fg_fg] == 1).all()) == (num_classes > 3)


# ----------------------------------------------------------------------------- transition matrix, random walk
def dense_transition_matrix(edge: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """The original's dense recipe, in float64: padded PathIndex, COO -> dense, crop, power, column norm."""
    height, width = edge.shape
    padded_height, padded_width = height + radius, width + 2 * radius
    index = PathIndex(radius, (padded_height, padded_width))
    padded = F.pad(edge.double()[None], (radius, radius, 0, radius), value=1.0)
    aff = edge_to_affinity(padded.reshape(1, -1), index).reshape(-1)
    n = padded_height * padded_width
    ind_from = index.src_indices.repeat(index.n_dirs)
    ind_to = index.dst_indices.reshape(-1)
    diagonal = torch.arange(n)
    indices = torch.cat([torch.stack([ind_from, ind_to]), torch.stack([diagonal, diagonal]),
                         torch.stack([ind_to, ind_from])], dim=1)
    values = torch.cat([aff, torch.ones(n, dtype=torch.float64), aff])
    dense = torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=True).to_dense()
    dense = dense.view(padded_height, padded_width, padded_height, padded_width)
    dense = dense[:-radius, radius:-radius, :-radius, radius:-radius].reshape(height * width, height * width)
    scaled = dense.pow(beta)
    return scaled / scaled.sum(dim=0, keepdim=True)


def soft_edge(height: int, width: int, seed: int) -> torch.Tensor:
    """Low edges with a bright wall, so that the walk both spreads and stops."""
    generator = torch.Generator().manual_seed(seed)
    edge = 0.3 * torch.rand(height, width, generator=generator)
    edge[:, width // 2] = 0.95
    return edge


@pytest.mark.parametrize(("radius", "beta"), [(5, 10), (3, 2)])
def test_transition_matrix_equals_the_dense_recipe(radius, beta):
    edge = soft_edge(9, 11, seed=radius)
    sparse = transition_matrix(edge, radius=radius, beta=beta)
    assert sparse.layout == torch.sparse_csr and sparse.shape == (99, 99)
    dense = dense_transition_matrix(edge, radius, beta)
    torch.testing.assert_close(sparse.to_dense().double(), dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sparse.to_dense().sum(dim=0), torch.ones(99), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exp_times", [0, 1, 2, 3, 4])
def test_random_walk_equals_dense_matrix_powers(exp_times):
    height, width = 9, 11
    edge = soft_edge(height, width, seed=exp_times)
    cam = torch.rand(3, height, width, generator=torch.Generator().manual_seed(10 + exp_times))
    rw = random_walk(cam, edge, radius=5, beta=10, exp_times=exp_times)
    assert rw.shape == (3, height, width) and rw.dtype == torch.float32

    walk = torch.linalg.matrix_power(dense_transition_matrix(edge, 5, 10), 2**exp_times)
    x = (cam.double() * (1 - edge.double())).reshape(3, -1)
    expected = (x @ walk).reshape(3, height, width)
    torch.testing.assert_close(rw.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(rw, cam * (1 - edge), atol=1e-3)  # it did propagate


def test_random_walk_background_channel():
    height, width = 9, 11
    edge = soft_edge(height, width, seed=7)
    cam = torch.rand(2, height, width, generator=torch.Generator().manual_seed(3))
    rw = random_walk(cam, edge, radius=5, beta=10, exp_times=2, background=0.5)
    assert rw.shape == (3, height, width)
    background = (1 - cam.amax(dim=0, keepdim=True)).pow(0.5)
    channels = torch.cat([background, cam]).double() * (1 - edge.double())
    walk = torch.linalg.matrix_power(dense_transition_matrix(edge, 5, 10), 4)
    expected = (channels.reshape(3, -1) @ walk).reshape(3, height, width)
    torch.testing.assert_close(rw.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rw[1:], random_walk(cam, edge, exp_times=2))


def smooth_edge(height: int, width: int, seed: int) -> torch.Tensor:
    """A realistic edge map in [0, 1]: a blurred random field, squared (mostly low, with ridges)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, height + 4, width + 4, generator=generator)
    blurred = F.avg_pool2d(noise, kernel_size=5, stride=1)[0, 0]
    return ((blurred - blurred.min()) / (blurred.max() - blurred.min())) ** 2


def dense_walk(cam: torch.Tensor, edge: torch.Tensor, radius: int, beta: float, exp_times: int) -> torch.Tensor:
    """The original's walk in float64: ``x @ T^(2^exp_times)`` with the dense ``T`` squared ``exp_times`` times."""
    walk = dense_transition_matrix(edge, radius, beta)
    for _ in range(exp_times):
        walk = walk @ walk
    x = (cam.double() * (1 - edge.double())).reshape(len(cam), -1)
    return (x @ walk).reshape(cam.shape)


@pytest.mark.parametrize(("size", "radius", "beta", "exp_times"), [
    ((20, 17), 5, 10, 8), ((17, 24), 5, 10, 8), ((1, 7), 5, 10, 8), ((3, 2), 5, 10, 8), ((22, 4), 5, 10, 8),
    ((14, 18), 3, 2, 8), ((12, 11), 5, 2.5, 8), ((15, 13), 10, 10, 6),
])
def test_random_walk_at_full_length_equals_the_dense_original(size, radius, beta, exp_times):
    """Up to 256 products on smooth edges, grids narrower than the stencil included, against dense squaring.

    The float32 products drift from the float64 reference by up to ~7e-5 of the maximum at radius 5
    (the CSR walk before the stencil rewrite alike); radius 10 (305 terms a product) drifts ~5e-4
    over 256 products, so it is checked at 64.
    """
    edge = smooth_edge(*size, seed=sum(size))
    cam = torch.rand(2, *size, generator=torch.Generator().manual_seed(radius))
    rw = random_walk(cam, edge, radius=radius, beta=beta, exp_times=exp_times)
    expected = dense_walk(cam, edge, radius, beta, exp_times=exp_times)
    assert rw.shape == cam.shape and rw.dtype == torch.float32
    torch.testing.assert_close(rw.double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_transposed_transition_matrix_is_the_transpose():
    edge = smooth_edge(13, 10, seed=4)
    plain = transition_matrix(edge, radius=5, beta=10)
    transposed = transition_matrix(edge, radius=5, beta=10, transposed=True)
    assert transposed.layout == torch.sparse_csr and transposed.col_indices().dtype == torch.int32
    torch.testing.assert_close(transposed.to_dense(), plain.to_dense().t(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(transposed.to_dense().sum(dim=1), torch.ones(130), rtol=0, atol=1e-6)


@pytest.mark.parametrize("radius", [2, 5, 10])
def test_transition_stencil_is_the_diagonal_and_both_ends_of_every_direction(radius):
    stencil = transition_stencil(radius)
    offsets = [offset for offset, _ in stencil]
    directions = search_directions(radius)
    assert offsets == sorted(offsets) and len(offsets) == len(set(offsets)) == 2 * len(directions) + 1
    assert set(offsets) == {(0, 0), *directions, *((-dy, -dx) for dy, dx in directions)}
    for (dy, dx), path in stencil:
        if (dy, dx) == (0, 0):
            assert path == []
            continue
        if (dy, dx) in directions:
            expected = direction_path(dy, dx)
        else:  # the pair seen from its other end: the same pixels, relative to that end
            expected = [(y + dy, x + dx) for y, x in direction_path(-dy, -dx)]
        assert path == expected and {(0, 0), (dy, dx)} <= set(path)


def test_random_walk_rejects_a_radius_below_two():
    with pytest.raises(ValueError, match="radius"):
        random_walk(torch.rand(1, 6, 7), torch.rand(6, 7), radius=1)


@pytest.mark.skipif(not random_walk_module._thread_count_is_adjustable(), reason="native parallel backend")
def test_random_walk_runs_on_one_cpu_thread_and_restores_the_setting(monkeypatch):
    original = torch.get_num_threads()
    seen = []
    build = random_walk_module.transition_matrix

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return build(*args, **kwargs)

    monkeypatch.setattr(random_walk_module, "transition_matrix", spy)
    cam, edge = torch.rand(2, 8, 9), smooth_edge(8, 9, seed=1)
    try:
        torch.set_num_threads(2)
        random_walk(cam, edge, exp_times=1)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="radius"):  # raised inside the single-thread block
            random_walk(cam, edge, radius=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_walk_on_cuda_stays_there_and_matches_the_cpu():
    edge = smooth_edge(30, 23, seed=2)
    cam = torch.rand(3, 30, 23, generator=torch.Generator().manual_seed(2))
    on_gpu = random_walk(cam.cuda(), edge.cuda(), exp_times=8, background=1.0)
    assert on_gpu.device.type == "cuda"
    expected = random_walk(cam, edge, exp_times=8, background=1.0)
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_random_walk_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="random_walk"):
        random_walk(torch.rand(2, 6, 7), torch.rand(6, 8))


def test_normalize_rw_modes():
    rw = torch.tensor([[[1.0, 2.0]], [[0.5, 4.0]], [[0.0, 0.0]]])
    torch.testing.assert_close(normalize_rw(rw), rw / 4)
    torch.testing.assert_close(
        normalize_rw(rw, mode="per_class"), torch.tensor([[[0.5, 1.0]], [[0.125, 1.0]], [[0.0, 0.0]]])
    )
    assert torch.equal(normalize_rw(torch.zeros(2, 3, 3)), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="mode"):
        normalize_rw(rw, mode="max")


MEASURE_WALK = """
import json, resource, time, torch
from core.random_walk import random_walk
torch.set_num_threads({threads})
random_walk(torch.rand(2, 12, 16), torch.rand(12, 16), exp_times=1)  # library initialisation, not counted
height, width = {height}, {width}
generator = torch.Generator().manual_seed(0)
cam = torch.rand(3, height, width, generator=generator)
edge = torch.rand(height, width, generator=generator)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
rw = random_walk(cam, edge, radius=5, beta=10, exp_times=8)
seconds = time.perf_counter() - start
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"seconds": seconds, "growth_mib": growth_kib / 1024, "finite": bool(rw.isfinite().all()),
                  "shape": list(rw.shape), "threads": torch.get_num_threads()}}))
"""


@pytest.mark.parametrize("threads", [2, 1])
def test_random_walk_on_a_500x375_image_is_fast_and_lean(threads):
    """h4 x w4 = 125 x 94, 256 sparse products; a fresh process so that its peak RSS is the walk's.

    About 0.2 s and 30 MiB with either thread setting on two shared cores (the original: minutes, GBs;
    the CSR walk on two OpenMP threads: up to 7 s as soon as another process wanted a core).
    """
    height, width = math.ceil(500 / 4), math.ceil(375 / 4)
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_WALK.format(height=height, width=width, threads=threads)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["shape"] == [3, height, width] and stats["finite"]
    assert stats["threads"] == threads
    assert stats["seconds"] < 3
    assert stats["growth_mib"] < 64
