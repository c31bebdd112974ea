#!/usr/bin/env python3
"""agentd's tokenizer against llama.cpp's on the same GGUF files, string by string.

Usage:
  python3 bench/tokenizer_compare.py [--model F.gguf ...] [--agentd PATH] [--examples N]
      [--write-fixtures DIR]

For each model file (`--model`, repeatable; default: the SmolLM2, Qwen 2.5 Coder and Gemma 3
files in the models folder that exist) it builds a corpus of 1000+ strings — code in a dozen
languages, prose in English, French, German, Chinese, Japanese, Korean, Arabic, Russian, Hindi
and more, digit runs, whitespace runs (spaces, tabs, newlines, CR LF, odd Unicode spaces), emoji
with ZWJ sequences, skin tones and flags, text that looks like special tokens (`<|im_start|>`,
`<start_of_turn>`, `<0x41>`, `▁`, and a sample of the file's own control and user-defined
tokens), a sweep of code points across Unicode blocks, random code points from every plane,
random strings over an alphabet of special-token pieces, and random mixtures of all of these — and
tokenizes every string four ways (special tokens parsed or not, BOS/EOS added or not) with
llama.cpp (llama-cpp-python: `Llama(model_path, vocab_only=True).tokenize(text.encode(),
add_bos, special)`) and with `agentd model tokenize --file F --input strings.json [--special]
[--bos]` (one process per model and mode).

Prints one JSON report: per model, the number of strings and the mismatches per mode, with the
first few mismatching examples (text, both id lists, the first differing position). Exits 1 if
anything differs.

`--write-fixtures DIR` also writes about thirty of the cases per vocabulary, with llama.cpp's
ids, to DIR/<name>.json for daemon/engine/src/tokenizer/fixture_tests.rs.

Needs llama-cpp-python (`pip install llama-cpp-python`, which builds llama.cpp from source) and
a built agentd (`cargo build`; default: $CARGO_TARGET_DIR/debug/agentd, else target/debug).
"""
import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile

import llama_cpp

MODELS_DIR = os.path.join(
    os.environ.get("AGENTD_HOME")
    or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "agentd"
    ),
    "models",
)

# Model file -> fixture name; files sharing a vocabulary share a fixture (the first one writes).
DEFAULT_MODELS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2",
    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf": "qwen2.5",
    "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf": "qwen2.5",
    "gemma-3-270m.Q4_K_M.gguf": "gemma3",
}
# Fixture names of llama.cpp's own vocabulary-only test files (its models/ggml-vocab-*.gguf),
# compared when passed with --model: Llama 2's SentencePiece vocabulary (space prefix on) and
# Phi-3's (special tokens strip the whitespace after them).
EXTRA_FIXTURES = {
    "ggml-vocab-llama-spm.gguf": "llama-spm",
    "ggml-vocab-phi-3.gguf": "phi-3",
}

MODES = [
    ("special", True, False),
    ("plain", False, False),
    ("special+bos", True, True),
    ("plain+bos", False, True),
]

