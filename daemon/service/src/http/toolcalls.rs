//! The model's Hermes tool calls (`<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`,
//! as the daemon's tool-call constraint produces them) turned into OpenAI's pieces as the text
//! streams: content, then for each call a start (index, id, name) and its arguments in pieces.
//!
//! The arguments are streamed as the model writes them, held back by one character (which may
//! be the call's closing `}`) until the end of the call is seen; a JSON string never holds a
//! raw newline, so the first newline after the arguments ends them. What was streamed is always
//! a prefix of the final arguments text, and the final text is exactly what the model wrote
//! (valid JSON: the constraint made it so).

use agentd_wire::hermes::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

/// One piece of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text for `message.content`.
    Content(String),
    /// Call `index` starts: its id and the function's name.
    CallStart {
        /// The call's position in the reply, from 0.
        index: usize,
        /// `call_…`, unique.
        id: String,
        /// The function.
        name: String,
    },
    /// More of call `index`'s arguments text.
    CallArgs {
        /// The call's position.
        index: usize,
        /// The next piece of the JSON text.
        text: String,
    },
}

/// A finished call, for a reply assembled whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `call_…`.
    pub id: String,
    /// The function.
    pub name: String,
    /// The arguments, as the JSON text the model wrote.
    pub arguments: String,
}

#[derive(Debug)]
enum State {
    /// Outside a call; `pending` may be the start of `<tool_call>`.
    Text { pending: String },
    /// Inside a call, after `<tool_call>`: the body so far.
    Call {
        body: String,
        /// Set once the name is known and the start was emitted: the call's id, where the
        /// arguments begin in `body`, and how many of their bytes were emitted.
        args: Option<(String, usize, usize)>,
    },
    /// After a call's closing tag: a newline there is the format's, not content.
    AfterCall,
}

/// Splits a streamed reply into [`Piece`]s.
#[derive(Debug)]
pub struct ToolCallParser {
    state: State,
    calls: Vec<Call>,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ToolCallParser {
    /// A parser at the start of a reply.
    pub fn new() -> Self {
        Self {
            state: State::Text {
                pending: String::new(),
            },
            calls: Vec::new(),
        }
    }

    /// The calls finished so far.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// Takes the next text of the reply; returns the pieces that became certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut input = text.to_owned();
        // Each round consumes `input` or changes state; a state change moves what is left on.
        while !input.is_empty() {
            input = match &mut self.state {
                State::AfterCall => {
                    let rest = input.strip_prefix('\n').unwrap_or(&input).to_owned();
                    self.state = State::Text {
                        pending: String::new(),
                    };
                    rest
                }
                State::Text { pending } => {
                    pending.push_str(&input);
                    let buf = std::mem::take(pending);
                    match buf.find(TOOL_CALL_OPEN) {
                        Some(i) => {
                            push_content(&mut out, &buf[..i]);
                            self.state = State::Call {
                                body: String::new(),
                                args: None,
                            };
                            buf[i + TOOL_CALL_OPEN.len()..].to_owned()
                        }
                        None => {
                            // Keep back a tail that may still become `<tool_call>`.
                            let keep = partial_suffix(&buf, TOOL_CALL_OPEN);
                            push_content(&mut out, &buf[..buf.len() - keep]);
                            *pending = buf[buf.len() - keep..].to_owned();
                            String::new()
                        }
                    }
                }
                State::Call { body, args } => {
                    body.push_str(&input);
                    let index = self.calls.len();
                    let close = format!("\n{TOOL_CALL_CLOSE}");
                    if args.is_none() {
                        if let Some((name, start)) = name_and_args_start(body) {
                            let id = call_id();
                            out.push(Piece::CallStart {
                                index,
                                id: id.clone(),
                                name,
                            });
                            *args = Some((id, start, 0));
                        }
                    }
                    if let Some(end) = body.find(&close) {
                        let rest = body[end + close.len()..].to_owned();
                        match finish_call(body[..end].trim()) {
                            Some((name, arguments)) => {
                                let (id, sent) = match args.take() {
                                    Some((id, _, sent)) => (id, sent),
                                    None => {
                                        let id = call_id();
                                        out.push(Piece::CallStart {
                                            index,
                                            id: id.clone(),
                                            name: name.clone(),
                                        });
                                        (id, 0)
                                    }
                                };
                                if let Some(more) = arguments.get(sent..).filter(|m| !m.is_empty())
                                {
                                    out.push(Piece::CallArgs {
                                        index,
                                        text: more.to_owned(),
                                    });
                                }
                                self.calls.push(Call {
                                    id,
                                    name,
                                    arguments,
                                });
                            }
                            // Not a call after all (only possible without the constraint):
                            // the text is content.
                            None => push_content(
                                &mut out,
                                &format!("{TOOL_CALL_OPEN}{}{close}", &body[..end]),
                            ),
                        }
                        self.state = State::AfterCall;
                        rest
                    } else {
                        if let Some((_, start, sent)) = args {
                            // Everything before the first newline, less one character (the
                            // call's closing brace may be it), is arguments text.
                            let tail = &body[*start..];
                            let avail = tail.find('\n').unwrap_or(tail.len());
                            let mut upto = avail.saturating_sub(1);
                            while !tail.is_char_boundary(upto) {
                                upto -= 1;
                            }
                            if upto > *sent {
                                out.push(Piece::CallArgs {
                                    index,
                                    text: tail[*sent..upto].to_owned(),
                                });
                                *sent = upto;
                            }
                        }
                        String::new()
                    }
                }
            };
        }
        out
    }

