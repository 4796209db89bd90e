"""Prompt files and rewards: formats, chat templates, validation errors."""

import json

import pytest
import torch
from tiny import make_tokenizer, tiny_config

from mergekit_warp.errors import WarpError
from mergekit_warp.lm.prompts import load_prompts, read_prompts
from mergekit_warp.lm.rewards import load_reward


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_prompts_plain_and_chat(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"prompt": "hello you"}, "", {"messages": [{"role": "user", "content": "bye"}]}])
    assert load_prompts(f, make_tokenizer()) == ["hello you", "bye"]
    chat = load_prompts(f, make_tokenizer(chat_template=True))
    assert chat == ["user : hello you assistant : ", "user : bye assistant : "]
    assert [p.line for p in read_prompts(f, make_tokenizer())] == [1, 3]


@pytest.mark.parametrize(
    "lines, match",
    [
        ([{"prompt": "ok"}, "{not json"], r"p.jsonl:2: malformed JSON"),
        ([{"prompt": "ok"}, {"text": "x"}], r"p.jsonl:2: expected"),
        ([{"messages": []}], r"p.jsonl:1: expected"),
        (["", "  "], r"holds no prompts"),
    ],
)
def test_bad_prompt_files(tmp_path, lines, match):
    with pytest.raises(WarpError, match=match):
        load_prompts(_write(tmp_path / "p.jsonl", lines), make_tokenizer())


def test_missing_prompt_file(tmp_path):
    with pytest.raises(WarpError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl", make_tokenizer())


ROWS = [
    {"prompt": "hello you", "messages": None},
    {"prompt": None, "messages": [{"role": "user", "content": "bye"}]},
    {"prompt": None, "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the cat"}]},
]


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _saved_dataset(folder, rows, shards=2):
    """What `datasets.Dataset.save_to_disk` writes: Arrow stream shards, state.json, dataset_info.json."""
    import pyarrow as pa

    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    step = -(-len(rows) // shards)
    for i, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.slice(i * step, step))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


@pytest.mark.parametrize("chat", [False, True])
def test_parquet_and_datasets_prompts_equal_jsonl(tmp_path, chat):
    tok = make_tokenizer(chat_template=chat)
    jsonl = _write(tmp_path / "p.jsonl", [{k: v for k, v in r.items() if v is not None} for r in ROWS])
    want = read_prompts(jsonl, tok)
    for path in (_parquet(tmp_path / "p.parquet", ROWS), _saved_dataset(tmp_path / "ds", ROWS)):
        got = read_prompts(path, tok)
        assert [(p.text, p.line, p.plain) for p in got] == [(p.text, p.line, p.plain) for p in want]
    # a Parquet file without the suffix is recognised by its magic bytes
    (tmp_path / "noext").write_bytes((tmp_path / "p.parquet").read_bytes())
    assert load_prompts(tmp_path / "noext", tok) == [p.text for p in want]
    # TRL's conversational format: a "prompt" column holding messages
    trl = _parquet(tmp_path / "trl.parquet", [{"prompt": [{"role": "user", "content": "bye"}]}])
    assert load_prompts(trl, tok) == [want[1].text]


def test_bad_table_prompts(tmp_path):
    tok = make_tokenizer()
    bad_row = _parquet(tmp_path / "b.parquet", [{"prompt": "ok"}, {"prompt": None}])
    with pytest.raises(WarpError, match=r"b.parquet row 2: expected"):
        read_prompts(bad_row, tok)
    with pytest.raises(WarpError, match=r"ds row 1: expected"):
        read_prompts(_saved_dataset(tmp_path / "ds", [{"messages": [{"role": "user", "content": None}]}], 1), tok)
    with pytest.raises(WarpError, match=r'no "prompt" or "messages" column \(it has text\)'):
        read_prompts(_parquet(tmp_path / "t.parquet", [{"text": "x"}]), tok)
    with pytest.raises(WarpError, match=r"the prompt is empty"):
        read_prompts(_parquet(tmp_path / "e.parquet", [{"prompt": "  "}]), tok)
    empty = tmp_path / "empty.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(WarpError, match="holds no prompts"):
        read_prompts(empty, tok)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(WarpError, match="cannot be read as a Parquet file"):
        read_prompts(tmp_path / "broken.parquet", tok)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    _saved_dataset(tmp_path / "dd" / "train", ROWS[:1], 1)
    with pytest.raises(WarpError, match=r"several splits \(train\); give one split's folder"):
        read_prompts(tmp_path / "dd", tok)
    (tmp_path / "plain").mkdir()
    with pytest.raises(WarpError, match="not a datasets folder"):
        read_prompts(tmp_path / "plain", tok)


