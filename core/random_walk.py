"""The random walk that propagates CAMs along AffinityNet's pixel affinities (docs/method.md §5).

The affinities of an edge map (``1 - max(edge on the path)`` between the pairs of ``core.path_index``)
define a column-stochastic transition matrix ``T`` and the CAMs are propagated as ``x @ T^(2^exp_times)``.

The original builds ``T`` as a dense ``(h*w)^2`` matrix (about 1 GB at 500x500) and squares it
``exp_times`` times (41-44 s and 309 MiB on a 75x57 grid). ``T`` has at most ``K = 2 * n_dirs + 1``
entries per column, at the same offsets for every pixel (a banded stencil), so here:

* ``T`` is built in stencil form: ``(h, w, K)`` maps sliced out of the padded edge map
  (``transition_stencil``), turned into a CSR of ``T^T`` with int32 indices, without a ``PathIndex``
  of the padded grid or a sort. The CAMs are multiplied by it ``2^exp_times`` times, which gives
  the original's result up to float rounding (in float32 ~1e-4 of the maximum after 256 products
  at radius 5, several times that at radius 10, as before). The column sums of ``T`` are
  accumulated in float64, so that they round to 1 without a bias that the products would compound.
* On the CPU the walk runs on ``WALK_CPU_THREADS`` intra-op thread, and torch's setting is restored
  afterwards (the native parallel backend, which could not restore it, keeps its setting). The 256
  products are small (~0.2 ms each at 75x57): a second OpenMP thread gains nothing measurable on a
  quiet machine and waits for a scheduler slice at every product as soon as another process wants
  a core (the walk took up to 4.4 s instead of 0.07 s then). Dense-by-CSR, COO ``sparse.mm``, gather and
  shifted-slice stencil products measured 3.5-50x slower than int32 CSR-by-dense on one thread.

On two shared cores a 75x57 walk (2 classes, radius 5, exp_times 8) takes 0.07 s with either thread
setting and grows the peak RSS by ~9-11 MiB; 125x94 takes 0.2 s and ~25-32 MiB
(``python -m tools.bench --stage random_walk --repeat 5``; that tool counts from process start, 35-38 MiB).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from core.conventions import CAM_STRIDE
from core.path_index import direction_path, search_directions

RW_RADIUS = 5
RW_BETA = 10
RW_EXP_TIMES = 8
EDGE_PADDING_VALUE = 1.0
WALK_CPU_THREADS = 1  # see the module docstring
OPENMP_BACKEND = "OpenMP"  # as torch.__config__.parallel_info() names it
NORMALISER_DTYPE = torch.float64  # T's column sums: summed in float32 they bias the walk's mass over 256 products


# ----------------------------------------------------------------------------- transition matrix
def transition_stencil(radius: int) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """The ``2 * n_dirs + 1`` offsets ``o = (dy, dx)`` at which a column of ``T`` can be nonzero, with their paths.

    ``T[p + o, p]`` is nonzero only for ``o`` = ``(0, 0)`` (the diagonal) or ``±d`` for ``d`` in
    ``search_directions(radius)``. Each offset comes with the path points ``q`` whose edges
    ``edge[p + q]`` decide the affinity of ``p`` and ``p + o``: ``direction_path(d)`` for ``+d``, the same
    points shifted by ``-d`` for ``-d`` (the pair seen from its other end), none for the diagonal.
    Sorted by ``(dy, dx)``, which is the order of the flat indices ``p + o`` of the neighbours that lie
    on the grid, so a row of the CSR built from them needs no sort.
    """
    if not isinstance(radius, int) or radius < 2:
        raise ValueError(f"random walk radius must be an integer >= 2, got {radius!r}")
    stencil = [((0, 0), [])]
    for dy, dx in search_directions(radius):
        path = direction_path(dy, dx)
        stencil.append(((dy, dx), path))
        stencil.append(((-dy, -dx), [(y - dy, x - dx) for y, x in path]))
    return sorted(stencil, key=lambda entry: entry[0])


def _shifted(padded: Tensor, reach: int, size: tuple[int, int], dy: int, dx: int) -> Tensor:
    """The ``size`` view of ``padded`` (an ``(h, w)`` map padded by ``reach`` on every side) at ``p + (dy, dx)``."""
    top, left = reach + dy, reach + dx
    return padded[top : top + size[0], left : left + size[1]]


def _path_affinity(padded: Tensor, reach: int, path: list[tuple[int, int]], out: Tensor) -> Tensor:
    """Write ``1 - max_q edge[p + q]`` over the path points ``q`` into the ``(h, w)`` ``out``.

    An empty path (the diagonal) gives 1. ``padded`` is the edge map padded by ``reach``.
    """
    if not path:
        return out.fill_(1.0)
    out.copy_(_shifted(padded, reach, out.shape, *path[0]))
    for dy, dx in path[1:]:
        torch.maximum(out, _shifted(padded, reach, out.shape, dy, dx), out=out)
    return out.neg_().add_(1.0)


def _inside(offsets: Tensor, length: int) -> Tensor:
    """Bool ``(K, length)``: whether ``i + offsets[k]`` lies in ``[0, length)`` for every ``i < length``."""
    shifted = torch.arange(length, device=offsets.device) + offsets[:, None]
    return (shifted >= 0) & (shifted < length)


def _affinity_stencil(edge: Tensor, radius: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """``A^beta`` of an ``(h, w)`` edge map in stencil form: offsets, weights and where they exist.

    Returns int64 ``(K, 2)`` offsets (``transition_stencil``), float ``(h, w, K)`` weights
    ``A[p, p + o_k]^beta`` (0 where ``p + o_k`` is off the grid) and bool ``(h, w, K)`` ``valid``
    (``p + o_k`` on the grid), pixel-major like the CSR's entries. ``A`` is the original's:
    ``1 - max(edge on the path)`` for neighbours, 1 on the diagonal. The path of two pixels on the
    grid stays inside their bounding box, so the original's padding with ``EDGE_PADDING_VALUE`` never
    reaches a kept pair; it only fills the off-grid entries, which ``valid`` drops. Built in place:
    one ``(h, w, K)`` float map and one bool map.
    """
    height, width = edge.shape
    reach = radius - 1
    stencil = transition_stencil(radius)
    padded = F.pad(edge, (reach, reach, reach, reach), value=EDGE_PADDING_VALUE)
    weights = edge.new_empty(height, width, len(stencil))
    for k, (_, path) in enumerate(stencil):
        _path_affinity(padded, reach, path, weights[..., k])
    offsets = torch.tensor([offset for offset, _ in stencil], dtype=torch.int64, device=edge.device)
    valid = _inside(offsets[:, 0], height).t()[:, None, :] & _inside(offsets[:, 1], width).t()[None, :, :]
    weights.pow_(beta).masked_fill_(~valid, 0.0)
    return offsets, weights, valid


def _offset_sum(weights: Tensor) -> Tensor:
    """``(h, w)`` sums of ``(h, w, K)`` weights over ``K``, accumulated in ``NORMALISER_DTYPE``, returned in theirs.

    One offset at a time: ``sum(dtype=...)`` would first copy all the weights to that dtype.
    The sums are at least 1 (the diagonal's weight).
    """
    sums = weights.new_zeros(weights.shape[:2], dtype=NORMALISER_DTYPE)
    for k in range(weights.shape[2]):
        sums.add_(weights[..., k])
    return sums.to(weights.dtype)


def _stencil_csr(offsets: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """The ``(N, N)`` CSR, ``N = h*w``, whose row ``p`` holds ``values[p, k]`` at column ``p + o_k`` where ``valid``.

    ``offsets`` int64 ``(K, 2)`` sorted by ``(dy, dx)``, ``values`` float ``(h, w, K)``, ``valid`` bool
    ``(h, w, K)``. Indices are int32 when they fit, which lets the CPU product use MKL without
    converting them at every call (about 1.5x faster than int64) and halves their memory.
    """
    height, width, n_offsets = values.shape
    n_pixels = height * width
    index_dtype = torch.int32 if n_offsets * n_pixels <= torch.iinfo(torch.int32).max else torch.int64
    flat_offsets = (offsets[:, 0] * width + offsets[:, 1]).to(index_dtype)
    keep = valid.reshape(n_pixels, n_offsets)
    crow_indices = torch.zeros(n_pixels + 1, dtype=index_dtype, device=values.device)
    crow_indices[1:] = keep.sum(dim=1, dtype=index_dtype).cumsum(dim=0)
    entries = values.reshape(n_pixels, n_offsets).masked_select(keep)
    pixels = torch.arange(n_pixels, dtype=index_dtype, device=values.device)
    col_indices = (pixels[:, None] + flat_offsets[None, :]).masked_select(keep)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow_indices, col_indices, entries, (n_pixels, n_pixels),
                                       check_invariants=False)


def transition_matrix(
    edge: Tensor, radius: int = RW_RADIUS, beta: float = RW_BETA, transposed: bool = False
) -> Tensor:
    """Sparse CSR ``(N, N)``, ``N = h*w``: the column-stochastic random-walk matrix ``T`` of an ``(h, w)`` edge map.

    Equal to the original's dense matrix: ``T = A^beta / colsum(A^beta)`` (power elementwise), so
    ``T[p + o, p] = A[p, p + o]^beta / s_p`` with ``s_p = sum_o A[p, p + o]^beta`` (``A`` is symmetric).
    ``transposed=True`` gives ``T^T``, whose row ``p`` is column ``p`` of ``T``: ``x @ T == (T^T @ x^T)^T``
    is how the walk multiplies. Both share the stencil structure; only the normaliser differs
    (``s`` of the row for ``T^T``, of the column for ``T``).
    """
    if edge.dim() != 2:
        raise ValueError(f"transition_matrix: edge must be (h, w), got {tuple(edge.shape)}")
    edge = edge.float()
    offsets, weights, valid = _affinity_stencil(edge, radius, beta)
    sums = _offset_sum(weights)
    if transposed:
        weights.div_(sums[..., None])
    else:
        reach = radius - 1
        padded_sums = F.pad(sums, (reach, reach, reach, reach), value=1.0)
        for k, (dy, dx) in enumerate(offsets.tolist()):
            weights[..., k].div_(_shifted(padded_sums, reach, sums.shape, dy, dx))
    return _stencil_csr(offsets, weights, valid)


# ----------------------------------------------------------------------------- random walk
@cache
def _thread_count_is_adjustable() -> bool:
    """Whether torch's intra-op thread count can be changed back and forth: with the OpenMP backend.

    The native backend (e.g. macOS wheels) ignores ``set_num_threads`` with a warning once parallel
    work has started, and before that a cap would stick for the rest of the process.
    """
    return f"parallel backend: {OPENMP_BACKEND}" in torch.__config__.parallel_info()


@contextmanager
def _cpu_threads_at_most(limit: int, device: torch.device) -> Iterator[None]:
    """Cap torch's intra-op CPU threads at ``limit`` inside the block; the previous setting is restored after.

    Restored on exceptions too; a no-op off the CPU, when the setting is already at most ``limit`` or
    when the backend cannot restore it (``_thread_count_is_adjustable``). The cap is process-wide
    while it lasts (other Python threads running torch ops see it as well).
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous <= limit or not _thread_count_is_adjustable():
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def random_walk(
    cam: Tensor,
    edge: Tensor,
    radius: int = RW_RADIUS,
    beta: float = RW_BETA,
    exp_times: int = RW_EXP_TIMES,
    background: float | None = None,
) -> Tensor:
    """Propagate ``(n, h, w)`` CAMs on the ``(h, w)`` edge map: ``x @ T^(2^exp_times)`` with ``x = cam * (1 - edge)``.

    ``T^(2^exp_times)`` is never formed: ``x^T`` ``(N, n)``, ``N = h*w``, is multiplied ``2^exp_times``
    times by the sparse ``T^T``, which equals the original's repeated squaring of the dense ``T`` up
    to float rounding. It runs on the inputs' device; on the CPU on ``WALK_CPU_THREADS`` thread(s),
    torch's setting being restored afterwards (see the module docstring).

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
    with _cpu_threads_at_most(WALK_CPU_THREADS, edge.device):
        edge = edge.float()
        signal = cam.float()
        if background is not None:
            peak = signal.amax(dim=0) if len(signal) else torch.zeros_like(edge)
            signal = torch.cat([(1.0 - peak).clamp(min=0.0).pow(background).unsqueeze(0), signal])
        if len(signal) == 0:
            return signal.reshape(0, height, width)
        state = (signal * (1.0 - edge)).reshape(-1, height * width).t().contiguous()
        transposed = transition_matrix(edge, radius, beta, transposed=True)
        for _ in range(2**exp_times):
            state = transposed @ state
        return state.t().reshape(-1, height, width)


def walk_to_image(rw: Tensor, height: int, width: int, mode: Literal["global", "per_class"] = "global") -> Tensor:
    """The stride-4 walk ``(n, h, w)`` at the photo's size ``(n, H, W)`` (bilinear x4, cropped), normalised
    by ``normalize_rw``; an image without classes (``n = 0``) gives ``(0, H, W)``."""
    if len(rw) == 0:
        return rw.new_zeros((0, height, width))
    upsampled = F.interpolate(rw[None], scale_factor=CAM_STRIDE, mode="bilinear", align_corners=False)[0]
    return normalize_rw(upsampled[:, :height, :width], mode)


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
