"""Bad data found in a DataLoader worker keeps its one-line message and exit code 2 (torch re-raises a worker's
exception as ``type(message)``; before, our errors could not be rebuilt that way and became RuntimeError)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

from networks.common.errors import DataError, TaoUserError
from networks.common.synthetic import generate
from tao_cli.cli import run_model
from tao_cli.paths import configs_dir

pytestmark = pytest.mark.reliability


class _Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError("/data/img7.jpg", "cannot be read (truncated image)", "re-export the image")


def test_error_from_a_worker_keeps_type_and_line():
    with pytest.raises(TaoUserError) as err:
        list(DataLoader(_Broken(), num_workers=1))
    assert isinstance(err.value, DataError) and err.value.exit_code == 2
    assert err.value.one_line() == "/data/img7.jpg: cannot be read (truncated image) (hint: re-export the image)"


@pytest.fixture(scope="module")
def mal_run(tmp_path_factory):
    """A synthetic set and a 1-epoch MAL checkpoint trained on it (the demo spec, 64 px crops)."""
    root = tmp_path_factory.mktemp("worker_errors")
    data = generate(root / "synthetic", seed=2, num_train=4, num_val=2, image_size=64)
    overrides = [f"results_dir={root / 'r'}", f"dataset.train_ann_path={data['train']['annotations']}",
                 f"dataset.train_img_dir={data['train']['images']}", f"dataset.val_ann_path={data['val']['annotations']}",
                 f"dataset.val_img_dir={data['val']['images']}", "train.num_epochs=1", "train.batch_size=2",
                 "train.checkpoint_interval=1", "train.validation_interval=1"]
    assert run_model("mal", "train", str(configs_dir() / "mal" / "demo.yaml"), overrides) == 0
    return data, root / "r" / "train" / "mal_model_latest.pth"


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_names_the_file_with_or_without_workers(tmp_path, capsys, mal_run, workers):
    data, ckpt = mal_run
    val = tmp_path / "val"
    shutil.copytree(data["val"]["images"], val)
    broken = sorted(val.iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated file
    overrides = [f"results_dir={tmp_path / 'r'}", f"dataset.val_ann_path={data['val']['annotations']}",
                 f"dataset.val_img_dir={val}", f"dataset.num_workers_per_gpu={workers}", f"evaluate.checkpoint={ckpt}"]
    capsys.readouterr()
    code = run_model("mal", "evaluate", str(configs_dir() / "mal" / "demo.yaml"), overrides)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert broken.name in err[0] and "RuntimeError" not in err[0]


def _break(images: Path, defect: str) -> Path:
    """Damage the first image of ``images``: cut it short, or replace it with an image of another size."""
    from PIL import Image

    broken = sorted(images.iterdir())[0]
    if defect == "truncated":
        broken.write_bytes(broken.read_bytes()[:100])
    else:
        with Image.open(broken) as im:
            w, h = im.size
        Image.new("RGB", (w + 8, h), (10, 20, 30)).save(broken, format=Image.registered_extensions()[broken.suffix])
    return broken


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("defect", ["truncated", "other-size"])
@pytest.mark.parametrize("action", ["train", "evaluate", "inference"])
def test_bad_image_in_every_mal_action_is_one_line_naming_the_file(tmp_path, capsys, mal_run, action, defect,
                                                                    workers):
    data, ckpt = mal_run
    split = "train" if action == "train" else "val"
    images = tmp_path / split
    shutil.copytree(data[split]["images"], images)
    broken = _break(images, defect)
    ann = data[split]["annotations"]
    overrides = [f"results_dir={tmp_path / 'r'}", f"dataset.num_workers_per_gpu={workers}",
                 f"dataset.val_ann_path={ann if action != 'train' else data['val']['annotations']}",
                 f"dataset.val_img_dir={images if action != 'train' else data['val']['images']}"]
    if action == "train":
        overrides += [f"dataset.train_ann_path={ann}", f"dataset.train_img_dir={images}", "train.num_epochs=1",
                      "train.batch_size=2", "train.checkpoint_interval=1", "train.validation_interval=1"]
    elif action == "evaluate":
        overrides += [f"evaluate.checkpoint={ckpt}"]
    else:
        overrides += [f"inference.checkpoint={ckpt}", f"inference.ann_path={ann}", f"inference.img_dir={images}"]
    capsys.readouterr()
    code = run_model("mal", action, str(configs_dir() / "mal" / "demo.yaml"), overrides)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert broken.name in err[0] and "RuntimeError" not in err[0] and "DataLoader worker" not in err[0], err[0]
    written = [p.name for p in (tmp_path / "r").rglob("*") if p.suffix == ".json" and p.name != "status.json"
               and p.name != "experiment.json"]
    assert not any(n in ("metrics.json", "pseudo_labels.json") for n in written), written
