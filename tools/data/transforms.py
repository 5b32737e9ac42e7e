"""Training and evaluation transforms of every stage (docs/method.md §10.2; the DeepLab recipe: §7).

Images stay PIL until normalisation, so colour jitter and every resize run through PIL as in the
original. Masks travel beside them as ``tv_tensors.Mask`` and follow each geometric step with
centre-sampled nearest interpolation. After normalisation, crops pad the image with 0 (the ImageNet
mean colour) and masks with 255 (ignore).

Randomness: every draw (torchvision's transforms and ours) comes from torch's global RNG, so
``torch.manual_seed``, the DataLoader's per-worker torch seeds and a restored torch RNG state
reproduce a run. The original drew resize, flip and crop from python ``random`` and the expand
factor from numpy.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from core.cam import scaled_size
from core.conventions import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOR_JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}
# Masks sample source pixel floor((i + 0.5) * scale), the centre rule of PIL NEAREST.
MASK_INTERPOLATION = v2.InterpolationMode.NEAREST_EXACT
SCALE_MODES = ("choice", "uniform")
DEEPLAB_CROP_SIZE = 321
DEEPLAB_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


# ----------------------------------------------------------------------------- building blocks
class _ResizeBase(v2.Transform, ABC):
    """Resizes images with ``interpolation`` and masks with centre-sampled nearest.

    Subclasses choose the output size in ``output_size``; an unchanged size returns the input as is.
    """

    def __init__(self, interpolation: v2.InterpolationMode) -> None:
        super().__init__()
        self.interpolation = interpolation

    @abstractmethod
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(H, W)`` to resize an ``height x width`` input to."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"input_size": (height, width), "size": self.output_size(height, width)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] == params["input_size"]:
            return inpt
        interpolation = MASK_INTERPOLATION if isinstance(inpt, tv_tensors.Mask) else self.interpolation
        return self._call_kernel(F.resize, inpt, list(params["size"]), interpolation=interpolation)


class SquareResize(_ResizeBase):
    """Resizes to ``size x size`` without keeping the aspect ratio (bilinear image)."""

    def __init__(self, size: int) -> None:
        super().__init__(v2.InterpolationMode.BILINEAR)
        self.size = _positive("size", size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size, self.size


class RandomExpand(_ResizeBase):
    """Multiplies both sides by one factor drawn uniformly from ``scales`` (bilinear image)."""

    def __init__(self, scales: tuple[float, float] = (1.0, 3.0)) -> None:
        super().__init__(v2.InterpolationMode.BILINEAR)
        low, high = scales
        if not 0 < low <= high:
            raise ValueError(f"RandomExpand scales must satisfy 0 < low <= high, got {scales}")
        self.scales = (float(low), float(high))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        factor = float(torch.empty((), dtype=torch.float64).uniform_(*self.scales))
        return max(1, int(factor * height)), max(1, int(factor * width))


class RandomScale(_ResizeBase):
    """Multiplies both sides by a random factor (bilinear image): one of ``scales`` with equal
    probability (``mode="choice"``) or uniform in ``[min(scales), max(scales)]`` (``mode="uniform"``)."""

    def __init__(self, scales: tuple[float, ...], mode: str = "choice") -> None:
        super().__init__(v2.InterpolationMode.BILINEAR)
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales}")
        if mode not in SCALE_MODES:
            raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
        self.scales, self.mode = tuple(float(scale) for scale in scales), mode

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.mode == "choice":
            factor = self.scales[int(torch.randint(len(self.scales), ()))]
        else:
            factor = float(torch.empty((), dtype=torch.float64).uniform_(min(self.scales), max(self.scales)))
        return max(1, int(factor * height)), max(1, int(factor * width))


class RandomResizeLongSide(_ResizeBase):
    """Rescales so the long side becomes a random integer in ``[min_size, max_size]`` (bicubic image)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__(v2.InterpolationMode.BICUBIC)
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size, self.max_size = min_size, max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        long_side = int(torch.randint(self.min_size, self.max_size + 1, ()))
        scale = long_side / height if width < height else long_side / width
        return round(height * scale), round(width * scale)


