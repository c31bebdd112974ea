//! Special tokens: each token's attributes (llama.cpp's `llama_token_attr`, with the
//! adjustments llama.cpp makes after loading), the end-of-generation set, and the partition of
//! text into raw fragments and special tokens written in it (`tokenizer_st_partition`).
//!
//! **Architecture Invariant:** the partition gives exactly llama.cpp's fragments. llama.cpp
//! takes the special tokens longest first and, for each, splits every raw fragment at the
//! token's leftmost non-overlapping occurrences; a longer token therefore wins over a shorter
//! one anywhere in the text, not only where they start together (which is what the usual
//! leftmost-longest matching would give). That walk costs tokens × fragments; here one
//! Aho-Corasick pass finds which special tokens occur at all, and only those are searched for
//! (with `memmem`), in the same order, skipping what earlier tokens claimed. Tokens of equal
//! length keep their id order (llama.cpp's `std::sort` leaves that order unspecified; it only
//! matters for two overlapping special tokens of the same length).

use std::collections::{BTreeMap, BTreeSet};

use aho_corasick::automaton::Automaton;
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, MatchKind};

use super::{Result, TokenizerError};

/// Token attribute bits, as llama.cpp's `llama_token_attr`.
pub(super) mod attr {
    /// `<unk>`-like: matched in text only with special parsing, printed only when asked.
    pub const UNKNOWN: u16 = 1 << 0;
    /// Padding and reserved slots: never matched in text, printed as nothing.
    pub const UNUSED: u16 = 1 << 1;
    /// Ordinary text.
    pub const NORMAL: u16 = 1 << 2;
    /// Control tokens (`<|im_start|>`, `<start_of_turn>`): matched in text only with special
    /// parsing, printed only when asked.
    pub const CONTROL: u16 = 1 << 3;
    /// Matched as a whole piece wherever it is written, with or without special parsing.
    pub const USER_DEFINED: u16 = 1 << 4;
    /// A byte-fallback token (`<0x41>`).
    pub const BYTE: u16 = 1 << 5;
    /// Whitespace to the token's left is dropped when it is matched in text.
    pub const LSTRIP: u16 = 1 << 7;
    /// Whitespace to the token's right is dropped when it is matched in text.
    pub const RSTRIP: u16 = 1 << 8;
}

/// A GGUF `tokenizer.ggml.token_type` value as attribute bits (llama.cpp's `llama_vocab::load`).
pub(super) fn attr_from_type(token_type: i32) -> u16 {
    match token_type {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        // 0 (undefined) and anything else: no attribute, so never matched and printed as
        // nothing, as in llama.cpp.
        _ => 0,
    }
}

/// Texts that llama.cpp takes as an end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
/// Texts of the fill-in-the-middle tokens llama.cpp detects (and makes control tokens):
/// prefix, suffix, middle, pad, repository, file separator.
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts that end generation wherever they are in the vocabulary (llama.cpp's EOG list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// Tokens llama.cpp always makes user-defined (gpt-oss renders them).
const ALWAYS_USER_DEFINED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// Special token ids named in the metadata, each `None` when its key is absent.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct NamedIds {
    /// `tokenizer.ggml.eos_token_id` (or the model's default).
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom: Option<u32>,
    /// `tokenizer.ggml.fim_pre_token_id` (or the older `prefix_token_id`).
    pub fim_pre: Option<u32>,
    /// `tokenizer.ggml.fim_suf_token_id` (or the older `suffix_token_id`).
    pub fim_suf: Option<u32>,
    /// `tokenizer.ggml.fim_mid_token_id` (or the older `middle_token_id`).
    pub fim_mid: Option<u32>,
    /// `tokenizer.ggml.fim_pad_token_id`.
    pub fim_pad: Option<u32>,
    /// `tokenizer.ggml.fim_rep_token_id`.
    pub fim_rep: Option<u32>,
    /// `tokenizer.ggml.fim_sep_token_id`.
    pub fim_sep: Option<u32>,
}

