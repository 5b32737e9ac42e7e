"""tools.import_cams: peer CAM folders written as each peer's code writes them, imported and read back.

Each fixture folder follows the saving code cited in tools/cam_formats.py (key conventions, torch
tensors inside the pickles, stride-4 and full-size arrays); the imported files must give the peer's
scores back (up to the compact format's 1/120000) under our keys, and every bad input must stop the
real command line with one line, exit status 1 and no DEST.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.conventions import strided_size
from tests.cli_runner import REPO, run_script
from tools.artifacts.cam_formats import FORMATS, ImageFacts, PeerCams
from tools.artifacts.files import ArtifactError, load_label_png
from tools.artifacts.fingerprint import folder_fingerprint
from tools.artifacts.predictions import load_prediction
from tools.artifacts.provenance import read_run
from tools.cli.arguments import UsageError
from tools.data.descriptor import load_descriptor
from tools.data.voc import VOCReader
from tools.import_cams import imported_cams
from tools.import_cams import main as import_cams

EXIT_ERROR = 1
TOLERANCE = 1 / 120000 + 1e-6  # the compact format's half step, plus float32 rounding
PEER_EPSILON = 1e-5  # the peers divide by max + 1e-5
LOW_STRIDE = 16  # the peers' network output stride
CLI = ("-m", "tools.import_cams")


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    """Descriptor path, reader, the 6 ``train`` ids and the dataset flags."""
    descriptor = load_descriptor(synthetic_dataset)
    flags = ["--dataset", str(synthetic_dataset), "--domain", "train", "--n_jobs", "1"]
    return synthetic_dataset, VOCReader(descriptor), descriptor.read_ids("train"), flags


def peer_maps(seed: int, classes: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stride-4, full-size)`` maps as IRN / SemFormer make them: random non-negative network output at
    stride 16, resized to the stride-4 grid and to the size rounded up to 16 then cropped, each divided
    by its max + 1e-5."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(classes, -(-height // LOW_STRIDE), -(-width // LOW_STRIDE), generator=generator) * 3
    up = (-(-height // LOW_STRIDE) * LOW_STRIDE, -(-width // LOW_STRIDE) * LOW_STRIDE)
    strided = F.interpolate(low[None], strided_size(height, width), mode="bilinear", align_corners=False)[0]
    full = F.interpolate(low[None], up, mode="bilinear", align_corners=False)[0, :, :height, :width]
    strided = strided / (F.adaptive_max_pool2d(strided, (1, 1)) + PEER_EPSILON)
    full = full / (F.adaptive_max_pool2d(full, (1, 1)) + PEER_EPSILON)
    return strided, full


def write_peer_folder(kind: str, folder: Path, reader: VOCReader, ids: list[str]) -> dict[str, dict]:
    """The peer folder of ``kind`` for ``ids``; returns each id's expected ``cam`` / ``hr_cam`` (ascending
    class order, max 1; None where the importer derives it) and keys."""
    folder.mkdir(parents=True)
    expected = {}
    for index, image_id in enumerate(ids):
        label = reader.load_label(image_id)
        height, width = reader.image_size(image_id)
        valid_cat = torch.nonzero(torch.from_numpy(label))[:, 0]  # as every peer takes its classes
        strided, full = peer_maps(index, len(valid_cat), height, width)
        keys = [0, *(valid_cat + 1).tolist()]
        cam, hr_cam = strided.numpy(), full.numpy()
        path = folder / f"{image_id}.npy"
        if kind == "semformer":  # inference_semformer.py
            np.save(path, dict(keys=np.pad(valid_cat + 1, (1, 0), mode="constant"), cam=strided.cpu().numpy(),
                               hr_cam=full.cpu().numpy()))
        elif kind == "puzzlecam":  # inference_classification.py: 'cam' stays a tensor
            np.save(path, {"keys": np.pad(valid_cat + 1, (1, 0), mode="constant"), "cam": strided.cpu(),
                           "hr_cam": full.cpu().numpy()})
        elif kind == "irn":  # step/make_cam.py
            np.save(path, {"keys": valid_cat, "cam": strided.cpu(), "high_res": full.cpu().numpy()})
        elif kind == "amn":  # step/make_amn_cam.py: the background's channel first
            background = torch.rand(1, *strided.shape[1:]), torch.rand(1, height, width)
            np.save(path, {"keys": valid_cat, "cam": torch.cat([background[0], strided]),
                           "high_res": torch.cat([background[1], full]).numpy()})
        elif kind == "clip-es":  # generate_cams_voc12.py: XML order, min-max scaled, float16, full size only
            order = list(dict.fromkeys(reader.read_object_names(image_id)))
            clip_keys = [reader.class_index[name] for name in order]
            maps = full[torch.tensor([valid_cat.tolist().index(key) for key in clip_keys], dtype=torch.long)]
            maps = (maps - maps.amin(dim=(1, 2), keepdim=True)) / (maps.amax(dim=(1, 2), keepdim=True)
                                                                  - maps.amin(dim=(1, 2), keepdim=True) + 1e-7)
            np.save(path, {"keys": torch.tensor(clip_keys).numpy(), "attn_highres": maps.numpy().astype(np.float16)})
            hr_cam = np.asarray(maps, dtype=np.float16).astype(np.float32)[np.argsort(clip_keys)]
            cam = None
        elif kind == "dense-all":  # (K, H, W) with the background channel
            dense = np.zeros((len(label) + 1, height, width), np.float32)
            dense[0] = 0.5
            dense[np.asarray(keys[1:])] = hr_cam
            np.save(path, dense)
            cam = None
        elif kind == "dense-strided":  # (n, h/4, w/4) in an .npz
            np.savez(folder / f"{image_id}.npz", strided.numpy())
            hr_cam = None
        expected[image_id] = {"keys": keys, "cam": cam, "hr_cam": hr_cam}
    return expected


def scaled(maps: np.ndarray) -> np.ndarray:
    return maps / maps.max(axis=(1, 2), keepdims=True)


FORMAT_OF = {"semformer": "semformer", "puzzlecam": "puzzlecam", "irn": "irn", "amn": "irn", "clip-es": "clip-es",
             "dense-all": "dense", "dense-strided": "dense"}


@pytest.mark.parametrize("kind", sorted(FORMAT_OF))
def test_each_peer_format_round_trips(kind, dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    expected = write_peer_folder(kind, tmp_path / "peer", reader, ids)
    dest = import_cams([str(tmp_path / "peer"), str(tmp_path / "ours"), "--format", FORMAT_OF[kind],
                        "--allow_pickle", *flags])
    num_classes = len(reader.descriptor.class_names)
    for image_id in ids:
        height, width = reader.image_size(image_id)
        cams = load_prediction(dest / f"{image_id}.npz", num_classes, image_size=(height, width),
                               require=("cam", "hr_cam"))
        want = expected[image_id]
        assert cams["keys"].tolist() == want["keys"]
        for name in ("cam", "hr_cam"):
            assert np.allclose(cams[name].max(axis=(1, 2)), 1, atol=TOLERANCE)
            if want[name] is not None:
                assert np.abs(cams[name] - scaled(want[name])).max() <= TOLERANCE
        if want["cam"] is None:  # derived as ours resizes: bilinear to the stride-4 grid
            derived = F.interpolate(torch.from_numpy(want["hr_cam"])[None], strided_size(height, width),
                                    mode="bilinear", align_corners=False)[0].numpy()
            assert np.abs(cams["cam"] - scaled(derived)).max() <= TOLERANCE
        if want["hr_cam"] is None:  # derived as IRN's make_sem_seg_labels.py upsamples
            derived = F.interpolate(torch.from_numpy(want["cam"])[None], scale_factor=4, mode="bilinear",
                                    align_corners=False)[0, :, :height, :width].numpy()
            assert np.abs(cams["hr_cam"] - scaled(derived)).max() <= TOLERANCE


def test_run_json_names_source_and_format_and_a_changed_file_changes_the_fingerprint(dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    peer, dest = tmp_path / "peer", tmp_path / "ours"
    write_peer_folder("irn", peer, reader, ids)
    command = [str(peer), str(dest), "--format", "irn", "--allow_pickle", *flags]
    import_cams(command)
    run = read_run(dest)
    assert run["settings"]["format"] == "irn"
    assert run["inputs"]["source"] == {"path": str(peer.resolve()), "provenance": folder_fingerprint(peer, (".npy",))}
    assert import_cams(command) == dest and read_run(dest) == run  # the same files: up to date, untouched

    before = folder_fingerprint(peer, (".npy",))
    content = np.load(peer / f"{ids[0]}.npy", allow_pickle=True).item()
    content["high_res"] = content["high_res"] * 0.5
    np.save(peer / f"{ids[0]}.npy", content)
    assert folder_fingerprint(peer, (".npy",)) != before
    with pytest.raises(ArtifactError, match="imported from other source files"):
        import_cams(command)
    import_cams([*command, "--overwrite"])
    assert read_run(dest)["provenance"] != run["provenance"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ours", "peer"]  # no staging folder left


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def damage(kind: str, peer: Path, reader: VOCReader, ids: list[str]) -> Path:
    """Break one file of an IRN folder (or remove it); returns the file the error must name."""
    target = next(image_id for image_id in ids if not reader.load_label(image_id).all())
    path = peer / f"{target}.npy"
    if kind == "missing":
        path.unlink()
        return path
    content = np.load(path, allow_pickle=True).item()
    if kind == "size":
        content["high_res"] = content["high_res"][:, :-3]
    elif kind == "class":
        absent = np.flatnonzero(reader.load_label(target) == 0)[0]
        content["keys"] = torch.cat([content["keys"], torch.tensor([absent])])
        content["cam"] = torch.cat([content["cam"], content["cam"][:1]])
        content["high_res"] = np.concatenate([content["high_res"], content["high_res"][:1]])
    elif kind == "nan":
        content["high_res"][0, 1, 1] = np.nan
    np.save(path, content)
    return path


BAD_INPUTS = {"size": "'high_res' is", "class": "not among the image's labels", "nan": "non-finite values",
              "missing": "missing (1 of the 6 ids", "pickle": "pass --allow_pickle"}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_no_dest(kind, dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    peer, dest = tmp_path / "peer", tmp_path / "out" / "ours"
    write_peer_folder("irn", peer, reader, ids)
    named = peer if kind == "pickle" else damage(kind, peer, reader, ids)
    pickle_flag = [] if kind == "pickle" else ["--allow_pickle"]
    result = run_cli(*CLI, str(peer), str(dest), "--format", "irn", *pickle_flag, *flags, "--n_jobs", "2")
    assert result.returncode == EXIT_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    last = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith(f"error: {named}: ") and BAD_INPUTS[kind] in last, last
    assert not dest.exists()
    assert not (dest.parent.exists() and list(dest.parent.iterdir()))


def test_dense_pickle_an_existing_dest_and_a_dest_holding_src_are_refused(dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    peer = tmp_path / "peer"
    write_peer_folder("irn", peer, reader, ids)  # pickled dicts, not plain arrays
    with pytest.raises(ArtifactError, match="cannot read a plain dense array"):
        import_cams([str(peer), str(tmp_path / "a"), "--format", "dense", *flags])
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "note.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="pass --overwrite"):
        import_cams([str(peer), str(tmp_path / "b"), "--format", "irn", "--allow_pickle", *flags])
    assert (tmp_path / "b" / "note.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="is SRC or holds it"):
        import_cams([str(peer), str(tmp_path), "--format", "irn", "--allow_pickle", "--overwrite", *flags])
    assert len(list(peer.iterdir())) == len(ids)


def test_imported_folder_goes_through_make_affinity_labels(dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    peer, experiments = tmp_path / "peer", tmp_path / "experiments"
    write_peer_folder("irn", peer, reader, ids)
    name = "IRN@imported"
    stage_flags = [*flags[:4], "--experiments_dir", str(experiments)]
    output = run_script(*CLI, str(peer), str(experiments / "predictions" / name), "--format", "irn",
                        "--allow_pickle", *stage_flags)
    assert f"python make_affinity_labels.py --experiment_name {name}" in output
    run_script("make_affinity_labels.py", "--experiment_name", name, *stage_flags, "--n_jobs", "2")
    labels = experiments / "predictions" / f"{name}@aff_fg=0.11_bg=0.15"
    assert json.loads((labels / "run.json").read_text())["inputs"]["cams"]["provenance"] == \
        read_run(experiments / "predictions" / name)["provenance"]
    for image_id in ids:
        values = set(np.unique(load_label_png(labels / f"{image_id}.png")).tolist())
        present = set((np.flatnonzero(reader.load_label(image_id)) + 1).tolist())
        assert values <= {0, 255} | present


def test_a_label_without_a_map_and_a_dense_array_of_another_class_count_are_errors(dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    names = reader.descriptor.class_names
    image = ImageFacts(np.array([1, 3]), (8, 12), len(names))
    maps = {"hr_cam": ("high_res", np.ones((1, 8, 12), np.float32))}
    with pytest.raises(ArtifactError, match=rf"no map of the image's labels \['{names[3]}'\]"):
        imported_cams(PeerCams(np.array([1]), maps), tmp_path / "a.npy", image, names)
    np.save(tmp_path / "b.npy", np.ones((len(names) + 1, 8, 12), np.float32))
    with pytest.raises(ArtifactError, match=f"{len(names) + 1} channels, but a dense CAM has {len(names)}"):
        FORMATS["dense"].read(tmp_path / "b.npy", image)


def test_maps_are_put_in_class_order_and_scaled_exactly_to_max_one(dataset, tmp_path):
    descriptor_path, reader, ids, flags = dataset
    names = reader.descriptor.class_names
    image = ImageFacts(np.array([1, 2, 3]), (8, 12), len(names))
    hr_cam = np.stack([np.full((8, 12), 3.0), np.zeros((8, 12)), np.linspace(0, 0.5, 96).reshape(8, 12)])
    hr_cam = hr_cam.astype(np.float16)  # classes 3, 1, 2 as CLIP-ES may order them
    peer = PeerCams(np.array([3, 1, 2]), {"hr_cam": ("attn_highres", hr_cam)})
    keys, cam, full = imported_cams(peer, tmp_path / "c.npy", image, names)
    assert keys.tolist() == [0, 1, 2, 3] and cam.shape == (3, 2, 3) and full.dtype == np.float32
    assert not full[0].any() and np.all(full[2] == 1)  # an all-zero map stays zero
    assert np.array_equal(full[1], hr_cam[2].astype(np.float32) / np.float32(0.5))
