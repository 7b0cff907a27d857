"""
The demo corpus: a small, deterministic, Chinese-first fictional world that a tiny model can learn on a
laptop CPU in minutes, with held-out evaluation that only passes if the model really learned something.

Run as (through the data pipeline, which also packs the pretraining text):
    python data_process.py demo                   # -> dataset/demo/
or directly (text files only, no packing):
    python demo_corpus.py --out_dir dataset/demo

The world
- `n_people` fictional people with unique 3-character names and six attributes: birth date (year+month),
  birth city, university, major, employer, hobby. Every value list is "substring-free" (no value contains
  another value or appears in a name), so "gold answer appears in the generated text" is an exact score.
- Each person gets `n_bios` biographies: one sentence per attribute, each attribute phrased with one of three
  templates (rotated so every person sees every template), sentences in a shuffled order, the full name in
  every sentence (a tiny model binds facts to the name, not to a pronoun five sentences back).
- Two-digit arithmetic: a+b and a-b (a >= b), a, b in 10..99, written "37+45=82。". A fraction of the
  (op, a, b) triples is held out and appears nowhere except in the eval files.

- `n_unknown` names of people who do not exist (drawn like the real names, in no pretraining text): asked
  about, the assistant should say "我不知道X是谁。". Half of them are DPO's, the other half only in eval.
- Tool use (docs/tools.md): multiplication and division of multi-digit numbers, asked with the calculator of
  model/tools.py declared, are answered by calling it; other questions asked with it declared get no call. A set
  of 3-digit numbers (200-999, `TOOL_HELDOUT_RATIO`) appears in no training file: eval multiplies two of them.

Who appears where
- pretraining text: every biography of every person, every training arithmetic triple.
- SFT single / multi and DPO: questions about the "SFT people" only (a subset), training triples only;
  greetings, "你是谁？" and users who say their name ("我叫X。", X none of the world's people) in SFT;
  multi-turn dialogues change topic (sum, second person) as users do.
- DPO only: refusal pairs for the DPO unknown names (the one behaviour SFT never shows), and true facts over a
  refusal for known people: SFT people and the "DPO people" (`dpo_people_ratio`), who like the held-out people
  appear only in the pretraining text, so that "known" means "in the pretraining text", not "asked about in SFT".
- eval files: questions about the "held-out people" (their facts are ONLY in the pretraining text), about the
  eval unknown names, and held-out arithmetic triples (also asked after another exchange: arith_multiturn). So
  eval measures knowledge extraction and arithmetic generalisation, not recall of a memorised answer.

Files written to out_dir (one JSON object per line, UTF-8, ensure_ascii=False):
    tokenizer_train.jsonl  {"text"}   pretraining text + SFT/DPO chat text + GB2312 charset lines (tokenizer coverage)
    pretrain_data.jsonl    {"text"}   biographies and arithmetic blocks, shuffled
    sft_data_single.jsonl  {"conversations": [{"role","content"}, ...]}  one user/assistant exchange
    sft_data_multi.jsonl   same, 2-7 exchanges, follow-ups refer back with 他/她 to the previous exchange's person
    sft_data_tools.jsonl   {"conversations", "tools"}  the calculator declared: calls for products and quotients,
                           direct answers to everything else
    dpo_data.jsonl         {"chosen": [msgs], "rejected": [msgs]}  same prompt, last assistant turn differs
    dpo_eval.jsonl         same format, held-out pairs (eval unknown names, held-out people): DPO reward accuracy
    eval_chat.jsonl        {"category", "messages", "answer", ...}  chat checks (2-eval.py --eval_file)
    grpo_data.jsonl        {"conversations", "answer"}  RL prompts (5-grpo.py): training sums in new phrasings
    eval_rl.jsonl          eval_chat's format: held-out sums in those phrasings (category arith_rl)
    eval_pretrain.jsonl    {"category", "prompt", "answer", ...}    completion checks (0-eval_pretrain.py)
    eval_tools.jsonl       {"category", "messages", "tools", "answer"}  held-out products and quotients, and
                           questions that need no tool, all with the calculator declared (2-eval.py --eval_file)
    world.json             the ground truth: people, attributes, who is held out, held-out arithmetic
Scoring rule for both eval files: correct iff `answer` is a substring of the first line of the generated text.
"""
import argparse
import json
import os
import random
import re

# ----------------------------------------------------------------------------------------------------------
# The world's vocabulary. Fictional universities and employers so the world cannot leak from real knowledge.

SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范石廖贾夏韦方白邹孟熊秦邱江尹薛段雷侯龙史陶黎贺顾毛郝龚邵严武戴莫孔汤")
PEOPLE_SURNAMES, UNKNOWN_SURNAMES = SURNAMES[:60], SURNAMES[60:]  # people who exist / who do not
GIVEN_FIRST = list("子雨思欣梓浩宇俊佳晨嘉诗明文志建晓春立天若泽慧家永少")
GIVEN_SECOND = list("涵轩琪怡然豪杰婷华峰伟强磊洋勇军敏静丽芳娜玲鹏辉红霞")

CITIES = ["杭州", "成都", "西安", "南京", "苏州", "重庆", "长沙", "青岛", "厦门", "大连", "昆明", "哈尔滨",
          "郑州", "济南", "福州", "合肥", "南昌", "贵阳", "兰州", "宁波"]
UNIVERSITIES = ["东湖大学", "青山大学", "明德大学", "远志大学", "星海大学", "北辰大学", "启明大学", "云麓大学",
                "长风大学", "清源大学", "博雅大学", "南山大学"]
MAJORS = ["计算机科学", "数学", "物理学", "化学", "经济学", "法学", "历史学", "生物学", "机械工程", "临床医学",
          "新闻学", "建筑学"]
