//! Golden tests: the real default model's tokenizer against llama.cpp.
//!
//! The expected ids were produced by llama.cpp through llama-cpp-python 0.3.36 (pip, built from
//! source; its vendored llama.cpp), from the same GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf,
//! sha256 b179c952...), with:
//!
//! ```python
//! m = llama_cpp.Llama(model_path=PATH, vocab_only=True)
//! special = m.tokenize(text.encode(), add_bos=False, special=True)
//! plain = m.tokenize(text.encode(), add_bos=False, special=False)
//! ```
//!
//! `plain` is only written out where it differs from `special`.

use std::sync::OnceLock;

use super::GgufTokenizer;
use crate::model_files::ensure_default_model;

/// One string and what llama.cpp makes of it.
struct Golden {
    name: &'static str,
    text: &'static str,
    /// Ids with control tokens parsed (`special=True`).
    special: &'static [u32],
    /// Ids with control tokens as plain text (`special=False`), when different.
    plain: Option<&'static [u32]>,
}

const GOLDENS: &[Golden] = &[
    Golden {
        name: "accents",
        text: "Héllo wörld! Ça va? naïve café, señor Ångström",
        special: &[
            56, 2756, 31394, 267, 29989, 400, 17, 5549, 225, 81, 46316, 47, 15486, 46494, 37366,
            28, 427, 10214, 270, 5549, 223, 863, 1321, 45682,
        ],
        plain: None,
    },
    Golden {
        name: "cjk",
        text: "日本語のテキスト、中文字符。",
        special: &[
            23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100,
            226, 29917, 28589, 29184, 36518, 40562, 116, 19076,
        ],
        plain: None,
    },
    Golden {
        name: "korean",
        text: "안녕하세요, 세계!",
        special: &[
            183, 239, 226, 182, 223, 239, 33085, 242, 183, 222, 133, 183, 244, 238, 28, 18601, 222,
            133, 181, 128, 222, 17,
        ],
        plain: None,
    },
    Golden {
        name: "emoji_zwj",
        text: "Emoji: 😀👍🏽 family 👨\u{200d}👩\u{200d}👧\u{200d}👦 flag 🇫🇷!",
        special: &[
            10809, 33777, 42, 40303, 218, 10813, 235, 231, 10813, 233, 138, 1564, 15107, 235, 118,
            321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 321, 231, 10813, 235, 116, 7048,
            15107, 225, 121, 10813, 225, 132, 17,
        ],
        plain: None,
    },
    Golden {
        name: "rust_code",
        text: "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n",
        special: &[
            7853, 1085, 1000, 1662, 472, 1303, 1792, 42, 717, 1159, 44, 101, 35, 34, 46, 446,
            37024, 21653, 33, 28, 216, 34, 28, 216, 35, 26695, 472, 1628, 34115, 17, 45257, 42, 47,
            29394, 1792, 4258, 198, 109, 198,
        ],
        plain: None,
    },
    Golden {
        name: "python_code",
        text: "def f(a, b=2):\n\tif a > b:\n\t\treturn a  # comment\n    return b\n",
        special: &[
            1604, 275, 24, 81, 28, 278, 45, 34, 727, 198, 197, 342, 253, 2986, 278, 42, 3354, 197,
            5406, 253, 216, 907, 5189, 472, 1003, 278, 198,
        ],
        plain: None,
    },
    Golden {
        name: "digits",
        text: "12345 3.14159 1,000,000 x² ½",
        special: &[
            33, 34, 35, 36, 37, 216, 35, 30, 33, 36, 33, 37, 41, 216, 33, 28, 32, 32, 32, 28, 32,
            32, 32, 1792, 19133, 216, 16738,
        ],
        plain: None,
    },
    Golden {
        name: "whitespace_runs",
        text: "a  b   c\t\td\n\n\ne \t \n  f    ",
        special: &[
            81, 216, 278, 256, 265, 197, 197, 84, 1116, 198, 85, 216, 197, 3717, 216, 275, 289,
        ],
        plain: None,
    },
    Golden {
        name: "contractions",
        text: "I'm sure it's fine, they'll see. WE'RE DONE",
        special: &[
            57, 5248, 2090, 357, 506, 4979, 28, 502, 3060, 963, 30, 26587, 23, 3256, 422, 19832,
        ],
        plain: None,
    },
    Golden {
        name: "leading_space",
        text: "  hello",
        special: &[216, 33662],
        plain: None,
    },
    Golden {
        name: "empty",
        text: "",
        special: &[],
        plain: None,
    },
    Golden {
        name: "chatml",
        text: "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        special: &[1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198],
        plain: Some(&[
            44, 108, 306, 79, 3738, 108, 46, 4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46, 198,
            44, 108, 306, 79, 3738, 108, 46, 520, 9531, 198,
        ]),
    },
    Golden {
        name: "crlf_and_odd_spaces",
        text: "line one\r\nline\u{00a0}two\u{3000}three\u{2003}four\r\n\r\n",
        special: &[
            1311, 582, 201, 198, 1311, 15442, 11355, 12109, 218, 16347, 321, 221, 13996, 18682,
        ],
        plain: None,
    },
    Golden {
        name: "combining_marks",
        text: "e\u{0301}le\u{0300}ve cafe\u{0301} \u{1e9b}\u{0323}",
        special: &[
            85, 151, 219, 290, 151, 218, 307, 1020, 4565, 151, 219, 15822, 135, 245, 151, 113,
        ],
        plain: None,
    },
    Golden {
        name: "mixed_digits_letters",
        text: "abc123def 0x1F 2024-01-31 v1.2.3 \u{0663}\u{0664}\u{0665}",
        special: &[
            25276, 33, 34, 35, 1604, 216, 32, 104, 33, 54, 216, 34, 32, 34, 36, 29, 32, 33, 29, 35,
            33, 386, 33, 30, 34, 30, 35, 216, 164, 113, 164, 114, 164, 115,
        ],
        plain: None,
    },
    Golden {
        name: "specials_inside_text",
        text: "x<|im_start|>y <|endoftext|><|im_start|<|im_end|>z",
        special: &[104, 1, 105, 216, 0, 44, 108, 306, 79, 3738, 108, 2, 106],
        plain: Some(&[
            104, 44, 108, 306, 79, 3738, 108, 46, 105, 2067, 108, 486, 1714, 2692, 108, 21198, 108,
            306, 79, 3738, 108, 44, 108, 306, 79, 486, 108, 46, 106,
        ]),
    },
];