CODE = [
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    "impl<'a, T: Clone + Send> Iterator for Iter<'a, T> {\n\ttype Item = &'a T;\n}\n",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo(Bar):\n\tdef __init__(self, *args, **kwargs):\n\t\tsuper().__init__(*args, **kwargs)  # noqa\n",
    '#include <stdio.h>\n\nint main(int argc, char **argv) {\n\tprintf("%d\\n", argc);\n\treturn 0;\n}\n',
    "template <typename T>\nstd::vector<T> f(const std::vector<T>& xs) { return {xs.rbegin(), xs.rend()}; }",
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);\nexport default { add };\n",
    "function $(sel) { return document.querySelectorAll(sel); } // jQuery-ish\n",
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("héllo, 世界")\n}\n',
    "SELECT u.id, COUNT(*) AS n FROM users u LEFT JOIN orders o ON o.user_id = u.id\nWHERE u.created_at >= '2024-01-01' GROUP BY u.id HAVING n > 3;",
    '<!DOCTYPE html>\n<html lang="en">\n  <body><div class="x">Hi &amp; bye</div></body>\n</html>\n',
    '{"name": "agentd", "version": "0.1.0", "tags": ["llm", "rust"], "nested": {"a": [1, 2.5, null, true]}}',
    "key: value\nlist:\n  - one\n  - two\n\t# tab-indented comment\n",
    '#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo "$f" | tr a-z A-Z; done 2>&1 >/dev/null\n',
    "main :: IO ()\nmain = mapM_ print [x * y | x <- [1..3], y <- [1..3], x /= y]\n",
    "public static void main(String[] args) throws IOException {\n    System.out.println(args.length);\n}",
    "    \n\n    indented after blank lines\n\t\t\tand tabs\r\n\r\nwindows line ends\r\n",
    "x = [i**2 for i in range(100) if i % 3 == 0]\ny = {k: v for k, v in zip('abc', [1, 2, 3])}",
    "if (a != b && c <= d || !e) { x += 1; y -= 2; z *= 3; w /= 4; } else { return -1; }",
    "diff --git a/x.rs b/x.rs\n@@ -1,3 +1,4 @@\n-old line\n+new line\n+  another\n",
]

PROSE = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock somewhere, isn't it?",
    "I'm sure they'll see it; we've done it before, and you'd agree. WE'RE DONE. She'S here.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va ? Où est l'hôtel ?",
    "Größenordnung: Die Straße ist über 10 km lang, und Äpfel schmecken süß. Ärger? Öl!",
    "人工智能正在改变世界。我们需要更好的工具来理解大型语言模型的行为。",
    "日本語のテキストを処理します。ひらがな、カタカナ、漢字が混ざっています。東京は晴れ。",
    "안녕하세요, 세계! 한국어 텍스트 토큰화 테스트입니다. 감사합니다.",
    "مرحبا بالعالم! هذه جملة باللغة العربية مع أرقام ١٢٣ و 456.",
    "Привет, мир! Съешь же ещё этих мягких французских булок да выпей чаю.",
    "नमस्ते दुनिया! यह हिंदी में एक वाक्य है। संख्या १२३ और ४५६।",
    "Γειά σου κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "שלום עולם! זה משפט בעברית.",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Xin chào thế giới! Tiếng Việt có nhiều dấu: ắ ằ ẳ ẵ ặ.",
    "Türkçe: İstanbul'da ılık bir gün. Şeker, çay, ğ, ü, ö.",
    "Polski: Zażółć gęślą jaźń. Čeština: Příliš žluťoučký kůň.",
    "Español: ¿Dónde está la biblioteca? ¡Olé! Niño, año, señor.",
    "Português: Não há açúcar no café. Ação, coração, lições.",
    "Mixed 中文 and English, 日本語 and 한국어, العربية and русский in one line.",
    "e\u0301le\u0300ve cafe\u0301 \u1e9b\u0323 — combining marks, NFC vs NFD: é é",
    "Zero\u200bwidth\u200cjoiners\u200dand\ufeffBOM and \u2028line\u2029separators",
    "RTL \u202eoverride\u202c and \u200fmarks\u200e here",
    "Quotes: “curly” ‘single’ «guillemets» „low“ — en–dash … ellipsis",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∫₀^∞ f(t) dt ≈ 3.14159; ½ ¾ ⅓",
    "Currency: $100, €50, £20, ¥1000, ₹500, ₿0.01, 10¢",
    "Fullwidth: ＡＢＣ１２３！？ and halfwidth ｶﾀｶﾅ",
    "ALL CAPS SHOUTING AND lowercase whispering and CamelCaseIdentifiers",
    "URL: https://example.com/path?q=a+b&x=%20#frag and email a.b+c@ex-ample.org",
]

