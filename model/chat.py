"""
The one home of the chat format: how conversations and completions become token ids, and the tokenizer they use.

The format (also the tokenizer's Jinja `chat_template`, so transformers' apply_chat_template and llama.cpp render
the same text):

    <s>{role}\\n{content}</s>\\n        per message (role: system, user, assistant, tool)
    <s>assistant\\n                     the generation prompt: the model writes the reply and ends it with </s>

Tool use (the Hermes / Qwen2.5 layout, docs/tools.md), in the same turns:

    <s>system\\n[{system}\\n\\n]<tools>\\n{function json}\\n...</tools></s>\\n     when tools are declared
    <s>assistant\\n[{content}\\n]<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call></s>\\n
                                      several calls: one <tool_call> block each, joined by \\n
    <s>tool\\n<tool_response>\\n{result}\\n</tool_response></s>\\n      one turn per result, in call order

Everything that turns text into ids calls this module: SFT/DPO datasets (ChatEncoder: ids + exact assistant
label spans), evaluation and the server (encode_chat, trim_history, fit_context), pretraining text and completion
prompts (encode_completion). Message content is always encoded with special tokens disabled, so a "<s>", "</s>"
or role header typed by a user is text and cannot forge a turn or end a document. The tool tags are plain text
(no new tokens, so the shipped vocabulary and every checkpoint stay valid): they mean something only where the
format puts them, in an assistant turn the model generated (parse_tool_calls reads only that) or a tool turn the
caller made from a tool's result; typed by a user they stay inside the user's turn, which <s>/</s> close.

Also here: the tokenizer's files, its identity (sha256 of tokenizer.json, recorded by packed files and runs),
loading it checked against a model's vocabulary, and the label value the loss ignores. This module imports
neither torch nor transformers at load time (data_process.py starts without them).
"""
import hashlib
import json
import os
from typing import NamedTuple, Optional

from .errors import StageError

IGNORE_INDEX = -100  # labels with this value are not targets (the Hugging Face convention)
DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BOS, EOS = "<s>", "</s>"
ROLES = ("system", "user", "assistant", "tool")
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# No "-" whitespace control next to the newlines: "</s>\n" between turns is part of the format. transformers and
# llama-cpp-python render with trim_blocks, which drops a newline written right after a {% %} tag: the newlines
# that follow a tag are written as {{ '\n' }}. Without tools (or with an empty list) the output is what it was
# before tools existed: "<s>{role}\n{content}</s>\n" per message.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "<s>system\n{% if system %}{{ system }}\n\n{% endif %}<tools>{{ '\n' }}"
    "{% for tool in tools %}"
    "{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}{{ '\n' }}"
    "{% endfor %}"
    "</tools></s>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if loop.first and tools and message['role'] == 'system' %}"  # already written with the tools
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "<s>assistant\n{% if message['content'] %}{{ message['content'] }}{{ '\n' }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "<tool_call>\n{\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{{ fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}{{ '}' }}\n</tool_call>"
    "{% endfor %}"
    "</s>\n"
    "{% elif message['role'] == 'tool' %}"
    "<s>tool\n<tool_response>\n{{ message['content'] }}\n</tool_response></s>\n"
    "{% else %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------
# the tokenizer

def tokenizer_sha256(tokenizer_dir) -> str:
    """sha256 of the tokenizer's tokenizer.json bytes: the identity recorded in packed files and run settings."""
    digest = hashlib.sha256()
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(tokenizer_dir, vocab_size: int):
    """AutoTokenizer from a directory, checked against the model's vocabulary (a mismatch fails at step 0
    with an index error otherwise)."""
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise StageError(f"no tokenizer.json in {tokenizer_dir}: train one with train_tokenizer.py or pass --tokenizer_dir")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) != vocab_size:
        raise StageError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}: pass --vocab_size {len(tokenizer)} (or edit model/LMConfig.py) when "
                         f"pretraining, or use the tokenizer the model was trained with")
    return tokenizer


def encode_texts(tokenizer, texts) -> list:
    """Token ids of each text, special tokens disabled: a "</s>" in the text is text, not an end of turn."""
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []


def encode_completion(tokenizer, text: str) -> list:
    """<s> + the text, as pretraining documents start (encode_documents)."""
    return [tokenizer.bos_token_id] + encode_texts(tokenizer, [text])[0]


