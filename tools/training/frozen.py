"""The frozen parts of a model, which training checkpoints leave out.

A frozen submodule is a largest submodule that holds parameters, none of which requires a gradient
(SemFormer's CAAE, AffinityNet's backbone). Its parameters never change during training, and the script
rebuilds them on resume from where it first got them (``--ae_tag``'s model, ``--pretrained`` weights, the
seed), so a checkpoint need not repeat them: the paper's SemFormer checkpoint drops the DeiT-B CAAE.
Buffers always stay (BatchNorm statistics may change even where the weights are frozen). A checkpoint
records the digest of the left-out parameters, so a resume with other frozen weights (a retrained input
model) is refused instead of silently continuing on them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def frozen_submodules(model: nn.Module) -> list[str]:
    """Names of the largest submodules of ``model`` with parameters, none of which requires a gradient."""
    names: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            parameters = list(child.parameters())
            if parameters and not any(parameter.requires_grad for parameter in parameters):
                names.append(prefix + name)
            else:
                visit(f"{prefix}{name}.", child)

    visit("", model)
    return names


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of ``tensors``, in their order."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{list(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class FrozenParts:
    """A model's frozen submodules, the state-dict keys of their parameters and the digest of those."""

    modules: tuple[str, ...]
    keys: frozenset[str]
    digest: str

    @classmethod
    def of(cls, model: nn.Module) -> FrozenParts:
        """Find the frozen parts of ``model`` and hash their parameters (once, when training starts)."""
        modules = tuple(frozen_submodules(model))
        parameters = {f"{module}.{name}": parameter for module in modules
                      for name, parameter in model.get_submodule(module).named_parameters()}
        return cls(modules, frozenset(parameters), tensor_digest(parameters))

    def trained_state(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """``state_dict`` without the frozen parameters: what a checkpoint stores."""
        return {key: value for key, value in state_dict.items() if key not in self.keys}

    def record(self) -> dict[str, Any]:
        """The checkpoint's entry: the frozen submodules and the digest of their parameters."""
        return {"modules": list(self.modules), "sha256": self.digest}

    def mismatch(self, recorded: Mapping[str, Any]) -> str | None:
        """What differs from a checkpoint's ``record()``, in words; None if nothing does."""
        if list(recorded["modules"]) != list(self.modules):
            return (f"the checkpoint left out the frozen {_listed(recorded['modules'])}, this model freezes "
                    f"{_listed(self.modules)}")
        if recorded["sha256"] != self.digest:
            return (f"the frozen {_listed(self.modules)} of this run differ from those the checkpoint was "
                    "trained with (was the model they come from retrained or replaced?)")
        return None


def _listed(modules: Any) -> str:
    return ", ".join(f"'{name}'" for name in modules) or "nothing"
