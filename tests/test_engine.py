"""Training engine: optimiser groups and quirk, poly schedule, DDP, accumulation, AMP, selection, resume."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.engine_toy_train import ToyDataset, ToyNet
from tests.engine_toy_train import main as toy_main
from tests.engine_toy_train import toy_step
from tools.artifacts.files import ArtifactError
from tools.artifacts.paths import ExperimentPaths
from tools.cli import measurements
from tools.training.config import TrainConfig
from tools.training.distributed import DistContext
from tools.training.engine import Trainer
from tools.training.frozen import FrozenParts
from tools.training.optimizer import LearningRateFactor, build_optimizer, build_scheduler, parameter_groups
from tools.training.sampling import EpochSampler, SeededDataset, micro_batch_size, seed_everything
from tools.training.state import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "engine_toy_train.py"
TAG = "toy"
STEPS_PER_EPOCH, EPOCHS = 8, 3  # the helper's defaults: 64 samples, batch 8, 3 epochs
SINGLE_CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
VOLATILE_LOG_FIELDS = ("time", "eta")


def _names(group: dict, model: nn.Module) -> set[str]:
    ids = {id(parameter) for parameter in group["params"]}
    return {name for name, parameter in model.named_parameters() if id(parameter) in ids}


def _run_helper(args: list[str], **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HELPER), *args], cwd=REPO, env=env, text=True, **popen)


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def _log(root: Path) -> dict[str, list[dict]]:
    content = json.loads(ExperimentPaths(root).json_log(TAG).read_text())
    return {kind: [{name: value for name, value in entry.items() if name not in VOLATILE_LOG_FIELDS}
                   for entry in entries] for kind, entries in content.items()}


def _assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the helper (in process; dropout on, so RNG restoring matters)."""
    root = tmp_path_factory.mktemp("reference")
    result = toy_main(["--experiments_dir", str(root)])
    assert not result.interrupted and result.global_step == STEPS_PER_EPOCH * EPOCHS
    return root


