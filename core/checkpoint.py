"""Reading weight files and checking them against a model's state dict, with errors that name the problem."""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from core.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
UNSAFE_LOADING = "weights_only"  # torch's advice to unpickle a refused file is never passed on
LISTED_KEYS = 10  # keys named per kind of problem in an error message
IMAGENET_WEIGHTS = "IMAGENET1K_V1"  # torchvision's original ImageNet weights of every ResNet
TRACKING_SUFFIX = "num_batches_tracked"  # a BatchNorm counter FrozenBatchNorm2d does not keep


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.pth`` (a state dict, or DeiT's ``{'model': state_dict}``) or ``.safetensors`` file.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: nothing is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for damaged files
        raise unreadable_checkpoint(path, error) from error
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors (or {{'model': state_dict}}), found {type(state).__name__}"
        )
    return dict(state)


def unreadable_checkpoint(path: Path, error: Exception) -> CheckpointError:
    """The error of a weight file ``torch.load(weights_only=True)`` or safetensors cannot read. Torch's
    message for a file its safe unpickler refuses recommends ``weights_only=False``, which runs whatever code
    the file holds: it is replaced by what the file is not; other messages keep their first sentence."""
    if isinstance(error, pickle.UnpicklingError) or UNSAFE_LOADING in str(error):
        reason = "not a torch archive of tensors and plain values"
    else:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0].split('. ')[0]}"
    return CheckpointError(f"{path}: cannot read the checkpoint: not a readable checkpoint ({reason}); it is damaged, "
                           "truncated or another kind of file: remake it, or copy it again from its source")


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f", ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


@dataclass
class StateDictDiff:
    """How a found state dict differs from the expected one (keys in the expected dict's order)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def describe(self, include_unexpected: bool = True) -> str:
        """One line per kind of problem, naming the keys (and expected vs found shapes)."""
        lines = []
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): {_listed(self.missing)}")
        if self.unexpected and include_unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}): {_listed(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{key}: expected {list(want)}, found {list(got)}" for key, want, got in self.mismatched]
            lines.append(f"shape mismatches ({len(shapes)}): {_listed(shapes)}")
        return "\n".join(lines)


def compare_state_dicts(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> StateDictDiff:
    """Missing, unexpected and shape-mismatched keys of ``found`` against ``expected`` (shapes only)."""
    diff = StateDictDiff()
    for key, tensor in expected.items():
        if key not in found:
            diff.missing.append(key)
        elif tuple(found[key].shape) != tuple(tensor.shape):
            diff.mismatched.append((key, tuple(tensor.shape), tuple(found[key].shape)))
    diff.unexpected = [key for key in found if key not in expected]
    return diff


def load_strict(module: torch.nn.Module, state: Mapping[str, Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)`` after checking every key and shape; errors name ``source``."""
    diff = compare_state_dicts(module.state_dict(), state)
    if diff.missing or diff.unexpected or diff.mismatched:
        raise CheckpointError(f"{source}: the weights do not fit {type(module).__name__}\n{diff.describe()}")
    module.load_state_dict(state)


def load_weights(module: torch.nn.Module, path: str | Path, command: str | None = None) -> None:
    """Load a stage's saved model strictly; ``command`` (the stage that makes it) is named if it is missing."""
    path = Path(path)
    if not path.is_file() and command:
        raise CheckpointError(f"{path}: model file not found; make it first with:\n  {command}")
    load_strict(module, read_state_dict(path), path)


def load_imagenet_weights(net: nn.Module, name: str, pretrained: str) -> None:
    """``pretrained``: ``imagenet`` (torchvision's weights, downloaded once to the torch hub cache) or
    the path of a local torchvision-layout ``.pth`` / ``.safetensors`` file (``fc.*`` is ignored)."""
    if pretrained == "imagenet":
        source = f"torchvision {name} {IMAGENET_WEIGHTS}"
        try:
            state = torchvision.models.get_model_weights(name)[IMAGENET_WEIGHTS].get_state_dict(progress=True)
        except Exception as error:  # no network, proxy, damaged cache: urllib, OSError, RuntimeError...
            raise CheckpointError(
                f"cannot fetch the {source} weights ({type(error).__name__}: {error}); on an offline machine "
                f"pass a local file with --pretrained PATH, or train from scratch with --pretrained none"
            ) from error
    else:
        source = pretrained
        if not Path(pretrained).is_file():
            raise CheckpointError(f"{pretrained}: --pretrained file not found (give imagenet, none or a "
                                  "local torchvision ResNet .pth / .safetensors)")
        state = read_state_dict(pretrained)
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = net.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith(TRACKING_SUFFIX)]
    unexpected = [key for key in state if key not in expected and not key.endswith(TRACKING_SUFFIX)]
    mismatched = [key for key in state if key in expected and state[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source}: the weights do not fit a {name}: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatches {mismatched[:5]}")
    net.load_state_dict(state, strict=False)
