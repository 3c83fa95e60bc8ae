"""Each source format from tiny fixtures made here, and each bad input's message. No Ray: find_units() and
read_unit() are what the Ray tasks call."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PipelineConfig
from pipeline.sources import SourceError, find_units, read_unit, split_of_name
from pipeline.validate import prepare_text

ROWS = [("Solve 2*x = 4 for x.", "2"), ("Solve -y = 3 for y.", "-3"), ("Solve 5*z + 5 = 0 for z.", "-1")]


def read_all(source, **kw) -> pa.Table:
    units, _ = find_units(PipelineConfig(source=str(source), **kw))
    tables = [prepare_text(t, max_chars=2000) for u in units for t in read_unit(u, 2)]
    return pa.concat_tables(tables)


def wrapped(s: str) -> str:
    return f"b'{s}\\n'"


def test_split_names():
    assert split_of_name("train-easy") == ("train", "train-easy")
    assert split_of_name("train-00000-of-00002") == ("train", "train")
    assert split_of_name("test") == ("test", "test")
    assert split_of_name("interpolate") == ("test", "interpolate")
    assert split_of_name("extrapolate") == ("test", "extrapolate")
    assert split_of_name("validation-0") == ("validation", "validation")
    assert split_of_name("trainer") is None and split_of_name("0000") is None
    assert split_of_name("test_outputs") is None  # a folder named test_* is not a split


def test_hub_parquet_layout_wrapped(tmp_path):
    # the hub's refs/convert/parquet layout: <module>/<split>/0000.parquet, every string wrapped
    for split in ("train", "test"):
        (tmp_path / "algebra__linear_1d" / split).mkdir(parents=True)
        pq.write_table(pa.table({"question": [wrapped(q) for q, _ in ROWS], "answer": [wrapped(a) for _, a in ROWS]}),
                       tmp_path / "algebra__linear_1d" / split / "0000.parquet", row_group_size=1)
    t = read_all(tmp_path / "algebra__linear_1d")
    assert t["question"].to_pylist() == [q for q, _ in ROWS] * 2
    assert t["answer"].to_pylist() == [a for _, a in ROWS] * 2
    assert sorted(set(t["split"].to_pylist())) == ["test", "train"] and t["reject"].null_count == 6
    assert set(t["regime"].to_pylist()) == {"train", "test"}


@pytest.mark.parametrize("row_group_size,batch_rows", [(1, 100), (4, 100), (4, 3), (100, 2)])
def test_parquet_file_is_read_in_row_ranges(tmp_path, monkeypatch, row_group_size, batch_rows):
    import pipeline.sources as sources

    monkeypatch.setattr(sources, "PARQUET_ROWS_PER_UNIT", 5)
    questions = [f"Solve {i}*x = 0 for x." for i in range(23)]
    pq.write_table(pa.table({"question": questions, "answer": ["0"] * 23}), tmp_path / "train-00000.parquet",
                   row_group_size=row_group_size)
    units, _ = find_units(PipelineConfig(source=str(tmp_path / "train-00000.parquet")))
    assert [u.rows for u in units] == [5, 5, 5, 5, 3]
    t = pa.concat_tables([t for u in units for t in read_unit(u, batch_rows)])
    assert t["question"].to_pylist() == questions  # every row exactly once, in order


def test_jsonl_with_split_and_regime_columns(tmp_path):
    lines = [{"question": q, "answer": a, "split": s, "regime": r}
             for (q, a), s, r in zip(ROWS, ["train", "test", "train"], ["train-easy", "interpolate", None], strict=True)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    t = read_all(tmp_path / "data.jsonl")
    assert t["split"].to_pylist() == ["train", "test", "train"]
    assert t["regime"].to_pylist() == ["train-easy", "interpolate", "train"]  # missing regime -> split name


def test_arrow_ipc_file_and_stream(tmp_path):
    table = pa.table({"question": [q for q, _ in ROWS], "answer": [a for _, a in ROWS]})
    with pa.ipc.new_file(tmp_path / "train.arrow", table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(tmp_path / "test.arrow", table.schema) as w:  # hub `datasets` cache files are streams
        w.write_table(table)
    t = read_all(tmp_path)
    assert t["split"].to_pylist() == ["test"] * 3 + ["train"] * 3
    assert t["answer"].to_pylist() == ["2", "-3", "-1"] * 2


def test_v1_layout_odd_count_and_non_utf8(tmp_path):
    for regime in ("train-easy", "interpolate"):
        (tmp_path / regime).mkdir()
    (tmp_path / "train-easy" / "algebra__linear_1d.txt").write_bytes(
        b"Solve 2*x = 4 for x.\n2\nSolve -y = 3 for y.\n-3\nSolve caf\xe9 = 1 for c.\n1\nSolve q = 1 for q.\n")
    (tmp_path / "interpolate" / "algebra__linear_1d.txt").write_bytes(b"Solve 5*z + 5 = 0 for z.\n-1\n")
    (tmp_path / "train-easy" / "numbers__gcd.txt").write_bytes(b"other module\n1\n")  # ignored
    t = read_all(tmp_path)
    assert t.num_rows == 5
    by_q = {r["question_raw"]: r for r in t.to_pylist()}
    assert by_q["Solve 2*x = 4 for x."]["reject"] is None
    assert by_q["Solve -y = 3 for y."]["regime"] == "train-easy"
    assert by_q["Solve caf\\xe9 = 1 for c."]["reject"] == "not_utf8"
    assert by_q["Solve q = 1 for q."]["reject"] == "unpaired_line"
    assert by_q["Solve 5*z + 5 = 0 for z."]["split"] == "test"
    _, info = find_units(PipelineConfig(source=str(tmp_path)))
    assert info["ignored_files"] == 1


def test_v1_layout_is_read_strictly_as_line_pairs(tmp_path):
    """The issue's file: an empty first answer must not shift the later pairs (it used to: every later
    question was read as an answer and all 4 rows were lost)."""
    (tmp_path / "train-easy").mkdir()
    (tmp_path / "train-easy" / "algebra__linear_1d.txt").write_text("Q1\n\nQ2\n2\nQ3\n3\nQ4\n4\n")
    t = read_all(tmp_path)
    assert t.num_rows == 4  # 8 lines, 4 rows in
    assert [(r["question"], r["answer"], r["reject"]) for r in t.to_pylist()] == [
        ("Q1", "", "empty_answer"), ("Q2", "2", None), ("Q3", "3", None), ("Q4", "4", None)]
    # a blank question line, and a blank line at the end (an odd count): each a reject, nothing shifted
    (tmp_path / "train-easy" / "algebra__linear_1d.txt").write_text("\n5\nQ6\n6\n\n")
    t = read_all(tmp_path)
    assert [(r["question"], r["answer"], r["reject"]) for r in t.to_pylist()] == [
        ("", "5", "empty_question"), ("Q6", "6", None), ("", None, "unpaired_line")]


def test_v1_text_outside_a_regime_folder_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "algebra__linear_1d.txt").write_text("q\n1\n")
    with pytest.raises(SourceError, match="regime folder"):
        find_units(PipelineConfig(source=str(tmp_path)))


# ---- bad inputs: specific, actionable messages ------------------------------------------------------

def test_corrupt_and_truncated_parquet(tmp_path):
    good = tmp_path / "good" / "train.parquet"
    good.parent.mkdir()
    pq.write_table(pa.table({"question": ["q"] * 100, "answer": ["1"] * 100}), good)
    data = good.read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "train.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"train\.parquet: not a readable parquet file .*truncated or corrupt"):
        find_units(PipelineConfig(source=str(tmp_path / "trunc")))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "train.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(SourceError, match="truncated or corrupt"):
        find_units(PipelineConfig(source=str(tmp_path / "garbage")))


def test_missing_misnamed_and_mistyped_columns(tmp_path):
    pq.write_table(pa.table({"problem": ["q"], "answer": ["1"]}), tmp_path / "train.parquet")
    with pytest.raises(SourceError, match=r"missing column\(s\) \['question'\]; it has \['problem', 'answer'\]"):
        find_units(PipelineConfig(source=str(tmp_path / "train.parquet")))
    pq.write_table(pa.table({"question": ["q"], "answer": [1]}), tmp_path / "test.parquet")
    with pytest.raises(SourceError, match="column `answer` has type int64; expected strings"):
        find_units(PipelineConfig(source=str(tmp_path / "test.parquet")))
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": 7}) + "\n")
    with pytest.raises(SourceError, match="field `answer` holds int values"):
        find_units(PipelineConfig(source=str(tmp_path / "train.jsonl")))
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train.jsonl").write_text(json.dumps({"q": "x", "a": "1"}) + "\n")
    with pytest.raises(SourceError, match=r"missing field\(s\) \['question', 'answer'\]; it has \['a', 'q'\]"):
        find_units(PipelineConfig(source=str(tmp_path / "j")))


def test_unknown_split_and_bad_split_values(tmp_path):
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), tmp_path / "data.parquet")
    with pytest.raises(SourceError, match="cannot tell its split"):
        find_units(PipelineConfig(source=str(tmp_path / "data.parquet")))
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"], "split": ["holdout"]}), tmp_path / "data.parquet")
    units, _ = find_units(PipelineConfig(source=str(tmp_path / "data.parquet")))
    with pytest.raises(SourceError, match=r"`split` column holds \['holdout'\]"):
        list(read_unit(units[0], 10))


def test_empty_and_missing_sources(tmp_path):
    with pytest.raises(SourceError, match="source not found"):
        find_units(PipelineConfig(source=str(tmp_path / "nope")))
    (tmp_path / "README.md").write_text("no data here")
    with pytest.raises(SourceError, match="no data files under"):
        find_units(PipelineConfig(source=str(tmp_path)))


def test_hub_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="not reachable.*--source generate.*v1.0 release layout"):
        find_units(PipelineConfig(source="hf:deepmind/math_dataset"))


def test_several_modules_from_v1_layout_and_hub_layout(tmp_path):
    v1 = tmp_path / "v1"
    for regime, files in (("train-easy", {"algebra__linear_1d": "Solve x = 1 for x.\n1\n", "numbers__is_prime":
                                          "Is 7 prime?\nTrue\nIs 8 prime?\nmaybe\n", "numbers__gcd": "gcd?\n3\n"}),
                          ("extrapolate", {"arithmetic__add_or_sub_big": "1 + 2?\n3\n"}),
                          ("interpolate", {"arithmetic__add_or_sub": "0.5 + 1?\n1.5\n"})):
        (v1 / regime).mkdir(parents=True)
        for module, text in files.items():
            (v1 / regime / f"{module}.txt").write_text(text)
    t = read_all(v1, modules=["algebra__linear_1d", "numbers__is_prime", "arithmetic__add_or_sub"])
    rows = sorted((r["module"], r["regime"], r["split"], r["answer"], r["reject"]) for r in t.to_pylist())
    assert rows == [("algebra__linear_1d", "train-easy", "train", "1", None),
                    ("arithmetic__add_or_sub", "extrapolate", "test", "3", None),  # the _big file: its base module
                    ("arithmetic__add_or_sub", "interpolate", "test", "1.5", None),
                    ("numbers__is_prime", "train-easy", "train", "True", None),
                    ("numbers__is_prime", "train-easy", "train", "maybe", "answer_form")]  # its own form
    _, info = find_units(PipelineConfig(source=str(v1), modules=["all"]))
    assert info["modules"] == ["algebra__linear_1d", "arithmetic__add_or_sub", "numbers__gcd", "numbers__is_prime"]

    # hub layout: <module>/<split>/0000.parquet; and a file without a module in its name needs a module column
    hub = tmp_path / "hub"
    for module, answer in (("algebra__linear_1d", "2"), ("numbers__is_prime", "False")):
        (hub / module / "train").mkdir(parents=True)
        pq.write_table(pa.table({"question": [wrapped("q")], "answer": [wrapped(answer)]}),
                       hub / module / "train" / "0000.parquet")
    t = read_all(hub, modules=["all"])
    assert sorted(zip(t["module"].to_pylist(), t["answer"].to_pylist(), strict=True)) == [
        ("algebra__linear_1d", "2"), ("numbers__is_prime", "False")]
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), tmp_path / "mixed" / "train.parquet")
    with pytest.raises(SourceError, match="cannot tell which module"):
        find_units(PipelineConfig(source=str(tmp_path / "mixed"), modules=["algebra__linear_1d", "numbers__gcd"]))
    pq.write_table(pa.table({"question": ["q", "r"], "answer": ["1", "True"],
                             "module": ["algebra__linear_1d", "numbers__is_prime"]}), tmp_path / "mixed" / "train.parquet")
    t = read_all(tmp_path / "mixed", modules=["algebra__linear_1d", "numbers__gcd"])
    assert t["module"].to_pylist() == ["algebra__linear_1d", "numbers__is_prime"] and t["reject"].null_count == 2