def test_tables_without_pyarrow(tmp_path, monkeypatch):
    import sys

    path = _parquet(tmp_path / "p.parquet", ROWS[:1])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(WarpError, match=r"p.parquet: .*needs pyarrow; pip install pyarrow") as e:
        read_prompts(path, make_tokenizer())
    assert "\n" not in str(e.value)
    # JSONL does not need it
    assert load_prompts(_write(tmp_path / "p.jsonl", [{"prompt": "hi"}]), make_tokenizer()) == ["hi"]


def test_sentiment_and_length_penalty():
    r = load_reward("sentiment")
    pos, neg = r(["p", "p"], ["I love this wonderful day", "I hate this terrible day"])
    assert pos > 0.5 and neg < -0.5
    pen = load_reward("sentiment", length_penalty=0.1)(["p"], ["I love this wonderful day"])[0]
    assert pen == pytest.approx(pos - 0.1 * 5)
    tok_pen = load_reward("sentiment", length_penalty=0.1, tokenizer=make_tokenizer())(["p"], ["good good day"])[0]
    assert tok_pen == pytest.approx(load_reward("sentiment")(["p"], ["good good day"])[0] - 0.3)


REWARDS = """
import math
def count(prompts, completions):
    return [float(len(c)) for c in completions]
def boom(prompts, completions):
    raise RuntimeError("kaput")
def short(prompts, completions):
    return [1.0]
def nan(prompts, completions):
    return [math.nan for _ in completions]
def text(prompts, completions):
    return "abc"
"""


@pytest.mark.parametrize(
    "name, match",
    [
        ("boom", r"rew.py:boom raised RuntimeError: kaput"),
        ("short", r"rew.py:short returned 1 values for 2 completions"),
        ("nan", r"rew.py:nan returned NaN/inf"),
        ("text", r"rew.py:text returned"),
    ],
)
def test_bad_reward_callables(tmp_path, name, match):
    (tmp_path / "rew.py").write_text(REWARDS)
    fn = load_reward(f"{tmp_path / 'rew.py'}:{name}")
    with pytest.raises(WarpError, match=match):
        fn(["a", "b"], ["x", "yy"])


def test_reward_specs(tmp_path, monkeypatch):
    (tmp_path / "rew.py").write_text(REWARDS)
    assert load_reward(f"{tmp_path / 'rew.py'}:count")(["a", "b"], ["x", "yy"]) == [1.0, 2.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("rew:count")(["a"], ["xyz"]) == [3.0]
    with pytest.raises(WarpError, match="no callable"):
        load_reward("rew:missing")
    with pytest.raises(WarpError, match="cannot import module"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(WarpError, match="does not exist"):
        load_reward(f"{tmp_path / 'nope.py'}:f")
    with pytest.raises(WarpError, match="name the function"):
        load_reward(str(tmp_path / "rew.py"))


def _reward_model(folder, labels):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = tiny_config(len(tok))
    cfg.num_labels = labels
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model(tmp_path):
    rm = load_reward(str(_reward_model(tmp_path / "rm1", 1)))
    a = rm(["the cat", "the"], ["is good", "dog was very bad"])
    assert len(a) == 2 and a[0] != a[1]
    assert rm(["the"], ["dog was very bad"])[0] == pytest.approx(a[1], abs=1e-5)  # padding-invariant score
    with pytest.raises(WarpError, match="has 2 labels"):
        load_reward(str(_reward_model(tmp_path / "rm2", 2)))