EMOJI = [
    "😀😃😄😁😆😅😂🤣",
    "👍🏽👍🏿👋🏻 thumbs and waves",
    "family 👨\u200d👩\u200d👧\u200d👦 and couple 👩\u200d❤\ufe0f\u200d👨",
    "flags 🇫🇷🇩🇪🇯🇵🇺🇸🏳\ufe0f\u200d🌈🏴\u200d☠\ufe0f",
    "keycaps 1\ufe0f\u20e3 #\ufe0f\u20e3 *\ufe0f\u20e3",
    "🦀 Rust 🐍 Python ☕ Java 🚀 launch ✨ sparkle ❤️ heart",
    "🧑\u200d💻 technologist, 🧑🏾\u200d🚀 astronaut",
    "emoji at end 🎉",
    "🎉",
    "text🙂text🙃text",
]

LOOKALIKES = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|",
    "<|im_start|><|im_start|>",
    "x<|im_start|>y <|endoftext|><|im_start|<|im_end|>z",
    "<start_of_turn",
    "<start_of_turn><end_of_turn><start_of_turn>",
    "<0x41>",
    "<0x41><0x0A><0xFF><0xZZ><0x4>",
    "▁",
    "▁▁hello▁world",
    "▁ ▁ ▁",
    "<s>",
    "</s>",
    "<s>hello</s>",
    "<unk>",
    "<pad><mask><bos><eos>",
    "[PAD] [EOS] [EOT] <EOT> _<EOT>",
    "<|endoftext|>",
    "<|eot_id|> <|end_of_text|> <|begin_of_text|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<fim_prefix><fim_suffix><fim_middle><fim_pad>",
    "<reponame>agentd<file_sep>main.rs",
    "<table><tr><td>cell</td></tr></table>",
    "<b>bold</b> <i>it</i> <s>strike</s> <code>x</code>",
    "<unused0> <unused99> <unused6241>",
    "<|im_end|>",
    "< |im_start| >",
    "<<|im_start|>>",
]

WHITESPACE_UNITS = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2003", "\u202f", "\x0b", "\x0c"]


def codepoint_sweep():
    """Strings of consecutive code points across Unicode blocks (letters vs. punctuation vs.
    numbers, which the BPE pre-tokenizers split on)."""
    blocks = [
        (0x00A0, 0x0100), (0x0100, 0x0180), (0x0250, 0x02B0), (0x02B0, 0x0300), (0x0300, 0x0370),
        (0x0370, 0x0400), (0x0400, 0x0460), (0x0530, 0x0590), (0x0590, 0x0600), (0x0600, 0x0660),
        (0x0660, 0x0700), (0x0900, 0x0980), (0x0980, 0x0A00), (0x0E00, 0x0E60), (0x10A0, 0x1100),
        (0x1100, 0x1160), (0x16A0, 0x1700), (0x1D00, 0x1D80), (0x1E00, 0x1E80), (0x2000, 0x2070),
        (0x2070, 0x20D0), (0x20D0, 0x2100), (0x2100, 0x2190), (0x2190, 0x2200), (0x2200, 0x2300),
        (0x2460, 0x2500), (0x2500, 0x2580), (0x2580, 0x2600), (0x2600, 0x2700), (0x2E80, 0x2F00),
        (0x3000, 0x3040), (0x3040, 0x30A0), (0x30A0, 0x3100), (0x3130, 0x3190), (0x31F0, 0x3300),
        (0x4E00, 0x4E80), (0xA000, 0xA080), (0xAC00, 0xAC80), (0xD7B0, 0xD800), (0xE000, 0xE040),
        (0xF900, 0xF980), (0xFB00, 0xFB50), (0xFE00, 0xFE70), (0xFF00, 0xFFF0), (0xFFF0, 0x10000),
        (0x10000, 0x10080), (0x10300, 0x10380), (0x1D400, 0x1D480), (0x1F000, 0x1F100),
        (0x1F300, 0x1F380), (0x1F600, 0x1F650), (0x1F900, 0x1F980), (0x20000, 0x20040),
        (0x2FFF0, 0x30010), (0xE0000, 0xE0080), (0xF0000, 0xF0010), (0x10FFF0, 0x110000),
    ]
    out = []
    for lo, hi in blocks:
        chars = [chr(c) for c in range(lo, hi) if not 0xD800 <= c < 0xE000]
        # Alone, between letters, and spaced: the pre-tokenizers treat each context differently.
        out.append("".join(chars))
        out.append("a".join(chars[:40]))
        out.append(" ".join(chars[:40]))
        out.append("1".join(chars[:20]) + "1")
    return out


