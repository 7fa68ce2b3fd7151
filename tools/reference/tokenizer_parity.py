#!/usr/bin/env python3
"""Reference token ids for molt's tokenizer tests (tests/test_tokenizer.c, cli_tokenize.sh).

Writes into tests/fixtures/tokenizer/:
  corpus.jsonl           one {"text": ...} per line: hand-written lines, then seeded random
                         mixtures of scripts, digits, whitespace, emoji and control-token
                         look-alikes
  tekken.ids             ids by mistral-common's Tekkenizer (configs/tokenizers/tekken.json),
                         encode(text, bos=False, eos=False)
  deepseek-v3.ids        ids by Hugging Face tokenizers (configs/tokenizers/
                         deepseek-v3-tokenizer.json), encode(text, add_special_tokens=False)
                         with encode_special_tokens = True
  small-*.json, .ids     tiny byte-level BPE tokenizers trained here, each with a different
                         pre-tokenizer (ByteLevel regex, Digits, every Split behaviour,
                         ignore_merges, added tokens), and their ids on the first records

An .ids file starts with '#' header lines (what made it, package versions), then holds one
line per corpus record, in order: the ids separated by single spaces.

Why encode_special_tokens: molt's contract is that plain text never yields special tokens.
With that flag Hugging Face encodes added tokens marked special as ordinary text and still
matches the non-special ones, which is exactly the contract.

Run with a virtualenv outside the repository that has mistral-common, tokenizers and
tiktoken (see tools/reference/README_tokenizer.md):  /work/venv/bin/python tools/reference/tokenizer_parity.py
"""
import json
import platform
import random
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "tokenizer"
CONF = ROOT / "configs" / "tokenizers"
SEED = 20240918
N_RANDOM = 240
N_SMALL = 140  # records the small tokenizers are checked on

# ---- the corpus --------------------------------------------------------------------------

HANDWRITTEN = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "It's a test; we're sure they'll pass, aren't you? I'd think so. You've seen it.",
    "Mixed CASE words: camelCaseIdentifier, snake_case_name, SCREAMING_CASE, PascalCase.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Maß, größer.",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Ça va? Oui, très bien. L'été dernier, j'étais à Paris.",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ελληνικά: Γειά σου Κόσμε, αβγδεζηθ ΑΒΓΔ.",
    "مرحبا بالعالم! هذا نص عربي مع أرقام ١٢٣٤ و 5678.",
    "שלום עולם, זה טקסט בעברית.",
    "你好，世界！这是一个测试句子，包含中文标点。",
    "日本語のテキスト：ひらがな、カタカナ、漢字が混ざっています。東京タワー",
    "한국어 텍스트입니다. 안녕하세요, 세계!",
    "हिन्दी में एक वाक्य: नमस्ते दुनिया। क्षत्रिय",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 1️⃣ 🏳️‍🌈",
    "Numbers: 0 1 12 123 1234 12345 123456789 3.14159 -42 +7 1e-10 0x1F 1,000,000.50",
    "Dates 2024-05-17T12:34:56Z and times 09:30, phone +1 (555) 123-4567.",
    "Full-width ０１２３４５ and superscripts x² y³ ½ ¾ Ⅻ ⅷ ٣ ۴ ९ ৫",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "for (size_t i = 0; i < n; ++i) { sum += a[i] * b[i]; } // dot product",
    "const x = {a: 1, 'b': [2, 3], \"c\": null}; console.log(x?.a ?? 0);",
    "<html><body class=\"main\"><p>Paragraph &amp; entity &lt;tag&gt;</p></body></html>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "{\"reasoning_effort\": \"high\"}",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}",
    "https://example.com/path/to/page?query=value&other=42#fragment",
    "user@example.org, first.last+tag@sub.domain.co.uk",
    "$ ls -la /usr/local/bin && echo \"done\" | tee log.txt 2>&1",
    "Windows line endings\r\nsecond line\r\nthird line\r\n",
    "Old Mac line endings\rsecond\rthird",
    "Mixed\n\r\n\r\rendings\n\n\n",
    "Tabs\tbetween\t\twords\t\t\tand trailing tab\t",
    "Unicode spaces:\u00a0nbsp\u3000ideographic\u2009thin\u202fnarrow\u205fmath\u1680ogham.",
    "Line and paragraph separators:\u2028line\u2029paragraph\u0085next-line.",
    "Vertical tab\u000band form feed\u000cand file separator\u001cunit separator\u001f.",
    "Zero width: a\u200bb\u200cc\u200dd\ufeffe and Mongolian vowel separator \u180e here.",
    "Control chars: \u0001\u0002\u0007\u0008\u007f\u0080\u009f end.",
    "NUL inside: a\u0000b\u0000\u0000c",
    "Combining: e\u0301 a\u0300 o\u0308 n\u0303 Z\u0335\u0321a\u0336\u0322l\u0337\u0323g\u0338o",
    "Title case ǅemal ǈubljana, modifiers ʰʲˈ, ordinals ª º, math 𝐀𝐁𝐂 𝑎𝑏𝑐, Gothic 𐌰𐌱𐌲.",
    "Private use \ue000\uf8ff, replacement \ufffd, noncharacter \ufdd0, last \U0010ffff.",
    "[INST] What is the capital of France? [/INST] Paris.</s>",
    "<s>[INST]hello[/INST]</s><unk><pad>",
    "[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][MODEL_SETTINGS]{}[/MODEL_SETTINGS]",
    "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_RESULTS]sunny[/TOOL_RESULTS]",
    "[THINK]let me think[/THINK] The answer is 42. [AVAILABLE_TOOLS][][/AVAILABLE_TOOLS]",
    "<SPECIAL_20> <SPECIAL_999> [INST [INST]] [[INST]] [/ INST]",
    "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜>",
    "<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜>",
    "<｜fim▁hole｜><｜fim▁begin｜>x<｜fim▁end｜> <｜User｜ > <｜User｜><｜User｜>",
    "<|endoftext|> <tag> <tag>x <tag>! a<tag>!b <tag><tag>x<tag>! @@sep@@ x@@sep@@y",
    "ends with special look-alike [/INST]",
    "a-b--c---d-", "--lead and trail--", "1-2-3 x-y-z", "one, two; three,,four;;",
    "a", " ", "  ", "\n", "\r\n", "\t", ".", "?!", "1", "22", "333", "4444", "55555",
    " a", "a ", " a ", "  a  ", "\na", "a\n", " \n", "\n ", " \n\n ", "\t\n\t",
    "don't", "DON'T", "'s", "'re'", "it''s", "''", "\"quoted\"", "(paren)", "[bracket]",
    "x" * 3000,
    " " * 1200,
    "\n" * 500,
    "\t" * 300,
    " \n" * 200,
    "ab" * 1000,
    "abc " * 400,
    "🙂" * 300,
    "1" * 600,
    "=" * 800,
    "한" * 300,
    "é" * 500,
    "0123456789" * 60,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.",
    "Supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis "
    "antidisestablishmentarianism Donaudampfschifffahrtsgesellschaftskapitän",
    "HTTPServerError XMLHttpRequest iOS macOS iPhone eBay McDonald's O'Reilly",
    "snake_case__double___triple, kebab-case, dot.separated.name, path/to/file.txt",
    "   \t  mixed   whitespace \t\t run   \n\n  with newlines \r\n  ",
    "Ünïcödé ŁŻŚĆ ąęół ĳ ﬁ ﬂ Å Å (composed vs decomposed A\u030a)",
]

