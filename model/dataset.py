"""
Datasets for the three training stages. Each item is a dict of tensors; a batch goes straight into model(**batch).

    PretrainDataset(path, max_seq_len, doc_mask=False, tokenizer_sha256=None)
    open_packed(path, max_seq_len, vocab_size, tokenizer_sha256, ...)  # the same, checked for a stage
                                                          the packed token file from `data_process.py pretrain`;
                                                          with tokenizer_sha256 (= tokenizer_sha256(dir)) a file
                                                          packed with another tokenizer is a StageError
        item: input_ids [T], shift_labels [T] (already-shifted targets; -100 = ignored)
              + position_ids [T] when doc_mask=True (restart at 0 at every <s>: the model derives the document
              mask from the resets, so a token attends only within its document)
        batch with torch's default collate (all rows have the same length)
    PretrainReplay(packed, n_rows, seed, with_positions)  n rows of a PretrainDataset, in SFTDataset's item format
        (every token a label), to mix into SFT: 3-full_sft.py --ptx_data
    SFTDataset(path, tokenizer, max_seq_len, pack=False)  sft_data_*.jsonl (pack=True: a memmapped cache, prepare())
        item: input_ids [L], labels [L] (aligned with input_ids, the model shifts; -100 except the content and the
              closing </s> of EVERY assistant turn) + position_ids [L] when packed
        batch with dataset.collate: right padding to the longest row, attention_mask added
    DPODataset(path, tokenizer, max_seq_len)              dpo_data.jsonl
        item: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (labels only on the final
              assistant turn, i.e. the response); collate pads both sides to ONE length, so they can be
              concatenated into one forward pass, and adds chosen_attention_mask / rejected_attention_mask

Order, sharding and exact resume are the sampler's job (model.trainer.ResumableBatchSampler: a permutation from
(seed, epoch), sharded by rank, starting at any batch). Items here depend only on the index, so any sampler
works, and the datasets hold no open file or memmap when pickled to DataLoader workers.

Conversations become ids and labels through model/chat.py's ChatEncoder (the one home of the chat format and of
truncation to max_seq_len).

Bad records: data_process.py validates and reports bad lines; SFTDataset and DPODataset check every record of
their canonical file at construction (whatever pack is), list the bad ones as `file:line: reason` (BadLines) and
raise StageError naming the first and the count, so a bad file fails before step 1, never mid-training.

Packed SFT (pack=True) is tokenized once into memory-mapped files beside the data, `<data>.sft-<key>.*` (see
SFTDataset), keyed by the data file (size, mtime, head/tail hash), the tokenizer, max_seq_len and pack; a stage
calls SFTDataset.prepare(path, tokenizer, max_seq_len) on rank 0, then a barrier, then builds the datasets.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from .chat import IGNORE_INDEX, ChatEncoder
from .data_formats import publish
from .errors import BadLines, StageError


_warned_unchecked = set()  # packed files already warned about (no tokenizer_sha256 in their meta)


# ----------------------------------------------------------------------------------------------------------
# pretraining: a memory-mapped token stream

def packed_meta_path(bin_path):
    return (bin_path[:-4] if bin_path.endswith(".bin") else bin_path) + ".meta.json"


class PretrainDataset(Dataset):
    """Row i = tokens[i*T : i*T + T + 1] of the packed stream (T = max_seq_len): consecutive rows share one
    token, so every token is a target exactly once and no row is padded."""

    def __init__(self, path, max_seq_len, doc_mask=False, tokenizer_sha256=None):
        """tokenizer_sha256: the hash (model.chat.tokenizer_sha256) of the tokenizer the run uses; a packed
        file made with another tokenizer is then a StageError (its ids would mean other tokens)."""
        meta_path = packed_meta_path(path)
        if not os.path.isfile(path) or not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path}: packed token file or its {os.path.basename(meta_path)} is missing "
                                    f"(make them with `python data_process.py pretrain --data_path <file.jsonl>`)")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if tokenizer_sha256 is not None:
            check_packed_tokenizer(path, meta, tokenizer_sha256)
        self.path, self.max_seq_len, self.doc_mask = path, max_seq_len, doc_mask
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size, self.bos_id, self.eos_id = meta["vocab_size"], meta["bos_id"], meta["eos_id"]
        self.n_tokens = os.path.getsize(path) // self.dtype.itemsize
        if self.n_tokens != meta["n_tokens"]:
            raise ValueError(f"{path}: holds {self.n_tokens} tokens but {meta_path} says {meta['n_tokens']} "
                             f"(an interrupted or mixed-up write?); re-run data_process.py pretrain")
        self.n_rows = (self.n_tokens - 1) // max_seq_len
        if self.n_rows < 1:
            raise ValueError(f"{path}: {self.n_tokens} tokens, fewer than one row of max_seq_len + 1 = {max_seq_len + 1}")
        self._tokens = None  # opened lazily, once per process

    @staticmethod
    def val_path(path):
        """dataset/pretrain_data.bin -> dataset/pretrain_data.val.bin"""
        return (path[:-4] if path.endswith(".bin") else path) + ".val.bin"

    def __getstate__(self):  # DataLoader workers re-open the memmap instead of receiving a copy of it
        return {**self.__dict__, "_tokens": None}

    def __len__(self):
        return self.n_rows

    def __getitem__(self, i):
        if not 0 <= i < self.n_rows:
            raise IndexError(i)
        if self._tokens is None:  # mapping reads nothing; only the rows actually used are paged in
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = i * self.max_seq_len
        row = torch.from_numpy(self._tokens[start:start + self.max_seq_len + 1].astype(np.int64))
        item = {"input_ids": row[:-1], "shift_labels": row[1:].clone()}
        if self.doc_mask:
            is_start = row[:-1] == self.bos_id
            index = torch.arange(self.max_seq_len)
            last_start = torch.cummax(torch.where(is_start, index, 0), dim=0).values
            item["position_ids"] = index - last_start
            # </s> -> next document's <s> crosses a boundary the model is not allowed to look across
            item["shift_labels"][row[1:] == self.bos_id] = IGNORE_INDEX
        return item


def open_packed(path, max_seq_len, vocab_size, tokenizer_sha256, doc_mask=False, what="pretraining data"):
    """A stage's packed token file, checked against its model before any work: a missing file, a torn write,
    fewer tokens than one row, another tokenizer or a larger vocabulary is one StageError that names the file."""
    if not os.path.isfile(path):
        raise StageError(f"{what} not found: {path} (pretraining text packed by "
                         f"`python data_process.py pretrain --data_path <file.jsonl>`)")
    try:
        dataset = PretrainDataset(path, max_seq_len, doc_mask=doc_mask, tokenizer_sha256=tokenizer_sha256)
    except (FileNotFoundError, ValueError) as err:  # ValueError includes a meta file that is not JSON
        raise StageError(f"{what}: {err}") from None
    if dataset.vocab_size > vocab_size:
        raise StageError(f"{what} {path} was tokenized with a {dataset.vocab_size}-token vocabulary but the model "
                         f"has vocab_size {vocab_size}")
    return dataset


class PretrainReplay(Dataset):
    """n_rows rows of a packed pretraining file, drawn once from seed (each row at most once while there are
    enough), as SFTDataset items: input_ids, labels = input_ids (every token a target; the model shifts), and
    position_ids 0..T-1 when the SFT rows are packed (a batch's items must all have them or none). Mixed into the
    SFT rows, they keep SFT from moving the model away from what pretraining stored (docs/demo.md)."""

    def __init__(self, packed: PretrainDataset, n_rows: int, seed: int, with_positions: bool):
        generator = torch.Generator().manual_seed(seed)
        passes = -(-n_rows // len(packed))
        self.rows = torch.cat([torch.randperm(len(packed), generator=generator) for _ in range(passes)])[:n_rows].tolist()
        self.packed, self.with_positions = packed, with_positions

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = self.packed[self.rows[i]]["input_ids"]
        item = {"input_ids": ids, "labels": ids.clone()}
        if self.with_positions:
            item["position_ids"] = torch.arange(len(ids))
        return item


def check_packed_tokenizer(path, meta, sha256):
    """StageError when the packed file's meta names another tokenizer; a warning (once) when it names none."""
    packed_with = meta.get("tokenizer_sha256")
    if packed_with is None:
        if path not in _warned_unchecked:
            _warned_unchecked.add(path)
            print(f"warning: {packed_meta_path(path)} does not record its tokenizer (packed by an older "
                  f"data_process.py), so it cannot be checked against this run's tokenizer", file=sys.stderr)
        return
    if packed_with != sha256:
        source = " ".join(meta.get("source") or []) or "<the source .jsonl>"
        raise StageError(f"{path} was packed with tokenizer {meta.get('tokenizer', '?')} (sha256 {packed_with[:12]}) "
                         f"but this run's tokenizer is a different one (sha256 {sha256[:12]}): its token ids would "
                         f"mean other tokens. Re-pack with `python data_process.py pretrain --data_path {source} "
                         f"--tokenizer_dir <this run's tokenizer dir>`")


def pretrain_useful_fraction(dataset):
    """Share of the packed stream's tokens that are targets (not -100) in some row."""
    targets = len(dataset) * dataset.max_seq_len
    if dataset.doc_mask:  # one ignored target per document start inside the covered range
        tokens = np.memmap(dataset.path, dtype=dataset.dtype, mode="r")[1:targets + 1]
        targets -= int((tokens == dataset.bos_id).sum())
    return targets / dataset.n_tokens


# ----------------------------------------------------------------------------------------------------------
# chat data: shared encoding of conversations

def index_lines(path):
    """Byte offsets and 1-based line numbers of the non-blank lines of a JSONL file (one pass, no parsing)."""
    offsets, line_nos, pos = [], [], 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                offsets.append(pos)
                line_nos.append(line_no)
            pos += len(raw)
    return np.array(offsets, dtype=np.int64), np.array(line_nos, dtype=np.int64)


def _check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: every message needs role system/user/assistant and a string content")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be from the assistant")
    return messages


