"""The reproduction's own code (examples/reproduce): its SFT policy's tokenizer and grammar, and the
statistics its verdicts rest on, checked against closed forms."""

from __future__ import annotations

import math
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "reproduce"))

import report
import sft


def test_tokenizer_covers_the_grammar_and_adds_bos():
    tok = sft.tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        text = sft.review(rng, rng.choice(sft.SUBJECTS))
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text.replace(" .", ".")  # as the reward sees it


def test_corpus_sentiment_is_balanced():
    """A third of the adjectives positive, a third negative: θ_sft's reward starts near 0, with room to grow."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia, rng = SentimentIntensityAnalyzer(), random.Random(1)
    scores = [sia.polarity_scores(sft.review(rng, "the movie"))["compound"] for _ in range(600)]
    assert abs(statistics.fmean(scores)) < 0.1
    assert all(sia.polarity_scores(w)["compound"] > 0 for w in sft.POSITIVE)
    assert all(sia.polarity_scores(w)["compound"] < 0 for w in sft.NEGATIVE)
    assert all(sia.polarity_scores(w)["compound"] == 0 for w in sft.NEUTRAL)


def test_matched_kl_difference_of_parallel_curves():
    kl = np.linspace(0, 4, 9)
    a = np.stack([kl, 0.5 * kl + 0.2], 1)
    b = np.stack([kl[::-1] * 0.5, 0.5 * kl[::-1] * 0.5], 1)  # reaches KL 2 only, points out of order
    assert report.matched(a, b) == pytest.approx(0.2)
    assert report.matched(b, a) == pytest.approx(-0.2)
    flat = np.zeros((3, 2))
    assert math.isnan(report.matched(a, flat))  # no KL range in common


def test_interval_and_verdicts():
    ci = report.interval([1.0, 1.1, 1.2])
    assert ci["mean"] == pytest.approx(1.1) and ci["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert ci["lo"] == pytest.approx(1.1 - 4.303 * 0.1 / math.sqrt(3))
    assert report.verdict(ci, +1) == "**reproduced**"
    assert report.verdict(ci, -1) == "**contradicted**"
    assert report.verdict(report.interval([-1.0, 1.0, 0.5]), +1) == "not reproduced (within noise)"
    assert report.verdict(report.interval([1.0]), +1) == "not enough repetitions"
