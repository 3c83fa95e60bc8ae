"""eval refuses bad inputs with one clear message, before Ray starts; the split is read once; --ask
answers in-process (seconds, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixtures import make_data, make_tiny_model

from cluster.config import ConfigError, RayConfig
from cluster.core import DataError, ModelError, OutputError
from eval.config import EvalConfig
from eval.resolve import EvalError, check_tokenizers_agree, load_split, manifest_module, resolve_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "final")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("d") / "data", n_test=8, files=1)


def _run(**kw):
    from eval.job import run

    return run(EvalConfig(**kw), RayConfig())


def test_model_dir_missing_weights_is_a_clear_error(tmp_path, model_dir, data_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelError, match=r"incomplete: missing model\.safetensors"):
        _run(model=str(broken), data=str(data_dir), output=str(tmp_path / "out"))


def test_model_dir_missing_config_and_pickle_only_weights(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError) as e:
        resolve_model(str(d))
    assert "config.json" in str(e.value) and "never unpickle" in str(e.value)


def test_model_dir_not_found_and_hub_id_offline(tmp_path, data_dir, monkeypatch):
    with pytest.raises(EvalError, match="model directory not found"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError, match="offline"):
        _run(model="google/flan-t5-large", data=str(data_dir), output=str(tmp_path / "out"))


def test_model_config_is_read_in_the_driver_fast_for_t5_and_checked_for_the_rest(tmp_path, model_dir):
    """A local T5 folder's config.json is read as JSON (no transformers import before Ray starts), with the
    same answer AutoConfig gives; another model type goes through AutoConfig, and a decoder-only model is
    refused before any actor starts."""
    import shutil

    from transformers import AutoConfig

    from eval.resolve import _local_t5_config, check_model_loads

    src = resolve_model(str(model_dir))
    ref = AutoConfig.from_pretrained(str(model_dir))
    assert _local_t5_config(src) == check_model_loads(src) == {"model_type": "t5", "vocab_size": ref.vocab_size}
    gpt = tmp_path / "gpt"
    shutil.copytree(model_dir, gpt)
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 98, "n_layer": 1}))
    src = resolve_model(str(gpt))
    assert _local_t5_config(src) is None
    with pytest.raises(EvalError, match="is a gpt2 model; eval needs an encoder-decoder"):
        check_model_loads(src)


def test_train_output_dir_resolves_to_final(model_dir):
    src = resolve_model(str(model_dir.parent))
    assert src.spec == str(model_dir) and src.local


def test_data_errors(tmp_path, model_dir, data_dir):
    with pytest.raises(DataError, match=r"validation holds no .parquet files .*splits found: \['test', 'tokenizer'\]"):
        load_split(str(data_dir), "validation", None)
    bad = tmp_path / "bad"
    (bad / "test").mkdir(parents=True)
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), bad / "test" / "p.parquet")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['input_ids', 'labels'\]"):
        load_split(str(bad), "test", None)
    (bad / "test" / "p.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match="cannot read its Parquet files"):
        load_split(str(bad), "test", None)


def test_split_read_once_with_regime_and_module_filled_in(tmp_path, data_dir):
    split = load_split(str(data_dir), "test", 5)
    assert split.rows == 5 and split.max_label_len == max(len(x) for x in split.table["labels"].to_pylist())
    # The fixture's rows have no module column and its manifest names none.
    assert set(split.table["module"].to_pylist()) == {"unknown"}
    assert split.table["regime"].to_pylist()[:4] == ["train-easy", "train-medium", "train-hard", "interpolate"]
    for cfg, want in [({"module": "algebra__linear_1d"}, "algebra__linear_1d"),
                      ({"modules": ["numbers__is_prime"]}, "numbers__is_prime"),
                      ({"modules": {"a": 1, "b": 2}}, "unknown"), ({"modules": "all"}, "unknown"), ({}, "unknown")]:
        d = tmp_path / f"m{len(want)}{len(cfg)}"
        d.mkdir(exist_ok=True)
        (d / "manifest.json").write_text(json.dumps({"complete": True, "config": cfg}))
        assert manifest_module(str(d)) == want, cfg
    # A module column in the data wins over the manifest.
    data = tmp_path / "withmod"
    make_data(data, n_test=4, files=1)
    t = pq.read_table(data / "test" / "part-00000.parquet")
    pq.write_table(t.append_column("module", pa.array(["m1", "m2", None, "m1"])), data / "test" / "part-00000.parquet")
    assert load_split(str(data), "test", None).table["module"].to_pylist() == ["m1", "m2", "unknown", "m1"]


def test_token_ids_beyond_the_model_vocabulary(tmp_path, model_dir):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    pq.write_table(
        pa.table({"question": ["q"], "answer": ["1"], "input_ids": [[5, 31999, 1]], "labels": [[20, 1]]}),
        data / "test" / "p.parquet",
    )
    with pytest.raises(DataError, match="token id 31999 .* vocabulary of"):
        _run(model=str(model_dir), data=str(data), output=str(tmp_path / "out"))


def test_tokenizer_mismatch(tmp_path, data_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "Solve": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(EvalError, match="encode text differently"):
        check_tokenizers_agree(str(tmp_path / "other"), str(data_dir))
    check_tokenizers_agree(str(data_dir / "tokenizer"), str(data_dir))  # the same one: fine


def test_a_copy_of_the_datas_tokenizer_is_recognized_without_loading_it(tmp_path, model_dir, data_dir):
    """A train output's tokenizer is the data's, saved again (tokenizer_config.json gains load metadata):
    same files, so no AutoTokenizer in the driver; a changed tokenizer.json or a setting is not the same."""
    import shutil

    from eval.resolve import same_tokenizer_files

    data_tok = data_dir / "tokenizer"
    assert same_tokenizer_files(str(model_dir), str(data_tok))  # the fixture's model saved its own copy
    changed = tmp_path / "changed"
    shutil.copytree(data_tok, changed)
    cfg = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**cfg, "is_local": True, "name_or_path": "x"}))
    assert same_tokenizer_files(str(changed), str(data_tok))  # load metadata only
    (changed / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 7}))
    assert not same_tokenizer_files(str(changed), str(data_tok))  # a setting
    shutil.copy(data_tok / "tokenizer_config.json", changed / "tokenizer_config.json")
    (changed / "tokenizer.json").write_text((data_tok / "tokenizer.json").read_text().replace("<unk>", "<UNK>"))
    assert not same_tokenizer_files(str(changed), str(data_tok))  # the vocabulary
    assert not same_tokenizer_files(str(tmp_path / "missing"), str(data_tok))


def test_unwritable_output(tmp_path, model_dir, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="not writable"):
        _run(model=str(model_dir), data=str(data_dir), output=str(blocker / "out"))


def test_predictions_file_errors(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"answer": ["1"], "pred": ["1"]}), p)
    with pytest.raises(EvalError, match=r"missing column\(s\) \['prediction'\]"):
        _run(predictions=str(p), output=str(tmp_path / "o"))
    pq.write_table(pa.table({"answer": [1], "prediction": ["1"]}), p)
    with pytest.raises(EvalError, match="answer must be a string column"):
        _run(predictions=str(p), output=str(tmp_path / "o"))


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"model": "m", "data": "d"}, "output is required"),
        ({"output": "o", "model": "m", "predictions": "p"}, "not both"),
        ({"output": "o"}, "--model MODEL"),
        ({"output": "o", "model": "m"}, "--data DIR"),
        ({"output": "o", "predictions": "p", "batch_size": 64, "sort_window": 8}, "sort_window"),
        ({"output": "o", "predictions": "p", "num_actors": 0}, "num_actors"),
    ],
)
def test_contradictory_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EvalConfig(**kw)


def test_cli_errors_exit_codes(tmp_path):
    from eval.__main__ import main

    with pytest.raises(SystemExit) as e:  # argparse: unknown flag
        main(["--output", str(tmp_path), "--no-such-flag", "1"])
    assert e.value.code == 2
    with pytest.raises(ConfigError):  # run_cli turns these into one error line, exit 2
        main(["--output", str(tmp_path), "--model", "m"])
    with pytest.raises(EvalError, match="model directory not found"):
        main(["--output", str(tmp_path / "o"), "--model", str(tmp_path / "missing"), "--data", "d"])
    proc = subprocess.run([sys.executable, "-m", "eval", "--output", str(tmp_path / "o"), "--model",
                           str(tmp_path / "missing"), "--data", "d"], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: model directory not found: {tmp_path / 'missing'}")


def test_ask_answers_like_eval(model_dir, data_dir, capsys, monkeypatch):
    """--ask: the in-process answer equals what eval's Predictor gives on the pipeline's token ids."""
    import io

    from cluster.core import load_tokenizer
    from eval.__main__ import main
    from eval.metrics import normalize_answer
    from eval.predict import Predictor

    table = pq.read_table(data_dir / "test")
    questions = table["question"].to_pylist()[:3]
    pred = Predictor(str(model_dir), str(model_dir), batch_size=8, max_new_tokens=32, teacher_forced=False,
                     use_gpu=False, torch_threads=1, announce=True)
    # the actor's start-up line, as the eval bench reads it (bench/eval_bench.py ACTOR_READY)
    from bench.eval_bench import ACTOR_READY

    ready = ACTOR_READY.findall(capsys.readouterr().out)
    assert len(ready) == 1 and all(float(x) >= 0 for x in ready[0]), ready
    assert float(ready[0][0]) >= float(ready[0][1]) + float(ready[0][2])  # the process is older than both
    want = [normalize_answer(t) for t in pred.predict(table["input_ids"].to_pylist()[:3])[0]]
    tok = load_tokenizer(str(model_dir))
    from eval.ask import encode_questions

    assert encode_questions(tok, ["  " + questions[0].replace(" ", "   ") + " "]) == table["input_ids"].to_pylist()[:1]

    assert main(["--model", str(model_dir.parent), "--ask", questions[0]]) == 0  # a train output works too
    assert capsys.readouterr().out == want[0] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{questions[0]}\n\n{questions[1]}\n{questions[2]}\n"))
    assert main(["--model", str(model_dir), "--ask", "-", "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.split("\n") == [want[0], "", want[1], want[2], ""]  # one line per question


def test_ask_subprocess_and_errors(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval", "--model", str(model_dir), "--ask", "-"],
                          input="Solve 3*x = 9 for x.\nSolve 2*y + 4 = 0 for y.\n", capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert len(lines) == 3 and lines[2] == "" and all(lines[:2])  # the fixture model always says something
    proc = subprocess.run([sys.executable, "-m", "eval", "--model", str(tmp_path / "none"), "--ask", "1+1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: model directory not found")


def test_predictor_own_greedy_output_is_teacher_forced_exact(model_dir, data_dir):
    """In-process, no Ray: feed the model its own greedy answers as gold. Generation EM and teacher-forced
    EM must then be 1 on every row that ended with </s>; this checks the sort/unsort of rows (each row
    gets its own prediction back) and the teacher-forced alignment of logits and labels."""
    from cluster.core import load_tokenizer
    from eval.predict import Predictor

    table = pq.read_table(data_dir / "test")
    batch = {k: np.array(table[k].to_pylist(), dtype=object) for k in ("question", "answer", "regime")}
    batch["module"] = np.array(["m"] * table.num_rows, dtype=object)
    batch["input_ids"] = np.array([np.array(x) for x in table["input_ids"].to_pylist()] + [None], dtype=object)[:-1]
    batch["labels"] = np.array([np.array(x) for x in table["labels"].to_pylist()] + [None], dtype=object)[:-1]
    pred = Predictor(str(model_dir), str(model_dir), batch_size=3, max_new_tokens=12, teacher_forced=True,
                     use_gpu=False, torch_threads=1)
    first = pred(batch)
    done = ~first["truncated"]
    assert done.sum() >= 2, "the fixture model should finish some answers"
    tok = load_tokenizer(str(model_dir))
    own = {k: v[done] for k, v in batch.items()}
    own["answer"] = first["prediction"][done]
    own["labels"] = np.array([np.array(x) for x in tok(list(own["answer"]))["input_ids"]] + [None],
                             dtype=object)[:-1]
    second = pred(own)
    assert list(second["prediction"]) == list(own["answer"])
    assert second["em"].all() and second["tf_em"].all()
    assert (second["f1"] == 1.0).all()


@pytest.mark.gpu
def test_predictor_loads_bf16_weights_straight_onto_the_gpu(model_dir, data_dir, capsys):
    """The eval actor on a GPU: weights in bf16 on cuda (device_map, no fp32 copy on the CPU), every row
    answered, the start-up line says where the model went."""
    import torch

    from eval.predict import Predictor

    table = pq.read_table(data_dir / "test")
    pred = Predictor(str(model_dir), str(model_dir), batch_size=4, max_new_tokens=8, teacher_forced=True,
                     use_gpu=True, torch_threads=1, announce=True)
    assert "model load to cuda" in capsys.readouterr().out
    p = next(pred.model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    texts, gen_tokens, truncated, tf_em = pred.predict(table["input_ids"].to_pylist(), table["labels"].to_pylist())
    assert len(texts) == len(tf_em) == table.num_rows and all(isinstance(t, str) for t in texts)
    assert (gen_tokens <= 8).all()
