"""
BERT's WordPiece tokenizer as the official UMT code uses it (its vendored
multi_modality/models/backbones/bert/tokenization_bert.py with bert-base-uncased's vocab.txt, called
as tokenizer(texts, padding='max_length', truncation=True, max_length=L)), for the BERT text side.

Written out here because no library gives the official ids without `transformers`: that tokenizer
puts [CLS] in front and adds NO [SEP], and it lower-cases one character at a time. The steps:
  1. cut out the special tokens [CLS] [MASK] [PAD] [SEP] [UNK] (case-sensitive, anywhere);
  2. lower-case the rest character by character; drop NUL, U+FFFD and control characters; map
     whitespace to a space; put spaces around CJK ideographs; split on whitespace;
  3. per word: strip accents (NFD, drop the combining marks); split off each punctuation character;
  4. WordPiece: greedy longest prefix first, continuations as ##piece; a word that cannot be
     covered (or has more than 100 characters) becomes one [UNK].
An encoding is [CLS] + the first L-1 tokens, padded with [PAD]; the mask is True on [CLS] and the
tokens (the official code returns the same as int64 ones).
"""

import re
import unicodedata

import torch

SPECIALS = ('[CLS]', '[MASK]', '[PAD]', '[SEP]', '[UNK]')
MAX_WORD = 100  # characters; a longer word is [UNK]

def _is_punctuation(c):
    o = ord(c)  # ASCII symbols such as $ + ^ ` count too, though Unicode calls them symbols
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or \
        unicodedata.category(c).startswith('P')

def _is_cjk(c):
    o = ord(c)  # the CJK Unified Ideographs blocks (not Hiragana, Katakana or Hangul)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF
            or 0x2A700 <= o <= 0x2CEAF or 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F)

def _clean(c):
    """One character -> '' (NUL, U+FFFD, control), ' ' (whitespace), ' c ' (CJK) or itself."""
    if c in ' \t\n\r' or unicodedata.category(c) == 'Zs':
        return ' '
    if c in '\x00\ufffd' or unicodedata.category(c).startswith('C'):
        return ''
    return f' {c} ' if _is_cjk(c) else c

def vocab_from_texts(texts):
    """A WordPiece vocabulary for a tiny BERT trained from scratch (the stage-2 demo): the special
    tokens, [PAD] first (id 0), then every word of the texts, then each character alone and as a
    ##piece, so that a word the texts never had still splits into known pieces, not into [UNK]."""
    words = sorted({w for t in texts for w in Tokenizer._words(t)})
    chars = sorted({c for w in words for c in w})
    return ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words + \
        [c for c in chars if c not in words] + ['##' + c for c in chars]

class Tokenizer:
    """Tokenizer(vocab): a vocab.txt path (one token per line, the line number is the id) or the
    list of tokens. tok(texts, L) -> (input_ids [B, L] int64, attention_mask [B, L] bool, True =
    token). With bert-base-uncased's vocab.txt (bert-large-uncased has the same) the ids are the
    official ones. The BERT text side's tokenizer: answer_eos and mlm_ids say how UMT uses it."""

    answer_eos = ' [SEP]'  # a QA answer is `answer [SEP]` (the official eos, configs/qa.py)

    def __init__(self, vocab):
        if isinstance(vocab, str):
            try:
                with open(vocab, encoding='utf-8') as f:
                    vocab = [line.rstrip('\n') for line in f]
            except OSError as e:
                raise ValueError(f'cannot read the vocabulary {vocab}: {e.strerror}') from e
        self.tokens = list(vocab)                               # id -> token, saved in checkpoints
        self.vocab = {t: i for i, t in enumerate(self.tokens)}  # token -> id
        if not all(t in self.vocab for t in SPECIALS):
            raise ValueError(f'not a BERT vocabulary: it lacks one of {SPECIALS}')
        # MLM (video_language.mask_text), as the official criterions.py: [PAD] and [CLS] are never
        # masked, a replaced token becomes [MASK] or any id of the vocabulary
        v = self.vocab
        self.mlm_ids = dict(mask_id=v['[MASK]'], never=(v['[PAD]'], v['[CLS]']),
                            random_ids=(0, len(self.tokens)))

    @staticmethod
    def _words(text):
        """Text without special tokens -> its words: lower-cased, unaccented, punctuation split."""
        # official lower-casing, per character: 'ΟΔΟΣ' -> 'οδοσ' (str.lower(): 'οδος')
        text = ''.join(c.lower() for c in text)
        for word in ''.join(_clean(c) for c in text).split():
            word = ''.join(c for c in unicodedata.normalize('NFD', word.lower())
                           if unicodedata.category(c) != 'Mn')              # café -> cafe
            yield from ''.join(f' {c} ' if _is_punctuation(c) else c for c in word).split()

    def _wordpiece(self, word):
        """One word -> its pieces, greedy longest match first; the whole word is [UNK] if stuck."""
        if len(word) > MAX_WORD:
            return ['[UNK]']
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # the longest vocabulary piece starting here
                piece = word[start:end] if start == 0 else '##' + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ['[UNK]']
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        """str -> list of WordPiece tokens, special tokens kept whole."""
        parts = re.split('(' + '|'.join(map(re.escape, SPECIALS)) + ')', text)  # text, special, ..
        tokens = []
        for i, part in enumerate(parts):
            if i % 2:
                tokens.append(part)
            else:
                tokens += [p for w in self._words(part) for p in self._wordpiece(w)]
        return tokens

    def __call__(self, texts, max_len=32):
        ids = torch.full((len(texts), max_len), self.vocab['[PAD]'], dtype=torch.long)   # [B, L]
        mask = torch.zeros(len(texts), max_len, dtype=torch.bool)                       # [B, L]
        for b, text in enumerate(texts):
            row = [self.vocab['[CLS]']] + [self.vocab[t] for t in self.tokenize(text)][:max_len - 1]
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), True
        return ids, mask


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
