"""Low-shot splits and split files (mimcli.evaluate.splits): exact class balance, seeds,
refusals, round trips."""

import json

import numpy as np
import pytest

from mimcli.errors import MimcliError
from mimcli.evaluate.splits import load_split, lowshot_splits, save_split, split_meta
from tests.test_lowshot import uneven_labels


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_integer_shots_take_exactly_k_images_of_every_class(shots):
    labels = uneven_labels([7, 12, 30, 5, 9])
    indices = lowshot_splits(labels, shots, seed=3)
    assert indices.dtype == np.int64
    assert np.array_equal(indices, np.unique(indices))  # sorted, no repeats
    assert np.bincount(labels[indices], minlength=5).tolist() == [shots] * 5


def test_fraction_takes_rounded_share_of_each_class_and_at_least_one():
    labels = uneven_labels([100, 250, 49, 30, 1000])
    one_percent = lowshot_splits(labels, 0.01, seed=0)
    # 1.0, 2.5 (half up), 0.49 and 0.3 (at least one), 10.0
    assert np.bincount(labels[one_percent]).tolist() == [1, 3, 1, 1, 10]
    tenth = lowshot_splits(labels, 0.1, seed=0)
    assert np.bincount(labels[tenth]).tolist() == [10, 25, 5, 3, 100]


def test_whole_number_given_as_float_counts_as_images_per_class():
    labels = uneven_labels([6, 6, 6])
    assert np.array_equal(lowshot_splits(labels, 2.0, 1), lowshot_splits(labels, 2, 1))


def test_splits_are_reproducible_and_differ_between_seeds():
    labels = uneven_labels([50] * 10)
    first = lowshot_splits(labels, 5, seed=0)
    assert np.array_equal(first, lowshot_splits(labels, 5, seed=0))
    assert not np.array_equal(first, lowshot_splits(labels, 5, seed=1))
    assert not np.array_equal(lowshot_splits(labels, 0.1, 0), lowshot_splits(labels, 0.1, 1))


def test_a_class_with_too_few_images_is_refused():
    labels = uneven_labels([10, 10, 3, 10])
    assert np.bincount(labels[lowshot_splits(labels, 2, 0)]).tolist() == [2, 2, 2, 2]
    with pytest.raises(MimcliError, match="class 2 has only 3"):
        lowshot_splits(labels, 5, seed=0)


@pytest.mark.parametrize("shots", [0, -1, 1.5, 1.0001, True, "5"])
def test_meaningless_shot_settings_are_refused(shots):
    with pytest.raises(MimcliError):
        lowshot_splits(uneven_labels([10, 10]), shots, seed=0)


def test_split_file_round_trip_and_refusal_for_other_labels(tmp_path):
    labels = uneven_labels([20, 30, 25])
    indices = lowshot_splits(labels, 0.1, seed=4)
    path = save_split(tmp_path / "splits" / "s.json", indices, split_meta(labels, 0.1, 4))
    record = json.loads(path.read_text())
    assert (record["shots"], record["seed"], record["num_train"]) == (0.1, 4, 75)
    assert len(record["labels_sha256"]) == 64
    assert np.array_equal(load_split(path, labels=labels, shots=0.1, seed=4), indices)
    assert np.array_equal(load_split(path), indices)

    relabelled = labels.copy()
    relabelled[0] = (relabelled[0] + 1) % 3
    with pytest.raises(MimcliError, match="another train set"):
        load_split(path, labels=relabelled)
    with pytest.raises(MimcliError, match="another train set"):
        load_split(path, labels=np.concatenate([labels, [0]]))
    with pytest.raises(MimcliError, match="seed 4, not 5"):
        load_split(path, labels=labels, seed=5)
    with pytest.raises(MimcliError, match="not 0.01"):
        load_split(path, shots=0.01)


def test_broken_split_files_are_refused_with_one_clear_error(tmp_path):
    labels = uneven_labels([5, 5])
    bad_json = tmp_path / "a.json"
    bad_json.write_text("{not json")
    with pytest.raises(MimcliError, match="not a readable low-shot split"):
        load_split(bad_json)
    out_of_range = save_split(tmp_path / "b.json", np.array([0, 10]), split_meta(labels, 1, 0))
    with pytest.raises(MimcliError, match="outside"):
        load_split(out_of_range)