class _CropOrPadBase(v2.Transform, ABC):
    """Cuts a ``size x size`` window that may reach past the image (tensor inputs only).

    Outside the image the window holds ``image_fill`` (images) or ``mask_fill`` (masks); XYXY boxes
    are shifted into the window and clipped to it. Subclasses place the window per axis.
    """

    def __init__(self, size: int, image_fill: float = 0.0, mask_fill: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size = _positive("crop size", size)
        self.image_fill, self.mask_fill = image_fill, mask_fill

    @abstractmethod
    def placement(self, length: int) -> tuple[int, int]:
        """``(offset of the window in the image, offset of the image in the window)`` along one axis."""

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        if any(isinstance(inpt, Image.Image) for inpt in flat_inputs):
            raise TypeError(f"{type(self).__name__} works on tensors: apply it after normalisation")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        (source_y, target_y), (source_x, target_x) = self.placement(height), self.placement(width)
        return {
            "source": (source_y, source_x),
            "target": (target_y, target_x),
            "extent": (min(height, self.size), min(width, self.size)),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        (source_y, source_x), (target_y, target_x) = params["source"], params["target"]
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            if inpt.format != tv_tensors.BoundingBoxFormat.XYXY:
                raise ValueError(f"{type(self).__name__} moves XYXY boxes only, got {inpt.format}")
            dx, dy = target_x - source_x, target_y - source_y
            boxes = (inpt.as_subclass(Tensor) + inpt.new_tensor([dx, dy, dx, dy])).clamp_(0, self.size)
            return tv_tensors.wrap(boxes, like=inpt, canvas_size=(self.size, self.size))
        height, width = params["extent"]
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        canvas = inpt.as_subclass(Tensor).new_full((*inpt.shape[:-2], self.size, self.size), fill)
        canvas[..., target_y : target_y + height, target_x : target_x + width] = inpt[
            ..., source_y : source_y + height, source_x : source_x + width
        ]
        return tv_tensors.wrap(canvas, like=inpt)


class TopLeftCropOrPad(_CropOrPadBase):
    """Keeps the top-left ``size x size`` corner, padding right and bottom where the image is smaller."""

    def placement(self, length: int) -> tuple[int, int]:
        return 0, 0


class RandomCropOrPad(_CropOrPadBase):
    """Random window: a random image offset in ``[0, length - size]`` along an axis longer than the
    crop, else a random position of the image inside the window in ``[0, size - length]``."""

    def placement(self, length: int) -> tuple[int, int]:
        slack = length - self.size
        offset = int(torch.randint(0, abs(slack) + 1, ()))
        return (offset, 0) if slack > 0 else (0, offset)


class DownsampleMask(v2.Transform):
    """Keeps mask pixel ``stride * i + stride // 2`` per axis: PIL NEAREST for a ``1 / stride`` resize."""

    _transformed_types = (tv_tensors.Mask,)

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = _positive("label stride", stride)

    def transform(self, inpt: tv_tensors.Mask, params: dict[str, Any]) -> tv_tensors.Mask:
        start = self.stride // 2
        return tv_tensors.wrap(inpt[..., start :: self.stride, start :: self.stride], like=inpt)


def _positive(name: str, value: int) -> int:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _normalization() -> list[v2.Transform]:
    """PIL / uint8 HWC array -> ``(3, H, W)`` float32 ``(x / 255 - mean) / std``."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _color_jitter(enabled: bool) -> list[v2.Transform]:
    return [v2.ColorJitter(**COLOR_JITTER)] if enabled else []


# ----------------------------------------------------------------------------- stage pipelines
class ImagePipeline:
    """PIL image -> plain ``(3, H, W)`` float32 tensor."""

    def __init__(self, transforms: list[v2.Transform]) -> None:
        self.transforms = v2.Compose(transforms)

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transforms(image).as_subclass(Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class ImageMaskPipeline(ImagePipeline):
    """``(PIL image, (H, W) integer mask)`` -> ``(image (3, h, w) float32, mask (h', w') int64)``."""

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        mask = np.asarray(mask)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} differs from the image's (H, W) {(image.height, image.width)}")
        if mask.dtype != np.uint8 and (mask.min() < 0 or mask.max() > IGNORE_INDEX):
            raise ValueError(f"mask values must lie in [0, {IGNORE_INDEX}], got [{mask.min()}, {mask.max()}]")
        image, mask = self.transforms(image, tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))))
        return image.as_subclass(Tensor), mask.as_subclass(Tensor).long()


class ImageCropBoxPipeline(ImagePipeline):
    """PIL image -> ``(image (3, C, C), crop box (4,) int64)``, the box being the crop's non-padding
    region as ``xmin, ymin, xmax, ymax``: the image's own extent, carried through the crop."""

    def __init__(self, transforms: list[v2.Transform], crop: RandomCropOrPad) -> None:
        super().__init__(transforms)
        self.crop = crop

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        image = self.transforms(image)
        height, width = image.shape[-2:]
        extent = tv_tensors.BoundingBoxes(
            [[0, 0, width, height]], format="XYXY", canvas_size=(height, width), dtype=torch.int64
        )
        image, extent = self.crop(image, extent)
        return image.as_subclass(Tensor), extent.as_subclass(Tensor)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms}, crop={self.crop})"


