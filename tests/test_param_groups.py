"""Every model declares its optimiser groups; with the defaults they are the original's name-based ones."""
from __future__ import annotations

import pytest
from torch import nn

from core.affinitynet import AffinityNet
from core.caae import CAAE
from core.deeplab import DeepLab
from core.param_groups import ParameterGroup, check_groups
from core.semformer import SemFormerSegmentor
from tools.training.optimizer import parameter_groups

TINY_VIT = dict(backbone_name="deit_small_patch16_224", backbone_kwargs=dict(depth=1, embed_dim=32, num_heads=2),
                image_size=64, class_dim=16)
ORIGINAL_MARKERS = ("model", "stage", "backbone")  # the original's test of a pretrained parameter name


def original_group(name: str) -> int:
    """The original's group of a parameter name, by substring: pretrained, then weight."""
    pretrained = any(marker in name for marker in ORIGINAL_MARKERS)
    return (0 if pretrained else 2) + (0 if "weight" in name else 1)


MODELS = {
    "caae": lambda: CAAE(21, decoder_width=32, decoder_depth=1, decoder_heads=2, **TINY_VIT),
    "semformer": lambda: SemFormerSegmentor(21, **TINY_VIT),
    "deeplabv2": lambda: DeepLab(21, "deeplabv2", "resnet18"),
    "deeplabv3plus": lambda: DeepLab(21, "deeplabv3plus", "resnet18", bn="train"),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_declared_groups_hold_every_parameter_once_and_equal_the_originals(kind):
    model = MODELS[kind]()
    groups = model.parameter_groups()
    check_groups(model, groups)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    declared = [{names[id(parameter)] for parameter in group.params} for group in groups]
    expected = [set() for _ in range(4)]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected[original_group(name)].add(name)
    assert declared == expected
    assert [group["lr"] for group in parameter_groups(model, 0.01, 1e-4)] == pytest.approx([0.01, 0.02, 0.1, 0.2])


def test_affinitynet_trains_its_edge_branch_in_one_group():
    model = AffinityNet("resnet18")
    (group,) = model.parameter_groups()
    check_groups(model, [group])
    assert (group.lr_multiplier, group.decayed) == (1.0, True)


def test_a_parameter_left_out_or_counted_twice_is_an_error():
    class Declared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = nn.Linear(2, 2), nn.Linear(2, 2)

        def parameter_groups(self) -> list[ParameterGroup]:
            return [ParameterGroup("backbone", list(self.backbone.parameters()))]

    model = Declared()
    with pytest.raises(ValueError, match="leaves out the trainable parameter.*head.weight, head.bias"):
        parameter_groups(model, 0.1, 0.0)
    twice = [ParameterGroup("a", list(model.parameters())), ParameterGroup("b", [model.head.bias])]
    with pytest.raises(ValueError, match="head.bias is in groups 'a' and 'b'"):
        check_groups(model, twice)
    with pytest.raises(TypeError, match="declares no parameter_groups"):
        parameter_groups(nn.Linear(2, 2), 0.1, 0.0)
