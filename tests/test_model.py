"""Model contract: shapes and parameter count, causality, KV-cache parity, packing, attention paths, RoPE, MoE,
FLOPs, optimizer groups, strict checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model.model as model_module
from conftest import TINY_SHAPE, make_tiny_model
from model.LMConfig import LMConfig
from model.model import CheckpointMismatchError, Transformer
from model.generate import KVCache, generate_stream
from model.model import apply_rope, attention_path, estimate_flops_per_token, rope_cos_sin

V = 300


# conftest's tiny model, a little wider: parity tolerances here were measured at dim 64
SHAPE = dict(TINY_SHAPE, dim=64, vocab_size=V, max_seq_len=64)


def tiny_config(**overrides):
    return LMConfig(**{**SHAPE, **overrides})


def tiny_model(seed=0, **overrides):
    return make_tiny_model(seed, **{**SHAPE, **overrides}).eval()


def expected_param_count(c: LMConfig) -> int:
    hd = c.dim // c.n_heads
    attention = c.dim * c.n_heads * hd * 2 + c.dim * c.n_kv_heads * hd * 2
    ffn = 3 * c.dim * c.hidden_dim
    if c.use_moe:
        ffn = ffn * (c.n_routed_experts + c.n_shared_experts) + c.n_routed_experts * c.dim
    norms = 2 * c.dim
    return c.vocab_size * c.dim + c.n_layers * (attention + ffn + norms) + c.dim  # tied output, final norm


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"use_moe": True, "n_shared_experts": 0},
                                       {"n_kv_heads": 4, "hidden_dim": 100}])
def test_parameter_count_matches_closed_form(overrides):
    model = tiny_model(**overrides)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(model.config)


def test_swiglu_hidden_dim_rule():
    assert LMConfig(dim=512).hidden_dim == 1408  # 8/3 * 512 = 1365.3 -> next multiple of 64
    assert LMConfig(dim=768, multiple_of=256).hidden_dim == 2048


@pytest.mark.parametrize("bad, field", [
    (dict(dim=65), "n_heads"), (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dim=12, n_heads=4), "head_dim"), (dict(use_moe=True, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(use_moe=True, scoring_func="sigmoid"), "scoring_func"), (dict(dim=0), "dim"),
])
def test_invalid_config_names_the_fields(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**bad)


@pytest.mark.parametrize("use_moe", [False, True])
def test_causality(use_moe):
    model = tiny_model(use_moe=use_moe)
    x = torch.randint(3, V, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(3, V, (2, 6))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_incremental_decoding_matches_full_forward(use_moe, cache_kind):
    model = tiny_model(use_moe=use_moe)
    x = torch.randint(3, V, (2, 20))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.config, 2, 20, "cpu", torch.float32) if cache_kind == "static" else None
        out = model(x[:, :12], use_cache=True, cache=cache)
        steps = [out.logits]
        for t in range(12, 20):
            out = model(x[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_left_padded_batch_decodes_like_each_prompt_alone():
    model = tiny_model()
    prompts = [torch.randint(3, V, (9,)), torch.randint(3, V, (5,))]
    continuation = torch.randint(3, V, (2, 6))
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p):] = p
        mask[i, 9 - len(p):] = 1
    with torch.no_grad():
        out = model(batch, attention_mask=mask, use_cache=True)
        batch_logits = [out.logits[:, -1]]
        for t in range(6):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = model(continuation[:, t:t + 1], attention_mask=mask, cache=out.cache, use_cache=True)
            batch_logits.append(out.logits[:, -1])
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[i]])[None]).logits[0, len(p) - 1:]
            got = torch.stack([step[i] for step in batch_logits])
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_packed_row_gives_each_document_its_own_logits():
    model = tiny_model()
    docs = [torch.randint(3, V, (n,)) for n in (7, 11, 5)]
    row = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(row, position_ids=position_ids).logits[0]
        unmasked = model(row).logits[0]
        start = 0
        for d in docs:
            alone = model(d[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=1e-4, atol=1e-5)
            start += len(d)
    # without the document mask the later documents would see the earlier ones
    assert (unmasked[7:18] - packed[7:18]).abs().max() > 1e-3


def test_labels_are_shifted_inside_and_ignore_index_respected():
    model = tiny_model()
    x = torch.randint(3, V, (2, 12))
    labels = x.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = model(x, labels=labels)
        logits = out.logits
    manual = torch.nn.functional.cross_entropy(logits[:, 4:-1].reshape(-1, V), x[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    shifted = model(x, shift_labels=torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)).loss
    torch.testing.assert_close(shifted, out.loss)


def moe_model(**overrides):
    return tiny_model(use_moe=True, **overrides)


def test_moe_routes_each_token_to_top_k_distinct_experts():
    model = moe_model(n_routed_experts=4, num_experts_per_tok=2)
    gate = model.layers[0].feed_forward.gate
    x = torch.randn(3, 10, 64)
    idx, weight, _ = gate(x)
    assert idx.shape == (30, 2)
    assert all(len(set(row.tolist())) == 2 for row in idx)
    scores = torch.nn.functional.linear(x.reshape(-1, 64), gate.weight).softmax(-1)
    top2 = scores.topk(2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx.sort(dim=-1).values, top2)
    torch.testing.assert_close(weight.sum(-1), torch.ones(30))


def test_moe_aux_loss_reaches_loss_and_trains_the_gate():
    model = moe_model().train()
    x = torch.randint(3, V, (2, 16))
    out = model(x, labels=x)
    assert out.aux_loss > 0
    model.zero_grad()
    out.aux_loss.backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        ce_only = model(x, labels=x).loss
    torch.testing.assert_close(out.loss.detach(), ce_only + out.aux_loss.detach())


def test_moe_train_and_eval_outputs_are_equal():
    model = moe_model()
    x = torch.randint(3, V, (2, 16))
    with torch.no_grad():
        model.train()
        train_logits = model(x).logits
        model.eval()
        eval_logits = model(x).logits
    torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=0)


def test_moe_every_expert_gets_a_grad_even_when_unrouted():
    model = moe_model(n_routed_experts=4, num_experts_per_tok=1).train()
    for layer in model.layers:
        gate = layer.feed_forward.gate
        original = gate.forward

        def only_expert_one(x, original=original):
            idx, weight, aux = original(x)
            return torch.ones_like(idx), weight, aux
        gate.forward = only_expert_one
    x = torch.randint(3, V, (2, 8))
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    unused = model.layers[0].feed_forward.experts[0].w1.weight.grad
    assert unused.abs().sum() == 0  # it got a (zero) gradient tensor, not None


@pytest.mark.parametrize("use_moe", [False, True])
def test_tiny_model_overfits_one_batch(use_moe):
    torch.manual_seed(0)
    model = Transformer(tiny_config(use_moe=use_moe)).train()
    x = torch.randint(3, V, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = model(x, labels=x).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05 * first:
            break
    assert loss.item() < 0.1 * first


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model(use_moe=True)
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path).eval()
    x = torch.randint(3, V, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()


def test_strict_loading_names_a_renamed_key(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["layers.0.attention.wq_renamed.weight"] = weights.pop("layers.0.attention.wq.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        Transformer.from_pretrained(tmp_path)
    assert "layers.0.attention.wq.weight" in str(err.value)
    assert "layers.0.attention.wq_renamed.weight" in str(err.value)


def test_strict_loading_names_a_shape_mismatch(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dim"] = 128
    config["hidden_dim"] = 192
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as err:
        Transformer.from_pretrained(tmp_path)
    assert "tok_embeddings.weight" in str(err.value) and "(300, 64)" in str(err.value) and "(300, 128)" in str(err.value)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_generationmixin_greedy_matches_project_generator_and_streams():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.pieces = []

        def put(self, value):
            self.pieces.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model = tiny_model()
    prompt = torch.randint(3, V, (1, 6))
    streamer = Collect()
    hf = model.generate(prompt, max_new_tokens=12, do_sample=False, streamer=streamer, eos_token_id=None,
                        pad_token_id=0)
    ours = torch.stack(list(generate_stream(model, prompt, max_new_tokens=12, temperature=0)), dim=1)
    assert torch.equal(hf[0, 6:], ours[0])
    assert sum(streamer.pieces[1:], []) == ours[0].tolist() and streamer.ended
    # greedy == argmax of full forward at every step
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq[0, 6:], ours[0])


def test_sampling_options_run_through_generationmixin_and_stop_at_eos():
    model = tiny_model()
    prompt = torch.randint(3, V, (2, 5))
    torch.manual_seed(0)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=True,
                         temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, pad_token_id=0)
    assert out.shape[0] == 2 and 5 < out.shape[1] <= 15
    # eos: declare the greedy first token to be eos; the stream must stop right after it
    with torch.no_grad():
        first = int(model(prompt[:1]).logits[0, -1].argmax())
    ours = list(generate_stream(model, prompt[:1], max_new_tokens=10, temperature=0, eos_token_id=first))
    assert len(ours) == 1


def test_a_temperature_too_small_to_divide_by_decodes_greedily():
    # logits / 1e-45 overflow to inf and multinomial raised: the CLI crashed where the server already answered
    from model.generate import sample_next
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    for temperature in (0.0, 1e-45, 1e-6):
        assert int(sample_next(logits, torch.empty(1, 0, dtype=torch.long), temperature=temperature)) == 1


def test_top_k_top_p_restrict_the_candidates():
    from model.generate import sample_next
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    torch.manual_seed(0)
    picks = {int(sample_next(logits, torch.empty(1, 0, dtype=torch.long), temperature=1.0, top_k=2))
             for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, torch.empty(1, 0, dtype=torch.long), temperature=1.0, top_p=0.5))
             for _ in range(200)}
    assert picks == {0}


# ---------------------------------------------------------------------------------------------------------
# attention paths: flex (CUDA, packed/padded rows), SDPA, explicit math (flash_attn=False)

def packed_batch(seed=0):
    """Two rows of 40 tokens, several documents each (row 1: 7 + 20 + 13, row 2: 12 + 9 + 19), position ids
    restarting at every document."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (2, 40), generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                                for lengths in ((7, 20, 13), (12, 9, 19))])
    return x, position_ids


