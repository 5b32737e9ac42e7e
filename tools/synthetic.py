"""Synthetic weakly-supervised segmentation dataset in the PASCAL VOC layout (or MS COCO 2014's).

Every stage runs on it unchanged, so the whole pipeline can be trained and tested on a CPU in
minutes. Each of the K object classes is a shape family with its own hue range and texture; some
classes share a hue range or a texture, so only shape, colour and texture together tell them apart.
Images hold 1-3 objects at random positions, scales and rotations, drawn in order (later ones
occlude earlier ones), on cluttered backgrounds with distractor shapes that belong to no class.

Layout written under ``--out`` (as VOC 2012 + SBD)::

    JPEGImages/<id>.jpg            RGB photo
    Annotations/<id>.xml           VOC XML, one <object> per visible object, 1-based boxes
    SegmentationClass/<id>.png     palette PNG: 0 background, 1..K classes, 255 ignore band
    SegmentationClassAug/<id>.png  the same masks
    train_aug.txt, train.txt, val.txt
    dataset.json                   descriptor, written last

With ``--format coco`` the same shapes are written as MS COCO 2014 ships (for ``tools.prepare_coco``)::

    train2014/COCO_train2014_<image id, 12 digits>.jpg, val2014/...
    annotations/instances_train2014.json, instances_val2014.json

with category ids that have gaps, polygons, compressed and uncompressed RLEs, crowd regions, objects
whose annotations overlap (the smaller drawn on top) and images without annotations. There is no ignore
band; ``coco_sample`` gives an image's ground truth mask (crowd regions 255).

Usage::

    python -m tools.synthetic --out demo_data/synthetic --num_classes 6
    python -m tools.synthetic --stats demo_data/synthetic
    python -m tools.synthetic --format coco --out demo_data/synthetic_coco
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from core.conventions import IGNORE_INDEX
from tools.arguments import StageArgumentParser
from tools.artifacts import atomic_write_bytes, atomic_write_text, save_png
from tools.descriptor import load_descriptor, voc_palette, write_descriptor
from tools.reader import VOCReader

JPEG_QUALITY = 95
SPLIT_SEEDS = {"train": 0, "val": 1}
OBJECT_COUNT_PROBABILITIES = (0.40, 0.35, 0.25)  # 1, 2 or 3 objects per image
OBJECT_DIAMETER_RANGE = (0.3, 0.7)  # circumscribed circle, fraction of the short side
DISTRACTOR_COUNT_RANGE = (1, 3)
DISTRACTOR_RADIUS_RANGE = (0.08, 0.22)  # fraction of the short side
MIN_VISIBLE_FRACTION = 0.03  # objects less visible than this are dropped from labels and mask
IGNORE_BAND_KERNEL = np.ones((3, 3), np.uint8)  # 2 px band straddling every object boundary
HUE_SPREAD = 15.0  # degrees either side of a class's hue
MIN_TEXTURE_PERIOD = 4.0  # pixels
SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision
COVERAGE_THRESHOLD = 0.5  # a pixel belongs to a shape where its anti-aliased coverage reaches this
PHOTO_NOISE = 0.012  # standard deviation of the sensor noise added last
MAX_LAYOUT_ATTEMPTS = 50
FORMATS = ("voc", "coco")
COCO_SPLIT_FOLDERS = {"train": "train2014", "val": "val2014"}
COCO_CATEGORY_IDS = (1, 3, 4, 8, 13, 15, 20, 27, 31, 44, 46, 90)  # ids with gaps, as COCO's 1..90
COCO_IMAGE_ID_STRIDE = 3
ANNOTATION_ID_BLOCK = 10  # the annotations of image i have ids i * 10 + 0..9
UNANNOTATED_PERIOD = 8  # images 7, 15, ... of a split show no object and have no annotation
CROWD_PERIOD = 3  # images 1, 4, ... (annotated ones) have a crowd region
CROWD_MEMBER_RANGE = (3, 5)
CROWD_DIAMETER_RANGE = (0.12, 0.25)  # crowd members, fraction of the short side
COCO_PIXEL_CENTRE = 0.5  # COCO polygons centre pixel (x, y) on (x + 0.5, y + 0.5), cv2 on (x, y)
POLYGON_DECIMALS = 2  # as in COCO's JSON


@dataclass(frozen=True)
class ClassSpec:
    """One object class: its name (also its shape family), hue range centre (degrees), texture and period."""

    name: str
    hue: float
    texture: str
    period: float  # texture period as a fraction of the object's radius


# Pairs share cues on purpose: disc/ring and square/cross share hues, disc/cross and triangle/ring
# share textures, so a classifier must combine shape, colour and texture.
CLASS_SPECS = (
    ClassSpec("disc", 0.0, "stripes", 0.45),
    ClassSpec("square", 220.0, "checker", 0.50),
    ClassSpec("triangle", 120.0, "dots", 0.45),
    ClassSpec("star", 50.0, "rings", 0.40),
    ClassSpec("ring", 12.0, "dots", 0.40),
    ClassSpec("cross", 232.0, "stripes", 0.40),
    ClassSpec("hexagon", 28.0, "grid", 0.50),
    ClassSpec("ellipse", 280.0, "zigzag", 0.45),
    ClassSpec("diamond", 185.0, "checker", 0.40),
    ClassSpec("crescent", 135.0, "speckle", 0.40),
    ClassSpec("arrow", 320.0, "grid", 0.45),
    ClassSpec("pentagon", 58.0, "zigzag", 0.40),
)
MAX_CLASSES = len(CLASS_SPECS)


@dataclass
class SyntheticObject:
    """One placed object. Pixel counts: whole shape, its part inside the image, its visible part."""

    class_index: int  # 1..K
    name: str
    layer: int
    full_pixels: int
    in_frame_pixels: int
    visible_pixels: int = 0
    box: tuple[int, int, int, int] | None = None  # 1-based xmin, ymin, xmax, ymax of visible pixels
    kept: bool = False

    @property
    def truncated(self) -> bool:
        return self.in_frame_pixels < self.full_pixels

    @property
    def occluded_pixels(self) -> int:
        return self.in_frame_pixels - self.visible_pixels


@dataclass
class Sample:
    """One rendered image: ``image (H, W, 3)`` uint8, ``mask (H, W)`` uint8, and how it was made."""

    image: np.ndarray
    mask: np.ndarray
    objects: list[SyntheticObject]
    background: np.ndarray  # (H, W, 3) uint8, the background before any shape was drawn
    distractor_pixels: np.ndarray  # (H, W) bool, visible distractor pixels

    @property
    def kept_objects(self) -> list[SyntheticObject]:
        return [obj for obj in self.objects if obj.kept]


Window = tuple[slice, slice]  # (rows, columns)


@dataclass
class _Layer:
    """A shape ready to composite: its patch's top-left corner, coverage ``(P, P)`` and colour ``(P, P, 3)``,
    and its outline: ``(N, 2)`` image-coordinate polygons with their fill values (0 cuts a hole)."""

    x0: int
    y0: int
    alpha: np.ndarray
    colour: np.ndarray
    class_index: int  # 0 for distractors
    contours: list[tuple[np.ndarray, int]]

    @property
    def has_holes(self) -> bool:
        return any(value == 0 for _, value in self.contours)


# ----------------------------------------------------------------------------- shapes
def _polygon(vertices: int, start_degrees: float = -90.0, radii: np.ndarray | float = 1.0) -> np.ndarray:
    angles = np.deg2rad(start_degrees) + np.arange(vertices) * 2.0 * np.pi / vertices
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.reshape(radii, (-1, 1))


_CIRCLE = _polygon(64)
_CROSS_HALF_WIDTH = 0.3


def _cross() -> np.ndarray:
    w = _CROSS_HALF_WIDTH
    points = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
              (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    return np.array(points, dtype=np.float64) / math.hypot(1.0, w)


_ARROW = np.array(
    [(-1.0, -0.25), (0.1, -0.25), (0.1, -0.7), (1.0, 0.0), (0.1, 0.7), (0.1, 0.25), (-1.0, 0.25)]
)

# Each shape is a list of (polygon in the unit circle, fill value): value 0 cuts a hole.
_SHAPES: dict[str, Callable[[np.random.Generator], list[tuple[np.ndarray, int]]]] = {
    "disc": lambda rng: [(_CIRCLE, 1)],
    "square": lambda rng: [(_polygon(4, 45.0), 1)],
    "triangle": lambda rng: [(_polygon(3), 1)],
    "star": lambda rng: [(_polygon(10, radii=np.tile([1.0, 0.45], 5)), 1)],
    "ring": lambda rng: [(_CIRCLE, 1), (_CIRCLE * 0.55, 0)],
    "cross": lambda rng: [(_cross(), 1)],
    "hexagon": lambda rng: [(_polygon(6), 1)],
    "ellipse": lambda rng: [(_CIRCLE * [1.0, rng.uniform(0.5, 0.68)], 1)],
    "diamond": lambda rng: [(np.array([(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]), 1)],
    "crescent": lambda rng: [(_CIRCLE, 1), (_CIRCLE * 0.8 + [0.42, 0.0], 0)],
    "arrow": lambda rng: [(_ARROW, 1)],
    "pentagon": lambda rng: [(_polygon(5), 1)],
}


def _distractor_shape(rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """An irregular blob or a bar: outlines no class uses."""
    if rng.random() < 0.6:
        vertices = int(rng.integers(9, 15))
        radii = rng.uniform(0.45, 1.0, vertices)
        radii = (radii + np.roll(radii, 1) + np.roll(radii, -1)) / 3.0
        return [(_polygon(vertices, rng.uniform(0, 360), radii), 1)]
    half_width = rng.uniform(0.1, 0.22)
    return [(np.array([(-1.0, -half_width), (1.0, -half_width), (1.0, half_width), (-1.0, half_width)]), 1)]


# ----------------------------------------------------------------------------- textures
def _soft_square(wave: np.ndarray) -> np.ndarray:
    """Sharpen a ``[-1, 1]`` wave into an anti-aliased two-level pattern in ``[0, 1]``."""
    return np.clip(0.5 + 2.0 * wave, 0.0, 1.0)


def _triangle_wave(x: np.ndarray) -> np.ndarray:
    """0 on integers, 0.5 half way between."""
    return np.abs(x - np.floor(x) - 0.5)


# Pattern in [0, 1] from object-frame coordinates u, v (pixels) and the period (pixels).
_TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "stripes": lambda u, v, p, rng: _soft_square(np.sin(2 * np.pi * u / p)),
    "checker": lambda u, v, p, rng: _soft_square(np.sin(np.pi * u / p) * np.sin(np.pi * v / p) * 2.0),
    "dots": lambda u, v, p, rng: np.clip(
        (np.hypot(_triangle_wave(u / p), _triangle_wave(v / p)) - 0.3) * 8.0 + 0.5, 0.0, 1.0
    ),
    "rings": lambda u, v, p, rng: _soft_square(np.sin(2 * np.pi * np.hypot(u, v) / p)),
    "grid": lambda u, v, p, rng: np.clip(
        (np.minimum(_triangle_wave(u / p + 0.5), _triangle_wave(v / p + 0.5)) - 0.1) * 10.0 + 0.5, 0.0, 1.0
    ),
    "zigzag": lambda u, v, p, rng: _soft_square(np.sin(2 * np.pi * (u + p * _triangle_wave(v / p)) / p)),
    "speckle": lambda u, v, p, rng: (rng.random(u.shape) < 0.5).astype(np.float64),
}


def _blotches(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in ``[0, 1]`` (distractor texture)."""
    coarse = rng.random((4, 4)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def _hsv(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_degrees / 360.0) % 1.0, saturation, value))


