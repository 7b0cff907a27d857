"""Shared pytest fixtures. Tests run from the repo root (pytest.ini), so `model.*` and the scripts import."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHIPPED_TOKENIZER = os.path.join(ROOT, "model", "tokenizer")


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped default tokenizer (model/tokenizer/), loaded as users load it."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The default demo corpus (text files only), generated once per session."""
    from model.demo_corpus import generate_demo
    out = str(tmp_path_factory.mktemp("demo"))
    generate_demo(out)
    return out