def padded_packed_batch():
    """SFT-style: packed rows right-padded to the longest, attention_mask 0 on padding, positions continuing."""
    x, position_ids = packed_batch()
    mask = torch.ones_like(x)
    mask[1, 31:] = 0
    return x, position_ids, mask


def test_attention_path_picks_flex_only_on_cuda_for_masked_fresh_forwards():
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert attention_path(device) == "flex"
        assert attention_path(device, masked=False) == "sdpa"   # plain causal: SDPA's flash kernel
        assert attention_path(device, cached=True) == "sdpa"    # decoding with a KV cache: dense mask
        assert attention_path(device, dropout=True) == "sdpa"   # flex_attention has no dropout
        assert attention_path(device, flash_attn=False) == "math"
    for device in ("cpu", "mps", torch.device("cpu")):
        assert attention_path(device) == "sdpa"
        assert attention_path(device, flash_attn=False) == "math"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_path_matches_dense_mask_on_packed_rows(monkeypatch, use_moe, padded):
    """flex_attention with the document-causal BlockMask (forced on, eager on CPU: forward only, torch 2.13 has
    no flex backward on CPU) gives the dense-mask SDPA logits; GQA (4 query heads on 2 kv heads)."""
    model = tiny_model(use_moe=use_moe)
    x, position_ids, mask = padded_packed_batch() if padded else (*packed_batch(), None)
    with torch.no_grad():
        dense = model(x, position_ids=position_ids, attention_mask=mask).logits
        calls = []
        monkeypatch.setattr(model_module, "attention_path", lambda *a, **k: "flex")
        monkeypatch.setattr(model_module, "flex_attention",
                            lambda *a, **k: calls.append(1) or torch.nn.attention.flex_attention.flex_attention(*a, **k))
        flex = model(x, position_ids=position_ids, attention_mask=mask).logits
    assert len(calls) == model.config.n_layers
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)  # padding positions included


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA (none here)")
@pytest.mark.parametrize("use_moe", [False, True])
def test_flex_path_matches_dense_mask_with_grads_on_cuda(monkeypatch, use_moe):
    model = tiny_model(use_moe=use_moe).cuda().train()
    x, position_ids, mask = (t.cuda() for t in padded_packed_batch())
    results = []
    for path in ("flex", "sdpa"):
        monkeypatch.setattr(model_module, "attention_path", lambda *a, path=path, **k: path)
        model.zero_grad()
        out = model(x, position_ids=position_ids, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
        out.loss.backward()
        results.append((out.logits.detach()[mask.bool()], {n: p.grad.clone() for n, p in model.named_parameters()}))
    (flex_logits, flex_grads), (dense_logits, dense_grads) = results
    torch.testing.assert_close(flex_logits, dense_logits, rtol=1e-4, atol=1e-4)
    for name, grad in flex_grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("use_moe", [False, True])
def test_flash_attn_false_math_path_gives_the_same_logits_and_grads(use_moe):
    fused = tiny_model(use_moe=use_moe).train()
    math = tiny_model(use_moe=use_moe, flash_attn=False).train()
    x, position_ids, mask = padded_packed_batch()
    labels = x.masked_fill(mask == 0, -100)
    for kwargs in ({}, {"position_ids": position_ids}, {"position_ids": position_ids, "attention_mask": mask}):
        outs = [m(x, labels=labels, **kwargs) for m in (fused, math)]
        for m, out in zip((fused, math), outs):
            m.zero_grad()
            out.loss.backward()
        torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(fused.named_parameters(), math.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_flash_attn_false_decodes_like_sdpa_with_a_cache():
    fused, math = tiny_model(), tiny_model(flash_attn=False)
    prompt = torch.randint(3, V, (1, 6))
    ours = [torch.stack(list(generate_stream(m, prompt, max_new_tokens=10, temperature=0)), dim=1) for m in (fused, math)]
    assert torch.equal(ours[0], ours[1])


# ---------------------------------------------------------------------------------------------------------
# RoPE, FLOPs, optimizer, generation against transformers

def test_rope_roll_is_llamas_rotate_half_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)  # (B, heads, T, head_dim), Llama's layout
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    cos, signed_sin = rope_cos_sin(position_ids, 16, 10000.0, torch.float32)
    sin = torch.cat((-signed_sin[..., :8], signed_sin[..., 8:]), dim=-1)  # back to the plain sin table
    theirs_q, theirs_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q.transpose(1, 2), cos, signed_sin).transpose(1, 2), theirs_q)
    assert torch.equal(apply_rope(k.transpose(1, 2), cos, signed_sin).transpose(1, 2), theirs_k)