# ----------------------------------------------------------------------------- rendering
def _rasterise(
    contours: list[tuple[np.ndarray, int]], centre: tuple[float, float], radius: float, angle: float, aspect: float
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, int]]]:
    """Draw a unit shape scaled, stretched and rotated into its own square patch.

    Returns the patch's top-left image coordinates, its anti-aliased coverage ``(P, P)`` in [0, 1],
    the object-frame coordinates ``u, v`` of every patch pixel (for textures) and the placed contours
    in image coordinates (cv2's: pixel ``(x, y)`` centred on ``(x, y)``).
    """
    half = int(math.ceil(radius * max(aspect, 1.0))) + 2
    x0, y0 = int(math.floor(centre[0])) - half, int(math.floor(centre[1])) - half
    size = 2 * half + 1
    local_centre = np.array([centre[0] - x0, centre[1] - y0])
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    coverage = np.zeros((size, size), np.uint8)
    outline = []
    for points, value in contours:
        placed = (points * [aspect, 1.0]) @ rotation.T * radius + local_centre
        fixed = np.round(placed * (1 << SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(coverage, [fixed], 255 * value, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        outline.append((placed + [x0, y0], value))
    dy, dx = np.mgrid[0:size, 0:size] - local_centre[::-1, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    return x0, y0, coverage / 255.0, u, v, outline


def _shade(colour: np.ndarray, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Directional lighting across the object, ``(P, P, 3)``."""
    direction = rng.uniform(0.0, 2.0 * np.pi)
    strength = rng.uniform(0.0, 0.2)
    light = 1.0 + strength * (u * math.cos(direction) + v * math.sin(direction)) / radius
    return np.clip(colour * light[..., None], 0.0, 1.0)


def _object_layer(
    spec: ClassSpec, class_index: int, width: int, height: int, rng: np.random.Generator,
    diameter_range: tuple[float, float] = OBJECT_DIAMETER_RANGE,
) -> _Layer:
    short_side = min(width, height)
    radius = 0.5 * short_side * rng.uniform(*diameter_range)
    centre = (rng.uniform(0.5 * radius, width - 0.5 * radius), rng.uniform(0.5 * radius, height - 0.5 * radius))
    contours = _SHAPES[spec.name](rng)
    x0, y0, alpha, u, v, outline = _rasterise(
        contours, centre, radius, rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.9, 1.1)
    )
    hue = spec.hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)
    saturation, value = rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.95)
    light = _hsv(hue, saturation, value)
    dark = _hsv(hue + rng.uniform(-8.0, 8.0), saturation * rng.uniform(0.5, 0.9), value * rng.uniform(0.3, 0.55))
    period = max(MIN_TEXTURE_PERIOD, spec.period * radius)
    pattern = _TEXTURES[spec.texture](u, v, period, rng)
    colour = dark + pattern[..., None] * (light - dark)
    return _Layer(x0, y0, alpha, _shade(colour, u, v, radius, rng), class_index, outline)


def _distractor_layer(width: int, height: int, rng: np.random.Generator) -> _Layer:
    radius = min(width, height) * rng.uniform(*DISTRACTOR_RADIUS_RANGE)
    centre = (rng.uniform(0, width), rng.uniform(0, height))
    x0, y0, alpha, u, v, outline = _rasterise(
        _distractor_shape(rng), centre, radius, rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.7, 1.3)
    )
    base = _hsv(rng.uniform(0.0, 360.0), rng.uniform(0.1, 0.7), rng.uniform(0.3, 0.95))
    if rng.random() < 0.5:
        colour = np.broadcast_to(base, alpha.shape + (3,))
    else:
        colour = base * (0.6 + 0.4 * _blotches(alpha.shape, rng))[..., None]
    return _Layer(x0, y0, alpha, _shade(colour, u, v, radius, rng), 0, outline)


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient + low-frequency noise + random lines and translucent blobs, ``(H, W, 3)`` float32."""
    def random_colour() -> np.ndarray:
        return _hsv(rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.9))

    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    start, end = random_colour(), random_colour()
    image = (start + ramp[..., None] * (end - start)).astype(np.float32)
    coarse = rng.normal(0.0, 0.08, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 7))):
        points = rng.uniform([-0.2 * width, -0.2 * height], [1.2 * width, 1.2 * height], (2, 2)).astype(int)
        cv2.line(image, tuple(map(int, points[0])), tuple(map(int, points[1])),
                 tuple(map(float, random_colour())), int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 5))):
        overlay = image.copy()
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = tuple(int(a) for a in rng.integers(4, max(5, min(width, height) // 4), 2))
        cv2.ellipse(overlay, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    tuple(map(float, random_colour())), -1, cv2.LINE_AA)
        opacity = rng.uniform(0.3, 0.7)
        image = cv2.addWeighted(overlay, opacity, image, 1.0 - opacity, 0.0)
    return np.clip(image, 0.0, 1.0)


def _overlap(layer: _Layer, height: int, width: int) -> tuple[Window, Window] | None:
    """The slices of a layer's patch and of an ``(H, W)`` image where they meet; None if they do not."""
    size = layer.alpha.shape[0]
    ix0, iy0 = max(layer.x0, 0), max(layer.y0, 0)
    ix1, iy1 = min(layer.x0 + size, width), min(layer.y0 + size, height)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    patch = (slice(iy0 - layer.y0, iy1 - layer.y0), slice(ix0 - layer.x0, ix1 - layer.x0))
    return patch, (slice(iy0, iy1), slice(ix0, ix1))


def _composite(image: np.ndarray, owner: np.ndarray, layer: _Layer, layer_id: int) -> tuple[int, int]:
    """Alpha-blend a layer into ``image`` and claim its covered pixels in ``owner``.

    Returns the shape's pixel count in the whole patch and inside the image.
    """
    covered = layer.alpha >= COVERAGE_THRESHOLD
    window = _overlap(layer, *owner.shape)
    if window is None:
        return int(covered.sum()), 0
    patch, region = window
    alpha = layer.alpha[patch][..., None]
    image[region] = image[region] * (1.0 - alpha) + layer.colour[patch] * alpha
    owner[region][covered[patch]] = layer_id
    return int(covered.sum()), int(covered[patch].sum())


def _box_survives_reader(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """VOC readers clamp boxes to ``[0, W-1] x [0, H-1]`` and drop empty ones (METHOD 1. Data)."""
    xmin, ymin, xmax, ymax = box
    return min(xmax, width - 1) > min(xmin, width - 1) and min(ymax, height - 1) > min(ymin, height - 1)


def _label(owner: np.ndarray, objects: list[SyntheticObject]) -> np.ndarray:
    """Class mask with a 255 band on object boundaries; decides which objects are kept."""
    height, width = owner.shape
    counts = np.bincount(owner.ravel(), minlength=max(obj.layer for obj in objects) + 1)
    instances = np.zeros(owner.shape, np.uint8)
    classes = np.zeros(owner.shape, np.uint8)
    dropped = np.zeros(owner.shape, bool)
    for instance, obj in enumerate(objects, start=1):
        pixels = owner == obj.layer
        obj.visible_pixels = int(counts[obj.layer])
        obj.box = None
        if obj.visible_pixels:
            ys, xs = np.nonzero(pixels)
            obj.box = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        obj.kept = (
            obj.visible_pixels >= MIN_VISIBLE_FRACTION * obj.full_pixels
            and obj.box is not None
            and _box_survives_reader(obj.box, width, height)
        )
        if obj.kept:
            instances[pixels] = instance
            classes[pixels] = obj.class_index
        else:
            dropped |= pixels
    band = cv2.dilate(instances, IGNORE_BAND_KERNEL) != cv2.erode(instances, IGNORE_BAND_KERNEL)
    mask = np.where(band | dropped, IGNORE_INDEX, classes).astype(np.uint8)
    for obj in objects:
        if obj.kept and not np.any(mask[owner == obj.layer] == obj.class_index):
            obj.kept = False  # entirely inside the ignore band: unlabelled, like a sliver
            mask[owner == obj.layer] = IGNORE_INDEX
    return mask


def render_sample(
    rng: np.random.Generator, num_classes: int, min_size: int = 96, max_size: int = 192
) -> Sample:
    """Draw one image with 1-3 objects of classes ``1..num_classes`` and its VOC-style mask.

    Objects that end up less than ``MIN_VISIBLE_FRACTION`` visible are unlabelled (their pixels are
    255); the layout is redrawn until at least one object is labelled.
    """
    _check_classes(num_classes)
    width, height = (int(side) for side in rng.integers(min_size, max_size + 1, 2))
    background = _background(width, height, rng)
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        count = int(rng.choice(len(OBJECT_COUNT_PROBABILITIES), p=OBJECT_COUNT_PROBABILITIES)) + 1
        class_indices = rng.integers(1, num_classes + 1, count)
        layers = [_object_layer(CLASS_SPECS[c - 1], int(c), width, height, rng) for c in class_indices]
        for _ in range(int(rng.integers(DISTRACTOR_COUNT_RANGE[0], DISTRACTOR_COUNT_RANGE[1] + 1))):
            layers.insert(int(rng.integers(0, len(layers) + 1)), _distractor_layer(width, height, rng))
        image = background.copy()
        owner = np.zeros((height, width), np.int16)
        objects = []
        for layer_id, layer in enumerate(layers, start=1):
            full, in_frame = _composite(image, owner, layer, layer_id)
            if layer.class_index:
                spec = CLASS_SPECS[layer.class_index - 1]
                objects.append(SyntheticObject(layer.class_index, spec.name, layer_id, full, in_frame))
        mask = _label(owner, objects)
        if any(obj.kept for obj in objects):
            break
    else:
        raise RuntimeError(f"no visible object after {MAX_LAYOUT_ATTEMPTS} layouts of a {width}x{height} image")
    distractor_ids = [i for i, layer in enumerate(layers, start=1) if not layer.class_index]
    image += rng.normal(0.0, PHOTO_NOISE, image.shape).astype(np.float32)
    return Sample(
        image=_to_uint8(image),
        mask=mask,
        objects=objects,
        background=_to_uint8(background),
        distractor_pixels=np.isin(owner, distractor_ids),
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- writing
def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index), so any subset reproduces."""
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


def image_id(split: str, index: int) -> str:
    return f"syn_{split}_{index:06d}"


def annotation_xml(sample_id: str, sample: Sample) -> str:
    """VOC annotation of a sample's labelled objects."""
    height, width = sample.mask.shape
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "synthetic"
    ElementTree.SubElement(root, "filename").text = f"{sample_id}.jpg"
    size = ElementTree.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(size, key).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "1"
    for obj in sample.kept_objects:
        element = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(element, "name").text = obj.name
        ElementTree.SubElement(element, "pose").text = "Unspecified"
        ElementTree.SubElement(element, "truncated").text = str(int(obj.truncated))
        ElementTree.SubElement(element, "difficult").text = "0"
        box = ElementTree.SubElement(element, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ElementTree.SubElement(box, key).text = str(value)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def _jpeg(image: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 photo as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_sample(root: Path, sample_id: str, sample: Sample, palette: np.ndarray) -> None:
    """Write one sample's JPEG, XML and both mask PNGs, each atomically."""
    atomic_write_bytes(root / "JPEGImages" / f"{sample_id}.jpg", _jpeg(sample.image))
    atomic_write_text(root / "Annotations" / f"{sample_id}.xml", annotation_xml(sample_id, sample))
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        save_png(root / folder / f"{sample_id}.png", sample.mask, palette)


def generate_dataset(
    out_dir: str | Path,
    num_classes: int = 6,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
    progress: bool = True,
) -> Path:
    """Write the whole dataset under ``out_dir``; returns the descriptor path (written last)."""
    _check_arguments(num_classes, num_train, num_val, seed, min_size, max_size)
    root = Path(out_dir)
    palette = voc_palette()
    jobs = [("train", index) for index in range(num_train)] + [("val", index) for index in range(num_val)]
    for split, index in tqdm(jobs, desc="synthetic images", disable=not progress):
        sample = render_sample(sample_rng(seed, split, index), num_classes, min_size, max_size)
        write_sample(root, image_id(split, index), sample, palette)
    train_ids = [image_id("train", index) for index in range(num_train)]
    lists = {
        "train": train_ids[: max(1, num_train // 4)],
        "train_aug": train_ids,
        "val": [image_id("val", index) for index in range(num_val)],
    }
    for domain, ids in lists.items():
        atomic_write_text(root / f"{domain}.txt", "\n".join(ids) + "\n")
    descriptor = root / "dataset.json"
    write_descriptor(
        descriptor,
        name="synthetic",
        class_names=["background", *(spec.name for spec in CLASS_SPECS[:num_classes])],
        lists={domain: f"{domain}.txt" for domain in lists},
        data_dir=".",
        ignore_index=IGNORE_INDEX,
    )
    return descriptor


def _check_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"--num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")


def _check_arguments(num_classes: int, num_train: int, num_val: int, seed: int, min_size: int, max_size: int) -> None:
    """The generator's settings, checked with messages naming the flags."""
    _check_classes(num_classes)
    for name, value in (("num_train", num_train), ("num_val", num_val), ("min_size", min_size)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    if max_size < min_size:
        raise ValueError(f"--max_size ({max_size}) must not be below --min_size ({min_size})")


# ----------------------------------------------------------------------------- MS COCO layout
@dataclass
class CocoAnnotation:
    """One instance annotation: class ``1..K``, crowd flag, COCO ``segmentation`` JSON (polygons, compressed
    or uncompressed RLE) and the mask it decodes to, ``(H, W)`` bool."""

    annotation_id: int
    class_index: int
    iscrowd: bool
    segmentation: list | dict
    mask: np.ndarray

    def as_json(self, image_id: int) -> dict:
        """The entry of ``instances_*.json``: area and box of the decoded mask, as COCO's."""
        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {
            "id": self.annotation_id,
            "image_id": image_id,
            "category_id": COCO_CATEGORY_IDS[self.class_index - 1],
            "segmentation": self.segmentation,
            "area": float(self.mask.sum()),
            "bbox": [float(value) for value in mask_utils.toBbox(rle)],
            "iscrowd": int(self.iscrowd),
        }


@dataclass
class CocoSample:
    """One image of the COCO export: ``image (H, W, 3)`` uint8, its annotations (crowd first, then the
    objects bottom to top) and the ground truth ``mask (H, W)`` uint8 that ``tools.prepare_coco`` must
    reproduce: 0 background, class ids ``1..K``, 255 on crowd regions no object covers."""

    image: np.ndarray
    mask: np.ndarray
    annotations: list[CocoAnnotation]

    @property
    def labels(self) -> list[int]:
        """Image-level class ids: every annotation's, crowd regions included."""
        return sorted({annotation.class_index for annotation in self.annotations})


def coco_image_id(split: str, index: int) -> int:
    """Image ids step by ``COCO_IMAGE_ID_STRIDE`` and differ between splits, as COCO's."""
    return index * COCO_IMAGE_ID_STRIDE + SPLIT_SEEDS[split] + 1


def coco_file_name(split: str, index: int) -> str:
    """``COCO_train2014_000000000001.jpg``: COCO 2014's naming."""
    return f"COCO_{COCO_SPLIT_FOLDERS[split]}_{coco_image_id(split, index):012d}.jpg"


def _frame_coverage(layer: _Layer, height: int, width: int) -> np.ndarray:
    """The pixels a layer claims inside an ``(H, W)`` image (as ``_composite`` does), ``(H, W)`` bool."""
    coverage = np.zeros((height, width), bool)
    window = _overlap(layer, height, width)
    if window is not None:
        patch, region = window
        coverage[region] = layer.alpha[patch] >= COVERAGE_THRESHOLD
    return coverage


def _compressed_rle(mask: np.ndarray) -> dict:
    """``{"size": [H, W], "counts": "<string>"}`` of an ``(H, W)`` bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths of the column-major ``(H, W)`` bool mask, a background run first."""
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def _polygon_annotation(layer: _Layer, annotation_id: int, height: int, width: int) -> CocoAnnotation:
    """The shape's outline as a COCO polygon (it may reach outside the image) and what pycocotools draws."""
    polygons = [np.round(points + COCO_PIXEL_CENTRE, POLYGON_DECIMALS).ravel().tolist()
                for points, _ in layer.contours]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
    return CocoAnnotation(annotation_id, layer.class_index, False, polygons, mask)


def _object_annotation(layer: _Layer, number: int, annotation_id: int, height: int, width: int) -> CocoAnnotation:
    """Even-numbered shapes without holes become polygons, the others compressed RLEs of their coverage."""
    if number % 2 == 0 and not layer.has_holes:
        return _polygon_annotation(layer, annotation_id, height, width)
    coverage = _frame_coverage(layer, height, width)
    return CocoAnnotation(annotation_id, layer.class_index, False, _compressed_rle(coverage), coverage)


def render_coco_sample(
    rng: np.random.Generator, num_classes: int, image_id: int, annotated: bool, crowd: bool,
    min_size: int = 96, max_size: int = 192,
) -> CocoSample:
    """Draw one image of the COCO export and annotate it as COCO does.

    Every object gets a polygon or an RLE of its whole in-frame shape, so annotations of overlapping
    objects overlap; a crowd region is one uncompressed RLE over a group of small objects of one class.
    The drawing order is prepare_coco's painting rule: distractors, the crowd, then the objects from the
    largest annotation to the smallest (equal areas: lower annotation id first). Annotation ids are
    shuffled within the image, so their order is not the drawing order. ``annotated=False`` draws only
    the background and distractors.
    """
    _check_classes(num_classes)
    width, height = (int(side) for side in rng.integers(min_size, max_size + 1, 2))
    background = _background(width, height, rng)
    distractors = [_distractor_layer(width, height, rng)
                   for _ in range(int(rng.integers(DISTRACTOR_COUNT_RANGE[0], DISTRACTOR_COUNT_RANGE[1] + 1)))]
    members: list[_Layer] = []
    if crowd:
        crowd_class = int(rng.integers(1, num_classes + 1))
        members = [_object_layer(CLASS_SPECS[crowd_class - 1], crowd_class, width, height, rng, CROWD_DIAMETER_RANGE)
                   for _ in range(int(rng.integers(CROWD_MEMBER_RANGE[0], CROWD_MEMBER_RANGE[1] + 1)))]
    objects: list[_Layer] = []
    if annotated:
        count = int(rng.choice(len(OBJECT_COUNT_PROBABILITIES), p=OBJECT_COUNT_PROBABILITIES)) + 1
        objects = [_object_layer(CLASS_SPECS[c - 1], int(c), width, height, rng)
                   for c in rng.integers(1, num_classes + 1, count)]
    ids = image_id * ANNOTATION_ID_BLOCK + rng.permutation(len(objects) + (1 if members else 0))
    crowds = []
    if members:
        region = np.logical_or.reduce([_frame_coverage(layer, height, width) for layer in members])
        crowds = [CocoAnnotation(int(ids[-1]), members[0].class_index, True, _uncompressed_rle(region), region)]
    annotations = [_object_annotation(layer, number, int(ids[number]), height, width)
                   for number, layer in enumerate(objects)]
    order = sorted(range(len(objects)), key=lambda k: (-int(annotations[k].mask.sum()), annotations[k].annotation_id))
    image = background.copy()
    scratch_owner = np.zeros((height, width), np.int16)
    for layer in [*distractors, *members, *(objects[k] for k in order)]:
        _composite(image, scratch_owner, layer, 1)
    mask = np.zeros((height, width), np.uint8)
    for annotation in crowds:
        mask[annotation.mask] = IGNORE_INDEX
    drawn = [annotations[k] for k in order]
    for annotation in drawn:
        mask[annotation.mask] = annotation.class_index
    image += rng.normal(0.0, PHOTO_NOISE, image.shape).astype(np.float32)
    return CocoSample(_to_uint8(image), mask, crowds + drawn)


def coco_sample(seed: int, split: str, index: int, num_classes: int, min_size: int, max_size: int) -> CocoSample:
    """Image ``index`` of a split of the COCO export: every ``UNANNOTATED_PERIOD``-th shows no object,
    every ``CROWD_PERIOD``-th of the others has a crowd region. Depends only on its arguments."""
    annotated = index % UNANNOTATED_PERIOD != UNANNOTATED_PERIOD - 1
    crowd = annotated and index % CROWD_PERIOD == 1
    return render_coco_sample(sample_rng(seed, split, index), num_classes, coco_image_id(split, index), annotated,
                              crowd, min_size, max_size)


def generate_coco_dataset(
    out_dir: str | Path,
    num_classes: int = 6,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
    progress: bool = True,
) -> Path:
    """Write the set in MS COCO 2014's layout under ``out_dir`` (``train2014/``, ``val2014/``,
    ``annotations/instances_{train,val}2014.json``); returns ``out_dir``. Masks, lists and the
    descriptor are ``tools.prepare_coco``'s to make.

    Categories, images and annotations are listed in descending order, so a reader must sort them.
    """
    _check_arguments(num_classes, num_train, num_val, seed, min_size, max_size)
    root = Path(out_dir)
    categories = [{"id": COCO_CATEGORY_IDS[k], "name": CLASS_SPECS[k].name, "supercategory": "shape"}
                  for k in reversed(range(num_classes))]
    for split, count in (("train", num_train), ("val", num_val)):
        folder = COCO_SPLIT_FOLDERS[split]
        images, annotations = [], []
        for index in tqdm(range(count), desc=f"synthetic {folder}", disable=not progress):
            sample = coco_sample(seed, split, index, num_classes, min_size, max_size)
            atomic_write_bytes(root / folder / coco_file_name(split, index), _jpeg(sample.image))
            height, width = sample.mask.shape
            image_id = coco_image_id(split, index)
            images.append({"id": image_id, "file_name": coco_file_name(split, index), "height": height, "width": width})
            annotations.extend(annotation.as_json(image_id) for annotation in sample.annotations)
        content = {"info": {"description": "synthetic shapes in the MS COCO 2014 layout"},
                   "images": images[::-1], "annotations": annotations[::-1], "categories": categories}
        atomic_write_text(root / "annotations" / f"instances_{folder}.json", json.dumps(content) + "\n")
    return root


# ----------------------------------------------------------------------------- statistics
def dataset_statistics(root: str | Path) -> dict:
    """Per list file: image count and sizes, objects per image, images per class, pixel fractions.

    ``root`` holds ``dataset.json`` (any VOC-layout dataset with a descriptor works). Pixel fractions
    cover the ids that have a ``SegmentationClass`` mask; ``ignore`` is the share of 255.
    """
    descriptor = load_descriptor(Path(root) / "dataset.json")
    reader = VOCReader(descriptor)
    names = descriptor.class_names
    statistics = {"name": descriptor.name, "class_names": list(names), "splits": {}}
    for domain in descriptor.lists:
        ids = descriptor.read_ids(domain)
        objects, widths, heights = [], [], []
        images_per_class = np.zeros(descriptor.num_foreground, np.int64)
        pixels = np.zeros(256, np.int64)
        masks = 0
        for sample_id in ids:
            objects.append(len(reader.read_object_names(sample_id)))
            images_per_class += reader.load_label(sample_id).astype(np.int64)
            height, width = reader.image_size(sample_id)
            widths.append(width)
            heights.append(height)
            mask = reader.load_mask(sample_id)
            if mask is not None:
                pixels += np.bincount(mask.ravel(), minlength=256)
                masks += 1
        total = max(int(pixels.sum()), 1)
        fractions = {name: float(pixels[index]) / total for index, name in enumerate(names)}
        fractions["ignore"] = float(pixels[descriptor.ignore_index]) / total
        statistics["splits"][domain] = {
            "images": len(ids),
            "masks": masks,
            "width": {"min": min(widths), "max": max(widths)},
            "height": {"min": min(heights), "max": max(heights)},
            "objects_per_image": {"mean": float(np.mean(objects)), "min": min(objects), "max": max(objects)},
            "images_per_class": {name: int(count) for name, count in zip(names[1:], images_per_class)},
            "pixel_fraction": fractions,
        }
    return statistics


def format_statistics(statistics: dict) -> str:
    """Human-readable summary of ``dataset_statistics``."""
    lines = [f"dataset '{statistics['name']}': {len(statistics['class_names']) - 1} classes"]
    for domain, split in statistics["splits"].items():
        counts = split["objects_per_image"]
        lines.append(
            f"[{domain}] {split['images']} images ({split['masks']} masks), "
            f"size {split['width']['min']}-{split['width']['max']} x {split['height']['min']}-{split['height']['max']}, "
            f"objects/image mean {counts['mean']:.2f} min {counts['min']} max {counts['max']}"
        )
        lines.append("  images per class: " + ", ".join(f"{k} {v}" for k, v in split["images_per_class"].items()))
        lines.append("  pixel share: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in split["pixel_fraction"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    parser.add_argument("--out", type=Path, help="dataset root to write")
    parser.add_argument("--format", choices=FORMATS, default="voc",
                        help="voc: the VOC 2012 + SBD layout with masks and descriptor; coco: MS COCO 2014's "
                             "photos and instances JSON, for python -m tools.prepare_coco")
    parser.add_argument("--stats", type=Path, metavar="DIR", help="only print the statistics of an existing set")
    parser.add_argument("--num_classes", type=int, default=6, help=f"object classes, 1..{MAX_CLASSES}")
    parser.add_argument("--num_train", type=int, default=400, help="train_aug images (train.txt: the first quarter)")
    parser.add_argument("--num_val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_size", type=int, default=96, help="smallest width / height in pixels")
    parser.add_argument("--max_size", type=int, default=192, help="largest width / height in pixels")
    args = parser.parse_args(argv)
    if args.stats is None and args.out is None:
        parser.error("give --out DIR to generate a dataset or --stats DIR to describe one")
    if args.stats is not None and args.format != "voc":
        parser.error("--stats describes a VOC-layout set; prepare a COCO-layout one with tools.prepare_coco")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stats is not None:
        print(format_statistics(dataset_statistics(args.stats)))
        return
    generate = generate_coco_dataset if args.format == "coco" else generate_dataset
    try:
        generate(args.out, args.num_classes, args.num_train, args.num_val, args.seed, args.min_size, args.max_size)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    if args.format == "coco":
        print(f"Next: python -m tools.prepare_coco --coco_dir {args.out} --out {args.out / 'prepared'}")
        return
    print(format_statistics(dataset_statistics(args.out)))


if __name__ == "__main__":
    main()
