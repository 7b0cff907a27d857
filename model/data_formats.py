"""
Readers and converters for the raw files users download, used by data_process.py.

Every reader yields (line_no, record) where record is a parsed object or a BadRecord saying why the line is
unusable; every converter turns one parsed record into its canonical form or raises BadRecord. Nothing here
prints, counts or decides to fail: data_process.py does that, so every bad line is reported the same way.

Inputs understood:
    JSONL           one JSON object per line (.jsonl / .json with one object per line)
    JSON array      alpaca-style files: one top-level [ {...}, {...} ] (.json), streamed element by element
    CSV             a header row; pretraining needs a `text` column, the seed's SFT CSV has `history,q,a`

Canonical records:
    pretrain  {"text": str}
    sft       {"conversations": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              optional system first, then user/assistant alternating, ending with assistant
    dpo       {"chosen": [messages], "rejected": [messages]}  same prompt turns, different last assistant turn
"""
import ast
import csv
import io
import json
import os
import re

csv.field_size_limit(2**31 - 1)  # pretraining rows can be far longer than the 128 KiB default
MAX_ELEMENT_CHARS = 1 << 26  # a JSON array element longer than this is treated as malformed

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "bot": "assistant", "chatgpt": "assistant", "model": "assistant"}


class BadRecord(Exception):
    """One unusable input record. `kind` is the short category counted in the summary."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Unreadable(BadRecord):
    """A structural error (JSON array syntax, a CSV row that cannot be split): nothing after it can be read, so
    it is not one bad line but a lost remainder, and the caller must fail the run. Always a reader's last record.
    offset / stop_line: byte offset and line where reading stopped; size: the file's size in bytes."""

    def __init__(self, kind, detail, path, offset, stop_line):
        super().__init__(kind, detail)
        self.path, self.offset, self.stop_line = path, offset, stop_line
        self.size = os.path.getsize(path)

    @property
    def unread(self):
        return self.size - self.offset

    def describe(self, line_no):
        """One line: where, why, and how much of the file was never read."""
        return (f"{self.path}:{line_no}: {self}; reading stopped at byte {self.offset} (line {self.stop_line}), "
                f"{self.unread} bytes ({self.unread / max(1, self.size):.2%} of the file) left unread")


# ----------------------------------------------------------------------------------------------------------
# durable publishing

def fsync_dir(directory):
    """Make a rename in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp, path, file=None):
    """Rename a complete temporary file into place durably: its data is fsynced before the rename (so a crash
    never leaves a final name on a partly written file) and the directory after it (so the rename survives).
    `file`: the still open file object of tmp, flushed and closed here; else tmp is reopened to be fsynced."""
    if file is not None and not file.closed:
        file.flush()
        os.fsync(file.fileno())
        file.close()
    else:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ----------------------------------------------------------------------------------------------------------
# readers

def detect_format(path):
    """'csv', 'json_array' or 'jsonl', from the extension and, for .json, the first non-blank byte."""
    lower = path.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".json"):
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json_array" if head.startswith(b"[") else "jsonl"
    return "jsonl"


def parse_json_line(raw):
    """bytes of one JSONL line -> object, or BadRecord."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord("invalid UTF-8", f"byte {err.start}")
    if not text.strip():
        return BadRecord("blank line")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return BadRecord("malformed JSON", err.msg + f" (column {err.colno})")


def iter_jsonl(path):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            yield line_no, parse_json_line(raw), len(raw)


def iter_jsonl_raw(path):
    """(line_no, raw bytes, size): parsing is left to the caller (data_process parses in worker processes)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            yield line_no, raw, len(raw)


_SURROGATE = re.compile("[\udc80-\udcff]")
_MAYBE_SURROGATE = re.compile(r"[\udc80-\udcff]|\\u[dD][cC]")  # in raw JSON text: the byte, or its escape


def _has_surrogates(value):
    """Bytes that are not UTF-8, decoded with surrogateescape, show up as lone surrogates."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def line_start_offset(path, line_no):
    """Byte offset of the start of 1-based line `line_no` (the file size if it has fewer lines)."""
    offset = 0
    with open(path, "rb") as f:
        for _ in range(line_no - 1):
            line = f.readline()
            if not line:
                break
            offset += len(line)
    return offset


def char_to_byte_offset(path, n_chars, chunk_chars=1 << 20):
    """Byte offset of character `n_chars` of a file read as UTF-8 with surrogateescape and newline=""."""
    offset = 0
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        while n_chars > 0:
            text = f.read(min(chunk_chars, n_chars))
            if not text:
                break
            offset += len(text.encode("utf-8", "surrogateescape"))
            n_chars -= len(text)
    return offset


