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
