"""The offline datasets: CIFAR pickles read from a fixture in the standard layout, digits and
MNIST-1D generated locally, the crop-and-flip augmentation against a direct construction."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from experiments.datasets import (
    DataNotFoundError,
    Dataset,
    InvalidDataError,
    augment_crop_flip,
    load_dataset,
    local_fingerprint,
)


def _rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(root, n_per_batch=4, n_test=3, seed=0):
    """A CIFAR-10 folder in the python layout (the keys are bytes, as in the real pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = []
    for k in range(1, 6):
        batch = {b"data": _rows(rng, n_per_batch),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"batch_label": f"training batch {k} of 5".encode()}
        _dump(folder / f"data_batch_{k}", batch)
        batches.append(batch)
    test = {b"data": _rows(rng, n_test), b"labels": rng.integers(0, 10, n_test).tolist()}
    _dump(folder / "test_batch", test)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return batches, test


def write_cifar100(root, n_train=6, n_test=2, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    train = {b"data": _rows(rng, n_train), b"fine_labels": rng.integers(0, 100, n_train).tolist(),
             b"coarse_labels": rng.integers(0, 20, n_train).tolist()}
    test = {b"data": _rows(rng, n_test), b"fine_labels": rng.integers(0, 100, n_test).tolist(),
            b"coarse_labels": rng.integers(0, 20, n_test).tolist()}
    _dump(folder / "train", train)
    _dump(folder / "test", test)
    _dump(folder / "meta", {b"fine_label_names": [f"c{k}".encode() for k in range(100)],
                            b"coarse_label_names": [f"s{k}".encode() for k in range(20)]})
    return train, test


def _expected(rows_train, rows_test):
    """Images as (N, 3, 32, 32) in [0, 1], standardized by the training channel statistics."""
    tr = rows_train.reshape(-1, 3, 32, 32) / 255.0
    te = rows_test.reshape(-1, 3, 32, 32) / 255.0
    mean = tr.mean(axis=(0, 2, 3), keepdims=True)
    std = tr.std(axis=(0, 2, 3), keepdims=True)
    return (tr - mean) / std, (te - mean) / std


def test_cifar10_fixture_is_read_in_order_with_labels_and_names(tmp_path):
    batches, test = write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    rows = np.concatenate([b[b"data"] for b in batches])
    want_tr, want_te = _expected(rows, test[b"data"])
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_train.dtype == torch.float32
    np.testing.assert_allclose(data.x_train.numpy(), want_tr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_test.numpy(), want_te, rtol=1e-5, atol=1e-5)
    labels = sum((b[b"labels"] for b in batches), [])
    assert data.y_train.tolist() == labels and data.y_test.tolist() == test[b"labels"]
    assert data.num_classes == 10 and data.classes[0] == "airplane" and data.augment
    # one pixel by hand: row 5 is batch 2's second image; channel 1 (green) starts at 1024
    r = batches[1][b"data"][1]
    assert data.x_train[5, 1, 0, 2] == pytest.approx(float(want_tr[5, 1, 0, 2]), abs=1e-5)
    assert (r[1024 + 2] / 255.0 - rows.reshape(-1, 3, 1024)[:, 1].mean() / 255.0) / (
        rows.reshape(-1, 3, 1024)[:, 1].std() / 255.0) == pytest.approx(
        float(data.x_train[5, 1, 0, 2]), abs=1e-5)


def test_cifar100_fixture_uses_fine_labels(tmp_path):
    train, test = write_cifar100(tmp_path)
    data = load_dataset("cifar100", tmp_path)
    want_tr, want_te = _expected(train[b"data"], test[b"data"])
    np.testing.assert_allclose(data.x_train.numpy(), want_tr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_test.numpy(), want_te, rtol=1e-5, atol=1e-5)
    assert data.y_train.tolist() == train[b"fine_labels"]
    assert data.y_test.tolist() == test[b"fine_labels"]
    assert data.num_classes == 100 and data.classes[3] == "c3"


def test_missing_cifar_files_are_a_clear_error_saying_where(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DataNotFoundError, match=r"cifar-100-python.*lacks train, test"):
        load_dataset("cifar100", tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="lacks data_batch_3"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")


def test_digits_and_mnist1d_are_generated_offline_with_the_published_sizes():
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_test) == 1797 and len(digits.x_test) == 540
    assert torch.bincount(digits.y_test).min() >= 50  # stratified: every class in the test set
    state = np.random.get_state()[1].copy()
    m = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], state)  # global numpy state untouched
    assert m.x_train.shape == (4000, 1, 40) and m.x_test.shape == (1000, 1, 40)
    assert abs(float(m.x_train.mean())) < 1e-4 and float(m.x_train.std()) == pytest.approx(1, 1e-3)
    small = m.subset(10, 5)
    assert len(small.x_train) == 10 and len(small.y_test) == 5
    with pytest.raises(ValueError, match="n_train must be a positive integer"):
        m.subset(0)


