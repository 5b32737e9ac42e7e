"""Readers of other codebases' CAM files: one per ``--format`` of ``tools.import_cams``.

A reader turns one peer file into ``PeerCams``: the dataset class ids (1..K-1, background excluded)
of its channels, in the peer's order, and its maps ``(n, h, w)`` as the peer saved them, at stride 4
(``cam``) and / or at the photo's size (``hr_cam``). The checks, the class order, the missing
resolution and the scaling are ``tools.import_cams``'s, the same for every format. Each format
follows the peer's own saving code (``np.save(path, dict)`` writes a pickled dict):

``semformer``: JLChen-C/SemFormer ``inference_semformer.py``. ``<id>.npy`` =
    ``dict(keys=np.pad(keys + 1, (1, 0)), cam=strided_cams.cpu().numpy(), hr_cam=hr_cams.cpu().numpy())``
    with ``keys = torch.nonzero(label)[:, 0]``: ``keys`` int64 ``(n+1,)`` = background 0, then the
    1-based class ids (ascending); ``cam`` float32 ``(n, ceil(H/4), ceil(W/4))``; ``hr_cam`` float32
    ``(n, H, W)`` (resized to a multiple of 16, then cropped); each divided by its max + 1e-5.
``puzzlecam``: shjo-april/PuzzleCAM (formerly OFRIN/PuzzleCAM) ``inference_classification.py``: the
    same keys and ``hr_cam``, but ``cam`` is the torch tensor ``strided_cams.cpu()`` inside the pickle.
``irn``: jiwoon-ahn/irn ``step/make_cam.py``. ``<id>.npy`` = ``{"keys": valid_cat, "cam":
    strided_cam.cpu(), "high_res": highres_cam.cpu().numpy()}`` with ``valid_cat =
    torch.nonzero(label)[:, 0]``: ``keys`` a torch int64 tensor ``(n,)`` of 0-based class indices,
    no background (its readers use ``np.pad(keys + 1, (1, 0))``); ``cam`` a torch float32 tensor
    ``(n, ceil(H/4), ceil(W/4))``; ``high_res`` float32 numpy ``(n, H, W)``; each divided by max + 1e-5.
    jbeomlee93/AdvCAM, zhaozhengChen/ReCAM and CVI-SZU/CLIMS ``step/make_cam.py`` save the same dict.
    gaviotas/AMN ``step/make_amn_cam.py`` keeps those keys but saves ``n + 1`` channels, the
    background's first (its ``step/amn_cam_to_ir_label.py`` drops it: ``cams[1:]``): with ``n + 1``
    channels the first is dropped.
``clip-es``: linyq2117/CLIP-ES ``generate_cams_voc12.py``. ``<id>.npy`` = ``{"keys":
    torch.tensor(keys).numpy(), "attn_highres": refined.numpy().astype(np.float16)}``: ``keys`` int64
    ``(n,)`` = ``new_class_names.index(name)``, 0-based class indices without background, in the
    order the objects appear in the XML (not sorted; its ``eval_cam.py`` uses ``keys + 1``);
    ``attn_highres`` float16 ``(n, H, W)``, min-max scaled (pytorch_grad_cam's ``scale_cam_image``)
    and cv2-resized to the photo. No stride-4 map. The 0-based indices follow the descriptor's class
    order, which for VOC is CLIP-ES's ``class_names`` order.
``dense``: a plain array per image, no pickle: ``<id>.npy`` (``np.save`` of an array) or ``<id>.npz``
    holding exactly one array. Shape ``(C, h, w)``: ``C`` = K (every class, background channel 0,
    which is dropped), K - 1 (every foreground class in class order) or n (the image's labels, in
    ascending class order); the shape decides, since n <= K - 1 and n = K - 1 reads the same either
    way. The channels of the image's labels are kept. ``(h, w)`` is the photo's size or its stride-4
    grid ``(ceil(H/4), ceil(W/4))``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.npyio import NpzFile

from core.conventions import CAM_STRIDE, strided_size
from tools.artifacts.files import ArtifactError

NPY_SUFFIX = ".npy"
NPZ_SUFFIX = ".npz"


@dataclass(frozen=True)
class ImageFacts:
    """What the dataset says about one image: its label class ids ``(n,)`` (ascending, 1..K-1), its
    photo's ``(H, W)`` and the dataset's class count K (with background)."""

    labels: np.ndarray
    size: tuple[int, int]
    num_classes: int


@dataclass(frozen=True)
class PeerCams:
    """One peer file: ``classes`` ``(n,)`` dataset class ids of its channels, in the file's order, and
    ``maps``: ``'cam'`` and / or ``'hr_cam'`` -> ``(peer array name, float (n, h, w) array)``."""

    classes: np.ndarray
    maps: dict[str, tuple[str, np.ndarray]]


Reader = Callable[[Path, ImageFacts], PeerCams]


@dataclass(frozen=True)
class CamFormat:
    """A peer's file layout: the suffixes of its files, whether they are pickles, and their reader."""

    suffixes: tuple[str, ...]
    pickled: bool
    read: Reader