# Fragments the random records are made of.
WORDS = ["the", "of", "and", "token", "model", "Mistral", "expert", "router", "gradient",
         "über", "naïve", "café", "données", "ключ", "данные", "模型", "训练", "トークン",
         "데이터", "بيانات", "नमूना", "qwerty", "XML", "iPhone", "O'Neil", "x", "I"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\u00a0", "\u3000",
          "\u2028", "\u2029", "\u0085", "\u000b", "\u000c", "\u180e", "\u200b", "\u1680",
          "\u2009", "\u202f", "\u205f", "\u001c", "\u001f", "\ufeff"]
PUNCT = list(".,;:!?-()[]{}<>/\\|@#$%^&*_=+~`'\"") + ["...", "--", "->", "=>", "::", "''",
                                                      "「", "」", "。", "、", "«", "»", "—"]
LOOKALIKES = ["[INST]", "[/INST]", "<s>", "</s>", "<unk>", "[TOOL_CALLS]", "[THINK]",
              "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
              "<|endoftext|>", "<tag>", "<tag>x", "<tag>!", "@@sep@@"]
RANGES = [(0x4E00, 0x9FFF), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xD7A3),
          (0x0621, 0x064A), (0x05D0, 0x05EA), (0x0410, 0x044F), (0x0391, 0x03C9),
          (0x0905, 0x0939), (0x093E, 0x094C), (0x0E01, 0x0E3A), (0x0300, 0x036F),
          (0x1F600, 0x1F64F), (0x1F3FB, 0x1F3FF), (0x1F1E6, 0x1F1FF), (0x2160, 0x2188),
          (0x00B2, 0x00BE), (0x0660, 0x0669), (0xFF10, 0xFF19), (0x01C4, 0x01CC),
          (0x02B0, 0x02C1), (0x1D400, 0x1D433), (0x0000, 0x001F), (0x007F, 0x009F),
          (0x2000, 0x206F), (0xE000, 0xE010), (0xFE00, 0xFE0F), (0x20D0, 0x20F0)]


def fragment(rng):
    k = rng.random()
    if k < 0.25:
        w = rng.choice(WORDS)
        return w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
    if k < 0.45:
        return rng.choice(SPACES)
    if k < 0.55:
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 3)))
    if k < 0.65:
        return str(rng.randint(0, 10 ** rng.randint(1, 12)))
    if k < 0.70:
        return rng.choice(LOOKALIKES)
    lo, hi = rng.choice(RANGES)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))


