"""Fine-tuning mechanics on tiny generated images with a small random-weight MobileNetV2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from conftest import write_image
from pipeline.data import load_image
from pipeline.errors import FitError
from pipeline.finetune import (FinetuneConfig, FinetuneData, build_finetune_model, default_unfreeze, finetune,
                               logreg_dense_weights, save_finetuned)

SIZE = 32
CLASSES = ["blue", "green", "red"]
COLOURS = {"blue": (30, 40, 210), "green": (40, 200, 50), "red": (210, 40, 30)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x (5 training + 3 selection) small JPEGs: a coloured blob on noise."""
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    train, select = [], []
    for label, c in enumerate(CLASSES):
        for i in range(8):
            img = rng.integers(0, 120, (40 + i, 44, 3)).astype(np.int64)
            img[8:30, 10:34] = COLOURS[c]
            rel = f"{c}/{i}.jpg"
            write_image(root / rel, np.clip(img, 0, 255).astype(np.uint8))
            (train if i < 5 else select).append((rel, label))
    return FinetuneData(root, CLASSES, train, select, "crop")


def _built():
    from pipeline.backbones import build_feature_model

    return build_feature_model("mobilenet_v2", "none", SIZE, 0.35, announce=lambda m: None)


@pytest.fixture(scope="module")
def frozen(data):
    """A feature model, the pixels of every image and their features (for tests that do not train)."""
    built = _built()
    px = _pixels(data)
    return built, px, np.asarray(built.model(px)["avg"], np.float64)


def _pixels(data):
    return np.stack([load_image(data.root / rel, SIZE, "crop") for rel, _ in data.train + data.select]).astype(
        np.float32)


def _numpy(weights):
    import keras

    return [keras.ops.convert_to_numpy(w) for w in weights]


def _predict(model, px):
    return np.asarray(model(px, training=False), np.float64)


def _probe(feats, labels, names):
    y = np.asarray(names)[labels]
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=1.0, max_iter=2000))]).fit(feats, y)


def test_logistic_regression_start_reproduces_the_probe(data, frozen):
    built, px, feats = frozen
    labels = np.array([lab for _, lab in data.train + data.select])
    for names, rows in ((CLASSES, slice(None)), (CLASSES[:2], labels < 2)):  # multinomial, then binary
        probe = _probe(feats[rows], labels[rows], names)
        want = probe.predict_proba(feats[rows])  # columns in probe.classes_ order == sorted names
        model = build_finetune_model(built, probe, list(reversed(names)))  # another output order on purpose
        got = _predict(model, px[rows])[:, ::-1]
        assert np.abs(got - want).max() < 1e-5
        kernel, bias = logreg_dense_weights(probe, names)
        assert kernel.shape == (feats.shape[1], len(names)) and bias.shape == (len(names),)
    with pytest.raises(FitError, match="dense head or a logistic-regression head"):
        build_finetune_model(built, Pipeline([("clf", StandardScaler())]).fit(feats), CLASSES)
    with pytest.raises(FitError, match="--unfreeze must be between 0 and"):
        build_finetune_model(built, probe, CLASSES[:2], unfreeze=10_000)


def test_dense_head_start_reproduces_the_head(data, frozen, tmp_path):
    import keras

    from pipeline.fit.heads import DenseHead

    built, px, feats = frozen
    feats = feats.astype(np.float32)
    labels = np.asarray(CLASSES)[[lab for _, lab in data.train + data.select]]
    head = DenseHead(epochs=3, validation_fraction=0, run_eagerly=True).fit(feats, labels)
    head.save(tmp_path / "dense.keras")
    model = build_finetune_model(built, keras.models.load_model(tmp_path / "dense.keras"), CLASSES)
    assert np.abs(_predict(model, px) - head.predict_proba(feats)).max() < 1e-5


def test_finetuning_trains_only_the_unfrozen_layers_and_reloads(data, tmp_path):
    import keras

    built = _built()
    base = [layer for layer in built.model.layers if isinstance(layer, keras.Model)][0]
    n_layers = len(base.layers)
    assert 0 < default_unfreeze("mobilenet_v2", base) < n_layers
    px = _pixels(data)
    feats = np.asarray(built.model(px)["avg"], np.float64)
    probe = _probe(feats, np.array([lab for _, lab in data.train + data.select]), CLASSES)
    before = {layer.name: _numpy(layer.weights) for layer in base.layers}

    top = 12
    msgs: list[str] = []
    cfg = FinetuneConfig(unfreeze=top, epochs=2, learning_rate=1e-3, batch_size=8, workers=1, progress=False,
                         keep_best=False, run_eagerly=True)
    res = finetune(built, probe, data, cfg, log=msgs.append)
    assert res.epochs_run == 2 and res.best_epoch == 2 and res.unfreeze == top
    assert len(res.history["select_accuracy"]) == 3 and res.history["loss"][0] is None
    assert res.select_proba.shape == (len(data.select), 3)
    assert any("batch norms frozen" in m for m in msgs)

    changed, bn = [], 0
    for i, layer in enumerate(base.layers):
        after = _numpy(layer.weights)
        same = all(np.array_equal(a, b) for a, b in zip(before[layer.name], after))
        if isinstance(layer, keras.layers.BatchNormalization):
            bn += 1
            assert same, f"{layer.name}: batch-norm statistics or parameters moved"
        elif i < n_layers - top:
            assert same, f"{layer.name} is frozen but changed"
        elif after:
            changed.append(not same)
    assert bn > 10 and changed and all(changed), "every unfrozen layer with weights must have been trained"

    path = save_finetuned(res, tmp_path / "ft.keras", extra={"head": "logreg"})
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["head"] == "logreg" and side["epochs_run"] == 2 and len(side["history"]["select_loss"]) == 3
    reloaded = keras.models.load_model(path)  # plain Keras, no custom objects
    assert [layer.name for layer in reloaded.layers][:1] == ["pixels"]
    assert not any("random" in layer.name for layer in reloaded.layers), "augmentation is for training only"
    np.testing.assert_allclose(_predict(reloaded, px), _predict(res.model, px), atol=1e-6)


def test_keep_best_never_returns_a_worse_model(data, frozen):
    built, px, feats = frozen  # the last test of the module: it may change this model
    probe = _probe(feats, np.array([lab for _, lab in data.train + data.select]), CLASSES)
    start = build_finetune_model(built, probe, CLASSES).get_weights()
    cfg = FinetuneConfig(unfreeze=4, epochs=2, patience=1, learning_rate=0.5, batch_size=8, workers=1,
                         progress=False, run_eagerly=True)  # a learning rate that wrecks the model
    res = finetune(built, probe, data, cfg, log=lambda m: None)
    acc, loss = res.history["select_accuracy"], res.history["select_loss"]
    assert res.select_accuracy == max(acc)
    assert loss[res.best_epoch] == min(lo for a, lo in zip(acc, loss) if a == max(acc))
    if res.best_epoch == 0:  # the starting head is kept, weights and all
        assert all(np.array_equal(a, b) for a, b in zip(start, res.model.get_weights()))
    with pytest.raises(FitError, match="learning rate"):
        finetune(built, probe, data, FinetuneConfig(learning_rate=0), log=lambda m: None)
