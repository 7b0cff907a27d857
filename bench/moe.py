"""
moe: training step time of the MoE model / a dense model whose FFN has the same active parameters (one FFN as wide
as the routed experts a token goes through plus the shared ones).

    python -m bench moe --steps 5
"""
import statistics

import torch

from bench.common import model_config, ratio, take_turns, training_step
from model.model import Transformer


def run(args, results) -> dict:
    moe_config = model_config(args, use_moe=True)
    k, shared = moe_config.num_experts_per_tok, moe_config.n_shared_experts
    dense_config = model_config(args, hidden_dim=moe_config.hidden_dim * (k + shared))
    batch = torch.randint(0, moe_config.vocab_size, (args.batch_size, args.seq_len))
    steps = {}
    for name, config in (("dense", dense_config), ("moe", moe_config)):
        torch.manual_seed(0)
        model = Transformer(config).train()
        steps[name] = training_step(model, model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu"), batch)
    times = take_turns(steps, args.steps, args.warmup)
    active_ffn = 3 * moe_config.dim * moe_config.hidden_dim * (k + shared)
    return {"experts": f"{moe_config.n_routed_experts} routed, top-{k}, {shared} shared",
            "dense_hidden_dim": dense_config.hidden_dim, "active_ffn_params_per_layer": active_ffn,
            "dense_step_s": statistics.median(times["dense"]), "moe_step_s": statistics.median(times["moe"]),
            "moe_over_dense": ratio(times, "dense", "moe")}


def table(moe: dict) -> list:
    return ["", f"MoE ({moe['experts']}) vs dense (hidden_dim {moe['dense_hidden_dim']}, same active params)",
            f"  step: dense {moe['dense_step_s']:.2f} s, MoE {moe['moe_step_s']:.2f} s -> MoE/dense {moe['moe_over_dense']:.2f}"]