    /// The reply ended: what was held back. A call cut off (by `max_tokens`) is kept with the
    /// arguments written so far (not whole JSON); one cut off before its name, or a tag cut
    /// off, is dropped.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.state, State::AfterCall) {
            // The tool-call constraint allows `<` only as the start of a call: a held-back
            // tail is an unfinished tag, and a call cut off before its name is no call. Neither
            // is content.
            State::Text { pending } => {
                if !pending.starts_with('<') {
                    push_content(&mut out, &pending)
                }
            }
            State::Call { args: None, .. } => {}
            State::Call {
                body,
                args: Some((id, start, sent)),
            } => {
                let tail = &body[start..];
                let tail = tail[..tail.find('\n').unwrap_or(tail.len())].trim_end();
                // The held-back character is the call's closing brace when what precedes it
                // is whole JSON; otherwise it is part of the (cut-off) arguments.
                let arguments = match tail.strip_suffix('}') {
                    Some(inner) if serde_json::from_str::<serde_json::Value>(inner).is_ok() => {
                        inner
                    }
                    _ => tail,
                };
                if let Some(more) = arguments.get(sent..).filter(|m| !m.is_empty()) {
                    out.push(Piece::CallArgs {
                        index: self.calls.len(),
                        text: more.to_owned(),
                    });
                }
                let name = name_and_args_start(&body)
                    .map(|(n, _)| n)
                    .unwrap_or_default();
                self.calls.push(Call {
                    id,
                    name,
                    arguments: arguments.to_owned(),
                });
            }
            State::AfterCall => {}
        }
        out
    }
}

fn push_content(out: &mut Vec<Piece>, text: &str) {
    if !text.is_empty() {
        out.push(Piece::Content(text.to_owned()));
    }
}

/// How many bytes at the end of `buf` are a proper prefix of `tag`.
fn partial_suffix(buf: &str, tag: &str) -> usize {
    (1..tag.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf.is_char_boundary(buf.len() - n) && tag.starts_with(&buf[buf.len() - n..]))
        .unwrap_or(0)
}

/// The function name and where the arguments start, once the body reads
/// `{"name": "NAME", "arguments": ` (whitespace as the model wrote it).
fn name_and_args_start(body: &str) -> Option<(String, usize)> {
    let s = body.trim_start().strip_prefix('{')?.trim_start();
    let s = s.strip_prefix("\"name\"")?.trim_start();
    let s = s.strip_prefix(':')?.trim_start();
    // The name as a JSON string: find its closing quote.
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => break,
            _ => i += 1,
        }
    }
    if i >= bytes.len() {
        return None;
    }
    let name: String = serde_json::from_str(&s[..=i]).ok()?;
    let rest = s[i + 1..].trim_start();
    let rest = rest.strip_prefix(',')?.trim_start();
    let rest = rest.strip_prefix("\"arguments\"")?.trim_start();
    let rest = rest.strip_prefix(':')?;
    let rest_trim = rest.trim_start();
    if rest_trim.is_empty() {
        return None; // Wait for the arguments' first character.
    }
    Some((name, body.len() - rest_trim.len()))
}

/// A whole call's name and arguments text, if `json` is `{"name": string, "arguments": …}`.
fn finish_call(json: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    v.get("arguments")?;
    // The arguments text as written: after `"arguments":`, less the object's closing brace.
    let arguments = match name_and_args_start(json) {
        Some((_, start)) => {
            let tail = json[start..].trim_end();
            let inner = tail.strip_suffix('}')?.trim_end();
            if serde_json::from_str::<serde_json::Value>(inner).is_ok() {
                inner.to_owned()
            } else {
                v["arguments"].to_string()
            }
        }
        // Keys in another order: the arguments re-serialised.
        None => v["arguments"].to_string(),
    };
    Some((name, arguments))
}

