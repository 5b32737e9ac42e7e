"""Faults of real machines and of lists as users make them: each ends with its exit status and one line.

A full disk, a read-only folder, torch's own write failure, a checkpoint of random bytes, an input too
large for the attention's memory, a 1-pixel-high photo, ``torchrun`` off ``PATH``, a list with a byte-order
mark or a repeated id, a missing photo. Machine faults are simulated (tests run as root, whom ``chmod``
does not stop).
"""
from __future__ import annotations

import errno
import os
import pathlib
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import inference_rw
import inference_segmentation
import inference_semformer
import make_affinity_labels
import make_pseudo_labels
import train_caae
import train_segmentation
from core.cam import ATTENTION_LIMIT_BYTES
from core.semformer import SemFormerSegmentor
from tests.cli_runner import REPO
from tests.test_faults import CAMS, caae_command, cams, data, first_id, outcome, save_affinitynet  # noqa: F401
from tools import baseline_cams
from tools.artifacts.files import FREE_SPACE, WRITABLE
from tools.artifacts.model_card import describe_model, write_card
from tools.artifacts.predictions import load_prediction
from tools.cli.arguments import UsageError
from tools.cli.cam_limits import check_cam_inputs
from tools.cli.exits import EXIT_ERROR, EXIT_USAGE
from tools.cli.presets import vit_kwargs
from tools.data.descriptor import load_descriptor
from tools.data.readers import make_reader
from tools.pipeline import Settings, Stage, command

SEMFORMER = "S"
TINY_SEMFORMER = {**vit_kwargs("tiny"), "image_size": 64, "class_dim": 16}  # 2 heads, patch 8, depth 1


# ----------------------------------------------------------------------------- helpers
def caae_flags(data: Path, experiments: Path, *extra: str) -> list[str]:
    """``train_caae.py``'s flags for a one-epoch tiny run without workers."""
    return caae_command(data, experiments, "--max_epoch", "1", "--num_workers", "0", *extra)[1:]


def temporary_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def save_semformer(experiments: Path, num_classes: int) -> None:
    """A random tiny SemFormer segmentor with its model card as ``models/S.pth``."""
    segmentor = SemFormerSegmentor(num_classes, **TINY_SEMFORMER)
    model = experiments / "models" / f"{SEMFORMER}.pth"
    model.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"segmentor.{key}": value for key, value in segmentor.state_dict().items()}, model)
    write_card(model, {**describe_model("semformer", num_classes, TINY_SEMFORMER), "finished": True})


def replace_photo(data: Path, image_id: str, image: Image.Image) -> None:
    image.save(data.parent / "JPEGImages" / f"{image_id}.jpg", quality=95)


def one_id_list(tmp_path: Path, image_id: str) -> Path:
    listing = tmp_path / "one.txt"
    listing.write_text(image_id + "\n")
    return listing


# ----------------------------------------------------------------------------- 1. writes that fail
def test_a_full_disk_while_a_stage_writes_names_the_file_and_leaves_no_temporary(cams, capsys, monkeypatch,
                                                                                  tmp_path):
    flags, _ = cams
    write_bytes = pathlib.Path.write_bytes

    def full_disk(self: Path, content: bytes) -> int:
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, content)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    code, message = outcome(capsys, make_pseudo_labels.main, "--experiment_name", CAMS, "--n_jobs", "1",
                            "--crf_iteration", "0", *flags)
    folder = tmp_path / "exp" / "predictions" / f"{CAMS}@crf=0"
    assert code == EXIT_ERROR
    assert re.fullmatch(rf"error: {re.escape(str(folder))}/[^/]+: cannot write it \(No space left on device\); "
                        + re.escape(FREE_SPACE), message), message
    assert temporary_files(tmp_path / "exp") == []