def test_flops_per_token_counts_six_per_active_matmul_weight_plus_causal_attention():
    dense = tiny_model()
    matmul_weights = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))
    c = dense.config
    assert dense.flops_per_token(32) == 6 * matmul_weights + 6 * c.n_layers * 32 * c.dim
    assert estimate_flops_per_token(c, 32) == dense.flops_per_token(32)
    # MoE: the router plus the k routed and the shared experts a token goes through; idle experts cost nothing
    moe = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    expert = 3 * c.dim * c.hidden_dim
    router = c.dim * 4
    assert moe.flops_per_token(32) == dense.flops_per_token(32) + 6 * c.n_layers * (2 * expert + router)


def test_configure_optimizer_groups_and_fused_steps_match_plain_adamw():
    model, reference = tiny_model().train(), tiny_model().train()
    optimizer = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert optimizer.defaults["fused"] and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "tok_embeddings" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight"}
    plain = torch.optim.AdamW([{"params": [dict(reference.named_parameters())[names[id(p)]] for p in g["params"]],
                                "weight_decay": g["weight_decay"]} for g in (decay, no_decay)],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, V, (2, 16))
    for _ in range(3):
        for m, opt in ((model, optimizer), (reference, plain)):
            m(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_generate_stream_repetition_penalty_matches_transformers():
    """The preallocated token buffer feeds the penalty exactly what transformers' generate sees."""
    from model.llama import to_llama
    model = tiny_model()
    llama = to_llama(model).eval()
    prompt = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        theirs = llama.generate(prompt, max_new_tokens=15, do_sample=False, repetition_penalty=10.0,
                                eos_token_id=None, pad_token_id=0)[0, 6:]
        ours = torch.stack(list(generate_stream(model, prompt, max_new_tokens=15, temperature=0,
                                                repetition_penalty=10.0)), dim=1)[0]
    assert torch.equal(ours, theirs)
    assert len(set(ours.tolist())) > 10  # without the penalty this model repeats one token 15 times
