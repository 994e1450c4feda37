"""Long prompts (issue 10, item 8): a warning naming how many tokens past CLIP's 77-token limit were dropped."""
import warnings

import pytest

from diffedit_engine.weights.tokenizer import MAX_LENGTH, PromptTruncatedWarning, Tokenizer


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tok(request):
    return Tokenizer.bundled(request.param)


def caught(tok, prompts):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = tok(prompts)
    return ids, [x for x in w if issubclass(x.category, PromptTruncatedWarning)]


@pytest.mark.parametrize("n", [74, 75])
def test_prompts_that_fit_do_not_warn(tok, n):
    ids, w = caught(tok, "cat " * n)  # "cat" is one token: n + start + end <= 77
    assert w == [] and ids.shape == (1, MAX_LENGTH)


@pytest.mark.parametrize("n", [76, 100, 200])
def test_warning_names_the_dropped_count(tok, n):
    ids, w = caught(tok, "cat " * n)
    assert len(w) == 1
    msg = str(w[0].message)
    assert f"the last {n - 75} tokens were dropped" in msg and f"{n} tokens long" in msg and "\n" not in msg
    assert ids.shape == (1, MAX_LENGTH) and int(ids[0, -1]) == tok.eos_token_id
    assert w[0].filename == __file__  # points at the caller, not the tokenizer


def test_one_warning_per_distinct_prompt(tok):
    long_a, long_b = "cat " * 80, "dog " * 90
    _, w = caught(tok, [long_a, "short", long_a, long_b, long_a])  # a batch repeats its prompt B times
    assert len(w) == 2
    assert "last 5 tokens" in str(w[0].message) and "last 15 tokens" in str(w[1].message)
