"""`warp generate`: replies of a tiny local checkpoint, readable and as JSON lines; seeding; bad input."""

import json

import pytest
import torch
from tiny import make_tiny_llama
from typer.testing import CliRunner

from mergekit_warp.cli import app


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("gen") / "chat", seed=3, chat_template=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(*argv):
    return CliRunner().invoke(app, ["generate", *map(str, argv)])


def test_generate_prints_replies(chat_ckpt, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "the dog"}]}) + "\n")
    argv = [chat_ckpt, "--prompt", "hello you", "--prompts", tmp_path / "p.jsonl", "--samples", "3"]
    argv += ["--max-new-tokens", "6", "--seed", "5"]
    res = _run(*argv, "--json")
    assert res.exit_code == 0, (res.output, res.exception)
    rows = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello you", "the dog"]
    assert rows[0]["input"] == "user : hello you assistant : "  # the chat template was applied
    assert all(len(r["replies"]) == 3 and all(1 <= x["tokens"] <= 6 for x in r["replies"]) for r in rows)
    assert len({x["text"] for x in rows[0]["replies"]}) > 1  # independent samples
    # seeded: the same command prints the same replies, whatever the batch size
    assert _run(*argv, "--json").stdout == res.stdout
    assert _run(*argv, "--json", "--batch-size", "1").stdout == res.stdout
    assert _run(*argv[:-1], "6", "--json").stdout != res.stdout  # another seed
    # the readable layout carries the same replies
    text = _run(*argv).stdout
    assert text.startswith("=== prompt 1 ===\nhello you\n\n--- reply 1 of 3 (")
    assert all(x["text"] in text for r in rows for x in r["replies"])
    # greedy (top-k 1): every sample is the same reply; --no-chat feeds the raw text
    greedy = json.loads(_run(chat_ckpt, "--prompt", "hello you", "--samples", "2", "--top-k", "1", "--json").stdout)
    assert greedy["replies"][0] == greedy["replies"][1]
    raw = json.loads(_run(chat_ckpt, "--prompt", "hello you", "--no-chat", "--json").stdout)
    assert raw["input"] == "hello you"


def test_generate_stop_string(chat_ckpt):
    base = json.loads(_run(chat_ckpt, "--prompt", "the cat", "--max-new-tokens", "8", "--json").stdout)["replies"][0]
    words = base["text"].split()
    stop = next(w for i, w in enumerate(words) if i and w not in " ".join(words[:i]))
    got = json.loads(_run(chat_ckpt, "--prompt", "the cat", "--max-new-tokens", "8", "--stop", stop, "--json").stdout)
    text = got["replies"][0]["text"]
    assert text.endswith(stop) and base["text"].startswith(text) and len(text) < len(base["text"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "hi", "--top-p", "0"], "--top-p 0.0: Input should be greater than 0"),
        (["--prompt", "hi", "--top-k", "-2"], "--top-k -2"),
        (["--prompt", "hi", "--temperature", "inf"], "--temperature inf"),
        (["--prompt", "hi", "--stop", ""], "a stop string must not be empty"),
        ([], "no prompt: give --prompt TEXT"),
        (["--prompts", "nope.jsonl"], "prompts file nope.jsonl does not exist"),
        (["--prompt", "hi", "--dtype", "fp7"], "fp7"),
        (["--prompt", "hi", "--max-new-tokens", "500"], "exceeds the model context of 128 tokens"),
    ],
)
def test_generate_bad_input(chat_ckpt, argv, message):
    res = _run(chat_ckpt, *argv)
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert res.stdout == ""


def test_generate_missing_checkpoint(tmp_path):
    res = _run(tmp_path / "nope", "--prompt", "hi")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "no such file or folder" in res.stderr
