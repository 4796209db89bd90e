"""Reward specs that name nothing fail at once, with the builtin name they resemble."""

import pytest

from mergekit_warp.errors import WarpError
from mergekit_warp.lm import rewards
from mergekit_warp.lm.rewards import check_reward, load_reward


@pytest.mark.parametrize("fn", [load_reward, check_reward])
def test_misspelt_builtin_suggests_it_without_a_hub_lookup(fn, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a name that is no folder and no hub id must not reach the model loader")

    monkeypatch.setattr(rewards, "reward_model", no_loading)
    with pytest.raises(WarpError, match="did you mean sentiment"):
        fn("sentimnet")


def test_unrelated_name_names_the_forms():
    with pytest.raises(WarpError, match=r"not a builtin reward .*module:function") as e:
        load_reward("qqqq")
    assert "did you mean" not in str(e.value)


def test_reward_returning_strings_names_the_element(tmp_path):
    (tmp_path / "r.py").write_text("def strs(prompts, completions):\n    return ['x' for _ in completions]\n")
    fn = load_reward(f"{tmp_path / 'r.py'}:strs")
    with pytest.raises(WarpError, match=r"returned 'x' \(str\) for completion 0; it must return one float"):
        fn(["p"], ["c"])