/// What llama.cpp does to the token attributes after reading them, and the end-of-generation
/// ids it derives (`llama_vocab::impl::load`, "special tokens" and after): end-of-turn, FIM and
/// end-of-generation tokens found by their text become control tokens; the gpt-oss channel
/// tokens become user-defined; and for models named Phi-3 special tokens drop the whitespace
/// after them. Returns the end-of-generation ids, ascending.
///
/// Where llama.cpp picks one of several tokens found by text (its hash map's iteration order
/// decides), all of them are taken: a vocabulary with two FIM-pad tokens gets both as stop
/// tokens.
pub(super) fn adjust_attrs(
    tokens: &[String],
    attrs: &mut [u16],
    named: NamedIds,
    model_name: &str,
) -> Vec<u32> {
    let ids_with = |texts: &[&str]| -> Vec<u32> {
        tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| texts.contains(&t.as_str()))
            .filter_map(|(id, _)| u32::try_from(id).ok())
            .collect()
    };
    let make_control = |attrs: &mut [u16], ids: &[u32]| {
        for &id in ids {
            attrs[id as usize] |= attr::CONTROL;
        }
    };
    let detect = |attrs: &mut [u16], named: Option<u32>, texts: &[&str]| -> Vec<u32> {
        match named {
            Some(id) => vec![id],
            None => {
                let found = ids_with(texts);
                make_control(attrs, &found);
                found
            }
        }
    };
    let eot = detect(attrs, named.eot, EOT_TEXTS);
    let eom = detect(attrs, named.eom, &["<|eom_id|>"]);
    detect(attrs, named.fim_pre, FIM_PRE_TEXTS);
    detect(attrs, named.fim_suf, FIM_SUF_TEXTS);
    detect(attrs, named.fim_mid, FIM_MID_TEXTS);
    let fim_pad = detect(attrs, named.fim_pad, FIM_PAD_TEXTS);
    let fim_rep = detect(attrs, named.fim_rep, FIM_REP_TEXTS);
    let fim_sep = detect(attrs, named.fim_sep, FIM_SEP_TEXTS);

    let mut eog: BTreeSet<u32> = fim_pad.into_iter().chain(fim_rep).chain(fim_sep).collect();
    let by_text = ids_with(EOG_TEXTS);
    make_control(attrs, &by_text);
    eog.extend(by_text);
    for id in ids_with(ALWAYS_USER_DEFINED) {
        attrs[id as usize] = attr::USER_DEFINED;
    }
    eog.extend(named.eos);
    eog.extend(eot);
    eog.extend(eom);

    // gpt-oss and solar-open end a message with <|end|> without ending the generation.
    let text_of = |id: u32| tokens[id as usize].as_str();
    let has = |eog: &BTreeSet<u32>, text: &str| eog.iter().any(|&id| text_of(id) == text);
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>") && has(&eog, "<|end|>"))
        || ((has(&eog, "<|call|>") || has(&eog, "<|calls|>"))
            && has(&eog, "<|flush|>")
            && has(&eog, "<|end|>"))
    {
        let ends: Vec<u32> = eog
            .iter()
            .copied()
            .filter(|&id| text_of(id) == "<|end|>")
            .collect();
        for id in ends {
            eog.remove(&id);
            attrs[id as usize] = attr::USER_DEFINED;
        }
    }
    // Gemma 4 and PLaMo have an ordinary </s>.
    if has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>") {
        let ends: Vec<u32> = eog
            .iter()
            .copied()
            .filter(|&id| text_of(id) == "</s>")
            .collect();
        for id in ends {
            eog.remove(&id);
            attrs[id as usize] = attr::NORMAL;
        }
    }

    let name = model_name.to_ascii_lowercase();
    if name.contains("phi-3") || name.contains("phi3") {
        for a in attrs.iter_mut() {
            if *a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0 {
                *a |= attr::RSTRIP;
            }
        }
        for id in ids_with(&["</s>"]) {
            attrs[id as usize] |= attr::RSTRIP;
        }
        for id in ids_with(&["<unk>", "<s>", "<|endoftext|>"]) {
            attrs[id as usize] &= !attr::RSTRIP;
        }
    }
    eog.into_iter().collect()
}

/// One piece of a partitioned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fragment<'a> {
    /// Text to run through the tokenizer's model.
    Text(&'a str),
    /// A special token written in the text.
    Token(u32),
}

/// The special tokens of a vocabulary (control, user-defined and unknown ones), ready to be
/// found in text.
#[derive(Debug, Clone)]
pub(super) struct SpecialMatcher {
    /// Token ids in llama.cpp's order: longest text first, then by id.
    order: Vec<u32>,
    /// Finds all of them at once; pattern `i` is `order[i]`.
    automaton: Option<NFA>,
}