def special_texts(path):
    """A sample of the file's control and user-defined token texts, read with gguf."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return []
    r = GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields.get("tokenizer.ggml.token_type")
    if types is None:
        return []
    types = types.contents()
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]
    rng = random.Random(len(special))
    sample = special[:40] + rng.sample(special, min(40, len(special)))
    return sample


def corpus(extra_specials, seed=1234):
    rng = random.Random(seed)
    strings = ["", " ", "  ", "\n", "a", " a", "a ", "\t", "\0", "a\0b\0\0c", "Hello", " Hello", "hello world"]
    strings += CODE + PROSE + EMOJI + LOOKALIKES
    # Digit runs.
    for n in range(1, 25):
        strings.append("".join(rng.choice("0123456789") for _ in range(n)))
    strings += ["3.14159", "1,000,000", "-42", "1e-9", "0x1F", "2024-01-31T12:00:00Z", "v1.2.3",
                "١٢٣٤٥", "१२३४५", "①②③", "Ⅻ", "x² ½", "+1 (555) 010-9999", "12345 67890 1 22 333"]
    # Whitespace runs.
    for _ in range(60):
        n = rng.randint(1, 40)
        ws = "".join(rng.choice(WHITESPACE_UNITS) for _ in range(n))
        word = rng.choice(["", "x", "word", "日本", "é"])
        strings.append(rng.choice([ws, word + ws, ws + word, word + ws + word]))
    for n in (31, 32, 33, 62, 100):
        strings += [" " * n, "\n" * n, "\t" * n, "a" + " " * n + "b"]
    strings += codepoint_sweep()
    strings += extra_specials
    strings += [s + "hello" for s in extra_specials[:20]] + ["hello " + s for s in extra_specials[:20]]
    # Mixtures.
    pools = [CODE, PROSE, EMOJI, LOOKALIKES, extra_specials or LOOKALIKES, WHITESPACE_UNITS]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(2, 6)):
            pool = rng.choice(pools)
            s = rng.choice(pool)
            if len(s) > 40:
                start = rng.randrange(len(s) - 20)
                s = s[start:start + rng.randint(5, 40)]
            parts.append(s)
        strings.append(rng.choice(["", " ", "\n", ""]).join(parts))
    # Fuzz: random strings over an alphabet of special-token pieces and whitespace, which
    # stresses the special-token partition and the merges around it.
    alphabet = ["<", ">", "|", "/", "\n", " ", "  ", "\t", "▁", "s", "im_start", "im_end",
                "start_of_turn", "end_of_turn", "0x", "41", "<|", "|>", "endoftext", "é", "🦀"]
    alphabet += extra_specials[:20]
    for _ in range(150):
        strings.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))))
    # Random code points from every plane (no surrogates, which UTF-8 cannot hold).
    for _ in range(100):
        cps = []
        while len(cps) < rng.randint(1, 20):
            c = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000), rng.randrange(0x110000)])
            if not 0xD800 <= c < 0xE000:
                cps.append(c)
        strings.append("".join(map(chr, cps)))
    # Long strings.
    strings.append(" ".join(PROSE) * 5)
    strings.append("".join(CODE) * 3)
    strings.append("a" * 5000)
    strings.append(" " * 5000)
    strings.append("ab " * 3000)
    return strings


def llama_cpp_ids(path, strings, add_bos, special):
    m = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return [m.tokenize(s.encode("utf-8"), add_bos=add_bos, special=special) for s in strings]


def agentd_ids(agentd, path, strings, add_bos, special):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(strings, f, ensure_ascii=False)
        name = f.name
    try:
        cmd = [agentd, "model", "tokenize", "--file", path, "--input", name]
        if special:
            cmd.append("--special")
        if add_bos:
            cmd.append("--bos")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out)
    finally:
        os.unlink(name)


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


FIXTURE_TEXTS = [
    "", "Hello", " Hello world", "hello world", "I'm sure they'll see. WE'RE DONE",
    CODE[0], CODE[2], PROSE[4], PROSE[5], PROSE[7], PROSE[9], EMOJI[2], EMOJI[3],
    "12345 3.14159 1,000,000", "a  b   c\t\td\n\n\ne \t \n  f    ",
]


def fixture_cases(path, specials):
    texts = FIXTURE_TEXTS + [LOOKALIKES[0], LOOKALIKES[1], LOOKALIKES[4], LOOKALIKES[8], LOOKALIKES[10],
                             LOOKALIKES[20], LOOKALIKES[24]]
    texts += [s + " after" for s in specials[:3]]
    cases = []
    for i, text in enumerate(texts):
        add_bos = i % 3 == 0
        # Look-alikes both ways; other texts one way, alternating.
        for special in (True, False) if text in LOOKALIKES else (i % 2 == 0,):
            cases.append({"text": text, "parse_special": special, "add_bos": add_bos})
    m = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    for c in cases:
        c["ids"] = m.tokenize(c["text"].encode("utf-8"), add_bos=c["add_bos"], special=c["parse_special"])
    return cases


def fixture_json(fixture):
    """The fixture as JSON with one case per line."""
    head = {k: v for k, v in fixture.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in fixture["cases"]]
    body = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    return body + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="GGUF file (repeatable)")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "target"))
    ap.add_argument("--agentd", default=os.path.join(target, "debug", "agentd"))
    ap.add_argument("--examples", type=int, default=5, help="mismatching examples shown per model")
    ap.add_argument("--write-fixtures", metavar="DIR")
    args = ap.parse_args()

    models = args.model or [os.path.join(MODELS_DIR, f) for f in DEFAULT_MODELS if os.path.exists(os.path.join(MODELS_DIR, f))]
    if not models:
        sys.exit(f"no model files: pass --model, or put them in {MODELS_DIR}")
    report = {"llama_cpp_python": llama_cpp.__version__, "agentd": args.agentd, "models": {}}
    total = 0
    written = set()
    for path in models:
        specials = special_texts(path)
        strings = corpus(specials)
        entry = {"strings": len(strings), "mismatches": {}, "examples": []}
        for mode, special, add_bos in MODES:
            want = llama_cpp_ids(path, strings, add_bos, special)
            got = agentd_ids(args.agentd, path, strings, add_bos, special)
            bad = [i for i, (w, g) in enumerate(zip(want, got)) if w != g]
            if len(want) != len(got):
                bad.append(-1)
            entry["mismatches"][mode] = len(bad)
            total += len(bad)
            for i in bad[: max(0, args.examples - len(entry["examples"]))]:
                if i < 0:
                    entry["examples"].append({"mode": mode, "error": f"{len(got)} results for {len(want)} strings"})
                    continue
                d = first_difference(want[i], got[i])
                entry["examples"].append({
                    "mode": mode, "text": strings[i][:300], "first_difference": d,
                    "llama_cpp": want[i][max(0, d - 3):d + 8], "agentd": got[i][max(0, d - 3):d + 8],
                })
        report["models"][os.path.basename(path)] = entry
        base = os.path.basename(path)
        name = DEFAULT_MODELS.get(base) or EXTRA_FIXTURES.get(base)
        if args.write_fixtures and name and name not in written:
            written.add(name)
            fixture = {
                "model": os.path.basename(path),
                "sha256": sha256(path),
                "llama_cpp_python": llama_cpp.__version__,
                "cases": fixture_cases(path, specials),
            }
            os.makedirs(args.write_fixtures, exist_ok=True)
            with open(os.path.join(args.write_fixtures, f"{name}.json"), "w", encoding="utf-8") as f:
                f.write(fixture_json(fixture))
    report["total_mismatches"] = total
    print(json.dumps(report, ensure_ascii=False, indent=2))
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