def as_array(value: object) -> np.ndarray:
    """A numpy array of a value from a peer's pickle (a CPU torch tensor or an array)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def load_pickled_dict(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a pickled ``np.save(path, dict)`` file (unpickles: trusted files only)."""
    try:
        content = np.load(path, allow_pickle=True)
        content = content.item() if content.dtype == object and content.shape == () else None
    except Exception as error:  # a damaged pickle, a CUDA tensor on a machine without one, ...
        raise ArtifactError(f"{path}: cannot read the pickled CAM dict ({error})") from error
    if not isinstance(content, dict):
        raise ArtifactError(f"{path}: not a pickled dict, as np.save(path, dict) writes; check --format")
    absent = [name for name in names if name not in content]
    if absent:
        raise ArtifactError(f"{path}: no '{absent[0]}' entry (has {sorted(map(str, content))}); check --format")
    return {name: as_array(content[name]) for name in names}


def class_ids(keys: np.ndarray, path: Path, offset: int) -> np.ndarray:
    """The dataset class ids of a 1-D integer ``keys`` array: ``keys + offset``."""
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise ArtifactError(f"{path}: 'keys' must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    return keys.astype(np.int64) + offset


def read_semformer(path: Path, image: ImageFacts) -> PeerCams:
    """SemFormer / PuzzleCAM: ``keys`` = 0 then 1-based ids; ``cam`` and ``hr_cam`` one channel per id."""
    arrays = load_pickled_dict(path, ("keys", "cam", "hr_cam"))
    keys = class_ids(arrays["keys"], path, 0)
    if len(keys) == 0 or keys[0] != 0:
        raise ArtifactError(f"{path}: 'keys' {keys.tolist()} must start with the background 0, as SemFormer and "
                            "PuzzleCAM write them; check --format")
    return PeerCams(keys[1:], {"cam": ("cam", arrays["cam"]), "hr_cam": ("hr_cam", arrays["hr_cam"])})


def read_irn(path: Path, image: ImageFacts) -> PeerCams:
    """IRN family: ``keys`` 0-based without background; AMN's extra background channel is dropped."""
    arrays = load_pickled_dict(path, ("keys", "cam", "high_res"))
    classes = class_ids(arrays["keys"], path, 1)
    maps = {}
    for ours, theirs in (("cam", "cam"), ("hr_cam", "high_res")):
        values = arrays[theirs]
        maps[ours] = (theirs, values[1:] if values.ndim == 3 and len(values) == len(classes) + 1 else values)
    return PeerCams(classes, maps)


def read_clip_es(path: Path, image: ImageFacts) -> PeerCams:
    """CLIP-ES: ``keys`` 0-based in XML order, full-size float16 ``attn_highres`` only."""
    arrays = load_pickled_dict(path, ("keys", "attn_highres"))
    return PeerCams(class_ids(arrays["keys"], path, 1), {"hr_cam": ("attn_highres", arrays["attn_highres"])})


def load_plain_array(path: Path) -> np.ndarray:
    """The one array of a plain ``.npy`` or ``.npz`` file, read without unpickling."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, NpzFile):
            return loaded
        with loaded:
            if len(loaded.files) != 1:
                raise ArtifactError(f"{path}: a dense .npz must hold exactly one array, found {loaded.files}")
            return loaded[loaded.files[0]]
    except ArtifactError:
        raise
    except Exception as error:  # a damaged file, or an object array that only pickle could read
        raise ArtifactError(f"{path}: cannot read a plain dense array ({error}); pickled dicts need another "
                            "--format") from error


def read_dense(path: Path, image: ImageFacts) -> PeerCams:
    """A dense ``(C, h, w)`` array: C = K, K - 1 or n (see the module docstring); full size or stride 4."""
    values = load_plain_array(path)
    labels, (height, width) = image.labels, image.size
    if values.ndim != 3:
        raise ArtifactError(f"{path}: a dense CAM must be (C, h, w), got shape {values.shape}")
    channels = len(values)
    if channels == image.num_classes:
        values = values[labels]
    elif channels == image.num_classes - 1:
        values = values[labels - 1]
    elif channels != len(labels):
        raise ArtifactError(f"{path}: {channels} channels, but a dense CAM has {image.num_classes} (background and "
                            f"every class), {image.num_classes - 1} (every class) or {len(labels)} (one per label "
                            "of the image)")
    grids = {(height, width): "hr_cam", strided_size(height, width): "cam"}
    resolution = grids.get(tuple(values.shape[1:]))
    if resolution is None:
        grid = strided_size(height, width)
        raise ArtifactError(f"{path}: maps of {values.shape[1]}x{values.shape[2]}, but the photo is {height}x{width} "
                            f"(or its stride-{CAM_STRIDE} grid {grid[0]}x{grid[1]})")
    return PeerCams(labels, {resolution: ("dense", values)})


FORMATS: dict[str, CamFormat] = {
    "semformer": CamFormat((NPY_SUFFIX,), True, read_semformer),
    "puzzlecam": CamFormat((NPY_SUFFIX,), True, read_semformer),
    "irn": CamFormat((NPY_SUFFIX,), True, read_irn),
    "clip-es": CamFormat((NPY_SUFFIX,), True, read_clip_es),
    "dense": CamFormat((NPY_SUFFIX, NPZ_SUFFIX), False, read_dense),
}