_NORMALIZE = v2.Compose(_normalization())


def normalize(image: Image.Image | np.ndarray) -> Tensor:
    """RGB PIL image or ``(H, W, 3)`` uint8 array -> ``(3, H, W)`` float32 for inference."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        raise ValueError(f"normalize expects an RGB image, got mode {image.mode}")
    if isinstance(image, np.ndarray) and (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3):
        raise ValueError(f"normalize expects an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    return _NORMALIZE(image).as_subclass(Tensor)


def cam_inputs(image: Image.Image, scales: Sequence[float], multiple: int) -> list[Tensor]:
    """The photo at each CAM scale, resized (bicubic) to ``core.cam.scaled_size`` (sides multiples of
    the patch size) and normalised: one ``(3, h_s, w_s)`` tensor per scale."""
    sizes = (scaled_size(image.height, image.width, scale, multiple) for scale in scales)
    return [normalize(image.resize((width, height), Image.BICUBIC)) for height, width in sizes]


def caae_train_transform(
    image_size: int = 224, color_jitter: bool = True, expand: tuple[float, float] | None = (1.0, 3.0)
) -> ImagePipeline:
    """CAAE training: jitter, expand, RandomResizedCrop(S), flip, normalise -> ``(3, S, S)``."""
    return ImagePipeline(
        _color_jitter(color_jitter)
        + ([RandomExpand(expand)] if expand is not None else [])
        + [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip(), *_normalization()]
    )


def caae_eval_transform(image_size: int = 224) -> ImageMaskPipeline:
    """CAAE checkpoint selection: ``S x S`` resize (aspect not kept), normalise -> image, mask ``(S, S)``."""
    return ImageMaskPipeline([SquareResize(image_size), *_normalization()])


def semformer_train_transform(
    crop_size: int = 448, min_size: int = 224, max_size: int = 896, color_jitter: bool = True
) -> ImageCropBoxPipeline:
    """SemFormer training: jitter, random long side, flip, normalise, random crop -> image, crop box."""
    return ImageCropBoxPipeline(
        _color_jitter(color_jitter)
        + [RandomResizeLongSide(min_size, max_size), v2.RandomHorizontalFlip(), *_normalization()],
        RandomCropOrPad(crop_size),
    )


def semformer_eval_transform(crop_size: int = 448) -> ImageMaskPipeline:
    """SemFormer checkpoint selection: normalise, top-left crop/pad -> image, mask ``(C, C)``."""
    return ImageMaskPipeline([*_normalization(), TopLeftCropOrPad(crop_size)])


def affinity_train_transform(
    crop_size: int = 512,
    min_size: int = 320,
    max_size: int = 640,
    label_stride: int = 4,
    color_jitter: bool = True,
) -> ImageMaskPipeline:
    """AffinityNet training: random long side, flip, jitter, normalise, random crop, label / stride.

    Returns image ``(3, C, C)`` and label ``(C / stride, C / stride)`` int64 (255 = padding / uncertain).
    """
    if label_stride <= 0 or crop_size % label_stride:
        raise ValueError(f"crop_size {crop_size} must be a multiple of the positive label_stride {label_stride}")
    return ImageMaskPipeline(
        [RandomResizeLongSide(min_size, max_size), v2.RandomHorizontalFlip()]
        + _color_jitter(color_jitter)
        + [*_normalization(), RandomCropOrPad(crop_size), DownsampleMask(label_stride)]
    )


def segmentation_train_transform(
    crop_size: int = DEEPLAB_CROP_SIZE, scales: tuple[float, ...] = DEEPLAB_SCALES, scale_mode: str = "choice"
) -> ImageMaskPipeline:
    """DeepLab training: random scale, flip, normalise, random crop -> image ``(3, C, C)``, label ``(C, C)``.

    Padding holds the mean colour (0 after normalisation) in the image and 255 in the label.
    ``scale_mode="choice"`` draws one of ``scales`` (DeepLabV2: 0.5, 0.75, ..., 2.0); ``"uniform"``
    draws from ``[min(scales), max(scales)]`` (DeepLabV1: U[0.5, 1.5]).
    """
    return ImageMaskPipeline(
        [RandomScale(scales, scale_mode), v2.RandomHorizontalFlip(), *_normalization(), RandomCropOrPad(crop_size)]
    )


def segmentation_eval_transform() -> ImageMaskPipeline:
    """DeepLab validation during training: the whole image, normalised -> image ``(3, H, W)``, mask ``(H, W)``."""
    return ImageMaskPipeline(_normalization())
