"""The synthetic dataset's renderer: shapes, textures and cluttered photos with their masks (no file I/O).

Each of the K object classes is a shape family with its own hue range and texture; some classes share a
hue range or a texture, so only shape, colour and texture together tell them apart. Images hold 1-3
objects at random positions, scales and rotations, drawn in order (later ones occlude earlier ones), on
cluttered backgrounds with distractor shapes that belong to no class. The writers
(``tools.data.synthetic.voc_writer``, ``coco_writer``) turn samples into files.
"""
from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from core.conventions import IGNORE_INDEX

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
RADIAL_SECTORS = 6  # light / dark sector pairs of the radial texture


@dataclass(frozen=True)
class ClassSpec:
    """One object class: its name (also its shape family), hue range centre (degrees), texture and period."""

    name: str
    hue: float
    texture: str
    period: float  # texture period as a fraction of the object's radius


# Pairs share cues on purpose: disc/ring and cross/ellipse/arrow share hues, disc/cross and triangle/ring
# share textures, so a classifier must combine shape, colour and texture. Classes 13-20 (a VOC-sized
# label set) follow the same rule (semicircle/trefoil, hourglass/diamond and trapezoid/cross share hues,
# frame/hourglass, chevron/trefoil and trapezoid/gear textures); they come after the first twelve, so a
# set of up to 12 classes renders exactly as before they were added. The cross had the square's hue
# (232) until ac08014; sharing hue, straight edges and 4-fold symmetry with the square, it made the
# 6-class demo's DeepLab (from scratch, 400 images) take whole val squares for crosses (docs/demo.md).
CLASS_SPECS = (
    ClassSpec("disc", 0.0, "stripes", 0.45),
    ClassSpec("square", 220.0, "checker", 0.50),
    ClassSpec("triangle", 120.0, "dots", 0.45),
    ClassSpec("star", 50.0, "rings", 0.40),
    ClassSpec("ring", 12.0, "dots", 0.40),
    ClassSpec("cross", 300.0, "stripes", 0.40),
    ClassSpec("hexagon", 28.0, "grid", 0.50),
    ClassSpec("ellipse", 280.0, "zigzag", 0.45),
    ClassSpec("diamond", 185.0, "checker", 0.40),
    ClassSpec("crescent", 135.0, "speckle", 0.40),
    ClassSpec("arrow", 320.0, "grid", 0.45),
    ClassSpec("pentagon", 58.0, "zigzag", 0.40),
    ClassSpec("semicircle", 90.0, "rings", 0.45),
    ClassSpec("frame", 160.0, "plain", 0.45),
    ClassSpec("heart", 345.0, "speckle", 0.40),
    ClassSpec("chevron", 255.0, "dashes", 0.45),
    ClassSpec("trapezoid", 300.0, "radial", 0.45),
    ClassSpec("trefoil", 100.0, "dashes", 0.40),
    ClassSpec("hourglass", 198.0, "plain", 0.45),
    ClassSpec("gear", 38.0, "radial", 0.40),
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
class Layer:
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

_HEART_T = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
_HEART = np.stack([16.0 * np.sin(_HEART_T) ** 3, -(13.0 * np.cos(_HEART_T) - 5.0 * np.cos(2 * _HEART_T)
                   - 2.0 * np.cos(3 * _HEART_T) - np.cos(4 * _HEART_T))], axis=1)
_HEART -= (_HEART.max(0) + _HEART.min(0)) / 2.0
_HEART /= np.linalg.norm(_HEART, axis=1).max()
_SEMICIRCLE_T = np.linspace(0.0, np.pi, 33)
_SEMICIRCLE = np.stack([np.cos(_SEMICIRCLE_T), np.sin(_SEMICIRCLE_T) - 0.5], axis=1) / math.hypot(1.0, 0.5)
_CHEVRON = np.array([(-0.85, -0.45), (0.0, 0.3), (0.85, -0.45), (0.85, 0.1), (0.0, 0.9), (-0.85, 0.1)])
_TRAPEZOID = np.array([(-0.9, 0.4), (-0.45, -0.45), (0.45, -0.45), (0.9, 0.4)])
_TREFOIL = _polygon(96, radii=0.62 + 0.38 * np.cos(3.0 * np.arange(96) * 2.0 * np.pi / 96))
_HOURGLASS = np.array([(-0.6, -0.8), (0.6, -0.8), (0.08, 0.0), (0.6, 0.8), (-0.6, 0.8), (-0.08, 0.0)])
_GEAR_TEETH = 8
_GEAR = _polygon(4 * _GEAR_TEETH, radii=np.tile([0.72, 1.0, 1.0, 0.72], _GEAR_TEETH))

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
    "semicircle": lambda rng: [(_SEMICIRCLE, 1)],
    "frame": lambda rng: [(_polygon(4, 45.0), 1), (_polygon(4, 45.0) * 0.55, 0)],
    "heart": lambda rng: [(_HEART, 1)],
    "chevron": lambda rng: [(_CHEVRON, 1)],
    "trapezoid": lambda rng: [(_TRAPEZOID, 1)],
    "trefoil": lambda rng: [(_TREFOIL, 1)],
    "hourglass": lambda rng: [(_HOURGLASS, 1)],
    "gear": lambda rng: [(_GEAR, 1), (_CIRCLE * 0.3, 0)],
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


# Pattern in [0, 1] from object-frame coordinates u, v (pixels) and the period (pixels); radial (sectors
# around the centre) and plain (the light colour alone) do not depend on the period.
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
    "plain": lambda u, v, p, rng: np.ones_like(u),
    "dashes": lambda u, v, p, rng: _soft_square(np.sin(2 * np.pi * u / p)) * _soft_square(np.sin(np.pi * v / p)),
    "radial": lambda u, v, p, rng: _soft_square(np.sin(RADIAL_SECTORS * np.arctan2(v, u))),
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


def object_layer(
    spec: ClassSpec, class_index: int, width: int, height: int, rng: np.random.Generator,
    diameter_range: tuple[float, float] = OBJECT_DIAMETER_RANGE,
) -> Layer:
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
    return Layer(x0, y0, alpha, _shade(colour, u, v, radius, rng), class_index, outline)


def distractor_layer(width: int, height: int, rng: np.random.Generator) -> Layer:
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
    return Layer(x0, y0, alpha, _shade(colour, u, v, radius, rng), 0, outline)


def background_photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
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


def overlap(layer: Layer, height: int, width: int) -> tuple[Window, Window] | None:
    """The slices of a layer's patch and of an ``(H, W)`` image where they meet; None if they do not."""
    size = layer.alpha.shape[0]
    ix0, iy0 = max(layer.x0, 0), max(layer.y0, 0)
    ix1, iy1 = min(layer.x0 + size, width), min(layer.y0 + size, height)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    patch = (slice(iy0 - layer.y0, iy1 - layer.y0), slice(ix0 - layer.x0, ix1 - layer.x0))
    return patch, (slice(iy0, iy1), slice(ix0, ix1))


def composite(image: np.ndarray, owner: np.ndarray, layer: Layer, layer_id: int) -> tuple[int, int]:
    """Alpha-blend a layer into ``image`` and claim its covered pixels in ``owner``.

    Returns the shape's pixel count in the whole patch and inside the image.
    """
    covered = layer.alpha >= COVERAGE_THRESHOLD
    window = overlap(layer, *owner.shape)
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
    check_classes(num_classes)
    width, height = (int(side) for side in rng.integers(min_size, max_size + 1, 2))
    background = background_photo(width, height, rng)
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        count = int(rng.choice(len(OBJECT_COUNT_PROBABILITIES), p=OBJECT_COUNT_PROBABILITIES)) + 1
        class_indices = rng.integers(1, num_classes + 1, count)
        layers = [object_layer(CLASS_SPECS[c - 1], int(c), width, height, rng) for c in class_indices]
        for _ in range(int(rng.integers(DISTRACTOR_COUNT_RANGE[0], DISTRACTOR_COUNT_RANGE[1] + 1))):
            layers.insert(int(rng.integers(0, len(layers) + 1)), distractor_layer(width, height, rng))
        image = background.copy()
        owner = np.zeros((height, width), np.int16)
        objects = []
        for layer_id, layer in enumerate(layers, start=1):
            full, in_frame = composite(image, owner, layer, layer_id)
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
        image=to_uint8(image),
        mask=mask,
        objects=objects,
        background=to_uint8(background),
        distractor_pixels=np.isin(owner, distractor_ids),
    )


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index), so any subset reproduces."""
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])



def jpeg_bytes(image: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 photo as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()



def check_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"--num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")


def check_arguments(num_classes: int, num_train: int, num_val: int, seed: int, min_size: int, max_size: int) -> None:
    """The generator's settings, checked with messages naming the flags."""
    check_classes(num_classes)
    for name, value in (("num_train", num_train), ("num_val", num_val), ("min_size", min_size)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    if max_size < min_size:
        raise ValueError(f"--max_size ({max_size}) must not be below --min_size ({min_size})")