/// A fresh call id: `call_` and 24 random alphanumerics.
pub fn call_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..24)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("call_{s}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Content, and calls as (name, arguments), from pieces.
    fn assemble(pieces: &[Piece]) -> (String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for p in pieces {
            match p {
                Piece::Content(t) => content.push_str(t),
                Piece::CallStart { index, id, name } => {
                    assert_eq!(*index, calls.len(), "calls start in order");
                    calls.push((id.clone(), name.clone(), String::new()));
                }
                Piece::CallArgs { index, text } => calls[*index].2.push_str(text),
            }
        }
        (content, calls)
    }

    const REPLY: &str = "Let me look.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Z\\u00fcrich {x}\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {}}\n</tool_call>\n";

    fn run(chunks: &[&str]) -> (Vec<Piece>, Vec<Call>) {
        let mut p = ToolCallParser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c));
        }
        out.extend(p.finish());
        (out, p.calls().to_vec())
    }

    #[test]
    fn a_reply_in_one_piece_gives_content_and_calls_with_the_written_arguments() {
        let (pieces, calls) = run(&[REPLY]);
        let (content, streamed) = assemble(&pieces);
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(
            calls[0].arguments,
            "{\"city\": \"Z\\u00fcrich {x}\", \"days\": [1, 2]}"
        );
        assert_eq!(
            (calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("add", "{}")
        );
        for (c, s) in calls.iter().zip(&streamed) {
            assert_eq!((&c.id, &c.name, &c.arguments), (&s.0, &s.1, &s.2));
            assert!(c.id.starts_with("call_") && c.id.len() == 29);
        }
    }

    #[test]
    fn text_without_calls_and_a_lone_angle_bracket_are_content() {
        let (pieces, calls) = run(&["a < b", " and <tool", "_ca", "x> done"]);
        assert!(calls.is_empty());
        assert_eq!(assemble(&pieces).0, "a < b and <tool_cax> done");
        let (pieces, _) = run(&["a <", "b"]);
        assert_eq!(assemble(&pieces).0, "a <b");
        // A call that never parses (no constraint) is content.
        let (pieces, calls) = run(&["<tool_call>\nnot json\n</tool_call>\nok"]);
        assert!(calls.is_empty());
        assert_eq!(assemble(&pieces).0, "<tool_call>\nnot json\n</tool_call>ok");
    }

    #[test]
    fn a_call_cut_off_keeps_its_streamed_start() {
        let (pieces, calls) = run(&["<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1"]);
        let (content, streamed) = assemble(&pieces);
        assert_eq!(content, "");
        assert_eq!(
            (streamed[0].1.as_str(), streamed[0].2.as_str()),
            ("f", "{\"a\": 1")
        );
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("f", "{\"a\": 1")
        );
        // Cut off right after the call's own closing brace: that brace is not arguments.
        let (pieces, calls) = run(&["<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": {}}}"]);
        assert_eq!(assemble(&pieces).1[0].2, "{\"a\": {}}");
        assert_eq!(calls[0].arguments, "{\"a\": {}}");
        // Cut off before the name, or inside the tag: neither content nor a call.
        for cut in ["Hi <tool_call>\n{\"na", "Hi <tool_"] {
            let (pieces, calls) = run(&[cut]);
            assert_eq!(assemble(&pieces).0, "Hi ");
            assert!(calls.is_empty());
        }
    }

    proptest! {
        /// However the reply is cut into pieces, the assembled content and calls are the same,
        /// and the arguments stream is the final arguments text.
        #[test]
        fn any_chunking_gives_the_same_reply(cuts in proptest::collection::vec(0usize..REPLY.len(), 0..40)) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| REPLY.is_char_boundary(c)).collect();
            cuts.sort();
            cuts.dedup();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts {
                chunks.push(&REPLY[last..c]);
                last = c;
            }
            chunks.push(&REPLY[last..]);
            let (pieces, calls) = run(&chunks);
            let (content, streamed) = assemble(&pieces);
            prop_assert_eq!(content, "Let me look.");
            prop_assert_eq!(calls.len(), 2);
            for (c, s) in calls.iter().zip(&streamed) {
                prop_assert_eq!((&c.id, &c.name, &c.arguments), (&s.0, &s.1, &s.2));
            }
            prop_assert_eq!(&calls[1].arguments, "{}");
        }
    }
}
