import json

import pytest

from sftkey.data import DataConfig, DataError, content_version, load_records
from sftkey.data.sources import format_number

# sha256 content versions of the reference files (../shared/data), pinned: a change to the canonical form
# or to a converter shows up here.
VERSIONS = {
    ("gsm8k", "train"): (7473, "d6411a244552a2c7"),
    ("gsm8k", "test"): (1319, "fcfde4c74512"),
    ("svamp", "all"): (1000, "27b7ea903ba9"),
    ("math500", "test"): (500, "d7e0ec57f981"),
}


@pytest.mark.parametrize("dataset,split", list(VERSIONS))
def test_reference_data_counts_and_versions(shared_data, dataset, split):
    records, source = load_records(DataConfig(dataset, split))
    count, version = VERSIONS[(dataset, split)]
    assert source.startswith(str(shared_data))
    assert len(records) == count
    assert content_version(records).startswith(version)


def test_records_are_canonical(shared_data):
    svamp = load_records(DataConfig("svamp", "all"))[0][0]
    assert (svamp.uid, svamp.solution, svamp.answer) == ("chal-1", "( 76.0 - 25.0 )", "51")
    assert svamp.question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
        "How much do you have to pay to buy each pack?"
    )
    math = load_records(DataConfig("math500", "test"))[0][0]
    assert (math.uid, math.answer) == ("math500-test-00000", "\\left( 3, \\frac{\\pi}{2} \\right)")


def test_limit_is_a_seeded_sample_in_original_order(shared_data):
    first = [r.uid for r in load_records(DataConfig("gsm8k", "train", limit=5))[0]]
    again = [r.uid for r in load_records(DataConfig("gsm8k", "train", limit=5))[0]]
    other = [r.uid for r in load_records(DataConfig("gsm8k", "train", limit=5, seed=1))[0]]
    assert first == again == ["gsm8k-train-00546", "gsm8k-train-02127", "gsm8k-train-02420",
                              "gsm8k-train-02842", "gsm8k-train-03914"]
    assert first != other and other == sorted(other)


def test_carved_splits_partition_a_single_split_set(shared_data):
    train = {r.uid for r in load_records(DataConfig("svamp", "train"))[0]}
    test = {r.uid for r in load_records(DataConfig("svamp", "test"))[0]}
    assert (len(train), len(test)) == (697, 303)
    assert not train & test and len(train | test) == 1000


def test_hub_style_source_gives_the_same_version(shared_data, tmp_path):
    """A `datasets` save in the hub's schema (SVAMP split 700/300 and shuffled, MATH with unique_id)
    stands in for the hub: it must yield the same records as the reference files."""
    from datasets import Dataset, DatasetDict

    def rows(path):
        return [json.loads(line) for line in open(path)]

    gsm8k = DatasetDict({s: Dataset.from_list(rows(shared_data / f"gsm8k/{s}.jsonl")) for s in ("train", "test")})
    svamp_rows = json.load(open(shared_data / "svamp/SVAMP.json"))
    for row in svamp_rows:
        row["question_concat"] = row["Body"] + " " + row["Question"]
    svamp_rows = svamp_rows[::-1]  # the hub's order differs from the file's
    svamp = DatasetDict({"train": Dataset.from_list(svamp_rows[:700]), "test": Dataset.from_list(svamp_rows[700:])})
    math_rows = rows(shared_data / "math500/test.jsonl")
    for i, row in enumerate(math_rows):
        row["unique_id"] = f"test/{row['subject']}/{i}.json"
    math = DatasetDict({"test": Dataset.from_list(math_rows)})
    for name, dataset_dict, split in [("gsm8k", gsm8k, "test"), ("svamp", svamp, "all"), ("math500", math, "test")]:
        dataset_dict.save_to_disk(str(tmp_path / name))
        hub_records, source = load_records(DataConfig(name, split, path=str(tmp_path / name)))
        local_records, _ = load_records(DataConfig(name, split))
        assert source == f"datasets folder {tmp_path / name}"
        assert content_version(hub_records) == content_version(local_records)


def test_sftkey_data_dir_comes_before_shared_data(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k/test.jsonl").write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n')
    monkeypatch.setenv("SFTKEY_DATA_DIR", str(tmp_path))
    records, source = load_records(DataConfig("gsm8k", "test"))
    assert source == str(tmp_path / "gsm8k/test.jsonl")
    assert [(r.uid, r.solution, r.origin) for r in records] == [
        ("gsm8k-test-00000", "1+1=2\n#### 2", f"{tmp_path / 'gsm8k/test.jsonl'} line 1")
    ]


def test_missing_explicit_path_names_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.jsonl'} does not exist"):
        load_records(DataConfig("jsonl", "all", path=str(tmp_path / "nope.jsonl")))


def test_jsonl_needs_a_path():
    with pytest.raises(DataError, match="needs an explicit path"):
        load_records(DataConfig("jsonl", "all"))


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"question": "a", "solution": "b"}\n\n{"question": "c", "solution": \n', r"line 3: invalid JSON"),
        (b'{"question": "a", "solution": "b"}\n{"question": "\xff", "solution": "b"}\n', r"line 2: not valid UTF-8"),
        (b'{"question": "a", "solution": "b"}\n{"query": "a", "solution": "b"}\n', r"line 2: missing field 'question'"),
        (b'["a", "b"]\n', r"line 1: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path} {message}"):
        load_records(DataConfig("jsonl", "all", path=str(path)))


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'gsm9k'"):
        DataConfig("gsm9k")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_records(DataConfig("gsm8k", "dev"))


def test_format_number():
    assert [format_number(x, "t") for x in (51.0, 0.5, "2.50", -3.0, 1414.0)] == ["51", "0.5", "2.5", "-3", "1414"]