def open_document_tokenizer(tokenizer_json):
    """The bare `tokenizers` Tokenizer that data_process.py packs pretraining text with (one per worker process,
    no transformers): special tokens written in a document stay text, as in encode_texts."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_json)
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_documents(document_tokenizer, texts, bos_id, eos_id) -> list:
    """<s> + text + </s> per pretraining document, as token-id lists."""
    encodings = document_tokenizer.encode_batch(list(texts), add_special_tokens=False) if texts else []
    return [[bos_id] + encoding.ids + [eos_id] for encoding in encodings]


# ----------------------------------------------------------------------------------------------------------
# conversations: the text of each turn (what CHAT_TEMPLATE writes between "<s>{role}\n" and "</s>")

def to_json(value) -> str:
    """JSON as the template's tojson filter writes it in transformers and llama-cpp-python (json.dumps, no ASCII
    escapes, keys in their order)."""
    return json.dumps(value, ensure_ascii=False)


def tool_function(spec):
    """The function part of a tool or a call: {"type": "function", "function": {...}} or the bare {...}."""
    return spec["function"] if "function" in spec else spec


def render_call(call) -> str:
    """One call's JSON line: {"name": ..., "arguments": {...}}; arguments already a JSON string stay as given."""
    fn = tool_function(call)
    arguments = fn["arguments"]
    return '{"name": ' + to_json(fn["name"]) + ', "arguments": ' + \
        (arguments if isinstance(arguments, str) else to_json(arguments)) + "}"


def message_text(message) -> str:
    """The text of one message's turn: its content; an assistant's calls in <tool_call> blocks after it; a tool's
    result inside <tool_response>."""
    if message["role"] == "assistant" and message.get("tool_calls"):
        head = f"{message['content']}\n" if message.get("content") else ""
        return head + "\n".join(f"{CALL_OPEN}\n{render_call(call)}\n{CALL_CLOSE}" for call in message["tool_calls"])
    if message["role"] == "tool":
        return f"{RESPONSE_OPEN}\n{message['content']}\n{RESPONSE_CLOSE}"
    return message["content"]


def chat_turns(messages, tools=None) -> list:
    """[(role, text)] of a conversation as the template renders it: with tools, a system turn first holding the
    system message (if the conversation starts with one) and the tools' function descriptions, one JSON per line."""
    turns = []
    if tools:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        if system:
            messages = messages[1:]
        functions = "".join(to_json(tool_function(tool)) + "\n" for tool in tools)
        turns.append(("system", (f"{system}\n\n" if system else "") + f"{TOOLS_OPEN}\n{functions}{TOOLS_CLOSE}"))
    try:
        return turns + [(message["role"], message_text(message)) for message in messages]
    except (KeyError, TypeError, AttributeError) as err:  # a call without name/arguments, a message without role
        raise ValueError(f"a message or tool call the chat format cannot render ({type(err).__name__}: {err})") \
            from None


def render_chat(messages, tools=None, add_generation_prompt=False) -> str:
    """The text CHAT_TEMPLATE renders (tests compare the two byte for byte)."""
    text = "".join(f"{BOS}{role}\n{body}{EOS}\n" for role, body in chat_turns(messages, tools))
    return text + (f"{BOS}assistant\n" if add_generation_prompt else "")