def iter_csv(path):
    """Rows as dicts keyed by the header. Reported line = the row's first physical line. A row the csv module
    cannot split (an unterminated quote, text after a closing quote) ends the file with an Unreadable record:
    strict mode, because a lenient reader turns an unterminated quote into one field holding the rest of the file."""
    with open(path, "rb") as f:
        stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(stream, strict=True)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip().lstrip("\ufeff") for h in header]
        first_line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # the rest cannot be split into rows
                yield first_line, Unreadable("malformed CSV", str(err), path, line_start_offset(path, first_line),
                                             first_line), 0
                return
            size = sum(len(field) for field in row) + len(row)  # approximate bytes, for the progress bar
            if not row:
                record = BadRecord("blank line")
            elif len(row) != len(header):
                record = BadRecord("wrong column count", f"expected {len(header)} ({','.join(header)}), got {len(row)}")
            elif _has_surrogates(row):
                record = BadRecord("invalid UTF-8")
            else:
                record = dict(zip(header, row))
            yield first_line, record, size
            first_line = reader.line_num + 1


_JSON_SPACE = re.compile("[ \t\r\n\ufeff]*")


def iter_json_array(path, chunk_chars=1 << 20):
    """Elements of one top-level JSON array, streamed in linear time: the buffer is read through with an index
    and compacted only when it is refilled. A syntax error ends the file (where the next element starts is
    unknowable): the last record is then an Unreadable saying where reading stopped."""
    decoder = json.JSONDecoder()
    # newline="": characters map 1:1 to the file's text, so a character offset converts to a byte offset
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        buf, pos, base = "", 0, 0  # base: file characters before buf[0]; pos: the next unread character
        line_no, eof, state = 1, False, "start"

        def unreadable(detail, at, at_line, report_line=None):
            offset = char_to_byte_offset(path, base + at)
            return report_line or at_line, Unreadable("malformed JSON", detail, path, offset, at_line), 0

        while True:
            end = _JSON_SPACE.match(buf, pos).end()
            line_no += buf.count("\n", pos, end)
            pos = end
            if len(buf) - pos < chunk_chars and not eof:  # keep a chunk of look-ahead; compact while refilling
                more = f.read(chunk_chars)
                eof = not more
                buf, base, pos = buf[pos:] + more, base + pos, 0
                continue
            if pos == len(buf):
                if state != "end":
                    yield unreadable("file ends inside the array", pos, line_no)
                return
            ch = buf[pos]
            if state == "start":
                if ch != "[":
                    yield unreadable("expected a top-level JSON array", pos, line_no)
                    return
                pos, state = pos + 1, "value"
            elif state in ("value", "comma"):
                if ch == "]":
                    pos, state = pos + 1, "end"
                elif state == "comma":
                    if ch != ",":
                        yield unreadable(f"expected ',' or ']', got {ch!r}", pos, line_no)
                        return
                    pos, state = pos + 1, "value"
                else:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        cut = end == len(buf) and not eof  # a number cut by the chunk boundary parses too
                    except json.JSONDecodeError as err:
                        cut, value = not eof and len(buf) - pos < MAX_ELEMENT_CHARS, err
                    if cut:  # maybe the element is just cut off: read more (doubling, so a long element is linear)
                        more = f.read(max(chunk_chars, len(buf) - pos))
                        eof = not more
                        buf, base, pos = buf[pos:] + more, base + pos, 0
                        continue
                    if isinstance(value, json.JSONDecodeError):
                        yield unreadable(value.msg, pos, line_no, line_no + buf.count("\n", pos, value.pos))
                        return
                    # walk the value only when its text may hold a surrogate (the walk is the slow part)
                    maybe = _MAYBE_SURROGATE.search(buf, pos, end) is not None
                    record = BadRecord("invalid UTF-8") if maybe and _has_surrogates(value) else value
                    yield line_no, record, end - pos
                    line_no += buf.count("\n", pos, end)
                    pos, state = end, "comma"
            else:  # after the closing bracket only whitespace may follow
                yield unreadable("data after the closing ']'", pos, line_no)
                return


def iter_records(path, fmt=None):
    """(line_no, parsed record or BadRecord, approximate bytes) for any supported file."""
    fmt = fmt or detect_format(path)
    if fmt == "csv":
        return iter_csv(path)
    if fmt == "json_array":
        return iter_json_array(path)
    return iter_jsonl(path)


# ----------------------------------------------------------------------------------------------------------
# converters

def _field(record, name, types=str, required=True):
    if not isinstance(record, dict):
        raise BadRecord("wrong type", f"record is {type(record).__name__}, expected an object")
    if name not in record or record[name] is None:
        if required:
            raise BadRecord("missing field", name)
        return None
    value = record[name]
    if not isinstance(value, types):
        expected = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise BadRecord("wrong type", f"{name} is {type(value).__name__}, expected {expected}")
    return value