def test_a_read_only_experiments_folder_names_the_file(cams, capsys, monkeypatch, tmp_path):
    flags, _ = cams

    def read_only(*args, dir: str, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, message = outcome(capsys, make_affinity_labels.main, "--experiment_name", CAMS, "--n_jobs", "1", *flags)
    folder = tmp_path / "exp" / "predictions" / f"{CAMS}@aff_fg=0.11_bg=0.15"
    assert code == EXIT_ERROR
    assert re.fullmatch(rf"error: {re.escape(str(folder))}/[^/]+: cannot write it \(Read-only file system\); "
                        + re.escape(WRITABLE), message), message


def test_a_write_outside_the_atomic_writer_is_one_line_too(capsys):
    """``run_main`` maps the failed writes it knows (a log file opened for appending, say) to one line."""
    def over_quota(argv: list[str]) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/scratch/exp/logs/T.txt")

    assert outcome(capsys, over_quota) == (EXIT_ERROR, f"error: /scratch/exp/logs/T.txt: Disk quota exceeded; "
                                                       f"{FREE_SPACE}")


def test_torch_stream_writer_failure_during_a_checkpoint_save_is_one_line(capsys, data, monkeypatch, tmp_path):
    def failing_save(content, path, *args, **kwargs):
        Path(path).write_bytes(b"PK")  # torch had begun the file
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nframe #0: c10::ThrowEnforceNotMet")

    monkeypatch.setattr(torch, "save", failing_save)
    experiments = tmp_path / "exp"
    code, message = outcome(capsys, train_caae.main, *caae_flags(data, experiments))
    models = experiments / "models"
    assert code == EXIT_ERROR
    assert re.fullmatch(rf"error: {re.escape(str(models))}/CAAE@faults(\.last)?\.pth: cannot write it \(torch's "
                        r"writer failed: \[enforce fail at inline_container.cc:603\] . PytorchStreamWriter failed "
                        r"writing file data/0: file write failed\); the disk may be full or over quota: "
                        + re.escape(FREE_SPACE), message), message
    assert temporary_files(experiments) == []


# ----------------------------------------------------------------------------- 2. unreadable checkpoints
def test_a_checkpoint_of_random_bytes_is_not_readable_and_unsafe_loading_is_never_suggested(capsys, data,
                                                                                             tmp_path):
    garbage = tmp_path / "random.pth"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expected = (f"error: {garbage}: cannot read the checkpoint: not a readable checkpoint (not a torch archive of "
                "tensors and plain values); it is damaged, truncated or another kind of file: remake it, or copy it "
                "again from its source")
    assert outcome(capsys, train_caae.main, *caae_flags(data, tmp_path / "a", "--pretrained", str(garbage))) \
        == (EXIT_ERROR, expected)

    experiments = tmp_path / "b"
    last = experiments / "models" / "CAAE@faults.last.pth"
    last.parent.mkdir(parents=True)
    last.write_bytes(garbage.read_bytes())
    code, message = outcome(capsys, train_caae.main, *caae_flags(data, experiments, "--resume"))
    assert code == EXIT_ERROR
    assert message == expected.replace(str(garbage), str(last))
    assert "weights_only" not in message


# ----------------------------------------------------------------------------- 3. inputs too large for memory
@pytest.fixture
def semformer(data, tmp_path) -> list[str]:
    """A tiny SemFormer model: the flags of ``inference_semformer.py`` on it."""
    experiments = tmp_path / "exp"
    save_semformer(experiments, load_descriptor(data).num_classes)
    return ["--tag", SEMFORMER, "--dataset", str(data), "--experiments_dir", str(experiments), "--num_workers", "0"]


def test_an_absolute_scale_too_large_for_the_attention_is_refused_before_any_model_work(capsys, monkeypatch,
                                                                                       semformer, tmp_path):
    monkeypatch.setattr(inference_semformer, "CAMMakingDataset", None)  # any use of the inputs would fail
    code, message = outcome(capsys, inference_semformer.main, *semformer, "--scales", "5000", "--cra_layers", "1")
    assert code == EXIT_USAGE
    assert message == ("error: --scales 5000 is a 5000x5000 input of 390,629 tokens, whose attention in 1 block(s) "
                       "of 2 heads would take 2,273.8 GiB, above the limit of 16 GiB (at most 32,768 tokens); give "
                       "smaller scales")
    assert not (tmp_path / "exp" / "predictions").exists()


def test_a_huge_photo_is_refused_before_any_model_work_naming_its_id(capsys, data, monkeypatch, semformer,
                                                                    tmp_path):
    image_id = load_descriptor(data).read_ids("train")[2]
    replace_photo(data, image_id, Image.new("RGB", (6000, 4000), (90, 120, 150)))
    monkeypatch.setattr(inference_semformer, "CAMMakingDataset", None)
    code, message = outcome(capsys, inference_semformer.main, *semformer, "--domain", "train", "--cra_layers", "1")
    assert code == EXIT_ERROR
    assert message == (f"error: {data.parent / 'JPEGImages' / image_id}.jpg: id '{image_id}' (6000x4000) at scale 2 "
                       "is a 12000x8000 input of 1,500,004 tokens, whose attention in 1 block(s) of 2 heads would "
                       "take 33,527.8 GiB, above the limit of 16 GiB (at most 32,768 tokens); resize the photo "
                       "(VOC's have at most 500 px a side) or drop the large scales from --scales")


def test_the_papers_photos_and_scales_fit_the_limit(data):
    """DeiT-B (12 heads, patch 16), VOC's 21 class tokens, 4 CRA blocks: a 500x375 or 500x500 photo at the
    paper's scales, and the original's absolute ``--scales 1000``, pass; 1500 does not."""
    reader = make_reader(load_descriptor(data))
    image_id = load_descriptor(data).read_ids("train")[0]
    for size in ((500, 375), (500, 500)):
        replace_photo(data, image_id, Image.new("RGB", size))
        check_cam_inputs(reader, [image_id], (0.5, 1.0, 1.5, 2.0), 16, 21, 12, 4)
    check_cam_inputs(reader, [image_id], (1000,), 16, 21, 12, 4)
    with pytest.raises(UsageError, match="--scales 1500 is a 1500x1500 input of 8,857 tokens"):
        check_cam_inputs(reader, [image_id], (1500,), 16, 21, 12, 4)
    assert ATTENTION_LIMIT_BYTES == 16 * 2**30


# ----------------------------------------------------------------------------- 4. a 1-pixel-high photo
def test_a_one_pixel_high_photo_goes_through_every_stage(capsys, data, semformer, tmp_path):
    image_id = first_id(data)
    root = data.parent
    photo = Image.open(root / "JPEGImages" / f"{image_id}.jpg")
    row = photo.height // 2
    replace_photo(data, image_id, photo.crop((0, row, photo.width, row + 1)))
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        mask = Image.open(root / folder / f"{image_id}.png")
        mask.crop((0, row, mask.width, row + 1)).save(root / folder / f"{image_id}.png")
    experiments = tmp_path / "exp"
    flags = ["--dataset", str(data), "--experiments_dir", str(experiments), "--list",
             str(one_id_list(tmp_path, image_id))]

    inference_semformer.main([*semformer, *flags, "--scales", "1.0,0.5", "--cra_layers", "1"])
    cams = "S@train@scale=1.0,0.5"
    cam = load_prediction(experiments / "predictions" / cams / f"{image_id}.npz", 256)
    assert cam["hr_cam"].shape[1:] == (1, photo.width)
    make_affinity_labels.main(["--experiment_name", cams, "--n_jobs", "1", *flags])
    save_affinitynet(experiments)
    inference_rw.main(["--model_name", "Aff", "--architecture", "resnet18", "--cam_dir", cams, "--image_size", "64",
                       *flags])
    walk = inference_rw.output_name(inference_rw.parse_args(["--model_name", "Aff", "--cam_dir", cams, *flags]))
    make_pseudo_labels.main(["--experiment_name", walk, "--n_jobs", "1", *flags])
    evaluate.main(["--experiment_name", f"{walk}@crf=1", "--mode", "png", "--n_jobs", "1", *flags])
    train_segmentation.main(["--tag", "D", "--label_name", f"{walk}@crf=1", "--architecture", "deeplabv3plus",
                             "--backbone", "resnet18", "--pretrained", "none", "--backbone_bn", "train",
                             "--crop_size", "32", "--batch_size", "1", "--max_iters", "2", "--num_workers", "0",
                             "--eval_domain", "train", *flags])
    inference_segmentation.main(["--tag", "D", "--scales", "1.0", "--crf", "none", "--n_jobs", "1", *flags])
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. torchrun off PATH
def test_distributed_stages_run_through_the_interpreters_launcher_without_path(data, tmp_path):
    settings = Settings(data_dir=str(data.parent), dataset=str(data), experiments_dir=str(tmp_path / "exp"),
                        processes=1)
    stage = Stage("cams", "baseline CAMs", ["-m", "tools.baseline_cams", "--experiment_name", CAMS, "--domain",
                                             "train"], {"folder": CAMS}, None, True)
    argv = command(stage, settings)
    assert argv[:5] == [settings.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    written = sorted(path.stem for path in (tmp_path / "exp" / "predictions" / CAMS).glob("*.npz"))
    assert written == sorted(load_descriptor(data).read_ids("train"))


# ----------------------------------------------------------------------------- 6. lists as users make them
def test_a_list_with_a_byte_order_mark_is_read_as_its_ids(data, tmp_path):
    ids = load_descriptor(data).read_ids("train")
    listing = tmp_path / "bom.txt"
    listing.write_text("\n".join(ids) + "\n", encoding="utf-8-sig")
    baseline_cams.main(["--dataset", str(data), "--experiments_dir", str(tmp_path / "exp"), "--list", str(listing),
                        "--experiment_name", CAMS])
    assert sorted(path.stem for path in (tmp_path / "exp" / "predictions" / CAMS).glob("*.npz")) == sorted(ids)


def test_an_id_listed_twice_is_an_error(capsys, data, tmp_path):
    ids = load_descriptor(data).read_ids("train")
    listing = tmp_path / "twice.txt"
    listing.write_text("\n".join([*ids[:3], ids[1], *ids[3:]]) + "\n")
    code, message = outcome(capsys, train_caae.main, *caae_flags(data, tmp_path / "exp", "--list", str(listing)))
    assert code == EXIT_ERROR
    assert message == (f"error: {listing}: id '{ids[1]}' is listed twice (ids 2 and 4); remove the repeat, each id "
                       "is used once")


@pytest.mark.parametrize("folder, suffix, kind", [("JPEGImages", "jpg", "image"), ("Annotations", "xml",
                                                                                     "annotation")])
def test_a_missing_photo_or_annotation_is_named_before_any_work(capsys, data, tmp_path, folder, suffix, kind):
    image_id = load_descriptor(data).read_ids("train_aug")[17]
    missing = data.parent / folder / f"{image_id}.{suffix}"
    missing.unlink()
    experiments = tmp_path / "exp"
    code, message = outcome(capsys, train_caae.main, *caae_flags(data, experiments))
    assert (code, message) == (EXIT_ERROR, f"error: {missing}: {kind} of id '{image_id}' is missing")
    assert not experiments.exists()
