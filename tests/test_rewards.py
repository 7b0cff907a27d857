"""model/rewards.py: the checkable rewards 5-grpo.py trains with, on the edge cases that trip string matching."""
import sys

import pytest

from model.errors import StageError
from model.rewards import (accuracy, exact, format_reward, numbers, parse_rewards, repeated_ngram_share, repetition)

RECORD = {"conversations": [{"role": "user", "content": "37+45等于几？"}], "answer": "82"}


@pytest.mark.parametrize("completion, expected", [
    ("37+45=82。", 1.0),          # several numbers: the last one on the line is the answer
    ("82", 1.0),
    ("答案是82.0。", 1.0),          # numbers compared as numbers, not strings
    ("３７＋４５＝８２。", 1.0),      # full-width digits are digits
    ("37+45=83。", 0.0),
    ("我不知道。", 0.0),            # no number
    ("37+45=\n82", 0.0),          # the answer after a newline: only the first line is the reply's answer
    ("\n82", 0.0),
    ("87+69=156。82", 1.0),
    ("37+45=820。", 0.0),          # 820 is not 82 (no substring match)
    ("1,082 or 82", 1.0),
])
def test_accuracy_reads_the_last_number_of_the_first_line(completion, expected):
    assert accuracy([], completion, RECORD) == expected


def test_accuracy_gold_forms_and_signs():
    assert accuracy([], "10-15=-5。", {"answer": -5}) == 1.0
    assert accuracy([], "37-45", {"answer": "45"}) == 1.0   # a binary minus is no sign
    assert accuracy([], "=10", {"answer": "=10.0。"}) == 1.0
    assert accuracy([], "x=1,000", {"answer": 1000}) == 1.0
    assert accuracy([], "x=1000", {"answer": "１０００"}) == 1.0
    assert numbers("37，45") == [37, 45]                    # a Chinese comma separates numbers
    with pytest.raises(ValueError, match="no 'answer'"):
        accuracy([], "82", {})
    with pytest.raises(ValueError, match="holds 2 numbers"):
        accuracy([], "82", {"answer": "37+45"})
    with pytest.raises(ValueError, match="holds 0 numbers"):
        accuracy([], "82", {"answer": "八十二"})


def test_exact_wants_the_whole_worked_answer():
    record = {"answer": "82", "reference": "37+45=82。"}
    assert exact([], "37+45=82。", record) == 1.0 and exact([], " 37+45=82。\n还有", record) == 1.0
    # right result from operands copied wrong: accuracy pays it, exact does not
    assert accuracy([], "38+44=82。", record) == 1.0 and exact([], "38+44=82。", record) == 0.0
    with pytest.raises(ValueError, match="no string 'reference'"):
        exact([], "82", {"answer": "82"})


@pytest.mark.parametrize("completion, expected", [
    ("37+45=82。", 1.0), ("82", 1.0), ("答案：８２！", 1.0), ("82\n", 1.0),
    ("82是答案", 0.0), ("37+45=82。\n还有别的", 0.0), ("", 0.0), ("我不知道。", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward([], completion, RECORD) == expected


def test_repetition_counts_chinese_characters_not_words():
    # a \w+ split sees each of these as ONE word: no repeated word, no penalty (the trap)
    assert repeated_ngram_share("我不知道是谁") == 0.0
    looping = "我不知道我不知道我不知道我不知道"
    assert repeated_ngram_share(looping) > 0.6
    assert repetition([], looping, RECORD) == -repeated_ngram_share(looping)
    assert repeated_ngram_share("the cat sat on the mat and the dog sat on the rug") > 0  # "sat on the" again
    assert repeated_ngram_share("the cat sat on a mat") == 0.0  # words are units, not letters
    assert repeated_ngram_share("37+45=82。") == 0.0
    assert repeated_ngram_share("") == 0.0 and repeated_ngram_share("好的") == 0.0


def test_parse_rewards_weights_and_user_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompt, completion, record):\n    return -len(completion)\n"
                                            "def broken(prompt, completion, record):\n    return record['missing']\n"
                                            "def nan(prompt, completion, record):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = parse_rewards("accuracy,format=0.5,my_rewards:short=0.1")
    assert rewards.names == ["accuracy", "format", "my_rewards:short"]
    total, values = rewards.score([], "37+45=82。", RECORD, "prompts.jsonl:3")
    assert values == {"accuracy": 1.0, "format": 1.0, "my_rewards:short": -9.0}
    assert total == pytest.approx(1.0 + 0.5 - 0.9)
    # a raising reward is an error naming the record and the reward, not a silent zero
    with pytest.raises(StageError, match=r"reward my_rewards:broken failed on prompts.jsonl:7: KeyError"):
        parse_rewards("my_rewards:broken").score([], "82", RECORD, "prompts.jsonl:7")
    with pytest.raises(StageError, match=r"reward accuracy failed on p.jsonl:2: ValueError: .*no 'answer'"):
        parse_rewards("accuracy").score([], "82", {"conversations": []}, "p.jsonl:2")
    with pytest.raises(StageError, match="returned nan on x:1"):
        parse_rewards("my_rewards:nan").score([], "82", RECORD, "x:1")
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, message", [
    ("accuracy,nonsense", "no such reward"), ("accuracy=heavy", "is not a number"), ("accuracy,", "empty name"),
    ("no_such_module_xyz:f", "cannot import"), ("model.rewards:nothing", "has no function"),
    ("accuracy,accuracy=2", "given twice"),
])
def test_bad_reward_specs_are_one_line(spec, message):
    with pytest.raises(StageError, match=message):
        parse_rewards(spec)
