"""Shared pytest fixtures. Tests run from the repo root (pytest.ini), so `model.*` and the scripts import."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHIPPED_TOKENIZER = os.path.join(ROOT, "model", "tokenizer")
TINY_SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)


def make_tiny_model(seed=0, **overrides):
    """The tests' one tiny model: TINY_SHAPE (overrides win), initialised from `seed`, in training mode."""
    import torch
    from model.LMConfig import LMConfig
    from model.model import Transformer
    torch.manual_seed(seed)
    return Transformer(LMConfig(**{**TINY_SHAPE, **overrides}))


def overfit(model, rows, steps, lr=1e-2):
    """Train model on rows [(ids, labels)] (right-padded into one batch) for steps full-batch AdamW steps, until it
    replays them: the served-model tests' way to a model whose answers are known. -> the last loss."""
    import torch
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.fixture
def tiny_model():
    """make_tiny_model, for tests that take it as a fixture: tiny_model(seed=0, **config overrides)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped default tokenizer (model/tokenizer/), loaded as users load it."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The default demo corpus (text files only), generated once per session."""
    from demo_corpus import generate_demo
    out = str(tmp_path_factory.mktemp("demo"))
    generate_demo(out)
    return out