def pad_right(rows, value, length):
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


LONG_PASS = 20_000  # records: a pass over more shows a progress bar


class _JsonlRecords(Dataset):
    """Lazy random access to the records of a JSONL file: only the line index lives in memory."""

    kind, command = "records", "data_process.py"

    def __init__(self, path, tokenizer, max_seq_len):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (make it with `python data_process.py ...`)")
        self.path = path
        self.offsets, self.line_nos = index_lines(path)
        if len(self.offsets) == 0:
            raise ValueError(f"{path}: no records")
        self.encoder = ChatEncoder(tokenizer, max_seq_len)
        self.pad_id = self.encoder.pad_id

    def record(self, i):
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            raw = f.readline()
        return self.parse(raw, f"{self.path}:{self.line_nos[i]}")

    @staticmethod
    def parse(raw, where):
        try:
            return json.loads(raw), where
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{where}: not valid JSON ({err}); clean the file with data_process.py") from None

    def messages(self, record, where):
        """The record's conversation(s), checked; ValueError("file:line: reason") when it is not canonical."""
        raise NotImplementedError

    def validate(self, each=None, desc=None):
        """Parse and check every record before training starts; each(i, messages) sees every good one. Bad
        records are listed as `file:line: reason` (model.runtime.BadLines); any bad one is a StageError."""
        from tqdm import tqdm
        bad = BadLines()
        first = None
        with open(self.path, "rb") as f:
            for i, (offset, line_no) in enumerate(tqdm(zip(self.offsets, self.line_nos), total=len(self.offsets),
                                                       desc=desc or f"checking {os.path.basename(self.path)}",
                                                       unit=" records", file=sys.stderr,
                                                       disable=desc is None and len(self.offsets) < LONG_PASS)):
                f.seek(offset)
                where = f"{self.path}:{line_no}"
                bad.total += 1
                try:
                    messages = self.messages(*self.parse(f.readline(), where))
                except ValueError as err:
                    reason = str(err)[len(where):].lstrip(": ") if str(err).startswith(where) else str(err)
                    bad.add(self.path, line_no, reason)
                    first = first or f"{where}: {reason}"
                    continue
                if each is not None:
                    each(i, messages)
        if bad.count:
            print(bad.summary(), file=sys.stderr)
            raise StageError(f"{self.path}: {bad.count} of {bad.total} records are not canonical {self.kind}, "
                             f"the first: {first} (convert the raw file with `python {self.command} --data_path "
                             f"<raw file>`)")

    def __len__(self):
        return len(self.offsets)