# ----------------------------------------------------------------------------- optimiser
def test_four_parameter_groups_with_lr_and_weight_decay():
    model = ToyNet()
    groups = parameter_groups(model, lr=0.01, weight_decay=5e-4)
    assert [_names(group, model) for group in groups] == [
        {"backbone.0.weight", "backbone.1.weight"},
        {"backbone.0.bias", "backbone.1.bias", "stage_scale"},
        {"head.1.weight"},
        {"head.1.bias", "class_token"},
    ]
    assert [group["lr"] for group in groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [group["weight_decay"] for group in groups] == [5e-4, 0.0, 5e-4, 0.0]
    assert not any(name.startswith("frozen") for group in groups for name in _names(group, model))


def test_momentum_slot_quirk_and_fixed_option():
    model = ToyNet()
    quirk = build_optimizer(parameter_groups(model, 0.01, 5e-4), 0.01, 5e-4)
    assert all(group["momentum"] == 5e-4 and group["nesterov"] and group["dampening"] == 0
               for group in quirk.param_groups)
    assert [group["weight_decay"] for group in quirk.param_groups] == [5e-4, 0.0, 5e-4, 0.0]
    fixed = build_optimizer(parameter_groups(model, 0.01, 5e-4), 0.01, 5e-4, momentum=0.9, nesterov=False)
    assert all(group["momentum"] == 0.9 and not group["nesterov"] for group in fixed.param_groups)


def test_quirk_update_is_nesterov_sgd_with_momentum_equal_to_weight_decay():
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = build_optimizer([{"params": [weight], "lr": 0.1, "weight_decay": 0.5}], 0.1, 0.5)
    gradients = [torch.tensor([0.3, 0.1]), torch.tensor([-0.2, 0.4])]
    expected, buffer = weight.detach().clone(), None
    for gradient in gradients:
        weight.grad = gradient.clone()
        optimizer.step()
        decayed = gradient + 0.5 * expected
        buffer = decayed if buffer is None else 0.5 * buffer + decayed
        expected = expected - 0.1 * (decayed + 0.5 * buffer)
    assert torch.allclose(weight.detach(), expected)


def test_poly_schedule_values():
    model = ToyNet()
    optimizer = build_optimizer(parameter_groups(model, 0.01, 5e-4), 0.01, 5e-4)
    max_step = 10
    scheduler = build_scheduler(optimizer, "poly", max_step)
    seen = {}
    for step in range(max_step):
        seen[step] = [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    for step in (0, 1, 5, 9):
        factor = (1 - step / max_step) ** 0.9
        assert seen[step] == pytest.approx([0.01 * factor, 0.02 * factor, 0.1 * factor, 0.2 * factor])


# ----------------------------------------------------------------------------- data order
def test_batch_split_and_sample_order():
    assert micro_batch_size(64, 2, 4) == 8
    with pytest.raises(ValueError, match="--batch_size 8 .* not divisible"):
        micro_batch_size(8, 3, 1)
    dataset = ToyDataset(20)
    whole = list(_sampler(dataset, 0, 1, 8))
    per_rank = [list(_sampler(dataset, rank, 2, 4)) for rank in range(2)]
    for step in range(2):  # every step's global batch is the same set of samples
        ranks = per_rank[0][step * 4:(step + 1) * 4] + per_rank[1][step * 4:(step + 1) * 4]
        assert sorted(ranks) == sorted(whole[step * 8:(step + 1) * 8])
    resumed = _sampler(dataset, 0, 1, 8)
    resumed.set_epoch(0, start_step=1)
    assert list(resumed) == whole[8:16]


def _sampler(dataset, rank: int, world_size: int, samples_per_step: int) -> EpochSampler:
    sampler = EpochSampler(dataset, rank, world_size, seed=0, samples_per_step=samples_per_step, steps_per_epoch=2)
    sampler.set_epoch(0)
    return sampler


def test_augmentation_depends_only_on_seed_epoch_and_index():
    seeded = SeededDataset(ToyDataset(6), seed=3)
    first = seeded[4][0]
    seed_everything(123)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(seeded[4][0], first)  # whatever was drawn before
    # the caller's RNGs are left untouched (num_workers=0 must not shift dropout or other draws)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    seeded.set_epoch(1)
    assert not torch.equal(seeded[4][0], first)


# ----------------------------------------------------------------------------- one step
def _one_step(tmp_path: Path, name: str, *flags: str) -> dict:
    toy_main(["--experiments_dir", str(tmp_path / name), "--samples", "16", "--batch_size", "16",
              "--max_epoch", "1", "--dropout", "0", "--select_by", "last", "--dump", str(tmp_path / name), *flags])
    return torch.load(f"{tmp_path / name}.rank0.pt", weights_only=True)


def test_gradient_accumulation_matches_one_batch(tmp_path):
    whole = _one_step(tmp_path, "whole")
    accumulated = _one_step(tmp_path, "accumulated", "--accum_steps", "2")
    for kind in ("grads", "params"):
        for name, value in whole[kind].items():
            assert torch.allclose(accumulated[kind][name], value, atol=1e-6), (kind, name)
    initial = ToyNet().state_dict()
    assert not torch.equal(whole["params"]["head.1.weight"], initial["head.1.weight"])


def test_bf16_autocast_on_cpu_runs_a_step(tmp_path):
    full = _one_step(tmp_path, "full", "--amp", "off")
    mixed = _one_step(tmp_path, "mixed", "--amp", "bf16")
    loss = _log(tmp_path / "mixed")["train"][0]["loss"]
    assert loss == loss and 0 < loss < 10
    assert all(torch.isfinite(value).all() for value in mixed["params"].values())
    difference = (mixed["grads"]["head.1.weight"] - full["grads"]["head.1.weight"]).abs().max()
    assert 0 < difference < 0.05  # bf16 forward: close to, not equal to, float32


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    single = _one_step(tmp_path, "single")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dump = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(HELPER), "--experiments_dir", str(dump),
               "--samples", "16", "--batch_size", "16", "--max_epoch", "1", "--dropout", "0",
               "--select_by", "last", "--accum_steps", "2", "--dump", str(dump)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    ranks = [torch.load(f"{dump}.rank{rank}.pt", weights_only=True) for rank in range(2)]
    for kind in ("grads", "params"):
        for name, value in single[kind].items():
            for rank in ranks:
                assert torch.allclose(rank[kind][name], value, atol=1e-6), (kind, name)
    assert _log(dump)["train"][0]["loss"] == pytest.approx(_log(tmp_path / "single")["train"][0]["loss"], abs=1e-6)


# ----------------------------------------------------------------------------- model selection
@pytest.mark.parametrize("select_by, saved_epoch", [("gt", 1), ("last", 2)])
def test_select_by_keeps_best_or_last_apart_from_checkpoint(tmp_path, select_by, saved_epoch):
    scores = [0.5, 0.9, 0.7]
    snapshots: list[dict] = []

    def evaluate(model: nn.Module) -> dict:
        assert not model.training
        snapshots.append({name: value.clone() for name, value in model.state_dict().items()})
        return {"score": scores[len(snapshots) - 1], "threshold": 0.2}

    config = TrainConfig(tag=TAG, max_epoch=3, batch_size=8, lr=0.1, weight_decay=1e-4, select_by=select_by,
                         experiments_dir=str(tmp_path))
    model = ToyNet()
    optimizer = build_optimizer(parameter_groups(model, 0.1, 1e-4), 0.1, 1e-4)
    result = Trainer(config, SINGLE_CPU, model, optimizer, ToyDataset(16), toy_step, evaluate=evaluate,
                     export_state=lambda module: {"head.1.weight": module.head[1].weight}).fit()
    assert result.best_score == 0.9 and not result.interrupted
    paths = ExperimentPaths(tmp_path)
    best = load_checkpoint(paths.model(TAG))
    assert list(best) == ["head.1.weight"]
    assert torch.equal(best["head.1.weight"], snapshots[saved_epoch]["head.1.weight"])
    last = load_checkpoint(paths.checkpoint(TAG))
    assert (last["epoch"], last["global_step"], last["best_score"]) == (3, 6, 0.9)
    assert last["frozen"]["modules"] == ["frozen"]  # ToyNet's frozen layer: rebuilt on resume, not stored
    _assert_same_tensors(last["model"], {name: value for name, value in snapshots[2].items()
                                         if not name.startswith("frozen.")})
    validation = json.loads(paths.json_log(TAG).read_text())["validation"]
    assert [(entry["score"], entry["best_score"], entry["threshold"]) for entry in validation] == [
        (0.5, 0.5, 0.2), (0.9, 0.9, 0.2), (0.7, 0.9, 0.2)]
    assert not list(paths.root.rglob("*.tmp"))


def test_max_iters_ends_in_a_partial_epoch_that_is_evaluated_and_saved(tmp_path):
    evaluated_at: list[int] = []
    config = TrainConfig(tag=TAG, max_epoch=None, max_iters=5, batch_size=8, lr=0.1, weight_decay=1e-4,
                         select_by="last", experiments_dir=str(tmp_path))
    model = ToyNet()
    optimizer = build_optimizer(parameter_groups(model, 0.1, 1e-4), 0.1, 1e-4)
    trainer = Trainer(config, SINGLE_CPU, model, optimizer, ToyDataset(16), toy_step,
                      evaluate=lambda module: evaluated_at.append(trainer.global_step) or {"score": 0.0})
    result = trainer.fit()
    assert (result.global_step, result.epochs_done) == (5, 3)  # 2 steps per epoch: 2 + 2 + 1
    assert evaluated_at == [2, 4, 5]
    assert optimizer.param_groups[0]["lr"] == 0.0  # the poly schedule reached its end at max_iters
    last = load_checkpoint(ExperimentPaths(tmp_path).checkpoint(TAG))
    assert (last["epoch"], last["global_step"]) == (3, 5)
    assert ExperimentPaths(tmp_path).model(TAG).is_file()


def test_eval_every_skips_epochs_but_always_scores_the_last(tmp_path):
    evaluated_at: list[int] = []
    config = TrainConfig(tag=TAG, max_epoch=None, max_iters=9, batch_size=8, lr=0.1, weight_decay=1e-4,
                         select_by="last", experiments_dir=str(tmp_path), eval_every=2)
    model = ToyNet()
    optimizer = build_optimizer(parameter_groups(model, 0.1, 1e-4), 0.1, 1e-4)
    trainer = Trainer(config, SINGLE_CPU, model, optimizer, ToyDataset(16), toy_step,
                      evaluate=lambda module: evaluated_at.append(trainer.global_step) or {"score": 0.0})
    trainer.fit()
    assert evaluated_at == [4, 8, 9]  # epochs 2 and 4 of 2 steps, then the partial fifth
    validation = json.loads(ExperimentPaths(tmp_path).json_log(TAG).read_text())["validation"]
    assert [entry["iteration"] for entry in validation] == [4, 8, 9]


@pytest.mark.parametrize("samples", [5, 64])  # fewer than one batch: repeated; more than the steps need: cut
def test_max_steps_is_one_evaluated_epoch_whose_times_are_reported(tmp_path, monkeypatch, samples):
    monkeypatch.setenv(measurements.MEASUREMENTS_VARIABLE, str(tmp_path / "measured"))
    monkeypatch.setattr(measurements, "_RECORD", measurements._Record())
    evaluated_at: list[int] = []
    config = TrainConfig(tag=TAG, max_epoch=200, batch_size=8, lr=0.1, weight_decay=1e-4, max_steps=3,
                         experiments_dir=str(tmp_path))
    model = ToyNet()
    optimizer = build_optimizer(parameter_groups(model, 0.1, 1e-4), 0.1, 1e-4)
    trainer = Trainer(config, SINGLE_CPU, model, optimizer, ToyDataset(samples), toy_step,
                      evaluate=lambda module: evaluated_at.append(trainer.global_step) or {"score": 1.0})
    result = trainer.fit()
    assert (result.global_step, result.epochs_done, evaluated_at) == (3, 1, [3])
    assert ExperimentPaths(tmp_path).model(TAG).is_file()
    assert optimizer.param_groups[0]["lr"] == 0.0  # the schedule spans the 3 steps
    measurements.write_measurements()
    [reported] = measurements.read_measurements(tmp_path / "measured")
    assert {kind: len(times) for kind, times in reported["seconds"].items()} == {"step": 3, "evaluation": 1, "save": 1}
    assert all(seconds > 0 for times in reported["seconds"].values() for seconds in times)
    assert reported["peak_rss_bytes"] > 10 * 2**20


def test_gt_selection_needs_an_evaluation(tmp_path):
    config = TrainConfig(tag=TAG, max_epoch=1, batch_size=8, lr=0.1, weight_decay=1e-4,
                         experiments_dir=str(tmp_path))
    model = ToyNet()
    with pytest.raises(ValueError, match="--select_by last"):
        Trainer(config, SINGLE_CPU, model, build_optimizer(parameter_groups(model, 0.1, 0), 0.1, 0),
                ToyDataset(8), toy_step)


# ----------------------------------------------------------------------------- frozen parts
class _FrozenEncoderNet(nn.Module):
    """A frozen encoder (its BatchNorm in eval mode) before a trained head whose BatchNorm's affine is frozen
    but whose statistics still move in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        self.head[1].requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenEncoderNet:
        super().train(mode)
        self.encoder.eval()
        return self


def test_frozen_parts_are_whole_frozen_submodules_and_buffers_stay():
    model = _FrozenEncoderNet()
    frozen = FrozenParts.of(model)
    assert frozen.modules == ("encoder", "head.1")
    assert frozen.keys == {"encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias",
                           "head.1.weight", "head.1.bias"}
    kept = frozen.trained_state(model.state_dict())
    assert {"encoder.1.running_mean", "head.1.running_var", "head.1.num_batches_tracked"} <= set(kept)
    assert set(kept) == set(model.state_dict()) - frozen.keys
    with torch.no_grad():
        model.head[0].weight += 1.0  # trained weights do not change the digest, frozen ones do
    assert FrozenParts.of(model).digest == frozen.digest
    with torch.no_grad():
        model.encoder[0].weight[0, 0] += 1e-6
    assert FrozenParts.of(model).digest != frozen.digest
    assert FrozenParts.of(ToyNet()).modules == ("frozen",)


def test_resume_rebuilds_the_frozen_parts_and_refuses_other_ones(tmp_path):
    def trainer(model: nn.Module, resume: str = "no") -> Trainer:
        config = TrainConfig(tag=TAG, max_epoch=2, batch_size=8, lr=0.1, weight_decay=1e-4, select_by="last",
                             experiments_dir=str(tmp_path), resume=resume)
        return Trainer(config, SINGLE_CPU, model, build_optimizer(parameter_groups(model, 0.1, 1e-4), 0.1, 1e-4),
                       ToyDataset(16), toy_step)

    torch.manual_seed(0)
    trained = ToyNet()
    trainer(trained).fit()
    checkpoint = load_checkpoint(ExperimentPaths(tmp_path).checkpoint(TAG))
    assert not {"frozen.weight", "frozen.bias"} & set(checkpoint["model"])
    torch.manual_seed(0)
    rebuilt = ToyNet()  # as a script rebuilds it: the same frozen layer, trained weights from the checkpoint
    trainer(rebuilt, resume="yes")
    _assert_same_tensors(rebuilt.state_dict(), trained.state_dict())
    torch.manual_seed(1)
    with pytest.raises(ArtifactError, match="the frozen 'frozen' of this run differ from those the checkpoint was "
                                            "trained with"):
        trainer(ToyNet(), resume="yes")
    unfrozen = ToyNet().requires_grad_(True)
    with pytest.raises(ArtifactError, match="left out the frozen 'frozen', this model freezes nothing"):
        trainer(unfrozen, resume="yes")


# ----------------------------------------------------------------------------- resume
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, reference):
    root = tmp_path / "interrupted"
    process = _run_helper(["--experiments_dir", str(root), "--step_delay", "0.2"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "iteration=10," in line:
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + _finish(process)
    assert "Continue with the same command plus --resume" in output
    checkpoint = load_checkpoint(ExperimentPaths(root).checkpoint(TAG))
    assert 10 <= checkpoint["global_step"] < STEPS_PER_EPOCH * EPOCHS
    assert checkpoint["step_in_epoch"] == checkpoint["global_step"] - STEPS_PER_EPOCH * checkpoint["epoch"] > 0

    _finish(_run_helper(["--experiments_dir", str(root), "--resume", "--num_workers", "2"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    assert _log(root) == _log(reference)
    paths, reference_paths = ExperimentPaths(root), ExperimentPaths(reference)
    _assert_same_tensors(load_checkpoint(paths.model(TAG)), load_checkpoint(reference_paths.model(TAG)))
    _assert_same_tensors(load_checkpoint(paths.checkpoint(TAG))["model"],
                         load_checkpoint(reference_paths.checkpoint(TAG))["model"])


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, reference):
    root = tmp_path / "killed"
    process = _run_helper(["--experiments_dir", str(root), "--die_during_save", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    paths = ExperimentPaths(root)
    assert list(paths.checkpoint(TAG).parent.glob(f".{paths.checkpoint(TAG).name}.*.tmp"))  # the torn write
    checkpoint = load_checkpoint(paths.checkpoint(TAG))  # still the complete epoch-1 checkpoint
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"]) == (1, 0, STEPS_PER_EPOCH)

    _finish(_run_helper(["--experiments_dir", str(root), "--resume"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    assert _log(root) == _log(reference)
    _assert_same_tensors(load_checkpoint(paths.model(TAG)), load_checkpoint(ExperimentPaths(reference).model(TAG)))


def test_resume_refuses_changed_settings(tmp_path, reference):
    root = tmp_path / "changed"
    (root / "models").mkdir(parents=True)
    checkpoint = ExperimentPaths(reference).checkpoint(TAG)
    (root / "models" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match="batch_size: 8 -> 16"):
        toy_main(["--experiments_dir", str(root), "--resume", "--batch_size", "16"])
    with pytest.raises(ValueError, match="optimizer: 'sgd' -> 'adamw'"):
        toy_main(["--experiments_dir", str(root), "--resume", "--optimizer", "adamw"])


def test_cosine_and_constant_schedules_with_warm_up():
    cosine = LearningRateFactor("cosine", max_step=12, warmup_iters=2)
    assert [cosine(step) for step in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine(7) == pytest.approx(0.5) and cosine(12) == pytest.approx(0.0)
    assert [LearningRateFactor("constant", 10, 4)(step) for step in (0, 3, 9)] == pytest.approx([0.25, 1.0, 1.0])
    assert LearningRateFactor("poly", 10)(5) == pytest.approx(0.5 ** 0.9)
    with pytest.raises(ValueError, match="--warmup_iters 10 must be below"):
        LearningRateFactor("cosine", 10, 10)


def test_adamw_cosine_warm_up_and_clipping_train_and_resume_exactly(tmp_path):
    def run(root, stop_at: int | None = None, resume: bool = False):
        config = TrainConfig(tag=TAG, max_epoch=3, batch_size=8, lr=0.01, weight_decay=1e-4, optimizer="adamw",
                             select_by="last", experiments_dir=str(root), resume=resume, schedule="cosine",
                             warmup_iters=3, clip_grad_norm=0.5)
        seed_everything(0)
        model = ToyNet()
        optimizer = build_optimizer(parameter_groups(model, 0.01, 1e-4), 0.01, 1e-4, kind="adamw")
        trainer = Trainer(config, SINGLE_CPU, model, optimizer, ToyDataset(32),
                          lambda module, batch: step(module, batch))

        def step(module, batch):
            if trainer.global_step + 1 == stop_at:
                trainer._stop_signal = "SIGTERM"  # what the signal handler sets
            return toy_step(module, batch)

        return trainer.fit()

    assert not run(tmp_path / "whole").interrupted
    header = ExperimentPaths(tmp_path / "whole").text_log(TAG).read_text()
    assert "AdamW, lr 0.01, weight decay 0.0001, cosine schedule after 3 warm-up iterations, gradient norm " \
           "clipped at 0.5" in header
    assert run(tmp_path / "resumed", stop_at=6).interrupted
    assert load_checkpoint(ExperimentPaths(tmp_path / "resumed").checkpoint(TAG))["global_step"] == 6
    result = run(tmp_path / "resumed", resume=True)
    assert not result.interrupted and result.global_step == 12
    _assert_same_tensors(load_checkpoint(ExperimentPaths(tmp_path / "whole").model(TAG)),
                         load_checkpoint(ExperimentPaths(tmp_path / "resumed").model(TAG)))
