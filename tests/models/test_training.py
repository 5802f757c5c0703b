"""Training: exact resumption from checkpoints, fine-tuning from a local checkpoint, Eq. 1/2 losses run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from models.bundle import new_meta, read_meta, write_meta
from models.data import PairDataset, load_folder
from models.networks import build_dpm
from models.training import TrainConfig, load_pretrained_weights, train_dpm, train_filter, train_segmenter


@pytest.fixture()
def data(shapes_dir: Path) -> PairDataset:
    return load_folder(shapes_dir, 16)


def fresh_bundle(path: Path) -> Path:
    write_meta(path, new_meta(16))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpm", "segmenter", "filter"])
def test_resumed_training_equals_uninterrupted(tmp_path: Path, data: PairDataset, stage: str) -> None:
    fn = {"dpm": train_dpm, "segmenter": train_segmenter, "filter": train_filter}[stage]
    straight = fresh_bundle(tmp_path / "straight")
    fn(data, straight, TrainConfig(steps=4, batch_size=2, checkpoint_every=2))  # type: ignore[operator]

    resumed = fresh_bundle(tmp_path / "resumed")
    fn(data, resumed, TrainConfig(steps=2, batch_size=2, checkpoint_every=2))  # type: ignore[operator]
    summary = fn(data, resumed, TrainConfig(steps=4, batch_size=2, checkpoint_every=2))  # type: ignore[operator]
    assert summary["resumed_from"] == 2
    a, b = weights(straight / stage), weights(resumed / stage)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_meta(resumed)["training"][stage]["steps"] == 4


def test_changed_config_does_not_resume(tmp_path: Path, data: PairDataset) -> None:
    b = fresh_bundle(tmp_path / "b")
    train_segmenter(data, b, TrainConfig(steps=2, batch_size=2, checkpoint_every=2))
    summary = train_segmenter(data, b, TrainConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_every=2))
    assert summary["resumed_from"] == 0


def test_dpm_fine_tunes_from_local_checkpoint_and_lists_reinitialised_layers(
    tmp_path: Path, data: PairDataset
) -> None:
    # An "ImageNet-like" source: RGB in/out and 1000 classes, otherwise the same architecture.
    ours = build_dpm(16)
    source = UNet2DModel(
        **{**dict(ours.config), "in_channels": 3, "out_channels": 3, "num_class_embeds": 1000}
    )
    source.save_pretrained(tmp_path / "pretrained")
    model = build_dpm(16)
    reinit = load_pretrained_weights(model, tmp_path / "pretrained")
    assert reinit == ["class_embedding.weight", "conv_in.weight", "conv_out.bias", "conv_out.weight"]
    src = source.state_dict()
    for k, v in model.state_dict().items():
        if k not in reinit:
            assert torch.equal(v, src[k]), k

    b = fresh_bundle(tmp_path / "b")
    summary = train_dpm(data, b, TrainConfig(steps=2, batch_size=2), pretrained=tmp_path / "pretrained")
    assert summary["reinitialised_from_pretrained"] == reinit


def test_missing_pretrained_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint not found"):
        load_pretrained_weights(build_dpm(16), tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_dpm_loss_decreases_on_shapes(tmp_path: Path, data: PairDataset) -> None:
    losses: list[float] = []
    b = fresh_bundle(tmp_path / "b")
    train_dpm(data, b, TrainConfig(steps=60, batch_size=4, lr=1e-3, warmup_steps=5),
              callback=lambda s, n, loss: losses.append(loss))  # fmt: skip
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_filter_reports_held_out_metrics(tmp_path: Path, data: PairDataset) -> None:
    b = fresh_bundle(tmp_path / "b")
    train, test = data.subset(data.names[:6]), data.subset(data.names[6:])
    summary = train_filter(train, b, TrainConfig(steps=3, batch_size=2), test_data=test)
    t = read_meta(b)["metrics"]["filter_test"]
    assert (
        t == summary["test"]
        and t["n"] == 2
        and 0.0 <= t["dice_mean"] <= 1.0
        and 0.0 <= t["real_pass_rate"] <= 1.0
    )
    shutil.rmtree(b / ".checkpoints")
    assert (b / "filter" / "model.safetensors").is_file()


def test_augmented_small_dpm_resumes_exactly_and_records_its_shape(tmp_path: Path, data: PairDataset) -> None:
    from models.augment import AugmentRecipe

    kw = {"block_out_channels": (8, 16, 32, 32), "augment": AugmentRecipe(intensity=False)}
    straight = fresh_bundle(tmp_path / "straight")
    train_dpm(data, straight, TrainConfig(steps=4, batch_size=2, checkpoint_every=2), **kw)  # type: ignore[arg-type]
    resumed = fresh_bundle(tmp_path / "resumed")
    train_dpm(data, resumed, TrainConfig(steps=2, batch_size=2, checkpoint_every=2), **kw)  # type: ignore[arg-type]
    s = train_dpm(data, resumed, TrainConfig(steps=4, batch_size=2, checkpoint_every=2), **kw)  # type: ignore[arg-type]
    assert (
        s["resumed_from"] == 2
        and s["block_out_channels"] == [8, 16, 32, 32]
        and s["augment"]["flip"] is False
    )
    a, b = weights(straight / "dpm"), weights(resumed / "dpm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(UNet2DModel.from_pretrained(straight / "dpm").config.block_out_channels) == [8, 16, 32, 32]
    plain = fresh_bundle(tmp_path / "plain")
    train_dpm(
        data,
        plain,
        TrainConfig(steps=4, batch_size=2, checkpoint_every=2),
        block_out_channels=(8, 16, 32, 32),
    )
    assert any(
        not torch.equal(a[k], v) for k, v in weights(plain / "dpm").items()
    )  # augmentation changed the run


def test_retrained_bundle_is_cached_and_a_changed_recipe_is_refused(
    tmp_path: Path, data: PairDataset
) -> None:
    from models.data import make_split
    from models.retrain import RetrainMismatch, RetrainRecipe, retrain_bundle

    split = make_split(data.names, test_fraction=0.25, seed=0)
    sub, test = data.subset(split.train[:4]), data.subset(split.test)
    recipe = RetrainRecipe(
        dpm_steps=2, segmenter_steps=1, filter_steps=1, batch_size=2, dpm_channels=(8, 16, 32, 32)
    )
    kw = {"fraction": 0.5, "data_meta": {"fingerprint": data.fingerprint}, "sampling_defaults": {"steps": 2},
          "eta_default": 1.0}  # fmt: skip
    out = tmp_path / "fraction-0.5"
    b = retrain_bundle(sub, test, split, out, recipe, **kw)  # type: ignore[arg-type]
    assert b.meta["split"]["train"] == sub.names and b.meta["split"]["test"] == split.test
    assert b.meta["retrain_recipe"]["dpm_channels"] == [8, 16, 32, 32]
    stamp = (out / "dpm" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    retrain_bundle(sub, test, split, out, recipe, **kw)  # type: ignore[arg-type]
    assert (
        out / "dpm" / "diffusion_pytorch_model.safetensors"
    ).stat().st_mtime_ns == stamp  # loaded, not retrained
    with pytest.raises(RetrainMismatch, match="another recipe or split"):
        retrain_bundle(sub, test, split, out, RetrainRecipe(dpm_steps=3, batch_size=2), **kw)  # type: ignore[arg-type]
    with pytest.raises(RetrainMismatch):
        retrain_bundle(data.subset(split.train[:3]), test, split, out, recipe, **kw)  # type: ignore[arg-type]


def _spy_dpm(monkeypatch: pytest.MonkeyPatch, seen: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record (class labels, condition channel) of every Stage I forward pass."""
    import models.training as training

    real_build = training.build_dpm

    def build(*args: object, **kwargs: object) -> torch.nn.Module:
        model = real_build(*args, **kwargs)  # type: ignore[arg-type]
        forward = model.forward

        def spy(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> object:
            seen.append((class_labels.clone(), x[:, 1:].clone()))
            return forward(x, t, class_labels=class_labels)

        model.forward = spy  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(training, "build_dpm", build)


@pytest.mark.slow
def test_unlabelled_images_train_the_unconditional_image_phase(
    tmp_path: Path, data: PairDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.networks import Condition

    pool = torch.rand(5, 1, 16, 16) * 2 - 1
    runs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"without": [], "with": []}
    for key, unlabelled in (("without", None), ("with", pool)):
        _spy_dpm(monkeypatch, runs[key])
        summary = train_dpm(
            data, fresh_bundle(tmp_path / key), TrainConfig(steps=12, batch_size=8), unlabelled=unlabelled,
            unlabelled_share=0.6,
        )  # fmt: skip
        monkeypatch.undo()
    labels = {k: torch.cat([lab for lab, _ in v]) for k, v in runs.items()}
    uncond = {k: float((v == int(Condition.IMAGE_UNCOND)).float().mean()) for k, v in labels.items()}
    # without a pool only the classifier-free dropout (0.2 of image rows) is unconditional
    assert uncond["without"] < 0.25
    assert uncond["with"] > 0.45
    # an unconditional row never sees a mask in its condition channel
    for lab, cond in runs["with"]:
        rows = lab == int(Condition.IMAGE_UNCOND)
        assert torch.all(cond[rows] == 0)
    assert summary["unlabelled"] == 5 and summary["unlabelled_share"] == 0.6
    assert "unlabelled" not in read_meta(tmp_path / "without")["training"]["dpm"]


def test_unlabelled_training_resumes_exactly(tmp_path: Path, data: PairDataset) -> None:
    pool = torch.rand(5, 1, 16, 16) * 2 - 1
    straight = fresh_bundle(tmp_path / "straight")
    train_dpm(data, straight, TrainConfig(steps=4, batch_size=2, checkpoint_every=2), unlabelled=pool)
    resumed = fresh_bundle(tmp_path / "resumed")
    train_dpm(data, resumed, TrainConfig(steps=2, batch_size=2, checkpoint_every=2), unlabelled=pool)
    summary = train_dpm(
        data, resumed, TrainConfig(steps=4, batch_size=2, checkpoint_every=2), unlabelled=pool
    )
    assert summary["resumed_from"] == 2
    a, b = weights(straight / "dpm"), weights(resumed / "dpm")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unlabelled_share_out_of_range_is_refused(tmp_path: Path, data: PairDataset) -> None:
    with pytest.raises(ValueError, match="unlabelled_share"):
        train_dpm(data, fresh_bundle(tmp_path / "b"), TrainConfig(steps=1), unlabelled_share=1.0)
