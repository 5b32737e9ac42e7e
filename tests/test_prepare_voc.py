"""tools.prepare_voc: VOC 2012 + SBD from small archives in the real layouts (and their folders) to the
pipeline's layout; masks, lists, report, comparison, resuming, downloads and the one-line errors."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image
from torchvision.datasets import SBDataset, VOCSegmentation
from torchvision.datasets.voc import DATASET_YEAR_DICT

from tests.voc_layout import write_mask, write_xml
from tools.cli.exits import run_main
from tools.data.descriptor import DEFAULT_DESCRIPTOR, load_descriptor, voc_palette
from tools.data.readers import make_reader
from tools.data.voc import read_mask_png
from tools.prepare_voc import PUBLISHED_NAMES, SBD_LAYOUT, VOC_LAYOUT, main, published_downloads

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = load_descriptor(DEFAULT_DESCRIPTOR).class_names
VOC_ROOT, SBD_ROOT = Path(*VOC_LAYOUT.root), Path(*SBD_LAYOUT.root)
VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000033", "2007_000042"]
OTHER_PHOTOS = ["2008_000002", "2008_000003", "2008_000007", "2008_000008"]  # in VOC, no VOC mask
SBD_TRAIN = ["2007_000032", "2008_000002", "2008_000003"]  # 2007_000032: VOC's own mask wins
SBD_VAL = ["2007_000033", "2008_000007"]  # 2007_000033 is VOC val: not in train_aug
SBD_ONLY = ["2008_000002", "2008_000003", "2008_000007"]
TRAIN_AUG = ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000007"]
NUM_SBD_CLASSES = 20  # GTcls.Boundaries: one sparse map per foreground class
SUBPROCESS_TIMEOUT = 120
POLL_SECONDS = 0.002
KILL_PHOTOS = 60  # enough photos that a kill lands mid-way


def _shape(image_id: str) -> tuple[int, int]:
    """A small (H, W) of its own for every id."""
    number = int(image_id[-2:])
    return 12 + number % 5, 16 + number % 7


def voc_mask(image_id: str) -> np.ndarray:
    """A rectangle of class ``1 + number % 20`` with VOC's 255 band on its border."""
    height, width = _shape(image_id)
    mask = np.zeros((height, width), np.uint8)
    mask[2:9, 3:12] = 255
    mask[3:8, 4:11] = 1 + int(image_id[-2:]) % 20
    return mask


def sbd_segmentation(image_id: str) -> np.ndarray:
    """Another rectangle, of class ``20 - number % 20``, with no 255 (SBD has none)."""
    height, width = _shape(image_id)
    segmentation = np.zeros((height, width), np.uint8)
    segmentation[1:10, 2:9] = 20 - int(image_id[-2:]) % 20
    return segmentation


def write_sbd_mat(path: Path, segmentation: np.ndarray, struct: str = "GTcls") -> None:
    """SBD's cls/<id>.mat: a struct GTcls with Segmentation, Boundaries (a 20x1 cell of sparse maps) and
    CategoriesPresent."""
    present = [value for value in np.unique(segmentation).tolist() if 0 < value <= NUM_SBD_CLASSES]
    boundaries = np.empty((NUM_SBD_CLASSES, 1), dtype=object)
    for index in range(NUM_SBD_CLASSES):
        boundaries[index, 0] = scipy.sparse.csc_matrix(segmentation == index + 1)
    scipy.io.savemat(path, {struct: {"Segmentation": segmentation, "Boundaries": boundaries,
                                     "CategoriesPresent": np.array(present, np.uint8).reshape(-1, 1)}})


def _write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{image_id}\n" for image_id in ids))


