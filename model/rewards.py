"""
Rewards for 5-grpo.py: plain functions `reward(prompt, completion, record) -> float` that compute a score from the
text, never guess it (no reward model).

    prompt      the conversation the model answered (a list of {"role", "content"})
    completion  the model's reply as text (the end-of-turn token not included)
    record      the prompt file's record: {"conversations": [...], "answer": "139", ...any field a reward needs}

Built in (names for --reward):
    accuracy    1.0 when the last number on the reply's first line equals record["answer"] as a number
                ("10" = "10.0" = "１０"), else 0.0
    exact       1.0 when the reply's first line is record["reference"] (surrounding whitespace aside), else 0.0:
                the whole worked answer, e.g. "37+45=82。" (accuracy alone also pays "38+44=82。")
    format      1.0 when the reply is one line that ends in a number (closing punctuation allowed), else 0.0
    repetition  minus the share of repeated n-grams (0 = none repeated, -1 at most): n-grams over units, each CJK
                character and each Latin word or number one unit, so degenerate Chinese output is caught (a split
                on \\w+ sees a run of Chinese characters as one word)

    parse_rewards("accuracy,format=0.2,repetition=0.5,my_module:my_reward=1")
        -> a Rewards object: weighted sum per completion; `name=weight` (default 1), `module:function` imports a
        user's reward. Rewards.score(...) turns a raising or non-finite reward into an error naming the record.
"""
import importlib
import math
import re
from decimal import Decimal

from .errors import StageError

# Full-width digits, minus, dot and plus read as their ASCII forms (a Chinese IME types them); the full-width
# comma stays a comma of the sentence, not a thousands separator.
_FULL_WIDTH = {0xFF10 + d: str(d) for d in range(10)} | {0xFF0D: "-", 0x2212: "-", 0xFF0E: ".", 0xFF0B: "+"}
# A number: optional sign only where it cannot be a binary minus ("37-45" is 37 and 45; "=-8" is -8),
# ASCII thousands separators, a decimal part.
_NUMBER = re.compile(r"(?<![\d.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|(?<![\d.])-?\d+(?:\.\d+)?")
_CLOSING = "。．.！!）)」』\"'%％ \t"


def numbers(text: str) -> list:
    """Every number in the text as a Decimal, in order (full-width digits are digits)."""
    text = text.translate(_FULL_WIDTH)
    return [Decimal(m.group().replace(",", "")) for m in _NUMBER.finditer(text)]


def as_number(value):
    """The gold answer as a Decimal: a number, or the one number in a string ("139", "=139。", "１３９")."""
    if isinstance(value, bool):
        raise ValueError(f"answer {value!r} is not a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"answer {value!r} is not a finite number")
        return Decimal(str(value))
    if isinstance(value, str):
        found = numbers(value)
        if len(found) == 1:
            return found[0]
        raise ValueError(f"answer {value!r} holds {len(found)} numbers; it must hold exactly one")
    raise ValueError(f"answer is {type(value).__name__}, expected a number or a string holding one")


def first_line(text: str) -> str:
    """The reply's first line, as the evaluation scores it (an answer after a newline does not count)."""
    return text.split("\n", 1)[0]


# ----------------------------------------------------------------------------------------------------------
# the built-in rewards

def accuracy(prompt, completion, record) -> float:
    if "answer" not in record:
        raise ValueError("the record has no 'answer' field (the accuracy reward compares with it)")
    gold = as_number(record["answer"])
    found = numbers(first_line(completion))
    return float(bool(found) and found[-1] == gold)


def exact(prompt, completion, record) -> float:
    if not isinstance(record.get("reference"), str):
        raise ValueError("the record has no string 'reference' field (the exact reward compares with it)")
    return float(first_line(completion).strip() == record["reference"].strip())


def format_reward(prompt, completion, record) -> float:
    line = completion.strip()
    if not line or "\n" in line:
        return 0.0
    text = line.translate(_FULL_WIDTH).rstrip(_CLOSING)
    last = list(_NUMBER.finditer(text))
    return float(bool(last) and last[-1].end() == len(text))


# a unit: one CJK ideograph (or full-width symbol), one run of Latin letters/digits, or one other visible character
_UNIT = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the text's n-grams (over units: CJK characters, Latin words/numbers, symbols) that repeat an
    earlier one: 0 for text without repeats, near 1 for a loop."""
    units = _UNIT.findall(text)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def repetition(prompt, completion, record) -> float:
    return -repeated_ngram_share(completion)


BUILT_IN = {"accuracy": accuracy, "exact": exact, "format": format_reward, "repetition": repetition}


# ----------------------------------------------------------------------------------------------------------
# --reward

class Rewards:
    """The weighted rewards of a run. score() -> (total, {name: value}) for one completion."""

    def __init__(self, terms):
        self.terms = terms  # [(name, function, weight)]

    @property
    def names(self):
        return [name for name, _, _ in self.terms]

    def score(self, prompt, completion, record, where: str):
        values = {}
        for name, function, _ in self.terms:
            try:
                value = function(prompt, completion, record)
            except Exception as err:  # a reward that cannot score a record is a bug or bad data, never a zero
                raise StageError(f"reward {name} failed on {where}: {type(err).__name__}: {err}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise StageError(f"reward {name} returned {value!r} on {where}; a reward returns a finite number")
            values[name] = float(value)
        return sum(weight * values[name] for name, _, weight in self.terms), values

    def describe(self) -> str:
        return " + ".join(f"{weight:g}*{name}" for name, _, weight in self.terms)


def load_function(spec: str):
    """`module:function` (the module importable from the working directory or PYTHONPATH) -> the function."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise StageError(f"--reward {spec}: cannot import {module_name} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise StageError(f"--reward {spec}: {module_name} has no function {function_name}")
    return function


def parse_rewards(spec: str) -> Rewards:
    """"accuracy,format=0.2,my_module:my_reward=0.5" -> Rewards. One error line for a bad piece."""
    terms = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            raise StageError(f"--reward {spec!r}: an empty name between commas")
        name, _, weight_text = piece.partition("=")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise StageError(f"--reward {piece}: weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight):
            raise StageError(f"--reward {piece}: weight must be finite")
        if ":" in name:
            function = load_function(name)
        elif name in BUILT_IN:
            function = BUILT_IN[name]
        else:
            raise StageError(f"--reward {name}: no such reward (built in: {', '.join(BUILT_IN)}; "
                             f"or module:function)")
        if name in [n for n, _, _ in terms]:
            raise StageError(f"--reward {spec!r}: {name} given twice")
        terms.append((name, function, weight))
    return Rewards(terms)