impl SpecialMatcher {
    /// The matcher for the tokens whose attributes make them special.
    pub(super) fn new(tokens: &[String], attrs: &[u16]) -> Result<Self> {
        let mut order: Vec<u32> = (0..tokens.len())
            .filter(|&id| attrs[id] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            .filter_map(|id| u32::try_from(id).ok())
            .collect();
        // A stable sort: equal lengths keep id order.
        order.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));
        let automaton = if order.is_empty() {
            None
        } else {
            let patterns = order.iter().map(|&id| tokens[id as usize].as_bytes());
            let nfa = NFA::builder()
                .match_kind(MatchKind::Standard)
                .build(patterns)
                .map_err(|e| TokenizerError::Special(e.to_string()))?;
            Some(nfa)
        };
        Ok(Self { order, automaton })
    }

    /// Splits `text` into raw fragments and special tokens as llama.cpp does. Control and
    /// unknown tokens are only recognised with `parse_special`; user-defined ones always.
    pub(super) fn partition<'a>(
        &self,
        text: &'a str,
        parse_special: bool,
        tokens: &[String],
        attrs: &[u16],
    ) -> Vec<Fragment<'a>> {
        let occurring = self.occurring(text.as_bytes());
        // Claimed byte ranges: start -> (end, token); a stripped range has no token.
        let mut claimed: BTreeMap<usize, (usize, Option<u32>)> = BTreeMap::new();
        let bytes = text.as_bytes();
        for index in occurring {
            let id = self.order[index];
            let a = attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = tokens[id as usize].as_bytes();
            let finder = memchr::memmem::Finder::new(needle);
            let mut pos = 0;
            while let Some(found) = finder.find(&bytes[pos..]) {
                let start = pos + found;
                let end = start + needle.len();
                // The nearest claimed range starting before this match's end: if it reaches
                // past the match's start, every match starting before its end overlaps it.
                if let Some((_, &(c_end, _))) = claimed.range(..end).next_back() {
                    if c_end > start {
                        pos = c_end;
                        continue;
                    }
                }
                let prev_end = claimed
                    .range(..start)
                    .next_back()
                    .map_or(0, |(_, &(e, _))| e);
                let next_start = claimed.range(end..).next().map_or(bytes.len(), |(&s, _)| s);
                claimed.insert(start, (end, Some(id)));
                if a & attr::LSTRIP != 0 {
                    let mut s = start;
                    while s > prev_end && is_c_space(bytes[s - 1]) {
                        s -= 1;
                    }
                    if s < start {
                        claimed.insert(s, (start, None));
                    }
                }
                pos = end;
                if a & attr::RSTRIP != 0 {
                    let mut e = end;
                    while e < next_start && is_c_space(bytes[e]) {
                        e += 1;
                    }
                    if e > end {
                        claimed.insert(end, (e, None));
                    }
                    pos = e;
                }
            }
        }
        let mut fragments = Vec::with_capacity(2 * claimed.len() + 1);
        let mut at = 0;
        for (start, (end, id)) in claimed {
            if start > at {
                fragments.extend(text.get(at..start).map(Fragment::Text));
            }
            fragments.extend(id.map(Fragment::Token));
            at = end;
        }
        if at < text.len() {
            fragments.extend(text.get(at..).map(Fragment::Text));
        }
        fragments
    }

    /// Indices into `order` of the special tokens that occur in `bytes`, ascending: one pass of
    /// the automaton, noting the match states it enters (each holds every pattern that ends
    /// there, overlapping ones included).
    fn occurring(&self, bytes: &[u8]) -> Vec<usize> {
        let Some(nfa) = &self.automaton else {
            return Vec::new();
        };
        let Ok(mut sid) = nfa.start_state(Anchored::No) else {
            return Vec::new();
        };
        let mut seen = std::collections::HashSet::new();
        let mut last = None;
        for &b in bytes {
            sid = nfa.next_state(Anchored::No, sid, b);
            if nfa.is_match(sid) && last != Some(sid) {
                seen.insert(sid);
                last = Some(sid);
            }
        }
        let mut found: Vec<usize> = seen
            .into_iter()
            .flat_map(|sid| (0..nfa.match_len(sid)).map(move |i| nfa.match_pattern(sid, i)))
            .map(|pid| pid.as_usize())
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}

/// C's `isspace` in the "C" locale, which llama.cpp's strip uses.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}