def test_crop_flip_equals_padding_then_slicing_each_image():
    x = torch.randn(16, 3, 8, 8)
    g = torch.Generator().manual_seed(5)
    out = augment_crop_flip(x, g, pad=2)
    g = torch.Generator().manual_seed(5)  # the same draws, in the documented order
    di = torch.randint(0, 5, (16,), generator=g)
    dj = torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(16):
        want = padded[k, :, di[k]:di[k] + 8, dj[k]:dj[k] + 8]
        if flip[k]:
            want = want.flip(-1)
        assert torch.equal(out[k], want)
    assert 0 < int(flip.sum()) < 16  # both branches were exercised


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_flip_returns_standard_strides(channels):
    """With one channel a permuted (B, H, W, C) tensor passes is_contiguous() with
    channels-last strides; CPU convolutions of torch 2.13 corrupted the heap on such input."""
    out = augment_crop_flip(torch.randn(4, channels, 8, 8), torch.Generator().manual_seed(0))
    assert out.stride() == torch.empty(out.shape).stride()


@pytest.mark.parametrize("damage", ["label_10", "label_negative", "fewer_labels",
                                    "float_pixels", "truncated", "not_a_dict", "str_keys",
                                    "empty_test"])
def test_a_malformed_cifar_file_is_named_with_what_is_wrong(tmp_path, damage):
    """Labels out of range or fewer than the images loaded silently (a --tiny cut then
    trained on images paired with the wrong labels); float pixels were cast to uint8; a
    damaged pickle gave torch's or pickle's message without the file."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / ("test_batch" if damage == "empty_test"
                                               else "data_batch_2")
    with open(path, "rb") as fh:
        batch = pickle.load(fh)
    if damage == "label_10":
        batch[b"labels"][0] = 10
    elif damage == "label_negative":
        batch[b"labels"][1] = -1
    elif damage == "fewer_labels":
        batch[b"labels"] = batch[b"labels"][:-1]
    elif damage == "float_pixels":
        batch[b"data"] = batch[b"data"].astype(np.float64) * 3.7
    elif damage == "not_a_dict":
        batch = [batch]
    elif damage == "str_keys":
        batch = {k.decode(): v for k, v in batch.items()}
    elif damage == "empty_test":
        batch = {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        _dump(path, batch)
    with pytest.raises(InvalidDataError, match="test_batch" if damage == "empty_test"
                       else "data_batch_2|split is empty"):
        load_dataset("cifar10", tmp_path)


def test_a_dataset_checks_its_splits():
    x, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 1])
    Dataset("d", x, y, x, y, 3, ("a", "b", "c"))
    for bad in (dict(y_train=y[:3]), dict(y_test=torch.tensor([0, 1, 3, 0])),
                dict(x_train=x[:0], y_train=y[:0]), dict(y_train=y.float())):
        fields = dict(name="d", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=3,
                      classes=("a", "b", "c"))
        fields.update(bad)
        with pytest.raises(InvalidDataError):
            Dataset(**fields)


def test_the_local_fingerprint_follows_the_contents_not_the_folder(tmp_path):
    write_cifar10(tmp_path / "a", seed=0)
    write_cifar10(tmp_path / "b", seed=0)
    write_cifar10(tmp_path / "c", seed=1)
    fa, fb, fc = (local_fingerprint("cifar10", tmp_path / k) for k in "abc")
    assert fa == fb != fc
    with pytest.raises(DataNotFoundError):
        local_fingerprint("cifar10", tmp_path / "missing")
