"""Faults and bad input: every case ends promptly with its exit status and a one-line message.

Scripts run in this process through ``run_main`` (as their ``__main__`` does) where that is enough, and
in a subprocess with a timeout where a hang or a signal is the point.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

import evaluate
import inference_rw
import inference_segmentation
import inference_semformer
import make_affinity_labels
import make_pseudo_labels
import train_affinitynet
import train_caae
import train_segmentation
import train_semformer
from core.affinitynet import AffinityNet
from core.caae import CAAE
from core.semformer import SemFormerSegmentor
from tests.cli_runner import REPO
from tools import baseline_cams
from tools.artifacts.files import load_label_png, save_npz
from tools.artifacts.model_card import describe_model, write_card
from tools.artifacts.predictions import load_prediction
from tools.cli.exits import EXIT_ABORTED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, run_main
from tools.cli.presets import vit_flags, vit_kwargs
from tools.data.descriptor import load_descriptor
from tools.pipeline import Settings, load_recipe

CAMS = "Baseline@centre"
TINY_VIT = ["--pretrained", "none", *vit_flags("tiny")]
TINY_CAAE = [*TINY_VIT, "--image_size", "64", "--decoder_width", "32", "--decoder_depth", "1", "--decoder_heads", "2",
             "--class_dim", "16"]
HANG_TIMEOUT = 90  # seconds: a run that has not ended by then hangs


# ----------------------------------------------------------------------------- helpers
def outcome(capsys, main, *argv: str) -> tuple[int, str]:
    """Exit status and last stderr line of ``run_main(main)``, as ``python <script> argv`` ends."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(lambda: main(list(argv)))
    finally:  # run_main ignores interrupts once main has ended: not in this test process
        for number, handler in handlers.items():
            signal.signal(number, handler)
    stderr = capsys.readouterr().err
    code = stop.value.code
    if isinstance(code, str):  # sys.exit(message): Python prints it and exits with status 1
        stderr, code = stderr + code, EXIT_ERROR
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return code, lines[-1]


