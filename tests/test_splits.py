"""Low-shot splits and split files (mimcli.evaluate.splits): exact class balance, seeds,
refusals, round trips; --split-file lists (bare names, relative paths) matched to folders."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.data import ImageList, scan_folder
from mimcli.errors import MimcliError
from mimcli.evaluate.runner import EvalConfig, run_eval
from mimcli.evaluate.splits import (
    folder_names,
    load_split,
    load_split_files,
    lowshot_splits,
    match_split_file,
    read_split_lines,
    save_split,
    split_for,
    split_meta,
    split_text_filename,
    train_names,
    write_split_names,
)
from mimcli.report.rows import eval_rows
from tests.test_cli import one_line_error
from tests.test_lowshot import uneven_labels

runner = CliRunner()


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


# -- split files: one image name per line (SimCLRv2's 1percent.txt, MSN's 1imgs_class.txt) --


def named_folder(root, per_class, classes=3):
    """An ImageFolder of empty files with ImageNet-style unique names (``n0/n0_3.JPEG``): the
    names are all matching looks at."""
    for c in range(classes):
        (root / f"n{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"n{c}" / f"n{c}_{i}.JPEG").touch()
    return root


def test_bare_names_and_relative_paths_pick_the_same_folder_images(tmp_path):
    images = scan_folder(named_folder(tmp_path / "train", per_class=4))
    names = train_names(images)
    assert names[:2] == ["n0/n0_0.JPEG", "n0/n0_1.JPEG"] and len(names) == 12
    # SimCLRv2 / MSN style: bare file names, with a comment, blank lines, CRLF and padding
    bare = tmp_path / "1imgs_class.txt"
    bare.write_bytes(b"# one per class\r\nn2_3.JPEG\r\n\r\n  n0_1.JPEG \r\nn1_0.JPEG\r\n")
    # the same images as paths relative to --train (one with a leading ./)
    relative = tmp_path / "relative.txt"
    relative.write_text("n1/n1_0.JPEG\n./n0/n0_1.JPEG\n\n# done\nn2/n2_3.JPEG\n")
    expected = [names.index(n) for n in ("n0/n0_1.JPEG", "n1/n1_0.JPEG", "n2/n2_3.JPEG")]
    assert expected == [1, 4, 11]
    assert read_split_lines(bare) == [(2, "n2_3.JPEG"), (4, "n0_1.JPEG"), (5, "n1_0.JPEG")]
    assert match_split_file(bare, names).tolist() == expected
    assert match_split_file(relative, names).tolist() == expected
    both = load_split_files([bare, relative], images)
    assert [s.name for s in both] == ["1imgs_class.txt", "relative.txt"]
    assert [s.path for s in both] == [str(bare), str(relative)]
    assert all(s.indices.dtype == np.int64 and s.indices.tolist() == expected for s in both)


def test_written_splits_read_back_to_the_same_images(tmp_path):
    images = scan_folder(named_folder(tmp_path / "train", per_class=5))
    names = train_names(images)
    indices = lowshot_splits(np.asarray(images.labels), 2, seed=1)
    path = write_split_names(tmp_path / "out" / "2shot-seed1.txt", indices, names, "2-shot split")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# mimcli 2-shot split: 6 images")
    assert lines[1:] == [names[i] for i in indices] and all("/" in n for n in lines[1:])
    assert np.array_equal(match_split_file(path, names), indices)


def test_split_for_writes_the_name_list_beside_the_json(tmp_path):
    images = scan_folder(named_folder(tmp_path / "train", per_class=6))
    labels, names = np.asarray(images.labels), train_names(images)
    indices = split_for(labels, 0.5, 2, tmp_path / "splits", names)
    assert split_text_filename(0.5, 2) == "50pct-seed2.txt"
    text = tmp_path / "splits" / "50pct-seed2.txt"
    assert np.array_equal(match_split_file(text, names), indices)
    assert np.array_equal(load_split(tmp_path / "splits" / "50pct-seed2.json"), indices)
    # without names (a dataset's rows) only the JSON is written
    split_for(labels, 1, 0, tmp_path / "splits")
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == [
        "1shot-seed0.json",
        "50pct-seed2.json",
        "50pct-seed2.txt",
    ]


def test_unmatched_shared_and_repeated_names_are_one_clear_error_each(tmp_path):
    images = scan_folder(named_folder(tmp_path / "train", per_class=3))
    names = train_names(images)
    missing = tmp_path / "missing.txt"
    missing.write_text("n0_0.JPEG\nn0_7.JPEG\nn9/n9_0.JPEG\nn1_8.JPEG\nn2_9.JPEG\nn3_0.JPEG\n")
    with pytest.raises(MimcliError) as err:
        match_split_file(missing, names)
    assert str(err.value).startswith(
        f"--split-file {missing}: 5 of 6 names not found among the 9 --train images "
        "(n0_7.JPEG, n9/n9_0.JPEG, n1_8.JPEG, …)"
    )
    # the same file name in two class folders: a bare name is ambiguous, a path is not
    (tmp_path / "train" / "n1" / "n0_2.JPEG").touch()
    names = train_names(scan_folder(tmp_path / "train"))
    shared = tmp_path / "shared.txt"
    shared.write_text("n0_2.JPEG\n")
    with pytest.raises(
        MimcliError,
        match=r"1 file name shared by several --train images: "
        r"n0_2\.JPEG \(n0/n0_2\.JPEG and n1/n0_2\.JPEG\); write those lines as "
        r"paths relative to --train",
    ):
        match_split_file(shared, names)
    shared.write_text("n1/n0_2.JPEG\n")
    assert match_split_file(shared, names).tolist() == [names.index("n1/n0_2.JPEG")]
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("n0_1.JPEG\nn2_0.JPEG\nn0/n0_1.JPEG\n")
    with pytest.raises(
        MimcliError,
        match=r"1 line naming an image listed before: line 3 repeats "
        r"line 1 \(n0/n0_1\.JPEG\)",
    ):
        match_split_file(repeated, names)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(MimcliError, match="lists no images"):
        match_split_file(empty, names)
    with pytest.raises(MimcliError, match="no such file"):
        match_split_file(tmp_path / "nope.txt", names)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MimcliError, match="not readable as UTF-8"):
        match_split_file(binary, names)


def test_split_file_names_and_sources_that_cannot_be_matched(tmp_path):
    images = scan_folder(named_folder(tmp_path / "train", per_class=2))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1percent.txt").write_text("n0_0.JPEG\n")
    a, b = tmp_path / "a" / "1percent.txt", tmp_path / "b" / "1percent.txt"
    # two files of one name are told apart by their paths
    assert [s.name for s in load_split_files([a, b], images)] == [str(a), str(b)]
    with pytest.raises(MimcliError, match="given twice"):
        load_split_files([a, a], images)
    (tmp_path / "1%").write_text("n0_0.JPEG\n")
    with pytest.raises(MimcliError, match="'1%' is taken by another low-shot result"):
        load_split_files([tmp_path / "1%"], images, settings=["5-shot", "1%"])
    rows = ImageList("hfds/x/y", ["hfds/x/y[0]"], [0], ["c"], reader=object())
    with pytest.raises(MimcliError, match="needs a folder --train"):
        load_split_files([a], rows)
    assert folder_names(rows) is None and load_split_files([], rows) == []


def faint_folder(root, per_class, seed):
    """An ImageFolder of 3 classes, noise with a faint class tint (so few-shot accuracy depends on
    which images a split holds), files named uniquely across classes (``class_1/c1_004.png``)."""
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.normal(128, 50, size=(32, 32, 3))
            img[..., c] += 20
            image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
            image.save(root / f"class_{c}" / f"c{c}_{i:03d}.png")
    return root


def test_eval_scores_a_split_file_like_the_seeded_split_it_lists(tiny_model_dir, tmp_path):
    train, val = faint_folder(tmp_path / "train", 6, 1), faint_folder(tmp_path / "val", 6, 2)
    base = dict(
        models=[str(tiny_model_dir)],
        train=train,
        val=val,
        protocols=("lowshot",),
        shots=(2,),
        seeds=(0, 1),
        num_workers=0,
    )
    first = run_eval(EvalConfig(**base, out=tmp_path / "first"))
    seeded = first.models[0].lowshot["2-shot"]
    assert seeded["runs"][0] != seeded["runs"][1]  # the two seeds' subsets score differently
    splits = tmp_path / "first" / "splits"
    own = splits / "2shot-seed0.txt"
    lines = own.read_text().splitlines()
    assert lines[0].startswith("#") and len(lines) == 7 and lines[1].startswith("class_0/c0_")
    # seed 1's split handed back as bare file names (the SimCLRv2 / MSN format)
    bare = tmp_path / "msn-style.txt"
    relative = (splits / "2shot-seed1.txt").read_text().splitlines()[1:]
    bare.write_text("\n".join(line.rpartition("/")[2] for line in relative) + "\n")

    again = run_eval(EvalConfig(**{**base, "seeds": (0,)}, split_files=(own, bare)))
    result = again.models[0].lowshot
    assert list(result) == ["2-shot", "2shot-seed0.txt", "msn-style.txt"]
    assert result["2shot-seed0.txt"]["runs"] == [seeded["runs"][0]]
    assert result["2shot-seed0.txt"]["mean"] == seeded["runs"][0]
    assert result["msn-style.txt"]["mean"] == seeded["runs"][1]
    assert result["msn-style.txt"]["l2"] == [seeded["l2"][1]]
    assert result["msn-style.txt"]["split_file"] == str(bare)
    assert (result["msn-style.txt"]["images"], result["msn-style.txt"]["classes"]) == (6, 3)
    assert result["2shot-seed0.txt"]["std"] == 0.0 and result["2shot-seed0.txt"]["seeds"] == []
    rows = {row.label: row.cell(again.models[0]) for row in eval_rows(again)}
    assert rows["split msn-style.txt %"] == (seeded["runs"][1], None)
    assert rows["2-shot %"] == (seeded["runs"][0], 0.0)


def test_eval_cli_refuses_unusable_split_files_in_one_line(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders  # every class folder holds 000.png ... 009.png
    args = ["eval", str(tiny_model_dir), "--train", str(train), "--val", str(val)]
    shared = tmp_path / "shared.txt"
    shared.write_text("000.png\n001.png\nclass_1/002.png\n")
    line = one_line_error(runner.invoke(app, [*args, "--split-file", str(shared)]))
    assert line == (
        f"error: --split-file {shared}: 2 file names shared by several --train images: 000.png "
        "(class_0/000.png and class_1/000.png), 001.png (class_0/001.png and class_1/001.png); "
        "write those lines as paths relative to --train"
    )
    missing = tmp_path / "missing.txt"
    missing.write_text("class_0/000.png\nclass_0/010.png\nclass_3/000.png\n")
    line = one_line_error(
        runner.invoke(app, [*args, "--split-file", str(shared), "--split-file", str(missing)])
    )
    assert f"--split-file {shared}" in line  # files are checked in the order given
    line = one_line_error(runner.invoke(app, [*args, "--split-file", str(missing)]))
    assert line.startswith(
        f"error: --split-file {missing}: 2 of 3 names not found among the 30 --train images "
        "(class_0/010.png, class_3/000.png)"
    )
    line = one_line_error(
        runner.invoke(app, [*args, "--split-file", str(missing), "--protocols", "knn"])
    )
    assert "add lowshot to --protocols" in line
