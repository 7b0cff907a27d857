"""
The one home of the chat format: how conversations and completions become token ids, and the tokenizer they use.

The format (also the tokenizer's Jinja `chat_template`, so transformers' apply_chat_template and llama.cpp render
the same text):

    <s>{role}\\n{content}</s>\\n        per message (role: system, user, assistant)
    <s>assistant\\n                     the generation prompt: the model writes the reply and ends it with </s>

Everything that turns text into ids calls this module: SFT/DPO datasets (ChatEncoder: ids + exact assistant
label spans), evaluation and the server (encode_chat, trim_history, fit_context), pretraining text and completion
prompts (encode_completion). Message content is always encoded with special tokens disabled, so a "<s>", "</s>"
or role header typed by a user is text and cannot forge a turn or end a document.

Also here: the tokenizer's files, its identity (sha256 of tokenizer.json, recorded by packed files and runs),
loading it checked against a model's vocabulary, and the label value the loss ignores. This module imports
neither torch nor transformers at load time (data_process.py starts without them).
"""
import hashlib
import os

from .errors import StageError

IGNORE_INDEX = -100  # labels with this value are not targets (the Hugging Face convention)
DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BOS, EOS = "<s>", "</s>"
ROLES = ("system", "user", "assistant")

# No "-" whitespace control next to the newlines: "</s>\n" between turns is part of the format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
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
# conversations

class ChatEncoder:
    """Messages -> ids with the chat format, built piece by piece so training labels cover exactly the assistant's
    content and its closing </s>. For normal text the ids equal tokenizer.apply_chat_template(messages)."""

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

    def prompt(self, messages) -> list:
        """The ids a model continues to answer the conversation: every message, then `<s>assistant\\n`."""
        contents = encode_texts(self.tokenizer, [m["content"] for m in messages])
        ids = []
        for message, content in zip(messages, contents):
            ids += self.message_ids(message["role"], content)
        return ids + self.header("assistant")

    def message_lengths(self, messages) -> list:
        """Tokens each message takes in the prompt (the generation header not included): one tokenizer call."""
        contents = encode_texts(self.tokenizer, [m["content"] for m in messages])
        return [len(self.message_ids(m["role"], c)) for m, c in zip(messages, contents)]

    def encode(self, messages, train_on="all"):
        """-> (input_ids, labels) for training. train_on: "all" = every assistant turn (SFT), "last" = only the
        final assistant turn (the DPO response)."""
        return self.assemble(messages, encode_texts(self.tokenizer, [m["content"] for m in messages]), train_on)

    def encode_many(self, conversations, train_on="all"):
        """encode() of many conversations with one tokenizer call (the same result, faster)."""
        contents = iter(encode_texts(self.tokenizer, [m["content"] for messages in conversations for m in messages]))
        return [self.assemble(messages, [next(contents) for _ in messages], train_on) for messages in conversations]

    def assemble(self, messages, contents, train_on="all"):
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        ids, labels = [], []
        for k, (message, content) in enumerate(zip(messages, contents)):
            header = self.header(message["role"])
            learn = message["role"] == "assistant" and (train_on == "all" or k == last)
            ids += self.message_ids(message["role"], content)
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


def encode_chat(tokenizer, messages) -> list:
    """The prompt ids of a conversation (ChatEncoder.prompt); a user cannot forge a turn with typed tokens."""
    return ChatEncoder(tokenizer).prompt(messages)


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