@pytest.fixture
def data(synthetic_dataset, tmp_path) -> Path:
    """A private copy of the synthetic set (tests damage it): its descriptor."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset.parent, root)
    return root / "dataset.json"


@pytest.fixture
def cams(data, tmp_path) -> tuple[list[str], Path]:
    """Baseline CAMs of the ``train`` list: the dataset flags and the CAM folder."""
    flags = ["--dataset", str(data), "--experiments_dir", str(tmp_path / "exp"), "--domain", "train"]
    folder = baseline_cams.main([*flags, "--experiment_name", CAMS])
    return flags, folder


def first_id(data: Path) -> str:
    return load_descriptor(data).read_ids("train")[0]


def damage(folder: Path, image_id: str, **changes: np.ndarray) -> None:
    """Rewrite one CAM file with some arrays replaced (``None`` drops one)."""
    content = load_prediction(folder / f"{image_id}.npz", 256)
    content.update(changes)
    save_npz(folder / f"{image_id}.npz", **{name: value for name, value in content.items() if value is not None})


def save_affinitynet(experiments: Path) -> None:
    """A random ResNet-18 AffinityNet as ``models/Aff.pth`` (no description: ``--architecture`` says it)."""
    (experiments / "models").mkdir(parents=True, exist_ok=True)
    torch.save(AffinityNet("resnet18").state_dict(), experiments / "models" / "Aff.pth")


def run_subprocess(*args: str, timeout: float = HANG_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def last_line(text: str) -> str:
    assert "Traceback" not in text, text
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]


def caae_command(data: Path, experiments: Path, *extra: str) -> list[str]:
    return ["train_caae.py", "--tag", "CAAE@faults", *TINY_CAAE, "--batch_size", "4", "--dataset", str(data),
            "--experiments_dir", str(experiments), *extra]


# ----------------------------------------------------------------------------- 1. workers and signals
def test_truncated_jpeg_in_a_worker_ends_the_run_with_one_line(data, tmp_path):
    image = data.parent / "JPEGImages" / f"{load_descriptor(data).read_ids('train_aug')[5]}.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    result = run_subprocess(*caae_command(data, tmp_path / "exp", "--max_epoch", "1", "--num_workers", "2"))
    assert result.returncode == EXIT_ERROR
    assert last_line(result.stderr).startswith(f"error: {image}: unreadable image")


def test_unknown_class_in_an_xml_read_by_a_worker_ends_the_run_with_one_line(data, tmp_path):
    annotation = data.parent / "Annotations" / f"{load_descriptor(data).read_ids('train_aug')[3]}.xml"
    text = annotation.read_text()
    annotation.write_text(text.replace("<name>", "<name>unicorn", 1))
    result = run_subprocess(*caae_command(data, tmp_path / "exp", "--max_epoch", "1", "--num_workers", "2"))
    assert result.returncode == EXIT_ERROR
    assert f"error: {annotation}: unknown class name 'unicorn" in last_line(result.stderr)


def start_training(data: Path, experiments: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """A CAAE run with DataLoader workers, started and past its first logged iteration."""
    process = subprocess.Popen([sys.executable, *caae_command(data, experiments, "--num_workers", "2",
                                                              "--print_ratio", "0.2", *extra)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    deadline = time.monotonic() + HANG_TIMEOUT
    for line in process.stdout:
        lines.append(line)
        if "[train] iteration=" in line or time.monotonic() > deadline:
            break
    return process, lines


def test_two_ctrl_c_always_end_the_run_without_a_traceback(data, tmp_path):
    process, _ = start_training(data, tmp_path / "exp", "--max_epoch", "50")
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=HANG_TIMEOUT)
    assert process.returncode in (EXIT_INTERRUPTED, EXIT_ABORTED)
    assert last_line(output).startswith(("interrupted:", "aborted:"))


def test_sigterm_saves_the_checkpoint_exits_3_and_the_unfinished_model_is_refused(data, tmp_path):
    experiments = tmp_path / "exp"
    process, lines = start_training(data, experiments, "--max_epoch", "50")
    for line in process.stdout:  # wait for the epoch-1 model
        lines.append(line)
        if "saved model of epoch 1" in line:
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=HANG_TIMEOUT)
    assert process.returncode == EXIT_INTERRUPTED
    assert re.fullmatch(r"interrupted: training of CAAE@faults stopped at iteration \d+ with its checkpoint saved; "
                        r"continue with the same command plus --resume", last_line(output))
    assert (experiments / "models" / "CAAE@faults.last.pth").is_file()
    description = json.loads((experiments / "models" / "CAAE@faults.json").read_text())
    assert description["finished"] is False

    result = run_subprocess("train_semformer.py", "--tag", "S", "--ae_tag", "CAAE@faults", *TINY_VIT,
                            "--image_size", "64", "--class_dim", "16", "--batch_size", "4", "--max_epoch", "1",
                            "--num_workers", "0", "--dataset", str(data), "--experiments_dir", str(experiments))
    assert result.returncode == EXIT_ERROR
    assert last_line(result.stderr) == (
        f"error: {experiments / 'models' / 'CAAE@faults.json'}: the training run of CAAE@faults has not finished "
        "(the model is an intermediate epoch's); continue it with the training command plus --resume")


# ----------------------------------------------------------------------------- 2. damaged CAM files
def test_nan_in_a_cam_stops_the_random_walk_naming_the_file(cams, capsys, tmp_path):
    flags, folder = cams
    image_id = sorted(path.stem for path in folder.glob("*.npz"))[0]
    cam = load_prediction(folder / f"{image_id}.npz", 256)["cam"].copy()
    cam[0, :3, :3] = np.nan
    damage(folder, image_id, cam=cam)
    save_affinitynet(tmp_path / "exp")
    code, message = outcome(capsys, inference_rw.main, "--model_name", "Aff", "--architecture", "resnet18",
                            "--cam_dir", CAMS, "--image_size", "64", *flags)
    assert code == EXIT_ERROR
    assert message == f"error: {folder / image_id}.npz: 'cam' has 9 non-finite values (NaN or inf)"


def test_nan_in_hr_cam_is_refused_by_evaluate_and_pseudo_labels(cams, capsys, data):
    flags, folder = cams
    image_id = first_id(data)
    hr_cam = load_prediction(folder / f"{image_id}.npz", 256)["hr_cam"].copy()
    hr_cam[0, -3:, -3:] = np.inf
    damage(folder, image_id, hr_cam=hr_cam)
    expected = f"error: {folder / image_id}.npz: 'hr_cam' has 9 non-finite values (NaN or inf)"
    assert outcome(capsys, evaluate.main, "--experiment_name", CAMS, "--n_jobs", "1", *flags) == (EXIT_ERROR, expected)
    assert outcome(capsys, make_pseudo_labels.main, "--experiment_name", CAMS, "--n_jobs", "1", "--crf_iteration",
                   "0", *flags) == (EXIT_ERROR, expected)


def test_a_class_id_outside_the_dataset_is_refused(cams, capsys, data):
    flags, folder = cams
    image_id = first_id(data)
    keys = load_prediction(folder / f"{image_id}.npz", 256)["keys"].copy()
    keys[-1] = 99
    damage(folder, image_id, keys=keys)
    code, message = outcome(capsys, make_pseudo_labels.main, "--experiment_name", CAMS, "--n_jobs", "1", *flags)
    assert code == EXIT_ERROR
    assert message == (f"error: {folder / image_id}.npz: keys {keys.tolist()} must be 0 then distinct class ids "
                       "in 1..3 (the dataset has 4 classes)")


def test_more_keys_than_cam_channels_is_refused(cams, capsys, data):
    flags, folder = cams
    image_id = first_id(data)
    content = load_prediction(folder / f"{image_id}.npz", 256)
    keys = np.array([0, 1, 2, 3])[: len(content["keys"]) + 1]
    damage(folder, image_id, keys=keys)
    code, message = outcome(capsys, make_affinity_labels.main, "--experiment_name", CAMS, "--n_jobs", "1", *flags)
    assert code == EXIT_ERROR
    assert message.startswith(f"error: {folder / image_id}.npz: 'hr_cam' {content['hr_cam'].shape} must be "
                              f"(n, H, W) with n = {len(keys) - 1} channels")


def test_missing_or_wrong_size_hr_cam_is_refused(cams, capsys, data):
    flags, folder = cams
    image_id = first_id(data)
    content = load_prediction(folder / f"{image_id}.npz", 256)
    damage(folder, image_id, hr_cam=None)
    code, message = outcome(capsys, make_affinity_labels.main, "--experiment_name", CAMS, "--n_jobs", "1", *flags)
    assert (code, message) == (EXIT_ERROR, f"error: {folder / image_id}.npz: no 'hr_cam' array (has ['cam', 'keys'])")

    height, width = content["hr_cam"].shape[1:]
    damage(folder, image_id, hr_cam=content["hr_cam"][:, : height - 2])
    code, message = outcome(capsys, make_pseudo_labels.main, "--experiment_name", CAMS, "--n_jobs", "1",
                            "--crf_iteration", "0", *flags)
    assert (code, message) == (EXIT_ERROR, f"error: {folder / image_id}.npz: 'hr_cam' is {height - 2}x{width} but "
                                           f"the image needs {height}x{width}")


def test_an_image_without_objects_walks_to_an_all_background_label(cams, capsys, data, tmp_path):
    flags, folder = cams
    image_id = first_id(data)
    content = load_prediction(folder / f"{image_id}.npz", 256)
    damage(folder, image_id, keys=np.array([0]), cam=content["cam"][:0], hr_cam=content["hr_cam"][:0])
    save_affinitynet(tmp_path / "exp")
    listing = tmp_path / "one.txt"
    listing.write_text(image_id + "\n")
    flags = [*flags, "--list", str(listing)]
    inference_rw.main(["--model_name", "Aff", "--architecture", "resnet18", "--cam_dir", CAMS,
                       "--image_size", "64", *flags])
    walk_name = inference_rw.output_name(inference_rw.parse_args(["--model_name", "Aff", "--cam_dir", CAMS,
                                                                   *flags]))
    walk = load_prediction(tmp_path / "exp" / "predictions" / walk_name / f"{image_id}.npz", 4)
    assert walk["rw"].shape == (0, *content["hr_cam"].shape[1:])
    make_pseudo_labels.main(["--experiment_name", walk_name, "--n_jobs", "1", *flags])
    label_dir = tmp_path / "exp" / "predictions" / f"{walk_name}@crf=1"
    assert not load_label_png(label_dir / f"{image_id}.png").any()
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. make clean-demo
def test_demo_writes_under_demo_data_and_clean_demo_keeps_experiments(tmp_path):
    settings = Settings.from_recipe(load_recipe("demo"))
    folders = (Path(settings.experiments_dir), Path(settings.data_dir))
    assert [folder.relative_to(REPO).parts[0] for folder in folders] == ["demo_data", "demo_data"]
    for folder in ("experiments/models", "demo_data/synthetic", "demo_data/experiments/models"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "keep.pth").write_bytes(b"weights")
    subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "clean-demo"], cwd=tmp_path, check=True,
                   timeout=60)
    assert (tmp_path / "experiments" / "models" / "keep.pth").is_file()
    assert not (tmp_path / "demo_data").exists()


# ----------------------------------------------------------------------------- 4. one line, no traceback
@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "a descriptor is a JSON object with class_names, lists, ...; found a JSON list"),
    ('{"class_names": ["background", "a"], "lists": ["train.txt"]}', "'lists' must map domains to list files"),
    ('{"class_names": ["background", "a"], "ignore_index": "none"}',
     "'ignore_index' must be an integer in 2..255 (above the class ids, within a PNG label), got 'none'"),
    ('{"class_names": ["background", "a"], "palette": [[0, 0, 0], [300, 0, 0]]}',
     "'palette' must be \"voc\" or at most 256 [r, g, b] triples of integers in 0..255"),
    ("{not json", "not valid JSON"),
])
def test_a_malformed_descriptor_is_one_line(capsys, tmp_path, content, expected):
    descriptor = tmp_path / "dataset.json"
    descriptor.write_text(content)
    code, message = outcome(capsys, evaluate.main, "--experiment_name", CAMS, "--dataset", str(descriptor))
    assert code == EXIT_ERROR
    assert message.startswith(f"error: {descriptor}: ") and expected in message


def test_a_corrupt_model_description_is_one_line(capsys, data, tmp_path):
    models = tmp_path / "exp" / "models"
    models.mkdir(parents=True)
    torch.save({}, models / "S.pth")
    (models / "S.json").write_text('{"kind": "semformer", ')
    code, message = outcome(capsys, inference_semformer.main, "--tag", "S", "--dataset", str(data),
                            "--experiments_dir", str(tmp_path / "exp"))
    assert code == EXIT_ERROR
    assert message.startswith(f"error: {models / 'S.json'}: unreadable model description (")


@pytest.fixture
def affinity_labels(cams) -> list[str]:
    """Affinity labels of the baseline CAMs; the flags of ``train_affinitynet.py`` on them."""
    flags, _ = cams
    make_affinity_labels.main(["--experiment_name", CAMS, "--crf_iteration", "1", "--n_jobs", "1", *flags])
    return ["--tag", "Aff", "--label_name", f"{CAMS}@aff_fg=0.11_bg=0.15", "--architecture", "resnet18",
            "--batch_size", "2", "--max_epoch", "1", "--num_workers", "0", *flags]


def test_every_bad_pretrained_file_of_affinitynet_is_one_line(affinity_labels, capsys, tmp_path):
    missing = tmp_path / "absent.pth"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    for path, expected in ((missing, "--pretrained file not found"), (garbage, "cannot read the checkpoint"),
                           (wrong, "the weights do not fit a resnet18")):
        code, message = outcome(capsys, train_affinitynet.main, *affinity_labels, "--pretrained", str(path))
        assert code == EXIT_ERROR
        assert message.startswith(f"error: {path}: {expected}")


@pytest.mark.parametrize("main, flags, expected", [
    (inference_rw.main, ["--start", "0.5", "--end", "0.5"], "--start 0.5 must be below --end 0.5"),
    (inference_rw.main, ["--end", "1.5"], "argument --end: must be in [0, 1], got 1.5"),
    (inference_semformer.main, ["--scales", "1.0,0"], "argument --scales: scales must be positive finite numbers"),
    (inference_semformer.main, ["--scales", "1.0,nan"], "argument --scales: scales must be positive finite numbers"),
    (inference_semformer.main, ["--with_cra", "Flase"], "argument --with_cra: expected True or False, got 'Flase'"),
    (inference_semformer.main, ["--device", "gpu0"], "argument --device: not a torch device: 'gpu0'"),
    (train_caae.main, ["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
    (train_caae.main, ["--max_epoch", "-1"], "argument --max_epoch: must be >= 1, got -1"),
    (train_caae.main, ["--num_workers", "two"], "argument --num_workers: expected an integer, got 'two'"),
    (train_segmentation.main, ["--label_dir", "x", "--crop_size", "0"], "argument --crop_size: must be >= 1, got 0"),
    (train_caae.main, ["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
], ids=["start-end", "end", "scale-zero", "scale-nan", "bool-typo", "device", "batch", "epochs", "workers",
        "crop", "resume-overwrite"])
def test_bad_flags_are_a_usage_line(capsys, main, flags, expected):
    required = {inference_rw.main: ["--model_name", "A", "--cam_dir", "C"],
                inference_semformer.main: ["--tag", "S"], train_caae.main: [], train_segmentation.main: []}[main]
    code, message = outcome(capsys, main, *required, *flags)
    assert code == EXIT_USAGE
    assert message.endswith(f"error: {expected}") or f"error: {expected}" in message


def test_cuda_device_on_a_machine_without_one_is_a_usage_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, message = outcome(capsys, inference_semformer.main, "--tag", "S", "--device", "cuda")
    assert code == EXIT_USAGE and "argument --device: 'cuda': no CUDA device on this machine" in message


def test_flags_that_only_fail_once_the_model_or_data_is_known_are_usage_errors_too(capsys, data, tmp_path):
    """The checks that need a loaded model or the run's shards exit 2 through ``UsageError``, like argparse's."""
    experiments = tmp_path / "exp"
    flags = ["--dataset", str(data), "--experiments_dir", str(experiments)]
    num_classes = load_descriptor(data).num_classes
    segmentor = SemFormerSegmentor(num_classes, **vit_kwargs("tiny"), image_size=64, class_dim=16)
    model = experiments / "models" / "S.pth"
    model.parent.mkdir(parents=True)
    torch.save({f"segmentor.{key}": value for key, value in segmentor.state_dict().items()}, model)
    write_card(model, describe_model("semformer", num_classes, {**vit_kwargs("tiny"), "image_size": 64,
                                                                  "class_dim": 16}))
    caae = CAAE(num_classes, **vit_kwargs("tiny", "caae"), image_size=64, class_dim=16, decoder_width=32,
                decoder_depth=1, decoder_heads=2)
    torch.save(caae.state_dict(), experiments / "models" / "A.pth")
    write_card(experiments / "models" / "A.pth", describe_model("caae", num_classes, {
        **vit_kwargs("tiny", "caae"), "image_size": 64, "class_dim": 16, "decoder_width": 32, "decoder_depth": 1,
        "decoder_heads": 2}))
    cases = [
        (inference_semformer.main, ["--tag", "S", "--cra_layers", "5"], "--cra_layers 5 must lie in 1..1"),
        (train_affinitynet.main, ["--tag", "F", "--label_name", "L", "--image_size", "126"],
         "--image_size 126 must be a multiple of 4"),
        (train_semformer.main, ["--tag", "T", "--ae_tag", "A", *TINY_VIT, "--image_size", "64"],
         "--class_dim 256 differs from the CAAE's 16"),
        (inference_segmentation.main, ["--tag", "D", "--submission", "--start", "0.5"],
         "--submission packs the whole list"),
    ]
    for main, argv, expected in cases:
        code, message = outcome(capsys, main, *argv, *flags)
        assert (code, f"error: {expected}" in message) == (EXIT_USAGE, True), message


# ----------------------------------------------------------------------------- 5. smaller ones
def test_an_id_that_is_not_a_file_name_is_refused(cams, capsys, tmp_path):
    flags, _ = cams
    listing = tmp_path / "escape.txt"
    listing.write_text("syn_train_000000\n../../outside\n")
    code, message = outcome(capsys, make_pseudo_labels.main, "--experiment_name", CAMS, "--list", str(listing),
                            *flags)
    assert code == EXIT_ERROR
    assert message == (f"error: {listing}, id 2: id '../../outside' is not a plain file name "
                       "(no '/', '\\', or leading '.')")


def test_next_commands_keep_the_list_and_score_train_aug_on_train(cams, capsys, data, tmp_path):
    flags, folder = cams
    listing = tmp_path / "some.txt"
    listing.write_text("\n".join(load_descriptor(data).read_ids("train")[:2]) + "\n")
    make_affinity_labels.main(["--experiment_name", CAMS, "--crf_iteration", "0", "--n_jobs", "1", *flags,
                               "--list", str(listing)])
    assert f"--list {listing}" in capsys.readouterr().out
    from tools.cli.stage_data import evaluation_domain
    descriptor = load_descriptor(data)
    assert evaluation_domain(descriptor, inference_semformer.parse_args(["--tag", "S", "--domain", "train_aug"])) \
        == "train"
    assert evaluation_domain(descriptor, inference_semformer.parse_args(["--tag", "S", "--domain", "val"])) == "val"


def test_offline_imagenet_weights_stop_before_training_with_one_line(capsys, data, tmp_path, monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nCheck your connection.")
        return create_model(*args, **kwargs)

    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    flags = [flag for flag in caae_command(data, tmp_path / "exp", "--max_epoch", "1")[1:] if flag != "none"]
    flags.remove("--pretrained")  # the default: timm, the tag's own weights (ImageNet-1k for DeiT)
    code, message = outcome(capsys, train_caae.main, *flags)
    assert code == EXIT_ERROR
    assert message == ("error: cannot fetch timm's deit_small_patch16_224 weights 'fb_in1k' (OSError: We couldn't "
                       "connect to 'https://huggingface.co' to load this file.); on an offline machine pass a local "
                       "file with --pretrained PATH, or train from scratch with --pretrained none")
    assert not (tmp_path / "exp" / "models").exists()


def test_an_architecture_flag_that_contradicts_the_saved_model_is_an_error(capsys, data, tmp_path):
    models = tmp_path / "exp" / "models"
    models.mkdir(parents=True)
    torch.save({}, models / "C.pth")
    (models / "C.json").write_text(json.dumps({"kind": "caae", "num_classes": 4, "backbone_name": "deit_small_patch16_224",
                                               "image_size": 64, "backbone_kwargs": {"depth": 1}}))
    semformer = ["--tag", "S", "--ae_tag", "C", *TINY_VIT, "--class_dim", "16",
                 "--dataset", str(data), "--experiments_dir", str(tmp_path / "exp")]
    code, message = outcome(capsys, train_semformer.main, *semformer, "--ae_vit_depth", "3")
    assert code == EXIT_ERROR
    assert message == (f"error: {models / 'C.json'}: --ae_vit_depth 3 was given but the model was trained with 1; "
                       "drop the flag (the model's description rebuilds it) or pick another model")
