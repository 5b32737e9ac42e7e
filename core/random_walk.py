"""Pixel affinities from an edge map and the random walk that propagates CAMs along them (METHOD.md part 2).

``PathIndex`` enumerates, for every source pixel of an ``(h, w)`` grid, its neighbours within a radius
(a half-disc, so each unordered pair appears once) and the pixels on the straight path between them.
An edge map turns into affinities by ``1 - max(edge on the path)``. AffinityNet trains those
affinities against labels from ``affinity_targets``; at inference they define a column-stochastic
transition matrix ``T`` and the CAMs are propagated as ``x @ T^(2^exp_times)``.

The original builds ``T`` as a dense ``(h*w)^2`` matrix (about 1 GB at 500x500) and squares it
``exp_times`` times. ``T`` has at most ``2 * n_dirs + 1`` entries per column, so here it is kept
sparse (CSR) and ``x`` is multiplied by it ``2^exp_times`` times, which gives the same result up
to float rounding in a few MB of memory.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RW_RADIUS = 5
RW_BETA = 10
RW_EXP_TIMES = 8
EDGE_PADDING_VALUE = 1.0


# ----------------------------------------------------------------------------- path index
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


# ----------------------------------------------------------------------------- transition matrix
def _image_affinity_pairs(edge: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """Neighbour pairs ``(a, b)`` of the ``(h, w)`` image, each unordered pair once, and their affinity.

    As in the original: the edge map is padded with 1.0 (``radius`` columns left and right, ``radius``
    rows at the bottom) so that every image pixel is a source of ``PathIndex(radius, padded size)``;
    pairs with an end in the padding are dropped (the original crops them off its dense matrix).
    """
    height, width = edge.shape
    padded = F.pad(edge.unsqueeze(0), (radius, radius, 0, radius), value=EDGE_PADDING_VALUE)[0]
    padded_width = padded.shape[1]
    path_index = PathIndex(radius, tuple(padded.shape))
    affinity = edge_to_affinity(padded.reshape(1, -1), path_index)[0]

    def to_image(flat: Tensor) -> tuple[Tensor, Tensor]:
        y, x = flat // padded_width, flat % padded_width - radius
        return y * width + x, (y < height) & (x >= 0) & (x < width)

    destination = path_index.dst_indices.to(edge.device)
    source = path_index.src_indices.to(edge.device).expand_as(destination)
    source, source_inside = to_image(source)
    destination, destination_inside = to_image(destination)
    keep = source_inside & destination_inside
    return source[keep], destination[keep], affinity[keep]


def _transition_entries(edge: Tensor, radius: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Row, column and value of every nonzero entry of the column-stochastic ``T`` of an ``(h, w)`` edge map.

    ``A`` holds the affinity of each neighbour pair in both directions and 1 on the diagonal;
    ``T = A^beta / colsum(A^beta)`` (power elementwise).
    """
    height, width = edge.shape
    n_pixels = height * width
    a, b, affinity = _image_affinity_pairs(edge.float(), radius)
    diagonal = torch.arange(n_pixels, device=edge.device)
    rows = torch.cat([a, b, diagonal])
    cols = torch.cat([b, a, diagonal])
    values = torch.cat([affinity, affinity, torch.ones(n_pixels, device=edge.device)]).pow(beta)
    column_sums = torch.zeros(n_pixels, device=edge.device).index_add_(0, cols, values)
    return rows, cols, values / column_sums[cols]


def _csr_matrix(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> Tensor:
    """A square ``(n, n)`` CSR tensor from COO entries without duplicates."""
    order = torch.argsort(rows * n + cols)
    crow_indices = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow_indices[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow_indices, cols[order], values[order], (n, n), check_invariants=False)


def transition_matrix(edge: Tensor, radius: int = RW_RADIUS, beta: float = RW_BETA) -> Tensor:
    """Sparse CSR ``(N, N)``, ``N = h*w``: the column-stochastic random-walk matrix of an ``(h, w)`` edge map.

    Equal to the original's dense matrix (``A^beta`` normalised so that every column sums to 1).
    """
    if edge.dim() != 2:
        raise ValueError(f"transition_matrix: edge must be (h, w), got {tuple(edge.shape)}")
    rows, cols, values = _transition_entries(edge, radius, beta)
    return _csr_matrix(rows, cols, values, edge.numel())


# ----------------------------------------------------------------------------- random walk
def random_walk(
    cam: Tensor,
    edge: Tensor,
    radius: int = RW_RADIUS,
    beta: float = RW_BETA,
    exp_times: int = RW_EXP_TIMES,
    background: float | None = None,
) -> Tensor:
    """Propagate ``(n, h, w)`` CAMs on the ``(h, w)`` edge map: ``x @ T^(2^exp_times)`` with ``x = cam * (1 - edge)``.

    ``T^(2^exp_times)`` is never formed: ``x`` is multiplied ``2^exp_times`` times by the sparse ``T``,
    which equals the original's repeated squaring of the dense ``T`` up to float rounding.

    ``background=None`` reproduces the original (foreground channels only; the output is ``(n, h, w)``).
    A number ``alpha`` prepends a background channel ``(1 - max_c cam)^alpha`` (as in AffinityNet/PSA,
    ``1 - max`` clamped at 0), which is propagated with the others; the output is then ``(n + 1, h, w)``
    with the background at index 0. Normalising the result is up to the caller (``normalize_rw``).
    """
    if cam.dim() != 3 or edge.shape != cam.shape[1:]:
        raise ValueError(
            f"random_walk: expected cam (n, h, w) and edge (h, w), got {tuple(cam.shape)} and {tuple(edge.shape)}"
        )
    if exp_times < 0:
        raise ValueError(f"random_walk: exp_times must be >= 0, got {exp_times}")
    height, width = edge.shape
    edge = edge.float()
    signal = cam.float()
    if background is not None:
        peak = signal.amax(dim=0) if len(signal) else torch.zeros_like(edge)
        signal = torch.cat([(1.0 - peak).clamp(min=0.0).pow(background).unsqueeze(0), signal])
    state = (signal * (1.0 - edge)).reshape(-1, height * width)
    if len(state) == 0:
        return state.reshape(0, height, width)

    rows, cols, values = _transition_entries(edge, radius, beta)
    transposed = _csr_matrix(cols, rows, values, height * width)  # x @ T == (T^T @ x^T)^T
    state = state.t().contiguous()
    for _ in range(2**exp_times):
        state = transposed @ state
    return state.t().reshape(-1, height, width)


def normalize_rw(rw: Tensor, mode: Literal["global", "per_class"] = "global") -> Tensor:
    """Scale ``(n, H, W)`` random-walk scores to a maximum of 1.

    ``global`` (the original): one max over all channels and pixels. ``per_class``: each channel by its
    own max. All-zero channels (or maps) stay zero instead of turning into NaN.
    """
    if mode == "global":
        peak = rw.max() if rw.numel() else rw.new_ones(())
    elif mode == "per_class":
        peak = rw.amax(dim=(-2, -1), keepdim=True)
    else:
        raise ValueError(f"normalize_rw: mode must be 'global' or 'per_class', got {mode!r}")
    return rw / torch.where(peak > 0, peak, torch.ones_like(peak))