def pretrain_text(record):
    text = _field(record, "text")
    if not text.strip():
        raise BadRecord("empty text")
    return text


def normalize_message(message):
    """{"role","content"} or ShareGPT {"from","value"} -> {"role","content"}."""
    if not isinstance(message, dict):
        raise BadRecord("wrong type", f"message is {type(message).__name__}, expected an object")
    role_key, content_key = ("role", "content") if "role" in message or "content" in message else ("from", "value")
    role = _field(message, role_key)
    content = _field(message, content_key)
    if role.lower() not in ROLE_ALIASES:
        raise BadRecord("invalid conversation", f"unknown role {role!r}")
    return {"role": ROLE_ALIASES[role.lower()], "content": content}


def check_conversation(messages):
    """Optional system, then user/assistant alternating, ending with assistant; no empty content."""
    if not messages:
        raise BadRecord("invalid conversation", "no messages")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRecord("invalid conversation", f"message {i + len(messages) - len(body)} is {message['role']}, "
                                                    f"expected {expected} (optional system, then user/assistant turns)")
    for message in messages:
        if not message["content"].strip():
            raise BadRecord("empty text", f"empty {message['role']} message")
    if not body or body[-1]["role"] != "assistant":
        raise BadRecord("invalid conversation", "must end with an assistant message")
    return messages


def parse_history(history):
    """History as a list of [q, a] pairs; the seed's CSV stores it as a JSON or Python-literal string."""
    if isinstance(history, str):
        if not history.strip():
            return []
        try:
            history = json.loads(history)
        except json.JSONDecodeError:
            try:
                history = ast.literal_eval(history)  # Python repr as in the seed's CSV; never eval()
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise BadRecord("wrong type", "history is neither JSON nor a Python literal") from None
    if not isinstance(history, (list, tuple)):
        raise BadRecord("wrong type", f"history is {type(history).__name__}, expected a list of [q, a] pairs")
    messages = []
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord("wrong type", "history items must be [question, answer] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def to_conversation(record):
    """Any supported SFT record -> list of canonical messages."""
    if not isinstance(record, dict):
        raise BadRecord("wrong type", f"record is {type(record).__name__}, expected an object")
    for key in ("conversations", "messages"):  # canonical role/content, or ShareGPT from/value
        if key in record:
            messages = _field(record, key, list)
            return check_conversation([normalize_message(m) for m in messages])
    if "instruction" in record or "output" in record:  # deepctrl / alpaca
        prompt = _field(record, "instruction")
        extra = _field(record, "input", required=False)
        if extra and extra.strip():
            prompt = f"{prompt}\n{extra}"
        messages = parse_history(record.get("history") or [])
        system = _field(record, "system", required=False)
        messages = ([{"role": "system", "content": system}] if system else []) + messages
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _field(record, "output")}]
        return check_conversation(messages)
    if "q" in record or "a" in record:  # the seed's CSV: history,q,a
        messages = parse_history(record.get("history") or [])
        messages += [{"role": "user", "content": _field(record, "q")},
                     {"role": "assistant", "content": _field(record, "a")}]
        return check_conversation(messages)
    raise BadRecord("missing field", "none of conversations / messages / instruction+output / q+a")


def _as_messages(value, name):
    """A DPO side: a string (the answer), one message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [normalize_message(value)]
    if isinstance(value, list):
        return [normalize_message(m) for m in value]
    raise BadRecord("wrong type", f"{name} is {type(value).__name__}, expected a string, message or message list")


def to_preference(record):
    """Any supported DPO record -> {"chosen": messages, "rejected": messages}."""
    if not isinstance(record, dict):
        raise BadRecord("wrong type", f"record is {type(record).__name__}, expected an object")
    prompt = []
    if "prompt" in record:
        value = _field(record, "prompt", (str, list))
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _as_messages(value, "prompt")
    elif "conversations" in record:
        prompt = _as_messages(_field(record, "conversations", list), "conversations")
    system = record.get("system")
    if isinstance(system, str) and system and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    sides = {}
    for name in ("chosen", "rejected"):
        if name not in record or record[name] is None:
            raise BadRecord("missing field", name)
        messages = _as_messages(record[name], name)
        if prompt and messages[0]["role"] == "assistant":  # only the response was given
            messages = prompt + messages
        sides[name] = check_conversation(messages)
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("invalid conversation", "chosen and rejected have different prompt turns")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRecord("invalid conversation", "chosen and rejected answers are identical")
    return {"chosen": chosen, "rejected": rejected}


def zh_ratio(text):
    """Fraction of CJK ideographs among the non-space characters (the seed's Chinese-ratio filter)."""
    chars = [ch for ch in text if not ch.isspace()]
    if not chars:
        return 0.0
    return sum("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in chars) / len(chars)