class ChatEncoder:
    """Messages -> ids with the chat format, built turn by turn so training labels cover exactly the assistant's
    turns (its text, tool calls included, and the closing </s>), never a tool's result. For normal text the ids
    equal tokenizer.apply_chat_template(messages, tools=tools)."""

    def __init__(self, tokenizer, max_seq_len=None):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.newline = encode_texts(tokenizer, ["\n"])[0]
        self._header = {}

    def header(self, role):
        """`<s>{role}\\n` as ids (cached per role)."""
        if role not in self._header:
            self._header[role] = [self.bos_id] + encode_texts(self.tokenizer, [f"{role}\n"])[0]
        return self._header[role]

    def message_ids(self, role, content_ids):
        return self.header(role) + content_ids + [self.eos_id] + self.newline

    def prompt(self, messages, tools=None) -> list:
        """The ids a model continues to answer the conversation: every turn, then `<s>assistant\\n`."""
        turns = chat_turns(messages, tools)
        ids = []
        for (role, _), content in zip(turns, encode_texts(self.tokenizer, [text for _, text in turns])):
            ids += self.message_ids(role, content)
        return ids + self.header("assistant")

    def message_lengths(self, messages) -> list:
        """Tokens each message takes in the prompt (the generation header not included): one tokenizer call."""
        turns = chat_turns(messages)
        contents = encode_texts(self.tokenizer, [text for _, text in turns])
        return [len(self.message_ids(role, c)) for (role, _), c in zip(turns, contents)]

    def encode(self, messages, train_on="all", tools=None):
        """-> (input_ids, labels) for training. train_on: "all" = every assistant turn (SFT), "last" = only the
        final assistant turn (the DPO response). tools: the conversation's declared tools (their system turn)."""
        return self.encode_many([messages], train_on, [tools])[0]

    def encode_many(self, conversations, train_on="all", tools=None):
        """encode() of many conversations with one tokenizer call (the same result, faster). tools: None, or one
        entry (a tool list or None) per conversation."""
        tools = tools or [None] * len(conversations)
        turns = [chat_turns(messages, conversation_tools) for messages, conversation_tools in zip(conversations, tools)]
        contents = iter(encode_texts(self.tokenizer, [text for conversation in turns for _, text in conversation]))
        return [self.assemble([role for role, _ in conversation], [next(contents) for _ in conversation], train_on)
                for conversation in turns]

    def assemble(self, roles, contents, train_on="all"):
        last = max(k for k, role in enumerate(roles) if role == "assistant")
        ids, labels = [], []
        for k, (role, content) in enumerate(zip(roles, contents)):
            header = self.header(role)
            learn = role == "assistant" and (train_on == "all" or k == last)
            ids += self.message_ids(role, content)
            labels += [IGNORE_INDEX] * len(header)
            labels += content + [self.eos_id] if learn else [IGNORE_INDEX] * (len(content) + 1)
            labels += [IGNORE_INDEX] * len(self.newline)
        return self.truncate(ids, labels)

    def truncate(self, ids, labels, start=None):
        """Keep max_seq_len tokens. By default the first ones; if that would leave no label (a prompt longer than
        the window) the window starts max_seq_len // 2 tokens before the first label (or ends at the last
        token, whichever is earlier). Labels are fixed per token before cutting, so a cut never labels a prompt
        token. start: a window start chosen by the caller (DPO cuts both sides of a pair at the same place).
        max_seq_len None: no cut."""
        if self.max_seq_len is None or len(ids) <= self.max_seq_len:
            return ids, labels
        if start is None:
            start = self.window_start(labels, len(ids))
        return ids[start:start + self.max_seq_len], labels[start:start + self.max_seq_len]

    def window_start(self, labels, length):
        if all(label == IGNORE_INDEX for label in labels[:self.max_seq_len]):  # the window would teach nothing
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            return max(0, min(first - self.max_seq_len // 2, length - self.max_seq_len))
        return 0


# ----------------------------------------------------------------------------------------------------------
# tool calls the model writes

class ParsedReply(NamedTuple):
    """An assistant reply read back: its text before the calls, the calls, and why the calls did not parse (None
    when they did; then content is the whole reply and calls is empty)."""
    content: str
    calls: list
    error: Optional[str] = None


def parse_tool_calls(text) -> ParsedReply:
    """The text the model generated after `<s>assistant\\n` (up to </s>) -> ParsedReply. Calls are
    {"type": "function", "function": {"name": str, "arguments": dict}}; a call whose arguments are a JSON string
    holding an object is accepted too. Only <tool_call> blocks may follow the first one (whitespace between them);
    anything else, or a block that is not a JSON object with a string name and object arguments, is an error."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return ParsedReply(text, [])
    content = text[:start][:-1] if text[:start].endswith("\n") else text[:start]
    calls, pos = [], start
    while True:
        pos = len(text) - len(text[pos:].lstrip())
        if pos == len(text):
            return ParsedReply(content, calls)
        if not text.startswith(CALL_OPEN, pos):
            return ParsedReply(text, [], f"text after a tool call: {text[pos:pos + 40]!r}")
        end = text.find(CALL_CLOSE, pos)
        if end < 0:
            return ParsedReply(text, [], f"{CALL_OPEN} without {CALL_CLOSE}")
        body = text[pos + len(CALL_OPEN):end].strip()
        pos = end + len(CALL_CLOSE)
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            return ParsedReply(text, [], f"tool call {len(calls) + 1} is not JSON ({err.msg}): {body[:60]!r}")
        arguments = call.get("arguments") if isinstance(call, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(arguments, dict)):
            return ParsedReply(text, [], f'tool call {len(calls) + 1} is not {{"name": str, "arguments": {{...}}}}: '
                                         f"{body[:60]!r}")
        calls.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})


JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
              "null": type(None)}


def check_call(call, tools) -> Optional[str]:
    """Why a parsed call does not fit the declared tools (None if it does): the name must be declared, the
    arguments an object with every required parameter, and each argument of the type its schema names."""
    fn = tool_function(call)
    declared = {tool_function(tool).get("name"): tool_function(tool) for tool in tools or []}
    if fn.get("name") not in declared:
        return f"calls {fn.get('name')!r}, which is not a declared tool" + \
            (f" (declared: {', '.join(map(str, declared))})" if declared else " (no tools are declared)")
    arguments, parameters = fn.get("arguments"), declared[fn["name"]].get("parameters") or {}
    if not isinstance(arguments, dict):
        return f"the arguments of {fn['name']!r} are not a JSON object"
    missing = [key for key in parameters.get("required", []) if key not in arguments]
    if missing:
        return f"{fn['name']!r} misses the required argument(s) {', '.join(missing)}"
    for key, value in arguments.items():
        schema = (parameters.get("properties") or {}).get(key)
        if schema is None:
            if parameters.get("additionalProperties") is False:
                return f"{fn['name']!r} has no parameter {key!r}"
            continue
        names = schema.get("type") if isinstance(schema, dict) else None
        names = [names] if isinstance(names, str) else names or []
        known = [JSON_TYPES[name] for name in names if name in JSON_TYPES]
        is_bool = isinstance(value, bool)  # JSON true is no number, though Python's bool is an int
        if known and not any(isinstance(value, t) and (not is_bool or t is bool) for t in known):
            return f"argument {key!r} of {fn['name']!r} is {type(value).__name__}, expected {'/'.join(names)}"
    return None


def encode_chat(tokenizer, messages, tools=None) -> list:
    """The prompt ids of a conversation (ChatEncoder.prompt); a user cannot forge a turn with typed tokens."""
    return ChatEncoder(tokenizer).prompt(messages, tools)


def context_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed when max_new_tokens must follow: at least half the context stays for the prompt."""
    return max(max_seq_len - max_new_tokens, max_seq_len // 2)


def fit_context(ids, max_new_tokens: int, max_seq_len: int):
    """Keep prompt + reply within the trained context: cut the prompt from the front to at most
    context_budget(...) tokens, then shorten the reply to what is left."""
    ids = list(ids)[-context_budget(max_seq_len, max_new_tokens):]
    return ids, max(1, min(max_new_tokens, max_seq_len - len(ids)))


def trim_history(tokenizer, messages, max_tokens: int, lengths=None):
    """Drop the oldest turns until the conversation's prompt fits in max_tokens: a leading system message is kept
    while it fits, the kept turns start with a user turn, and the last message stays (its oldest text cut if it
    alone is too long).

    One pass: a prompt is its messages' ids one after another plus the generation header, so its length is a sum
    of per-message counts (ChatEncoder.message_lengths, one tokenizer call; pass them as `lengths` if you have
    them), and the kept turns are the longest suffix whose sum fits."""
    encoder = ChatEncoder(tokenizer)
    lengths = encoder.message_lengths(messages) if lengths is None else list(lengths)
    reply_header = len(encoder.header("assistant"))
    n_system = 1 if messages and messages[0]["role"] == "system" else 0
    system, turns = list(messages[:n_system]), list(messages[n_system:])
    room = max_tokens - reply_header - sum(lengths[:n_system])
    start, total = len(turns) - 1, 0  # the last message stays whatever its length
    for i in range(len(turns) - 1, -1, -1):
        total += lengths[n_system + i]
        if total > room:
            break
        if i == 0 or turns[i]["role"] == "user":  # a conversation restarts with a user turn
            start = i
    if system and sum(lengths[n_system + start:]) > room:
        system = []
    last = dict(turns[-1])
    fits = lambda msgs: len(encode_chat(tokenizer, msgs)) <= max_tokens  # noqa: E731
    if lengths[-1] + reply_header > max_tokens:
        while not fits([last]) and last["content"]:
            overflow = len(encode_chat(tokenizer, [last])) - max_tokens
            last["content"] = last["content"][max(1, overflow):]
    return system + turns[start:-1] + [last]