/// The default model's tokenizer, built once for all tests in this file.
fn smollm2() -> &'static GgufTokenizer {
    static TOKENIZER: OnceLock<GgufTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = ensure_default_model(&mut |line| eprintln!("{line}")).expect("default model");
        let mut file = std::fs::File::open(&path).expect("open model");
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut file).expect("read GGUF");
        GgufTokenizer::from_metadata(&content.metadata).expect("tokenizer")
    })
}

/// Checks one golden: both encodings, and that decoding gives the text back.
fn check(golden: &Golden) {
    let tok = smollm2();
    let name = golden.name;
    let special = tok.encode(golden.text, true).expect("encode");
    assert_eq!(special, golden.special, "{name}: parse_special = true");
    let plain = tok.encode(golden.text, false).expect("encode");
    assert_eq!(
        plain,
        golden.plain.unwrap_or(golden.special),
        "{name}: parse_special = false"
    );
    assert_eq!(
        tok.decode(&special, false).expect("decode"),
        golden.text,
        "{name}: decode"
    );
    assert_eq!(
        tok.decode(&plain, false).expect("decode"),
        golden.text,
        "{name}: decode plain"
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    for golden in GOLDENS {
        check(golden);
    }
}

#[test]
fn smollm2_special_ids() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), 2);
    assert!(!tok.add_bos_token());
    assert_eq!(tok.token_text(1), Some("<|im_start|>"));
    assert_eq!(tok.token_text(2), Some("<|im_end|>"));
    // EOS is <|im_end|>; <|endoftext|> (id 0) and <reponame> (id 4, which llama.cpp takes as
    // the FIM repository token) also end generation: llama.cpp's end-of-generation set.
    assert_eq!(tok.stop_token_ids(), [2, 0, 4]);
    assert!(tok.is_control(0) && tok.is_control(16) && !tok.is_control(17));
    let chatml = tok
        .encode("<|im_start|>user\nhi<|im_end|>", true)
        .expect("encode");
    assert_eq!(tok.decode(&chatml, true).expect("decode"), "user\nhi");
}