# ----------------------------------------------------------------------------------------------------------
# SFT: packed rows are tokenized once into a memory-mapped cache beside the data

SFT_CACHE_VERSION = 1


def _tokenizer_identity(tokenizer) -> str:
    """sha256 of what decides the encoding: the tokenizer's full serialization and its special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _data_identity(path) -> dict:
    """Size, mtime and a hash of the first and last MiB: any edit changes at least one (cheap on big files)."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail_sha256": digest.hexdigest()}


def sft_cache_key(path, tokenizer, max_seq_len, pack=True) -> dict:
    return {"version": SFT_CACHE_VERSION, "data": _data_identity(path), "tokenizer": _tokenizer_identity(tokenizer),
            "max_seq_len": max_seq_len, "pack": bool(pack)}


def sft_cache_base(path, key) -> str:
    """<data>.sft-<16 hex of the key's hash>; files: .ids.bin .labels.bin .idx.npy .rows.npy .meta.json"""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{path}.sft-{digest}"


SFT_CACHE_FILES = (".ids.bin", ".labels.bin", ".idx.npy", ".rows.npy")


class SFTDataset(_JsonlRecords):
    """Conversations; the loss covers every assistant turn. Every record is checked at construction (a bad one
    is a StageError naming file:line before step 1). pack=True concatenates consecutive conversations into rows
    of up to max_seq_len tokens, with position_ids restarting per conversation so the model keeps them apart;
    the packed encoding lives in a memory-mapped cache beside the data (SFTDataset.prepare), built once and
    reused until the data, the tokenizer or max_seq_len changes.

    Cache <data>.sft-<key hash>.*: ids.bin (uint16/uint32 token ids of every conversation, back to back),
    labels.bin (uint8, 1 = the token is a target: its label is its id), idx.npy (int64 conversation starts,
    n + 1), rows.npy (int64 first conversation of each packed row, n_rows + 1), meta.json (the key; last)."""

    kind, command = 'SFT records ({"conversations": [...]})', "data_process.py sft"

    def __init__(self, path, tokenizer, max_seq_len, pack=False):
        super().__init__(path, tokenizer, max_seq_len)
        self.pack, self.cache, self._arrays = pack, None, None
        if pack:
            self.cache = self.prepare(path, tokenizer, max_seq_len, pack=True, _records=self)
            self.n_rows = len(np.load(self.cache + ".rows.npy", mmap_mode="r")) - 1
        else:
            self.validate()

    @classmethod
    def prepare(cls, path, tokenizer, max_seq_len, pack=True, _records=None) -> str:
        """Build the packed cache of `path` if it is missing or stale; return its base path. A stage runs this
        on rank 0, then a barrier, then constructs the dataset everywhere (the constructor calls it too)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (make it with `python data_process.py sft`)")
        key = sft_cache_key(path, tokenizer, max_seq_len, pack)
        base = sft_cache_base(path, key)
        try:
            with open(base + ".meta.json", encoding="utf-8") as f:
                if json.load(f).get("key") == key and all(os.path.isfile(base + s) for s in SFT_CACHE_FILES):
                    return base
        except (OSError, ValueError):
            pass
        records = _records
        if records is None:  # only the line index: _build_cache checks every record as it tokenizes
            records = cls.__new__(cls)
            _JsonlRecords.__init__(records, path, tokenizer, max_seq_len)
        records._build_cache(base, key)
        return base

    def _build_cache(self, base, key):
        dtype = np.uint16 if len(self.encoder.tokenizer) <= 1 << 16 else np.uint32
        tmp = f".tmp-{os.getpid()}"
        ids_file, labels_file = open(base + ".ids.bin" + tmp, "wb"), open(base + ".labels.bin" + tmp, "wb")
        lengths, pending = np.zeros(len(self.offsets), dtype=np.int64), []

        def flush():
            for i, (ids, labels) in zip((i for i, _ in pending), self.encoder.encode_many([m for _, m in pending])):
                ids, labels = np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64)
                target = labels != IGNORE_INDEX
                assert (labels[target] == ids[target]).all()  # a label is always its own token: a mask suffices
                ids_file.write(ids.astype(dtype).tobytes())
                labels_file.write(target.astype(np.uint8).tobytes())
                lengths[i] = len(ids)
            pending.clear()

        def each(i, messages):
            pending.append((i, messages))
            if len(pending) >= 256:
                flush()

        try:
            self.validate(each, desc=f"SFT cache: tokenizing {os.path.basename(self.path)}")  # checks as it goes
            flush()
            for f in (ids_file, labels_file):
                publish(f.name, f.name[:-len(tmp)], f)
            starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            rows, length = [0], 0
            for i, n in enumerate(lengths.tolist()):  # greedy packing in file order
                if i > rows[-1] and length + n > self.encoder.max_seq_len:
                    rows.append(i)
                    length = 0
                length += n
            rows.append(len(lengths))
            for suffix, array in ((".idx.npy", starts), (".rows.npy", np.array(rows, dtype=np.int64))):
                with open(base + suffix + tmp, "wb") as f:
                    np.save(f, array)
                    publish(f.name, base + suffix, f)
            with open(base + ".meta.json" + tmp, "w", encoding="utf-8") as f:  # last: its presence = complete
                json.dump({"key": key, "source": self.path, "dtype": np.dtype(dtype).name,
                           "n_conversations": len(lengths), "n_rows": len(rows) - 1, "n_tokens": int(starts[-1])}, f)
                publish(f.name, base + ".meta.json", f)
        finally:
            for f in (ids_file, labels_file):
                f.close()
                if os.path.exists(f.name):
                    os.remove(f.name)

    def _open_cache(self):
        if self._arrays is None:
            with open(self.cache + ".meta.json", encoding="utf-8") as f:
                dtype = json.load(f)["dtype"]
            self._arrays = (np.memmap(self.cache + ".ids.bin", dtype=dtype, mode="r"),
                            np.memmap(self.cache + ".labels.bin", dtype=np.uint8, mode="r"),
                            np.load(self.cache + ".idx.npy", mmap_mode="r"),
                            np.load(self.cache + ".rows.npy", mmap_mode="r"))
        return self._arrays

    def __getstate__(self):  # DataLoader workers re-open the memmaps instead of receiving copies
        return {**self.__dict__, "_arrays": None}

    def messages(self, record, where):
        if not isinstance(record, dict) or "conversations" not in record:
            raise ValueError(f'{where}: expected {{"conversations": [...]}}')
        return _check_messages(record["conversations"], where)

    def encode(self, i):
        return self.encoder.encode(self.messages(*self.record(i)), train_on="all")

    def __len__(self):
        return self.n_rows if self.pack else len(self.offsets)

    def __getitem__(self, i):
        if not self.pack:
            ids, labels = self.encode(i)
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if not 0 <= i < self.n_rows:
            raise IndexError(i)
        ids_mm, labels_mm, starts, rows = self._open_cache()
        first, last = int(rows[i]), int(rows[i + 1])
        bounds = np.asarray(starts[first:last + 1])
        a, b = int(bounds[0]), int(bounds[-1])
        ids = torch.from_numpy(ids_mm[a:b].astype(np.int64))
        labels = torch.where(torch.from_numpy(labels_mm[a:b].astype(bool)), ids, IGNORE_INDEX)
        positions = torch.arange(b - a) - torch.from_numpy(np.repeat(bounds[:-1] - a, np.diff(bounds)))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def collate(self, batch):
        length = max(len(item["input_ids"]) for item in batch)
        out = {
            "input_ids": pad_right([b["input_ids"] for b in batch], self.pad_id, length),
            "labels": pad_right([b["labels"] for b in batch], IGNORE_INDEX, length),
            "attention_mask": pad_right([torch.ones_like(b["input_ids"]) for b in batch], 0, length),
        }
        if "position_ids" in batch[0]:  # padding continues the last conversation's positions
            out["position_ids"] = torch.stack([torch.cat([b["position_ids"], b["position_ids"][-1] + 1 + torch.arange(
                length - len(b["position_ids"]))]) for b in batch])
        return out


class DPODataset(_JsonlRecords):
    """Preference pairs; labels only on the final assistant turn (the response), prompts encoded as in SFT.
    Every record is checked at construction: a bad one is a StageError naming file:line before step 1."""

    kind, command = 'DPO records ({"chosen": [...], "rejected": [...]})', "data_process.py dpo"

    def __init__(self, path, tokenizer, max_seq_len):
        super().__init__(path, tokenizer, max_seq_len)
        self.whole = ChatEncoder(tokenizer)  # uncut: the window is chosen for the pair in __getitem__
        self.validate()

    def messages(self, record, where):
        if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
            raise ValueError(f'{where}: expected {{"chosen": [...], "rejected": [...]}}')
        return {side: _check_messages(record[side], f"{where} ({side})") for side in ("chosen", "rejected")}

    def __getitem__(self, i):
        sides = self.messages(*self.record(i))
        pair = {side: self.whole.encode(sides[side], train_on="last") for side in ("chosen", "rejected")}
        # One window start for both sides (each side's own start depends on its length: a prompt longer than the
        # context was cut at two places, and the two responses were scored under different prompts). The later of
        # the two keeps the start of both responses.
        length = self.encoder.max_seq_len
        start = max(self.encoder.window_start(labels, len(ids)) if len(ids) > length else 0
                    for ids, labels in pair.values())
        item = {}
        for side, (ids, labels) in pair.items():
            ids, labels = ids[start:start + length], labels[start:start + length]
            item[f"{side}_input_ids"], item[f"{side}_labels"] = torch.tensor(ids), torch.tensor(labels)
        return item

    def collate(self, batch):
        length = max(len(b[f"{side}_input_ids"]) for b in batch for side in ("chosen", "rejected"))
        out = {}
        for side in ("chosen", "rejected"):
            ids = [b[f"{side}_input_ids"] for b in batch]
            out[f"{side}_input_ids"] = pad_right(ids, self.pad_id, length)
            out[f"{side}_labels"] = pad_right([b[f"{side}_labels"] for b in batch], IGNORE_INDEX, length)
            out[f"{side}_attention_mask"] = pad_right([torch.ones_like(x) for x in ids], 0, length)
        return out


def token_fractions(batch):
    """Useful-token measures of a collated chat batch: non-padding share and labelled share of all positions."""
    mask = batch.get("attention_mask", batch.get("chosen_attention_mask"))
    labels = batch.get("labels", batch.get("chosen_labels"))
    return {"non_pad": mask.float().mean().item(), "labelled": (labels != IGNORE_INDEX).float().mean().item()}