EMPLOYERS = ["蓝海科技", "远航物流", "青松银行", "华夏电力", "星辰传媒", "金桥证券", "绿洲农业", "天工汽车",
             "云帆软件", "明日医药", "长城建设", "海纳电子", "新禾食品", "北斗航空", "和光教育"]
HOBBIES = ["下棋", "游泳", "摄影", "书法", "爬山", "钓鱼", "跑步", "绘画", "弹钢琴", "打篮球"]
YEARS = range(1970, 2000)
# Months 1 and 2 are left out: "1988年1月" is a substring of "1988年11月", which would break substring scoring.
MONTHS = range(3, 13)

# Per attribute: the value list, three statement templates (the first is canonical: SFT answers and completion
# prompts use it), and two question templates ({n} = name or, in follow-ups, 他/她).
ATTRIBUTES = {
    "birth_date": dict(values=[f"{y}年{m}月" for y in YEARS for m in MONTHS],
                       statements=["{n}的出生日期是{v}。", "{n}生于{v}。", "{n}在{v}出生。"],
                       questions=["{n}是什么时候出生的？", "{n}的出生日期是什么？"]),
    "birth_city": dict(values=CITIES,
                       statements=["{n}出生于{v}。", "{n}的家乡是{v}。", "{n}来自{v}。"],
                       questions=["{n}出生在哪个城市？", "{n}是哪里人？"]),
    "university": dict(values=UNIVERSITIES,
                       statements=["{n}毕业于{v}。", "{n}曾在{v}读书。", "{n}是{v}的毕业生。"],
                       questions=["{n}毕业于哪所大学？", "{n}是哪个大学毕业的？"]),
    "major": dict(values=MAJORS,
                  statements=["{n}的专业是{v}。", "{n}在大学里学的是{v}。", "{n}主修{v}。"],
                  questions=["{n}学的是什么专业？", "{n}的专业是什么？"]),
    "employer": dict(values=EMPLOYERS,
                     statements=["{n}的工作单位是{v}。", "{n}在{v}工作。", "{n}就职于{v}。"],
                     questions=["{n}在哪里工作？", "{n}的工作单位是哪里？"]),
    "hobby": dict(values=HOBBIES,
                  statements=["{n}的爱好是{v}。", "{n}喜欢{v}。", "{n}业余时间喜欢{v}。"],
                  questions=["{n}有什么爱好？", "{n}平时喜欢做什么？"]),
}
ARITH_QUESTIONS = ["{a}{op}{b}等于多少？", "计算{a}{op}{b}。", "{a}{op_zh}{b}是多少？"]

# Who the assistant is: greetings and identity questions in SFT, so a chat that starts with "你好" has an answer
# of its own (without them, a model asked something it never saw in SFT repeats the nearest answer it knows).
IDENTITY = "我是nano-LLM，一个从零开始训练的小语言模型。"
GREETINGS = [("你好", "你好！有什么可以帮你的吗？"), ("你好！", "你好！有什么可以帮你的吗？"),
             ("嗨", "你好！有什么可以帮你的吗？"), ("你是谁？", IDENTITY), ("你叫什么名字？", IDENTITY),
             ("请介绍一下你自己。", IDENTITY), ("你好，你是谁？", "你好！" + IDENTITY),
             ("你好，请问你是谁？", "你好！" + IDENTITY)]


# Questions no model can answer from its training text: SFT teaches "我不知道。" for them, so the words exist in the
# assistant's vocabulary; saying it about a PERSON the world does not have is what DPO adds.
OUT_OF_SCOPE = [("今天天气怎么样？", "我不知道。"), ("现在几点了？", "我不知道。"), ("今天是星期几？", "我不知道。"),
                ("明天会下雨吗？", "我不知道。"), ("下一期彩票的号码是多少？", "我不知道。"),
                ("我的钥匙放在哪里了？", "我不知道。")]


# Everyday sentences in the pretraining text, with the words the assistant says in SFT and DPO (我, 你好, 不知道, 谁,
# nano-LLM, 模型...) but no one's name and no chat format. Without them those characters never occur in
# pretraining, their (tied) embeddings stay random, frozen through SFT, and DPO's "我不知道X是谁。" came out
# garbled ("我知知道道…") from the better-trained model (docs/demo.md).
EVERYDAY_TEXT = ["nano-LLM是一个从零开始训练的小语言模型。", "有一个小语言模型叫nano-LLM，它是从零开始训练的。",
                 "你好！有什么可以帮你的吗？", "我不知道今天是星期几。", "谁也不知道明天会不会下雨。",
                 "他不知道现在几点了。", "她问：你是谁？我说：我是你的同学。", "这是谁的钥匙？我不知道。",
                 "我们都不知道下一期彩票的号码是多少。", "你知道那个人是谁吗？我也不知道。",
                 "老师问大家：这道题的答案是什么？", "你可以帮我一个忙吗？可以！"]


def refusal(name):
    """The answer DPO prefers for a person who does not exist in the world; SFT never shows it."""
    return f"我不知道{name}是谁。"


def check_substring_free(names):
    """Every gold answer must be unambiguous under substring scoring: no value inside another value or a name."""
    values = [v for spec in ATTRIBUTES.values() for v in spec["values"]]
    assert len(set(values)) == len(values), "duplicate attribute value"
    for v in values:
        for w in values:
            assert v == w or v not in w, f"value {v!r} is a substring of {w!r}"
        for name in names:
            assert v not in name, f"value {v!r} appears in name {name!r}"


def canonical_statement(name, attribute, value):
    return ATTRIBUTES[attribute]["statements"][0].format(n=name, v=value)


def completion_prompt(name, attribute):
    """'张伟出生于' for birth_city: the canonical statement cut just before the value."""
    return ATTRIBUTES[attribute]["statements"][0].split("{v}")[0].format(n=name)


def arith_result(op, a, b):
    return a + b if op == "+" else a - b


def arith_statement(op, a, b, result=None):
    return f"{a}{op}{b}={arith_result(op, a, b) if result is None else result}。"