def build_folders(base: Path, extra_photos: int = 0) -> tuple[Path, Path]:
    """The unpacked VOC tar and SBD tgz, ``(voc, sbd)``: photos, XMLs, palette masks and ImageSets lists;
    SBD's img, cls .mat files and train/val lists. ``extra_photos`` more VOC photos of 320x240."""
    voc, sbd = base / "voc", base / "sbd"
    voc_root, sbd_root = voc / VOC_ROOT, sbd / SBD_ROOT
    for folder in ("JPEGImages", "Annotations", "SegmentationClass"):
        (voc_root / folder).mkdir(parents=True)
    for folder in ("img", "cls"):
        (sbd_root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    extra = [(f"2009_{index:06d}", (240, 320)) for index in range(extra_photos)]
    for image_id, (height, width) in [(i, _shape(i)) for i in VOC_TRAIN + VOC_VAL + OTHER_PHOTOS] + extra:
        photo = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        photo.save(voc_root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        class_name = CLASS_NAMES[1 + int(image_id[-2:]) % 20]
        write_xml(voc_root / "Annotations" / f"{image_id}.xml", (width, height), [(class_name, (4, 3, 11, 8))])
    for image_id in VOC_TRAIN + VOC_VAL:
        write_mask(voc_root / "SegmentationClass" / f"{image_id}.png", voc_mask(image_id))
    for name, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", sorted(VOC_TRAIN + VOC_VAL))):
        _write_list(voc_root / "ImageSets" / "Segmentation" / f"{name}.txt", ids)
    for image_id in sorted(set(SBD_TRAIN + SBD_VAL)):
        shutil.copy(voc_root / "JPEGImages" / f"{image_id}.jpg", sbd_root / "img")
        write_sbd_mat(sbd_root / "cls" / f"{image_id}.mat", sbd_segmentation(image_id))
    _write_list(sbd_root / "train.txt", SBD_TRAIN)
    _write_list(sbd_root / "val.txt", SBD_VAL)
    return voc, sbd


def pack(folder: Path, archive: Path) -> Path:
    """A tar of the folder's contents (gzip for .tgz), members named as in the published archives."""
    with tarfile.open(archive, "w:gz" if archive.suffix == ".tgz" else "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


def _args(voc: Path, sbd: Path, out: Path, *flags: str) -> list[str]:
    return ["--voc", str(voc), "--sbd", str(sbd), "--out", str(out), "--workers", "1", *flags]


def _prepare(*args: str) -> tuple[str, str]:
    """Run the CLI in-process as ``run_main`` does; returns (stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        run_main(lambda: main(list(args)))
    return stdout.getvalue(), stderr.getvalue()


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file prepare_voc wrote, by path relative to ``out`` (temporary files excluded)."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and not path.name.startswith(".")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The folders and archives: voc, sbd (folders), voc_tar, sbd_tgz, and a reference list folder."""
    base = tmp_path_factory.mktemp("inputs")
    voc, sbd = build_folders(base)
    reference = base / "reference"
    _write_list(reference / "train.txt", VOC_TRAIN)
    _write_list(reference / "val.txt", VOC_VAL)
    _write_list(reference / "train_aug.txt", [*TRAIN_AUG[:-1], "2011_000001"])  # one id off each way
    return {"voc": voc, "sbd": sbd, "voc_tar": pack(voc, base / "voc.tar"), "sbd_tgz": pack(sbd, base / "sbd.tgz"),
            "reference": reference}


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory) -> tuple[Path, str, str]:
    """The archives prepared: ``(out, stdout, stderr)``."""
    out = tmp_path_factory.mktemp("prepared") / "VOC2012"
    stdout, stderr = _prepare(*_args(inputs["voc_tar"], inputs["sbd_tgz"], out, "--reference_lists",
                                     str(inputs["reference"])))
    return out, stdout, stderr


def test_fixture_is_in_the_layouts_torchvision_reads(inputs):
    sbd = SBDataset(str(inputs["sbd"] / SBD_ROOT), image_set="val", mode="segmentation")
    for index, image_id in enumerate(SBD_VAL):
        np.testing.assert_array_equal(np.array(sbd[index][1]), sbd_segmentation(image_id))
    boundaries = SBDataset(str(inputs["sbd"] / SBD_ROOT), image_set="train", mode="boundaries")[1][1]
    assert boundaries.shape == (NUM_SBD_CLASSES, *_shape(SBD_TRAIN[1]))
    voc = VOCSegmentation(str(inputs["voc"]), year="2012", image_set="val")
    np.testing.assert_array_equal(np.array(voc[1][1]), voc_mask(VOC_VAL[1]))
    with tarfile.open(inputs["voc_tar"]) as tar:
        assert "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" in tar.getnames()
    with tarfile.open(inputs["sbd_tgz"]) as tar:
        assert "benchmark_RELEASE/dataset/cls/2008_000002.mat" in tar.getnames()


def test_masks_voc_wins_sbd_elsewhere_with_the_voc_palette(prepared):
    out, _, _ = prepared
    for image_id in VOC_TRAIN + VOC_VAL:  # VOC's own, 255 band included, also where SBD has one
        np.testing.assert_array_equal(read_mask_png(out / "SegmentationClassAug" / f"{image_id}.png"),
                                      voc_mask(image_id))
        assert (out / "SegmentationClass" / f"{image_id}.png").exists()
    for image_id in SBD_ONLY:
        np.testing.assert_array_equal(read_mask_png(out / "SegmentationClassAug" / f"{image_id}.png"),
                                      sbd_segmentation(image_id))
    aug = sorted(path.stem for path in (out / "SegmentationClassAug").iterdir())
    assert aug == sorted(VOC_TRAIN + VOC_VAL + SBD_ONLY)
    for path in (out / "SegmentationClassAug").iterdir():
        with Image.open(path) as image:
            assert image.mode == "P"
            np.testing.assert_array_equal(np.array(image.getpalette()).reshape(-1, 3), voc_palette())
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_photos_xmls_and_voc_masks_are_copied(inputs, prepared):
    out, _, _ = prepared
    for folder in ("JPEGImages", "Annotations", "SegmentationClass"):
        source = inputs["voc"] / VOC_ROOT / folder
        assert sorted(path.name for path in (out / folder).iterdir()) == sorted(path.name for path in source.iterdir())
        for path in source.iterdir():
            assert (out / folder / path.name).read_bytes() == path.read_bytes()


def test_lists_counts_and_report(inputs, prepared):
    out, stdout, _ = prepared
    assert (out / "train.txt").read_text().split() == VOC_TRAIN
    assert (out / "val.txt").read_text().split() == VOC_VAL
    assert (out / "train_aug.txt").read_text().split() == TRAIN_AUG
    report = json.loads((out / "prepare_voc.json").read_text())
    assert report["photos"] == report["annotations"] == len(VOC_TRAIN + VOC_VAL + OTHER_PHOTOS)
    assert report["masks"] == {"voc": 4, "sbd": 3, "aug": 7}
    assert report["lists"] == {"train": 2, "val": 2, "train_aug": 5}
    assert report["inputs"] == {"voc": str(inputs["voc_tar"].resolve()), "sbd": str(inputs["sbd_tgz"].resolve())}
    assert "8 photos, 8 XMLs; masks: 4 from VOC, 3 from SBD, 7 in SegmentationClassAug" in stdout
    assert "lists: train 2, val 2, train_aug 5" in stdout


def test_lists_are_compared_with_the_reference(inputs, prepared):
    out, stdout, stderr = prepared
    assert f"train: 2 ids, as {inputs['reference'] / 'train.txt'}" in stdout
    assert (f"warning: train_aug: 5 ids, 5 in {inputs['reference'] / 'train_aug.txt'}: 1 only here (first: "
            "2008_000007), 1 only in train_aug.txt (first: 2011_000001)") in stderr
    comparison = json.loads((out / "prepare_voc.json").read_text())["comparison"]
    assert comparison["train"]["equal"] and comparison["val"]["equal"]
    assert comparison["train_aug"] == {"reference": str(inputs["reference"] / "train_aug.txt"), "equal": False,
                                       "only_here": 1, "only_in_reference": 1, "first_only_here": ["2008_000007"],
                                       "first_only_in_reference": ["2011_000001"]}


def test_repository_lists_are_the_default_reference(inputs, tmp_path):
    _, stderr = _prepare(*_args(inputs["voc"], inputs["sbd"], tmp_path / "out"))
    reference = DEFAULT_DESCRIPTOR.parent
    assert (f"warning: train: 2 ids, 1,464 in {reference / 'train.txt'}: 0 only here, 1,462 only in train.txt "
            "(first: 2007_000063, 2007_000068, 2007_000121)") in stderr.splitlines()
    for name, count, total in (("train_aug", 5, "10,582"), ("val", 2, "1,449")):  # the fixture's ids are VOC's
        assert f"warning: {name}: {count} ids, {total} in {reference / f'{name}.txt'}: 0 only here, " in stderr


def test_the_project_reader_reads_the_prepared_set(prepared):
    out, _, _ = prepared
    descriptor = load_descriptor(out / "dataset.json")
    assert descriptor.class_names == CLASS_NAMES and descriptor.data_dir == out.resolve()
    reader = make_reader(descriptor)
    assert descriptor.read_ids("train_aug") == TRAIN_AUG
    for image_id in descriptor.read_ids("train_aug"):
        assert reader.load_image(image_id).size == _shape(image_id)[::-1]
        label = reader.load_label(image_id)
        assert label.nonzero()[0].tolist() == [int(image_id[-2:]) % 20]  # class 1 + number % 20
        assert reader.load_mask(image_id, aug=True, required=True).shape == _shape(image_id)
    np.testing.assert_array_equal(reader.load_mask("2007_000039", required=True), voc_mask("2007_000039"))


def test_folders_as_inputs_give_the_same_files_and_workers_too(inputs, prepared, tmp_path):
    out, _, _ = prepared
    from_folders = tmp_path / out.name
    flags = ("--reference_lists", str(inputs["reference"]))
    _prepare(*_args(inputs["voc"] / VOC_ROOT, inputs["sbd"], from_folders, *flags))  # the root itself, or above
    expected = {name: data for name, data in _outputs(out).items() if name != "prepare_voc.json"}
    assert {name: data for name, data in _outputs(from_folders).items() if name != "prepare_voc.json"} == expected
    in_parallel = tmp_path / "parallel" / out.name
    _prepare(*_args(inputs["voc_tar"], inputs["sbd_tgz"], in_parallel, *flags), "--workers", "2")
    assert _outputs(in_parallel) == _outputs(out)


def test_rerun_of_a_partly_written_folder_gives_identical_files(inputs, prepared, tmp_path):
    out, _, _ = prepared
    partial = tmp_path / out.name
    shutil.copytree(out, partial)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        for path in sorted((partial / folder).iterdir())[::2]:
            path.unlink()
    for name in ("dataset.json", "train_aug.txt", "prepare_voc.json"):
        (partial / name).unlink()
    (partial / "JPEGImages" / ".2008_000002.jpg.abc.tmp").write_bytes(b"half a photo")  # a killed write
    _prepare(*_args(inputs["voc_tar"], inputs["sbd_tgz"], partial, "--reference_lists", str(inputs["reference"])))
    assert _outputs(partial) == _outputs(out)


def test_sigkill_mid_way_then_rerun_completes_identical_files(tmp_path):
    voc, sbd = build_folders(tmp_path / "inputs", extra_photos=KILL_PHOTOS)
    voc_tar, sbd_tgz = pack(voc, tmp_path / "voc.tar"), pack(sbd, tmp_path / "sbd.tgz")
    out = tmp_path / "killed" / "VOC2012"
    process = subprocess.Popen([sys.executable, "-m", "tools.prepare_voc", *_args(voc_tar, sbd_tgz, out)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not (out / "JPEGImages").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    total = len(VOC_TRAIN + VOC_VAL + OTHER_PHOTOS) + KILL_PHOTOS
    assert len(list((out / "JPEGImages").glob("*.jpg"))) < total and not (out / "dataset.json").exists()
    _prepare(*_args(voc_tar, sbd_tgz, out))
    fresh = tmp_path / "fresh" / "VOC2012"
    _prepare(*_args(voc_tar, sbd_tgz, fresh))
    assert _outputs(out) == _outputs(fresh)
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == total


def test_published_names_and_roots_are_torchvisions():
    voc = DATASET_YEAR_DICT["2012"]
    assert PUBLISHED_NAMES == {"--voc": voc["filename"], "--sbd": SBDataset.filename}
    assert VOC_LAYOUT.root == Path(voc["base_dir"]).parts
    downloads = published_downloads()
    assert (downloads["--voc"].url, downloads["--voc"].md5) == (voc["url"], voc["md5"])
    assert (downloads["--sbd"].url, downloads["--sbd"].md5) == (SBDataset.url, SBDataset.md5)


def test_download_uses_torchvisions_urls_and_checksums(inputs, tmp_path, monkeypatch, capsys):
    fetched = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        fetched.append((url, filename, md5))
        source = inputs["voc_tar"] if filename == PUBLISHED_NAMES["--voc"] else inputs["sbd_tgz"]
        Path(root).mkdir(parents=True, exist_ok=True)  # as download_url does
        shutil.copy(source, Path(root) / filename)

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    out = tmp_path / "out"
    _prepare("--download", "--out", str(out), "--workers", "1")
    voc = DATASET_YEAR_DICT["2012"]
    assert fetched == [(voc["url"], "VOCtrainval_11-May-2012.tar", voc["md5"]),
                       (SBDataset.url, "benchmark.tgz", SBDataset.md5)]
    assert (out / "downloads" / "benchmark.tgz").is_file()
    assert (out / "train_aug.txt").read_text().split() == TRAIN_AUG

    def failing_download(url: str, root: str, filename: str, md5: str) -> None:
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", failing_download)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(["--download", "--voc", str(inputs["voc_tar"]), "--out", str(tmp_path / "again")]))
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == (f"error: {SBDataset.url}: download failed (File not found or "
                                               "corrupted.); download benchmark.tgz yourself and pass --sbd")


# ----------------------------------------------------------------------------- bad inputs through the real CLI
def _break(base: Path, breakage: str) -> tuple[Path, Path]:
    """Archives with one thing wrong: ``(voc, sbd)``."""
    voc, sbd = build_folders(base)
    voc_root, sbd_root = voc / VOC_ROOT, sbd / SBD_ROOT
    if breakage == "missing_photo":
        (voc_root / "JPEGImages" / "2007_000039.jpg").unlink()
    elif breakage == "missing_list":
        (sbd_root / "val.txt").unlink()
    elif breakage == "no_gtcls":
        write_sbd_mat(sbd_root / "cls" / "2008_000003.mat", sbd_segmentation("2008_000003"), struct="GTinst")
    elif breakage == "sbd_value_37":
        segmentation = sbd_segmentation("2008_000007")
        segmentation[0, 0] = 37
        write_sbd_mat(sbd_root / "cls" / "2008_000007.mat", segmentation)
    elif breakage == "voc_value_37":
        mask = voc_mask("2007_000042")
        mask[0, :3] = 37
        write_mask(voc_root / "SegmentationClass" / "2007_000042.png", mask)
    elif breakage == "no_cls_folder":
        shutil.rmtree(sbd_root / "cls")
    elif breakage == "unreadable_mat":
        (sbd_root / "cls" / "2008_000002.mat").write_bytes(b"MATLAB 5.0, but not really")
    elif breakage == "rgb_mask":
        Image.fromarray(np.zeros((*_shape("2007_000033"), 3), np.uint8)).save(
            voc_root / "SegmentationClass" / "2007_000033.png")
    elif breakage == "missing_xml":
        (voc_root / "Annotations" / "2007_000042.xml").unlink()
    elif breakage == "no_mask_anywhere":
        (sbd_root / "cls" / "2008_000007.mat").unlink()
    name = PUBLISHED_NAMES["--voc"] if breakage == "checksum" else "voc.tar"
    voc_archive, sbd_archive = pack(voc, base / name), pack(sbd, base / "sbd.tgz")
    if breakage == "truncated_archive":
        sbd_archive.write_bytes(sbd_archive.read_bytes()[:-600])
    return voc_archive, sbd_archive


BREAKAGES = {
    "missing_photo": "{voc}:VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg: not found, the photo of id '2007_000039' "
                     "of the train list",
    "missing_list": "{sbd}:benchmark_RELEASE/dataset/val.txt: not found",
    "no_gtcls": "{sbd}:benchmark_RELEASE/dataset/cls/2008_000003.mat: no 'GTcls' struct (SBD's cls/*.mat hold "
                "GTcls.Segmentation); found ['GTinst']",
    "sbd_value_37": "{sbd}:benchmark_RELEASE/dataset/cls/2008_000007.mat: mask values outside 0..20 and 255 (37)",
    "voc_value_37": "{voc}:VOCdevkit/VOC2012/SegmentationClass/2007_000042.png: mask values outside 0..20 and 255 "
                    "(37)",
    "checksum": "{voc}: its MD5 is not the published " + DATASET_YEAR_DICT["2012"]["md5"]
                + " (a damaged or another file: download it again, or use --download)",
}


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory) -> dict[str, tuple[int, str, str, Path]]:
    """Every breakage run through ``python -m tools.prepare_voc``, all started at once:
    ``{breakage: (exit status, stderr, expected message, out)}``."""
    runs = {}
    for breakage, message in BREAKAGES.items():
        base = tmp_path_factory.mktemp(breakage)
        voc, sbd = _break(base, breakage)
        out = base / "out"
        process = subprocess.Popen([sys.executable, "-m", "tools.prepare_voc", *_args(voc, sbd, out)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs[breakage] = (process, message.format(voc=voc, sbd=sbd), out)
    return {breakage: (process.wait(SUBPROCESS_TIMEOUT), process.stderr.read(), message, out)
            for breakage, (process, message, out) in runs.items()}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_archives_give_one_line_errors(failed_runs, breakage):
    status, stderr, message, out = failed_runs[breakage]
    assert status == 1, stderr
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert error_lines == [f"error: {message}"], stderr
    assert not (out / "dataset.json").exists()


@pytest.mark.parametrize("flags, message", [
    ((), "give both --voc and --sbd, or --download for the ones not given"),
    (("--voc", "a.tar"), "give both --voc and --sbd"),
    (("--download", "--voc", "a.tar", "--sbd", "b.tgz"), "--download fetches the archives that --voc and --sbd"),
    (("--voc", "a.tar", "--sbd", "b.tgz", "--workers", "0"), "argument --workers: must be >= 1, got 0"),
])
def test_argument_problems_are_usage_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        main([*flags, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_input_is_a_one_line_error(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(_args(tmp_path / "absent.tar", inputs["sbd_tgz"], tmp_path / "out")))
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'absent.tar'}: not found"


@pytest.mark.parametrize("breakage, message", [
    ("no_cls_folder", "{sbd}:benchmark_RELEASE/dataset/cls: no *.mat files (a wrong or damaged input)"),
    ("unreadable_mat", "{sbd}:benchmark_RELEASE/dataset/cls/2008_000002.mat: unreadable MATLAB file ("),
    ("rgb_mask", "{voc}:VOCdevkit/VOC2012/SegmentationClass/2007_000033.png: a mask must be a palette or grayscale "
                 "PNG, got mode RGB"),
    ("missing_xml", "{voc}:VOCdevkit/VOC2012/Annotations/2007_000042.xml: not found, the XML of id '2007_000042' of "
                    "the val list"),
    ("no_mask_anywhere", "{sbd}:benchmark_RELEASE/dataset/cls/2008_000007.mat (nor {voc}:VOCdevkit/VOC2012/"
                         "SegmentationClass/2008_000007.png): not found, the mask of id '2008_000007' of the "
                         "train_aug list"),
    ("truncated_archive", "{sbd}: damaged or not a tar archive ("),
])
def test_more_bad_inputs_give_one_line_errors(tmp_path, capsys, breakage, message):
    voc, sbd = _break(tmp_path, breakage)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(_args(voc, sbd, tmp_path / "out")))
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {message.format(voc=voc, sbd=sbd)}"), error
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_a_folder_without_the_layout_is_an_error(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(_args(inputs["sbd"], inputs["sbd"], tmp_path / "out")))
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == (f"error: {inputs['sbd']}: no VOCdevkit/VOC2012/JPEGImages/ folder "
                                               "inside (pass the archive or the folder it unpacks to)")
