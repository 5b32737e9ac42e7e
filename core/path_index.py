"""Pixel pairs within a radius and the pixels on the path between them (docs/method.md §11.4).

``PathIndex`` enumerates, for every source pixel of an ``(h, w)`` grid, its neighbours within a radius
(a half-disc, so each unordered pair appears once) and the pixels on the straight path between them.
An edge map turns into affinities by ``1 - max(edge on the path)`` (``edge_to_affinity``). AffinityNet
trains those affinities against the pair labels of ``affinity_targets``; the random walk
(``core.random_walk``) builds its transition matrix from the same directions and paths.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def search_directions(radius: int) -> list[tuple[int, int]]:
    """The offsets ``(dy, dx)`` of a half-disc of radius ``radius``, in the original's order.

    ``(0, 1) .. (0, r-1)`` first, then every ``(y, x)`` with ``1 <= y < r``, ``|x| < r`` and
    ``x^2 + y^2 < r^2`` row by row. r = 10 gives 152 directions, r = 5 gives 34.
    """
    directions = [(0, x) for x in range(1, radius)]
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius * radius:
                directions.append((y, x))
    return directions


def direction_path(dy: int, dx: int) -> list[tuple[int, int]]:
    """The integer points of the box spanned by ``(0, 0)`` and ``(dy, dx)`` within distance 1 of the line.

    Sorted (stably) by descending ``|y| + |x|``, so the destination comes first and the source last.
    """
    length_sq = dy * dy + dx * dx
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq  # squared distance to the line below 1, in integers
    ]
    return sorted(points, key=lambda point: -abs(point[0]) - abs(point[1]))


class PathIndex:
    """Source, destination and path pixel indices of every neighbour pair on an ``(h, w)`` grid.

    With ``r_f = radius - 1`` the sources are the rows ``[0, h - r_f)`` and columns ``[r_f, w - r_f)``
    (row-major flat indices), so every destination ``(dy in [0, r_f], |dx| <= r_f)`` lies on the grid.
    Directions are grouped by path length in ascending order; within a group they keep the
    enumeration order of ``search_directions``.

    Attributes:
        paths: per length group, int64 ``(dirs_g, len_g, 2)`` path offsets, destination first.
        directions: int64 ``(n_dirs, 2)``, the destination offset of each direction, groups concatenated.
        path_indices: per length group, int64 ``(dirs_g, len_g, n_src)`` flat indices of the path pixels.
        src_indices: int64 ``(n_src,)`` flat indices of the sources.
        dst_indices: int64 ``(n_dirs, n_src)`` flat indices of the destinations.
    """

    def __init__(self, radius: int, size: tuple[int, int]) -> None:
        if not isinstance(radius, int) or radius < 2:
            raise ValueError(f"PathIndex radius must be an integer >= 2, got {radius!r}")
        height, width = (int(s) for s in size)
        self.radius = radius
        self.radius_floor = radius - 1
        self.size = (height, width)
        source_height = height - self.radius_floor
        source_width = width - 2 * self.radius_floor
        if source_height <= 0 or source_width <= 0:
            raise ValueError(
                f"PathIndex grid {height}x{width} is too small for radius {radius}: it needs "
                f"height > {self.radius_floor} and width > {2 * self.radius_floor}"
            )

        groups: dict[int, list[list[tuple[int, int]]]] = {}
        for dy, dx in search_directions(radius):
            path = direction_path(dy, dx)
            groups.setdefault(len(path), []).append(path)
        self.paths = [np.asarray(groups[length], dtype=np.int64) for length in sorted(groups)]
        self.directions = np.concatenate([paths[:, 0] for paths in self.paths])

        rows = np.arange(source_height, dtype=np.int64)[:, None]
        cols = np.arange(self.radius_floor, self.radius_floor + source_width, dtype=np.int64)[None, :]
        src = (rows * width + cols).reshape(-1)
        self.src_indices = torch.from_numpy(src)
        self.path_indices = [
            torch.from_numpy(src[None, None, :] + (paths[..., 0] * width + paths[..., 1])[..., None])
            for paths in self.paths
        ]
        self.dst_indices = torch.cat([indices[:, 0] for indices in self.path_indices])

    @property
    def n_dirs(self) -> int:
        return len(self.directions)

    @property
    def n_src(self) -> int:
        return len(self.src_indices)

    def __repr__(self) -> str:
        return f"PathIndex(radius={self.radius}, size={self.size}, n_dirs={self.n_dirs}, n_src={self.n_src})"


# ----------------------------------------------------------------------------- affinities and labels
def edge_to_affinity(edge: Tensor, path_index: PathIndex | Sequence[Tensor]) -> Tensor:
    """``(B, h*w)`` edge probabilities -> ``(B, n_dirs, n_src)`` affinities ``1 - max(edge on the path)``.

    The path includes both endpoints; the directions follow ``path_index.dst_indices``. ``path_index``
    is a ``PathIndex`` or its ``path_indices`` list (e.g. a model's buffers already on the device).
    """
    if isinstance(path_index, PathIndex):
        expected = path_index.size[0] * path_index.size[1]
        if edge[0].numel() != expected:
            raise ValueError(
                f"edge_to_affinity: edge has {edge[0].numel()} pixels per image but {path_index} "
                f"expects {expected}"
            )
        path_index = path_index.path_indices
    edge = edge.reshape(edge.shape[0], -1)
    affinities = []
    for indices in path_index:
        indices = indices.to(edge.device)
        on_path = edge.index_select(1, indices.reshape(-1)).view(edge.shape[0], *indices.shape)
        affinities.append(1.0 - on_path.max(dim=2).values)
    return torch.cat(affinities, dim=1)


def affinity_targets(label: Tensor, path_index: PathIndex, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise targets ``(bg_pos, fg_pos, neg)``, each float32 ``(n_dirs, n_src)``, from an ``(h, w)`` label map.

    A pair is valid when both labels are below ``num_classes`` (so 255 is ignored on either end).
    ``bg_pos``: valid, both background (0). ``fg_pos``: valid, the same foreground class.
    ``neg``: valid, different labels (two different foreground classes included).
    """
    if tuple(label.shape) != path_index.size:
        raise ValueError(f"affinity_targets: label map {tuple(label.shape)} does not match {path_index}")
    flat = label.reshape(-1).long()
    source = flat[path_index.src_indices.to(flat.device)].unsqueeze(0)
    destination = flat[path_index.dst_indices.to(flat.device)]
    valid = (source < num_classes) & (destination < num_classes)
    same = source == destination
    bg_pos = valid & same & (source == 0)
    fg_pos = valid & same & (source > 0)
    neg = valid & ~same
    return bg_pos.float(), fg_pos.float(), neg.float()