# "73加45等于118。" in the pretraining text: with only "73+45=118。" there, 加 and 减 never occurred in
# pretraining, their embeddings stayed alike and frozen through SFT, and "X加Y是多少？" / "X减Y是多少？" got the
# other operation a third of the time (every wrong answer to those questions was a swapped sign; docs/demo.md).
def arith_in_words(op, a, b):
    return f"{a}{'加' if op == '+' else '减'}{b}等于{arith_result(op, a, b)}。"


# ----------------------------------------------------------------------------------------------------------
# The world

def make_world(seed=1337, n_people=300, sft_people_ratio=0.5, heldout_pair_ratio=0.1, n_unknown=200,
               dpo_people_ratio=0.1):
    """n_unknown: names of people who do NOT exist (appearing in no pretraining text); the first half is for DPO's
    refusal pairs, the second half only for the eval files. Their surnames are ones no real person has
    (UNKNOWN_SURNAMES): a model this small, in a DPO stage of two minutes, does not learn to tell a new combination
    of familiar characters from a name it read in pretraining (docs/demo.md), but it can notice a surname it
    never read as anyone's.
    dpo_people_ratio: people who, like the held-out ones, appear only in the pretraining text, and whose true facts
    DPO prefers over a refusal: they teach DPO where "known" ends (in the pretraining text or not), not where SFT
    ends. Split per person: "sft", "dpo" or "heldout" (eval only)."""
    rng = random.Random(seed)
    max_names = len(PEOPLE_SURNAMES) * len(GIVEN_FIRST) * len(GIVEN_SECOND)
    assert 2 <= n_people <= max_names // 4, f"n_people must be in 2..{max_names // 4}"
    names, unknown, seen = [], [], set()
    while len(names) < n_people or len(unknown) < n_unknown:  # 3 characters each: unique names are prefix-free
        real = len(names) < n_people
        name = rng.choice(PEOPLE_SURNAMES if real else UNKNOWN_SURNAMES) + rng.choice(GIVEN_FIRST) + \
            rng.choice(GIVEN_SECOND)
        if name not in seen:
            seen.add(name)
            (names if real else unknown).append(name)
    check_substring_free(names + unknown)
    people = []
    for name in names:
        person = {"name": name, "gender": rng.choice(["男", "女"])}
        for attribute, spec in ATTRIBUTES.items():
            person[attribute] = rng.choice(spec["values"])
        people.append(person)
    n_sft = max(1, min(n_people - 1, round(n_people * sft_people_ratio)))
    n_dpo = round(n_people * dpo_people_ratio)
    assert n_sft + n_dpo < n_people, "no people left for the held-out evaluation"
    for i, person in enumerate(people):  # names are already in random order
        person["split"] = "sft" if i < n_sft else "dpo" if i < n_sft + n_dpo else "heldout"

    triples = [("+", a, b) for a in range(10, 100) for b in range(10, 100)]
    triples += [("-", a, b) for a in range(10, 100) for b in range(10, a + 1)]
    rng.shuffle(triples)
    heldout = set()
    for op in "+-":  # hold out the same fraction of each operation
        of_op = [t for t in triples if t[0] == op]
        heldout.update(of_op[:round(len(of_op) * heldout_pair_ratio)])
    return {
        "seed": seed,
        "people": people,
        "arith_train": [t for t in triples if t not in heldout],
        "arith_heldout": [t for t in triples if t in heldout],
        "unknown_names": {"dpo": unknown[:n_unknown // 2], "eval": unknown[n_unknown // 2:]},
    }


def pronoun(person):
    return "他" if person["gender"] == "男" else "她"


# ----------------------------------------------------------------------------------------------------------
# Pretraining text

def biographies(person, n_bios, rng):
    attributes = list(ATTRIBUTES)
    offset = rng.randrange(3)
    bios = []
    for k in range(n_bios):
        sentences = []
        for j, attribute in enumerate(attributes):
            template = ATTRIBUTES[attribute]["statements"][(k + j + offset) % 3]  # rotate through all templates
            sentences.append(template.format(n=person["name"], v=person[attribute]))
        rng.shuffle(sentences)
        bios.append("".join(sentences))
    return bios


def pretrain_documents(world, n_bios, rng, equations_per_doc=16):
    docs = [bio for person in world["people"] for bio in biographies(person, n_bios, rng)]
    docs += ["".join(rng.sample(EVERYDAY_TEXT, len(EVERYDAY_TEXT))) for _ in range(n_bios)]
    train = list(world["arith_train"])
    rng.shuffle(train)
    for i in range(0, len(train), equations_per_doc):  # a quarter of them in words, the way a question puts them
        docs.append("\n".join(arith_statement(*t) if rng.random() < 0.75 else arith_in_words(*t)
                              for t in train[i:i + equations_per_doc]))
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------------------
# Chat data: SFT single, SFT multi, DPO, eval

def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def arith_question(op, a, b, rng):
    return rng.choice(ARITH_QUESTIONS).format(a=a, b=b, op=op, op_zh="加" if op == "+" else "减")


# Users who say their name: the assistant starts its answer with that name and, asked later, says it again. The
# names are drawn from the whole name space (none is a person of the world), so the only way to get them
# right is to copy them from the conversation: the skill an answer about a person needs for its first words.
# Without it, the most common wrong answer in every chat stage began with the right surname and went on with an
# SFT person's given name (罗永静 -> 罗泽涵): SFT answers had taught 40 names as likely continuations (docs/demo.md).
def stranger_name(world, rng):
    taken = {p["name"] for p in world["people"]}
    while True:
        name = rng.choice(PEOPLE_SURNAMES) + rng.choice(GIVEN_FIRST) + rng.choice(GIVEN_SECOND)
        if name not in taken:
            return name


def introduction(name):
    return [user(f"我叫{name}。"), assistant(f"{name}，你好！有什么可以帮你的吗？")]


def name_recall(name):
    return [user("我叫什么名字？"), assistant(f"你叫{name}。")]


def sft_single(world, rng, n_arith=1500, greeting_repeats=15, n_introductions=300):
    records = [introduction(stranger_name(world, rng)) for _ in range(n_introductions)]
    for person in world["people"]:
        if person["split"] != "sft":
            continue
        for attribute, spec in ATTRIBUTES.items():
            for question in spec["questions"]:
                answer = canonical_statement(person["name"], attribute, person[attribute])
                records.append([user(question.format(n=person["name"])), assistant(answer)])
    for op, a, b in rng.sample(world["arith_train"], min(n_arith, len(world["arith_train"]))):
        records.append([user(arith_question(op, a, b, rng)), assistant(arith_statement(op, a, b))])
    records += [[user(q), assistant(a)] for q, a in GREETINGS + OUT_OF_SCOPE] * greeting_repeats
    rng.shuffle(records)
    return records


def person_turn(person, attribute, rng, follow_up=False):
    """One exchange about a person: named, or (follow_up) 他/她 for the person of the previous exchange."""
    question = rng.choice(ATTRIBUTES[attribute]["questions"]).format(n=pronoun(person) if follow_up else person["name"])
    return [user(question), assistant(canonical_statement(person["name"], attribute, person[attribute]))]


def dialogue(person, attributes, rng):
    """Several questions about one person; only the first names them, follow-ups say 他/她."""
    return [m for i, attribute in enumerate(attributes) for m in person_turn(person, attribute, rng, i > 0)]


def arith_turn(world, rng):
    op, a, b = rng.choice(world["arith_train"])
    return [user(arith_question(op, a, b, rng)), assistant(arith_statement(op, a, b))]


def mixed_dialogue(world, person, other, rng):
    """2-7 exchanges that change topic the way a user does: maybe a greeting or the user's name, maybe a sum, then
    questions about a person (named, then 1-2 follow-ups with 他/她), maybe a sum, and maybe a second person of the
    same gender, named, with a follow-up. 他/她 always means the person of the previous exchange, and a follow-up
    comes after every first question about a person. A sum comes after any kind of exchange, also right after the
    first question about someone (who is then named again): when sums came only after follow-ups, a sum asked
    right after a person got an answer about the person. Every answer depends on its own question, so the model
    learns to answer the newest question, not to repeat the history; a user who gave their name may ask for it
    at the end."""
    messages, name = [], None
    if rng.random() < 0.3:
        question, answer = rng.choice(GREETINGS)
        messages += [user(question), assistant(answer)]
    elif rng.random() < 0.4:  # the user says their name first, and may ask for it again at the end
        name = stranger_name(world, rng)
        messages += introduction(name)
    if rng.random() < 0.4:
        messages += arith_turn(world, rng)
    attributes = rng.sample(list(ATTRIBUTES), rng.randint(2, 3))
    if rng.random() < 0.3:  # named, a sum, named again, a follow-up
        attributes = rng.sample(list(ATTRIBUTES), 3)
        messages += person_turn(person, attributes[0], rng) + arith_turn(world, rng)
        messages += dialogue(person, attributes[1:], rng)
    else:
        messages += dialogue(person, attributes, rng)
        if rng.random() < 0.5:
            messages += arith_turn(world, rng)
    if other is not None and rng.random() < 0.5:
        messages += dialogue(other, rng.sample(list(ATTRIBUTES), 2), rng)
    if rng.random() < 0.3:  # "who are you?" late in a conversation too, not only as its opening
        question, answer = rng.choice(GREETINGS[3:6])
        messages = messages[:12] + [user(question), assistant(answer)]
    elif name and rng.random() < 0.5:
        messages = messages[:12] + name_recall(name)
    # At most 7 exchanges: up to 252 tokens with the demo's tokenizer, inside max_seq_len 256, and as long as a chat
    # gets (2-eval.py --interactive keeps what fits in 256 - 40 tokens). Cut at 5, the 6th and 7th question of the
    # scripted session (a follow-up about the second person, "你叫什么名字？") got an earlier answer (docs/demo.md).
    return messages[:14]


def sft_multi(world, rng, n_dialogues=600):
    sft_people = [p for p in world["people"] if p["split"] == "sft"]
    records = []
    for i in range(n_dialogues):
        person = sft_people[i % len(sft_people)]
        same_gender = [p for p in sft_people if p["gender"] == person["gender"] and p is not person]
        records.append(mixed_dialogue(world, person, rng.choice(same_gender) if same_gender else None, rng))
    rng.shuffle(records)
    return records


def invented_answer(name, rng):
    """A confident, made-up fact: what a model that has not learned to say "I don't know" produces."""
    attribute = rng.choice(list(ATTRIBUTES))
    return attribute, canonical_statement(name, attribute, rng.choice(ATTRIBUTES[attribute]["values"]))


def unknown_pair(name, rng):
    attribute, invented = invented_answer(name, rng)
    prompt = [user(rng.choice(ATTRIBUTES[attribute]["questions"]).format(n=name))]
    return {"chosen": prompt + [assistant(refusal(name))], "rejected": prompt + [assistant(invented)]}


def known_pair(person, rng, refuse):
    """Chosen: the true fact. Rejected: a refusal (so DPO does not learn to refuse everyone) or a wrong value."""
    attribute = rng.choice(list(ATTRIBUTES))
    spec = ATTRIBUTES[attribute]
    prompt = [user(rng.choice(spec["questions"]).format(n=person["name"]))]
    wrong = rng.choice([v for v in spec["values"] if v != person[attribute]])
    rejected = refusal(person["name"]) if refuse else canonical_statement(person["name"], attribute, wrong)
    return {"chosen": prompt + [assistant(canonical_statement(person["name"], attribute, person[attribute]))],
            "rejected": prompt + [assistant(rejected)]}


def wrong_arith_result(op, a, b, rng):
    correct = arith_result(op, a, b)
    candidates = [correct + d for d in (-10, -2, -1, 1, 2, 10) if correct + d >= 0]
    return rng.choice(candidates)


def repeat_pair(messages, rng):
    """A conversation cut after a later question: its own answer over an earlier answer said again, the first or
    the previous one (the failures of a model that repeats the history instead of answering the newest
    question; the second is what a late "你叫什么名字？" got before these pairs had it)."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    differs = lambda k: [j for j in answers if j < k and messages[j]["content"] != messages[k]["content"]]  # noqa: E731
    k = rng.choice([i for i in answers[1:] if differs(i)])
    earlier = differs(k)
    prompt = messages[:k]
    return {"chosen": prompt + [messages[k]], "rejected": prompt + [messages[rng.choice([earlier[0], earlier[-1]])]]}


def dpo_pairs(world, rng, n_unknown_pairs=500, n_known_pairs=500, n_arith_pairs=200, n_repeat_pairs=300,
              n_identity_pairs=100):
    """The behaviour DPO adds (SFT never shows it): "我不知道X是谁。" for a person who does not exist, instead of
    an invented biography. Pairs about known people (true fact over a refusal or a wrong value) keep it from
    refusing people it knows: half about DPO people, who like the held-out people appear only in the pretraining
    text, so that what decides is "in the pretraining text", not "asked about in SFT". Arithmetic, greeting and
    multi-turn pairs (the newest question's answer over an earlier answer repeated; the identity, asked late, over a
    refusal or the previous answer) keep what SFT taught."""
    sft_people = [p for p in world["people"] if p["split"] == "sft"]
    dpo_people = [p for p in world["people"] if p["split"] == "dpo"] or sft_people
    names = world["unknown_names"]["dpo"]
    records = [unknown_pair(names[i % len(names)], rng) for i in range(n_unknown_pairs)]
    for i in range(n_known_pairs):  # every other pair about a DPO person (each in turn), the rest about SFT people
        person = dpo_people[i // 2 % len(dpo_people)] if i % 2 else rng.choice(sft_people)
        records.append(known_pair(person, rng, refuse=i // 2 % 2 == 0))
    # what SFT taught, as pairs too: a DPO stage on refusals and people alone forgets the sums and the history
    for op, a, b in rng.sample(world["arith_train"], min(n_arith_pairs, len(world["arith_train"]))):
        prompt = [user(arith_question(op, a, b, rng))]
        records.append({"chosen": prompt + [assistant(arith_statement(op, a, b))],
                        "rejected": prompt + [assistant(arith_statement(op, a, b, wrong_arith_result(op, a, b, rng)))]})
    for question, answer in GREETINGS * 10:  # "你是谁？" is not a person to refuse
        records.append({"chosen": [user(question), assistant(answer)], "rejected": [user(question), assistant("我不知道。")]})
    dialogues = [d for d in sft_multi(world, rng, n_dialogues=2 * n_repeat_pairs)
                 if len({m["content"] for m in d if m["role"] == "assistant"}) > 1][:n_repeat_pairs]
    records += [repeat_pair(d, rng) for d in dialogues]
    # "你叫什么名字？" late in a conversation: the identity, not a refusal of someone (once the refusal was learnt, a
    # late identity question got "我不知道<some name>是谁。") nor the previous answer again
    for i, d in enumerate(dialogues[:n_identity_pairs]):
        question, answer = rng.choice(GREETINGS[3:6])
        prompt = d[:2 * rng.randint(1, len(d) // 2 - 1)] + [user(question)]  # at most as long as a dialogue
        wrong = prompt[-2]["content"] if i % 2 and prompt[-2]["content"] != answer else refusal(names[i % len(names)])
        records.append({"chosen": prompt + [assistant(answer)], "rejected": prompt + [assistant(wrong)]})
    rng.shuffle(records)
    return records


def arith_after_pairs(world, dialogues, rng, n_pairs=150):
    """Sums asked after one or two exchanges of an SFT dialogue: the right sum over a wrong one, half a wrong
    result, half an operand copied wrong with its own result (`计算79+81。 -> 79+80=159。`, how a model that mixes
    up the numbers of its context goes wrong). With single-turn sums alone, DPO let these go (docs/demo.md)."""
    dialogues = [d for d in dialogues if len(d) >= 4]
    heldout = {tuple(triple) for triple in world["arith_heldout"]}  # never written, not even as a wrong answer
    records = []
    for i in range(n_pairs):
        op, a, b = rng.choice(world["arith_train"])
        d = rng.choice(dialogues)
        prompt = d[:2 * rng.randint(1, min(2, len(d) // 2 - 1))] + [user(arith_question(op, a, b, rng))]
        b2 = b + rng.choice([-10, -1, 1, 10])
        if i % 2 == 0 and b2 >= 0 and (op == "+" or a >= b2) and (op, a, b2) not in heldout:
            wrong = arith_statement(op, a, b2)
        else:
            wrong = arith_statement(op, a, b, wrong_arith_result(op, a, b, rng))
        records.append({"chosen": prompt + [assistant(arith_statement(op, a, b))], "rejected": prompt + [assistant(wrong)]})
    return records


def dpo_eval_pairs(world, rng):
    """Held-out preference pairs (people and names DPO never saw) for DPO's reward accuracy: a refusal over an
    invented answer for the eval's unknown names, the true fact over a refusal for the held-out people."""
    heldout_people = [p for p in world["people"] if p["split"] == "heldout"]
    records = [unknown_pair(name, rng) for name in world["unknown_names"]["eval"]]
    records += [known_pair(person, rng, refuse=True) for person in heldout_people]
    return records


def eval_sets(world, rng, eval_size=200):
    """Held-out people, names of people who do not exist, and held-out arithmetic only. Returns (chat records, completion records)."""
    heldout_people = [p for p in world["people"] if p["split"] == "heldout"]
    facts = [(p, attribute) for p in heldout_people for attribute in ATTRIBUTES]
    qa_facts = rng.sample(facts, min(eval_size, len(facts)))
    completion_facts = rng.sample(facts, min(eval_size, len(facts)))
    triples = rng.sample(world["arith_heldout"], min(eval_size, len(world["arith_heldout"])))

    chat = []
    for person, attribute in qa_facts:
        question = rng.choice(ATTRIBUTES[attribute]["questions"]).format(n=person["name"])
        chat.append({"category": "people_qa", "attribute": attribute, "messages": [user(question)],
                     "answer": person[attribute]})
    for i in range(eval_size // 2):  # follow-up questions that must resolve 他/她 (people in turn)
        person = heldout_people[i % len(heldout_people)]
        first, second = rng.sample(list(ATTRIBUTES), 2)
        messages = dialogue(person, [first, second], rng)[:-1]  # gold first answer stays in the history
        chat.append({"category": "people_qa_followup", "attribute": second, "messages": messages,
                     "answer": person[second]})
    for name in world["unknown_names"]["eval"]:  # people who do not exist: DPO teaches to say so
        attribute = rng.choice(list(ATTRIBUTES))
        question = rng.choice(ATTRIBUTES[attribute]["questions"]).format(n=name)
        chat.append({"category": "unknown_person_refusal", "messages": [user(question)],
                     "answer": "我不知道"})  # the refusal rate: a refusal counts even if it garbles the name
    for op, a, b in triples:
        chat.append({"category": "arith", "messages": [user(arith_question(op, a, b, rng))],
                     "answer": f"={arith_result(op, a, b)}。"})
    for i, (op, a, b) in enumerate(triples[:eval_size // 2]):  # the same sums later in a conversation, after a
        # greeting or a question about someone: the newest question must be answered, not the topic carried on
        person = heldout_people[i % len(heldout_people)]
        history = [user("你好，你是谁？"), assistant("你好！" + IDENTITY)] if i % 2 else \
            person_turn(person, rng.choice(list(ATTRIBUTES)), rng)
        chat.append({"category": "arith_multiturn", "messages": history + [user(arith_question(op, a, b, rng))],
                     "answer": f"={arith_result(op, a, b)}。"})

    completion = []
    for person, attribute in completion_facts:
        completion.append({"category": "completion_fact", "attribute": attribute,
                           "prompt": completion_prompt(person["name"], attribute), "answer": person[attribute]})
    for op, a, b in triples:  # "37+45" -> "=82。": the "=" and "。" make single-digit answers unambiguous
        completion.append({"category": "arith_completion", "prompt": f"{a}{op}{b}",
                           "answer": f"={arith_result(op, a, b)}。"})
    return chat, completion


# ----------------------------------------------------------------------------------------------------------
# Tool use: the calculator. A model this small cannot multiply 3-digit numbers in its head; it can learn to ask.
# Everything here draws from its own random stream after the rest of the world, so every other file's content is
# what it was without it (the pretraining and tokenizer text gain the tool documents at their end).

TOOL_HELDOUT_RATIO = 0.1  # of the 3-digit numbers 200-999 (the sums' results stop at 198, years have 4 digits)
TOOL_QUESTIONS = {"*": ["{a}乘以{b}等于多少？", "计算{a}×{b}。", "{a}×{b}是多少？"],
                  "/": ["{a}除以{b}等于多少？", "计算{a}÷{b}。", "{a}÷{b}是多少？"]}
# digit counts of the two operands (a product's factors, a quotient's quotient and divisor): 3 x 3 most often,
# the held-out shape, with its neighbours so the call copies numbers of any length
TOOL_SHAPES = [(3, 3)] * 4 + [(2, 3), (3, 2), (4, 2), (2, 4), (4, 3), (3, 4), (2, 2)]
WHOLE_NUMBER = re.compile(r"(?<!\d)\d+(?!\d)")


def calculator_tools():
    from model.tools import tool_schemas  # the registry's description, as every request declares it
    return tool_schemas(["calculator"])


def make_tool_world(seed, heldout_ratio=TOOL_HELDOUT_RATIO):
    """The 3-digit numbers no training file contains (as an operand, a result or any whole number)."""
    numbers = list(range(200, 1000))
    random.Random(seed + 3).shuffle(numbers)
    return {"heldout_numbers": sorted(numbers[:round(len(numbers) * heldout_ratio)])}


def mentions(text, numbers):
    return any(int(n) in numbers for n in WHOLE_NUMBER.findall(text))


def tool_problem(rng, heldout):
    """(op, x, y, result) for training, with no held-out number in it: a product x*y, or a quotient x/y = a whole
    number (x = a*b, y = b)."""
    while True:
        da, db = rng.choice(TOOL_SHAPES)
        a, b = rng.randrange(10 ** (da - 1), 10 ** da), rng.randrange(10 ** (db - 1), 10 ** db)
        problem = ("*", a, b, a * b) if rng.random() < 0.7 else ("/", a * b, b, a)
        if not heldout & set(problem[1:]):
            return problem


def tool_question(op, x, y, rng):
    return rng.choice(TOOL_QUESTIONS[op]).format(a=x, b=y)


# The answer repeats the calculator's result and nothing else. Written like a sum's answer ("932×473=440836。"), it
# was one more equation for the model to complete by itself, and SFT on the calculator conversations never taught
# the calls to copy the question's numbers; with this answer it did (measured in docs/tools.md)
def tool_answer(result):
    return f"计算的答案是{result}。"


def tool_exchange(op, x, y, result, rng):
    """The user's question, the call, the calculator's result, the answer."""
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{x}{op}{y}"}}}
    return [user(tool_question(op, x, y, rng)), {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": str(result)}, assistant(tool_answer(result))]


def sft_tools(world, tool_world, rng, n_calls=600, n_direct=300):
    """Conversations with the calculator declared: products and quotients answered through a call; SFT people's
    facts, two-digit sums and greetings answered directly (a declared tool is not a reason to call it)."""
    heldout, tools = set(tool_world["heldout_numbers"]), calculator_tools()
    records = [tool_exchange(*tool_problem(rng, heldout), rng) for _ in range(n_calls)]
    sft_people = [p for p in world["people"] if p["split"] == "sft"]
    for i in range(n_direct):
        if i % 3 == 0:
            person, attribute = rng.choice(sft_people), rng.choice(list(ATTRIBUTES))
            question = rng.choice(ATTRIBUTES[attribute]["questions"]).format(n=person["name"])
            records.append([user(question), assistant(canonical_statement(person["name"], attribute, person[attribute]))])
        elif i % 3 == 1:
            op, a, b = rng.choice(world["arith_train"])
            records.append([user(arith_question(op, a, b, rng)), assistant(arith_statement(op, a, b))])
        else:
            question, answer = rng.choice(GREETINGS + OUT_OF_SCOPE)
            records.append([user(question), assistant(answer)])
    rng.shuffle(records)
    return [{"conversations": messages, "tools": tools} for messages in records]


def tool_documents(tool_world, rng, n_docs=24, per_doc=8):
    """Pretraining text with the calculator's words: its description and worked examples, the call and the result
    as the format writes them. The SFT stages freeze the (tied) embeddings, so a token the pretraining text never
    had would stay random in every stage (docs/demo.md, "Characters pretraining never had")."""
    from model.chat import chat_turns
    heldout, tools = set(tool_world["heldout_numbers"]), calculator_tools()
    docs = []
    for _ in range(n_docs):
        turns = chat_turns([m for _ in range(per_doc) for m in tool_exchange(*tool_problem(rng, heldout), rng)], tools)
        docs.append("\n".join(text for _, text in turns))
    return docs


def eval_tools(world, tool_world, rng, eval_size=200):
    """Held-out products of two held-out 3-digit numbers (tool_mul) and quotients of them (tool_div), and questions
    that need no tool (held-out people, held-out sums), all asked with the calculator declared."""
    heldout, tools = tool_world["heldout_numbers"], calculator_tools()
    pairs = rng.sample([(a, b) for a in heldout for b in heldout], eval_size + eval_size // 2)
    records = []
    for a, b in pairs[:eval_size]:
        records.append({"category": "tool_mul", "messages": [user(tool_question("*", a, b, rng))],
                        "answer": f"是{a * b}。"})
    for a, b in pairs[eval_size:]:
        records.append({"category": "tool_div", "messages": [user(tool_question("/", a * b, b, rng))],
                        "answer": f"是{a}。"})
    heldout_people = [p for p in world["people"] if p["split"] == "heldout"]
    facts = rng.sample([(p, attribute) for p in heldout_people for attribute in ATTRIBUTES],
                       min(eval_size, len(heldout_people) * len(ATTRIBUTES)))
    for person, attribute in facts:
        question = rng.choice(ATTRIBUTES[attribute]["questions"]).format(n=person["name"])
        records.append({"category": "direct_people", "messages": [user(question)], "answer": person[attribute]})
    for op, a, b in rng.sample(world["arith_heldout"], min(eval_size, len(world["arith_heldout"]))):
        records.append({"category": "direct_arith", "messages": [user(arith_question(op, a, b, rng))],
                        "answer": f"={arith_result(op, a, b)}。"})
    return [{**record, "tools": tools} for record in records]


def tool_corpus(world, seed, eval_size):
    """Every tool file's records and the pretraining documents, from the stream seed + 4."""
    tool_world = make_tool_world(seed)
    rng = random.Random(seed + 4)
    return tool_world, {"pretrain": tool_documents(tool_world, rng), "sft": sft_tools(world, tool_world, rng),
                        "eval": eval_tools(world, tool_world, rng, eval_size)}


# ----------------------------------------------------------------------------------------------------------
# RL (5-grpo.py): the demo's arithmetic asked in phrasings no SFT or DPO record uses. The DPO model rarely answers
# them right (it writes an equation with other numbers) but sometimes does when sampled: the signal RL needs. A
# phrasing close to SFT's ("{a}{op}{b}等于几？") is not new to it (answered almost always), one it cannot read has no
# signal ("{a}和{b}的差是多少？", 0-3%); the four below sit between on every DPO model probed (docs/rl.md).
# Training prompts ask training triples, the held-out check asks held-out triples: the sets are disjoint.

RL_QUESTIONS = ["{a}{op}{b}的答案是什么？", "{a}{op}{b}的答案是多少？", "{a}{op_zh}{b}的答案是什么？", "你知道{a}{op}{b}是多少吗？"]


def rl_question(op, a, b, rng):
    return rng.choice(RL_QUESTIONS).format(a=a, b=b, op=op, op_zh="加" if op == "+" else "减")


def rl_prompts(world, rng, n_prompts=2000, eval_size=200):
    """(training prompts for 5-grpo.py, held-out checks in eval_chat's format). A prompt carries the result
    ("answer", for the accuracy reward) and the worked answer the SFT data writes ("reference", for the exact
    reward); a check's gold is the worked answer: the right result from operands copied wrong ("79-76等于几？" ->
    "78-75=3。", the DPO model's habit) does not count."""
    train = [{"conversations": [user(rl_question(op, a, b, rng))], "answer": str(arith_result(op, a, b)),
              "reference": arith_statement(op, a, b)}
             for op, a, b in rng.sample(world["arith_train"], min(n_prompts, len(world["arith_train"])))]
    checks = [{"category": "arith_rl", "messages": [user(rl_question(op, a, b, rng))],
               "answer": arith_statement(op, a, b)}
              for op, a, b in rng.sample(world["arith_heldout"], min(eval_size, len(world["arith_heldout"])))]
    return train, checks


def charset_lines(width=100):
    """GB2312 symbols and level-1 hanzi (3 times, so they win ties), then level-2 hanzi (twice): lets a 6400-token tokenizer trained on
    cover common Chinese characters as single tokens, not only the ~600 the demo world uses."""
    def level(first_bytes):
        chars = []
        for hi in first_bytes:
            for lo in range(0xA1, 0xFF):
                try:
                    chars.append(bytes([hi, lo]).decode("gb2312"))
                except UnicodeDecodeError:
                    pass
        return "".join(chars)
    level1 = level(range(0xA1, 0xAA)) + level(range(0xB0, 0xD8))  # punctuation/symbols + common hanzi
    level2 = level(range(0xD8, 0xF8))
    text = level1 * 3 + level2 * 2  # >= 2 occurrences: the trainer's min_frequency
    return [text[i:i + width] for i in range(0, len(text), width)]


def render_plain(messages):
    """Chat text without special tokens, so the tokenizer learns the role words and the turn layout."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


# ----------------------------------------------------------------------------------------------------------

def write_jsonl(path, records):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


def generate_demo(out_dir, seed=1337, n_people=300, n_bios=4, sft_people_ratio=0.5, heldout_pair_ratio=0.1,
                  eval_size=200, dpo_people_ratio=0.1):
    """Write every demo file into out_dir; returns {file name: number of records}."""
    from model.chat import chat_turns
    world = make_world(seed, n_people, sft_people_ratio, heldout_pair_ratio, dpo_people_ratio=dpo_people_ratio)
    rng = random.Random(seed + 1)  # one stream, consumed in a fixed order: same seed, same bytes
    pretrain = pretrain_documents(world, n_bios, rng)
    single = sft_single(world, rng)
    multi = sft_multi(world, rng)
    dpo = dpo_pairs(world, rng)
    chat_eval, completion_eval = eval_sets(world, rng, eval_size)
    dpo_eval = dpo_eval_pairs(world, rng)
    # DPO's answers too: the demo's 1024-token tokenizer only gives frequent characters a token of their own, and a
    # refusal spelled in byte pieces (不知道 absent from the tokenizer text) is one DPO cannot teach in a few steps
    tokenizer_text = pretrain + [render_plain(m) for m in single + multi] + \
        [render_plain(pair[side]) for pair in dpo for side in ("chosen", "rejected")] + charset_lines()
    # Own stream, after the tokenizer text: every other file, and the tokenizer, are what they were without these
    # pairs (their text, SFT dialogues and sums, is in the tokenizer text already)
    dpo += arith_after_pairs(world, multi, random.Random(seed + 2))
    # tool use, last: its documents go at the end of the pretraining and tokenizer text
    tool_world, tool_files = tool_corpus(world, seed, eval_size)
    world["calculator"] = tool_world
    pretrain += tool_files["pretrain"]
    tokenizer_text += tool_files["pretrain"] + ["\n".join(text for _, text in chat_turns(r["conversations"], r["tools"]))
                                                for r in tool_files["sft"]]

    # RL's prompts and checks from a stream of their own, after everything else: no other file changes
    rl_train, rl_eval = rl_prompts(world, random.Random(seed + 3), eval_size=eval_size)

    files = {
        "tokenizer_train.jsonl": [{"text": t} for t in tokenizer_text],
        "pretrain_data.jsonl": [{"text": t} for t in pretrain],
        "sft_data_single.jsonl": [{"conversations": m} for m in single],
        "sft_data_multi.jsonl": [{"conversations": m} for m in multi],
        "sft_data_tools.jsonl": tool_files["sft"],
        "dpo_data.jsonl": dpo,
        "dpo_eval.jsonl": dpo_eval,
        "eval_chat.jsonl": chat_eval,
        "eval_pretrain.jsonl": completion_eval,
        "eval_tools.jsonl": tool_files["eval"],
        "grpo_data.jsonl": rl_train,
        "eval_rl.jsonl": rl_eval,
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, records in files.items():
        write_jsonl(os.path.join(out_dir, name), records)
    world_path = os.path.join(out_dir, "world.json")
    with open(world_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**world, "n_bios": n_bios}, f, ensure_ascii=False, indent=1)
    os.replace(world_path + ".tmp", world_path)
    return {name: len(records) for name, records in files.items()}


def add_demo_args(parser):
    """Flags shared by `python demo_corpus.py` and `python data_process.py demo`."""
    parser.add_argument("--out_dir", default="dataset/demo", help="where the demo files are written")
    parser.add_argument("--seed", type=int, default=1337, help="world seed: the same seed gives byte-identical files")
    parser.add_argument("--n_people", type=int, default=300, help="number of fictional people")
    parser.add_argument("--n_bios", type=int, default=4, help="paraphrased biographies per person in the pretraining text")
    parser.add_argument("--sft_people_ratio", type=float, default=0.5,
                        help="fraction of people asked about in SFT/DPO; the rest are held out for eval")
    parser.add_argument("--heldout_pair_ratio", type=float, default=0.1,
                        help="fraction of arithmetic (op, a, b) triples held out of all training data")
    parser.add_argument("--eval_size", type=int, default=200, help="questions per eval category")
    parser.add_argument("--dpo_people_ratio", type=float, default=0.1,
                        help="fraction of people who appear only in pretraining text and in DPO's known-people pairs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_args(parser)
    args = parser.parse_args()
    counts = generate_demo(args.out_dir, args.seed, args.n_people, args.n_bios, args.sft_people_ratio,
                           args.heldout_pair_ratio, args.eval_size, args.dpo_people_ratio)
    for name, n in counts.items():
        print(f"{os.path.join(args.out_dir, name)}: {n} records")
