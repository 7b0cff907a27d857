"""End-to-end learning check: a reduced demo (every stage, as subprocesses) must reach held-out accuracies far above
chance, every stage must add what it is there for (SFT: chat answers; multi-turn SFT: 他/她 follow-ups; DPO:
refusing people who do not exist, without forgetting the known ones), and the final model must hold a
multi-turn conversation in `2-eval.py --interactive`. Thresholds come from measured runs of `demo.py --quick`
with a margin (see QUICK_THRESHOLDS); a broken label shift, an inverted loss mask, a stage that stops learning or
a DPO that does nothing fails them."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import demo
from model.chat import ChatEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (stage, category) -> minimum accuracy. Measured with `python demo.py --quick` (docs/demo.md; 2 CPU cores, 300 eval
# records; quick8): pretrain completion_fact 76.7%, sft_single people_qa 55.8%, sft_single arith 25.6%, sft_multi
# people_qa_followup 60.5% (43 questions). Arithmetic varies most between runs (earlier quick runs: 53%, 73%, 84%;
# the pretrained model's held-out sums 2-77%), so its bound only asks that SFT made sums answerable at all. Chance is
# ~5-8% for the people questions (12-20 possible values), ~0% for an exact arithmetic result and for the refusal.
# With the pretraining text replayed in single-turn SFT (quick10, a 2-core AMD EPYC): 90.0%, 91.9%, 18.6% (its
# pretraining did not find the carry rule: held-out sums 4%), 83.7%; the bounds stay where they were.
QUICK_THRESHOLDS = {
    ("pretrain", "completion_fact"): 0.30,
    ("sft_single", "people_qa"): 0.25,
    ("sft_single", "arith"): 0.10,
    ("sft_multi", "people_qa_followup"): 0.12,
}
# (stage, category) -> maximum accuracy: the behaviour the next stage adds is absent or rare before it. The chat
# format: 0% before SFT. The refusal before DPO: SFT's out-of-scope answer "我不知道。" is also given to some
# unfamiliar names (sft_multi: 0% in quick8, 0-26% in full runs; docs/demo.md).
QUICK_CEILINGS = {
    ("pretrain_chat", "arith"): 0.10,  # no chat format before SFT
    ("sft_multi", "unknown_person_refusal"): 0.40,
}
# DPO, measured in a quick run (quick9): refusal 0% -> 84%, held-out people QA 51% -> 55%, held-out pairs reward
# accuracy 71% (with the full plan, final7: 9% -> 94%, 79.5% -> 81.5%, 71%); quick10 (SFT replay, DPO's weight 1):
# 2% -> 86%, 86.0% -> 87.2%, 71%. Before DPO replayed the pretraining text (--ptx_data) it cost known people 2.4
# points in the quick run and 1 to 10.5 in full runs (docs/demo.md).
DPO_REFUSAL_FLOOR = 0.6
DPO_REFUSAL_GAIN = 0.4  # points DPO adds to the refusal rate, at least
DPO_PEOPLE_QA_MAX_DROP = 0.05


def test_report_lists_each_models_accuracy_once(tmp_path):
    """The accuracy table has one row per (model, category): the pretrained model used to be listed twice."""
    runs = {name: str(tmp_path / name) for name in ("pretrain", "sft_single", "sft_multi", "dpo")}
    chat = {"per_category": {"people_qa": (1, 2, 0.5), "unknown_person_refusal": (0, 2, 0.0)}}
    results = {"pretrain": {"per_category": {"completion_fact": (3, 4, 0.75)}}, "pretrain_chat": chat,
               "sft_single": chat, "sft_multi": chat, "dpo": chat, "samples": [],
               "dpo_heldout_pairs": {"n": 2, "path": "dpo_eval.jsonl", "reward_accuracy": 1.0, "reward_margin": 0.5}}
    report = open(demo.write_report(str(tmp_path), demo.FULL, runs, results, {}, 60.0), encoding="utf-8").read()
    rows = [line for line in report.splitlines() if line.count("|") == 5 and "%" in line]
    assert len(rows) == len(set(rows)) == 1 + 2 * 4, "\n".join(rows)


def test_grpo_line_names_the_largest_drop_not_the_largest_move():
    """The report said "every other category within 9.0 points of DPO" when one category had gained 9 points and
    none had lost more than 0.5: the 2-point rule is about drops."""
    rl = {"greedy": 0.4, "pass@1": 0.3, "pass@8": 0.5, "repeated_ngrams": 0.0}
    results = {"rl": {"dpo": rl, "grpo": {**rl, "greedy": 0.99}},
               "dpo": {"per_category": {"arith": (199, 200, 0.995), "people_qa_followup": (75, 100, 0.75)}},
               "grpo": {"per_category": {"arith": (198, 200, 0.99), "people_qa_followup": (84, 100, 0.84)}}}
    (line,) = demo.rl_card(results)
    assert "40.0% → 99.0%" in line and "from -0.5 points (arith) to +9.0 (people_qa_followup)" in line, line


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """Run `demo.py --quick` once for the tests of this file; returns its working directory."""
    work = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--quick", "--out_dir", "out/demo",
                             "--data_dir", "dataset/demo"], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return work


@pytest.mark.slow
def test_quick_demo_dialogues_fit_the_context(quick_demo):
    """Every multi-turn SFT dialogue fits the model's context whole (truncation would cut the last, latest answers:
    the ones a long chat needs), and the longest is close to it (as long as a chat kept by --interactive)."""
    with open(quick_demo / "out/demo/sft_multi/config.json", encoding="utf-8") as f:
        max_seq_len = json.load(f)["max_seq_len"]
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(str(quick_demo / "out/demo/tokenizer")), 10 ** 6)
    with open(quick_demo / "dataset/demo/sft_data_multi.jsonl", encoding="utf-8") as f:
        lengths = [len(ids) for ids, _ in encoder.encode_many([json.loads(line)["conversations"] for line in f])]
    assert max_seq_len * 0.8 < max(lengths) <= max_seq_len


@pytest.mark.slow
def test_quick_demo_every_stage_adds_its_behaviour(quick_demo):
    with open(quick_demo / "out/demo/scores.json", encoding="utf-8") as f:
        scores = json.load(f)
    report = (quick_demo / "out/demo/report.md").read_text(encoding="utf-8")
    failures = []
    for (stage, category), minimum in QUICK_THRESHOLDS.items():
        accuracy = scores[stage]["per_category"][category][2]
        if accuracy < minimum:
            failures.append(f"{stage}/{category}: {accuracy:.1%} < {minimum:.0%}")
    for (stage, category), maximum in QUICK_CEILINGS.items():
        accuracy = scores[stage]["per_category"][category][2]
        if accuracy > maximum:
            failures.append(f"{stage}/{category}: {accuracy:.1%} > {maximum:.0%}")
    assert not failures, "\n".join(failures) + "\n" + report
    for stage in ("pretrain", "sft_single", "sft_multi", "dpo", "grpo"):
        assert (quick_demo / "out/demo" / stage / "loss.png").exists()
        assert f"| {stage} |" in report
    assert (quick_demo / "out/demo/grpo/reward.png").exists() and "- **GRPO**: sums in new phrasings" in report
    assert set(scores["rl"]) == {"dpo", "grpo"} and all(0 <= scores["rl"]["grpo"][k] <= 1 for k in ("greedy", "pass@1",
                                                                                                 "pass@8"))
    assert "## What each stage added" in report and "unknown_person_refusal" in report
    assert "reward accuracy" in report


@pytest.mark.slow
def test_quick_demo_dpo_teaches_refusal(quick_demo):
    """DPO adds the refusal (rare after SFT: QUICK_CEILINGS), and prefers the right answer on held-out pairs."""
    with open(quick_demo / "out/demo/scores.json", encoding="utf-8") as f:
        scores = json.load(f)
    failures = []
    before_refusal, refusal = (scores[s]["per_category"]["unknown_person_refusal"][2] for s in ("sft_multi", "dpo"))
    if refusal < DPO_REFUSAL_FLOOR or refusal < before_refusal + DPO_REFUSAL_GAIN:
        failures.append(f"dpo/unknown_person_refusal: {before_refusal:.1%} -> {refusal:.1%}")
    before, after = (scores[s]["per_category"]["people_qa"][2] for s in ("sft_multi", "dpo"))
    if after < before - DPO_PEOPLE_QA_MAX_DROP:
        failures.append(f"dpo/people_qa fell from {before:.1%} to {after:.1%}")
    pairs = scores["dpo_heldout_pairs"]
    if pairs["reward_accuracy"] < 0.6 or pairs["reward_margin"] <= 0:
        failures.append(f"held-out DPO pairs: reward accuracy {pairs['reward_accuracy']:.1%}, "
                        f"margin {pairs['reward_margin']:.3f}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_quick_demo_model_answers_each_question_of_a_conversation(quick_demo):
    """A scripted `2-eval.py --interactive` session (greedy, history kept): each people question gets an answer
    about its own person, not an earlier answer again; 他/她 means the person of the previous question (two people
    of different genders); each sum gets a sum, not an earlier answer again; "你好，你是谁？" and, late in the
    session, "你叫什么名字？" get the assistant's identity, not a refusal or the previous answer. (Whether the facts
    and sums are right is what the eval categories measure, arith_multiturn for sums after another exchange;
    docs/demo.md has this session's transcripts on full demo models.)"""
    with open(quick_demo / "dataset/demo/world.json", encoding="utf-8") as f:
        world = json.load(f)
    sft_people = [p for p in world["people"] if p["split"] == "sft"]
    a = sft_people[0]
    b = next(p for p in sft_people if p["gender"] != a["gender"])
    he_she = lambda p: "他" if p["gender"] == "男" else "她"  # noqa: E731
    # The person each answer is about is checked, not the fact (the categories measure facts); for a sum, that it
    # is a sum ("="), not whether it is right. The late identity question got the previous person, then (once DPO
    # taught refusals) "我不知道江建勇是谁。", until DPO's late-identity pairs; a model whose multi-turn data had no
    # sum after a greeting answered the last sum with the identity again (docs/demo.md).
    session = [("你好，你是谁？", "nano-LLM"),
               ("35加47是多少？", "="),
               (f"{a['name']}在哪里工作？", a["name"]),
               (f"{he_she(a)}有什么爱好？", a["name"]),
               (f"{b['name']}是哪里人？", b["name"]),
               (f"{he_she(b)}毕业于哪所大学？", b["name"]),
               ("你叫什么名字？", "nano-LLM"),
               ("20加16是多少？", "=")]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "2-eval.py"), "--interactive", "--checkpoint", "out/demo/dpo",
         "--temperature", "0", "--max_new_tokens", "40", "--device", "cpu"],
        input="".join(q + "\n" for q, _ in session), cwd=quick_demo, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [piece.split("\n", 1)[0] for piece in result.stdout.split("🤖: ")[1:]]
    transcript = "\n".join(f"{q} -> {answer}" for (q, _), answer in zip(session, answers))
    assert len(answers) == len(session), result.stdout
    # a people answer must name its person and a sum be a sum, and neither an earlier answer said again (which may
    # name the person too); only the identity is the same answer twice
    wrong = [f"{q} -> {answer} (expected {want!r}, a new answer)" for i, ((q, want), answer)
             in enumerate(zip(session, answers)) if want not in answer or want != "nano-LLM" and answer in answers[:i]]
    assert not wrong, "\n".join(wrong) + "\n\nwhole session:\n" + transcript


@pytest.mark.slow
def test_quick_demo_model_exports_to_llama_cpp_which_answers_as_ours(quick_demo):
    """The demo's final model exports to GGUF (its tokenizer splits like Qwen2, which llama.cpp implements) and
    llama.cpp's greedy answers to the demo's eval questions are ours token for token (tests/test_gguf.py checks the
    export in depth)."""
    from test_gguf import llama_cpp_greedy, llama_cpp_model, ours_greedy  # skips without gguf / llama-cpp-python

    from model.evaluate import load_checkpoint
    run = quick_demo / "out/demo/dpo"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export_model.py"), "--checkpoint", str(run),
                             "--gguf", str(quick_demo / "demo.gguf"), "--outtype", "f32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model, tokenizer, _ = load_checkpoint(str(run), device="cpu", dtype="float32")
    llm = llama_cpp_model(quick_demo / "demo.gguf")
    with open(quick_demo / "dataset/demo/eval_chat.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][::100]  # every category: people, follow-ups, unknown names, sums
    for record in records:
        ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)["input_ids"]
        assert llama_cpp_greedy(llm, ids, 24) == ours_greedy(model, ids, 24), record["messages"]