def random_records(n):
    rng = random.Random(SEED)
    return ["".join(fragment(rng) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def corpus():
    return HANDWRITTEN + random_records(N_RANDOM)

# ---- reference encoders ------------------------------------------------------------------


def versions():
    return (f"python {platform.python_version()}, mistral-common {version('mistral-common')}, "
            f"tiktoken {version('tiktoken')}, tokenizers {version('tokenizers')}")


def write_ids(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for h in header:
            f.write(f"# {h}\n")
        for ids in rows:
            f.write(" ".join(map(str, ids)) + "\n")


def hf_encoder(path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True  # special added tokens are plain text (molt's contract)
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    def encode(s):
        ids = tok.encode(s, add_special_tokens=False).ids
        # The fixture must mean what molt promises: no special token out of plain text.
        assert not set(ids) & set(special.values()), (path, s)
        return ids
    return encode


SMALL_SPECIAL = ["<|endoftext|>", "[INST]", "<tag>!"]


def train_small(texts, pre_tokenizer, ignore_merges, vocab_size=600):
    """A tiny byte-level BPE trained on texts, with added tokens of every kind.

    The special tokens' text is kept out of the training data: otherwise BPE learns it as
    an ordinary token, Hugging Face then gives the added token that same id, and merges
    produce it from plain text, which molt's contract rules out (molt drops merges into a
    special token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    for sp in SMALL_SPECIAL:
        texts = [t.replace(sp, " ") for t in texts]
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(SMALL_SPECIAL[0], special=True),
                            AddedToken(SMALL_SPECIAL[1], special=True),
                            AddedToken(SMALL_SPECIAL[2], special=True, normalized=False)])
    tok.add_tokens([AddedToken("<tag>", normalized=False),
                    AddedToken("<tag>x", normalized=False),
                    AddedToken("@@sep@@", normalized=True)])
    return tok


def small_variants():
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt
    bl = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        # GPT-2 style: ByteLevel's own regex, merges in order
        "small-bytelevel": (pt.ByteLevel(add_prefix_space=False, use_regex=True), False),
        # every Split behaviour that keeps the text, Digits one by one, ignore_merges
        "small-split": (pt.Sequence([
            pt.Digits(individual_digits=True),
            pt.Split(Regex(" ?[A-Za-z]+"), "merged_with_previous"),
            pt.Split("-", "merged_with_next"),
            pt.Split(Regex("\\s"), "contiguous"),
            pt.Split(Regex("[\\p{P}\\p{S}]+"), "isolated"),
            bl]), True),
        # Removed (drops text: no round trip) and grouped digits
        "small-removed": (pt.Sequence([
            pt.Split(Regex("[,;]"), "removed"),
            pt.Digits(individual_digits=False),
            bl]), False),
    }


def main():
    texts = corpus()
    FIX.mkdir(parents=True, exist_ok=True)
    with open(FIX / "corpus.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for s in texts:
            line = json.dumps({"text": s}, ensure_ascii=False)
            # Escaped so that line splitters that honour Unicode line breaks (Python's
            # splitlines) see one record per line too.
            for ch in "\u0085\u2028\u2029":
                line = line.replace(ch, f"\\u{ord(ch):04x}")
            f.write(line + "\n")
    ver = versions()

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    tekken = Tekkenizer.from_file(str(CONF / "tekken.json"))

    def tekken_encode(s):
        ids = tekken.encode(s, bos=False, eos=False)
        assert min(ids, default=tekken.num_special_tokens) >= tekken.num_special_tokens, s
        return ids
    write_ids(FIX / "tekken.ids",
              ["ids of corpus.jsonl by tools/reference/tokenizer_parity.py",
               "configs/tokenizers/tekken.json, Tekkenizer.encode(text, bos=False, eos=False)",
               ver],
              [tekken_encode(s) for s in texts])

    enc = hf_encoder(CONF / "deepseek-v3-tokenizer.json")
    write_ids(FIX / "deepseek-v3.ids",
              ["ids of corpus.jsonl by tools/reference/tokenizer_parity.py",
               "configs/tokenizers/deepseek-v3-tokenizer.json, Tokenizer.encode(text, "
               "add_special_tokens=False), encode_special_tokens=True",
               ver],
              [enc(s) for s in texts])

    for name, (pre, ignore_merges) in small_variants().items():
        tok = train_small(texts, pre, ignore_merges)
        path = FIX / f"{name}.json"
        tok.save(str(path), pretty=False)
        enc = hf_encoder(path)
        write_ids(FIX / f"{name}.ids",
                  [f"ids of the first {N_SMALL} records of corpus.jsonl by "
                   "tools/reference/tokenizer_parity.py",
                   f"{name}.json (trained there), Tokenizer.encode(text, "
                   "add_special_tokens=False), encode_special_tokens=True",
                   ver],
                  [enc(s) for s in texts[:N_SMALL]])
    print(f"{len(texts)} records ({len(HANDWRITTEN)} hand-written, {N_RANDOM} random); {ver}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
