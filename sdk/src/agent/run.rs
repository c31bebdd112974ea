//! One run of the tool loop on a session: generate, run the calls, append their results, and
//! compact the log (mask old results, summarise older turns) whenever the next step would not
//! fit the context budget.

use super::context::{ContextLog, Part, MIN_RESULT_TOKENS};
use super::{hermes, AgentEvent, Compaction, CompactionKind, Inner, RunOutput, Setup, ToolChoice};
use crate::client::{Event, GenerateOptions, Session};
use crate::{Error, FinishReason, Message, Usage};
use tokio_stream::StreamExt;

/// What a masked result says instead of the output.
const MASKED: &str = "[output elided to save context; call the tool again if it is needed]";
/// Tokens a masked result takes, at most (stub, name, markup): results no longer are left.
const MASKED_TOKENS: u32 = 48;
/// Tokens of markup around one appended message, at most (ChatML needs 5).
const MESSAGE_MARKUP: u32 = 8;
/// Tokens the summarisation request adds, at most.
const SUMMARY_REQUEST_TOKENS: u32 = 96;
/// What the model is asked when older turns are summarised.
const SUMMARY_REQUEST: &str = "Summarise the conversation so far for your own later use: the \
     request, what each tool call returned (keep exact names, numbers and facts) and what is \
     left to do. Plain text, brief.";
/// Summaries are plain text: no markup that could open a call.
const SUMMARY_GRAMMAR: &str = "start: TEXT?\nTEXT: /[^<]+/\n";

/// The state of one run.
pub(super) struct Run<'a> {
    pub(super) agent: &'a Inner,
    pub(super) setup: &'a Setup,
    pub(super) session: &'a Session,
    pub(super) input: &'a str,
    pub(super) emit: &'a (dyn Fn(AgentEvent) + Send + Sync),
    log: ContextLog,
    budget: u32,
    out: RunOutput,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        agent: &'a Inner,
        setup: &'a Setup,
        session: &'a Session,
        input: &'a str,
        emit: &'a (dyn Fn(AgentEvent) + Send + Sync),
    ) -> Self {
        let budget = agent
            .context
            .budget
            .map_or(setup.context, |b| b.min(setup.context));
        Self {
            agent,
            setup,
            session,
            input,
            emit,
            log: ContextLog::new(0),
            budget,
            out: RunOutput {
                answer: String::new(),
                transcript: vec![Message::user(input)],
                usages: Vec::new(),
                compactions: Vec::new(),
                finished: false,
            },
        }
    }

    /// The tokens a reply may take.
    fn reserve(&self) -> u32 {
        self.agent.options.token_limit()
    }

    /// Runs the loop to a reply without calls or the turn budget.
    pub(super) async fn run(mut self) -> Result<RunOutput, Error> {
        let (tokens, _) = self.session.tokens().await?;
        let len = tokens.len() as u32;
        // Only a session that starts with the agent's prefix has a known shape before this run;
        // otherwise what it holds is left as it is.
        let floor = if tokens.starts_with(&self.setup.prefix_tokens) {
            self.setup.prefix_tokens.len() as u32
        } else {
            len
        };
        self.log = ContextLog::new(floor);
        self.log.push(Part::History, len);
        let input_tokens = self.count(self.input).await? + MESSAGE_MARKUP;
        self.ensure_room(input_tokens + self.open_len() + self.reserve())
            .await?;
        let n = self
            .session
            .append_messages(&[Message::user(self.input)], true)
            .await?;
        self.log.push(Part::Input, n);
        let specs: Vec<(String, serde_json::Value)> = self
            .agent
            .tools
            .iter()
            .map(|t| (t.name().to_owned(), t.parameters()))
            .collect();
        for turn in 0..self.agent.max_turns {
            self.ensure_room(self.reserve()).await?;
            let required = match self.agent.tool_choice {
                ToolChoice::Auto => false,
                ToolChoice::RequiredFirst => turn == 0,
                ToolChoice::Always => true,
            };
            let opts = if specs.is_empty() || !self.agent.constrained {
                self.agent.options.clone()
            } else {
                self.agent
                    .options
                    .clone()
                    .tool_calls(&specs, required)
                    .max_tool_calls(self.agent.max_calls)
            };
            let (reply, usage, end) = self.generate(&opts).await?;
            (self.emit)(AgentEvent::TurnFinished(usage.clone()));
            let cut_off = usage.finish == FinishReason::MaxTokens;
            self.out.usages.push(usage);
            self.out.transcript.push(Message::assistant(reply.clone()));
            let (mut calls, text) = hermes::parse_calls(&reply);
            let unfinished = calls.is_empty() && reply.contains("<tool_call");
            self.out.answer = text;
            if calls.is_empty() && !unfinished {
                self.log.push(Part::Reply { calls: 0 }, end);
                self.out.finished = true;
                return Ok(self.out);
            }
            let texts = if unfinished {
                // The model opened a call and did not finish it: say so, as a tool's error,
                // and let it try again.
                calls.push(hermes::ToolCall {
                    name: "tool_call".into(),
                    arguments: serde_json::Value::Null,
                });
                vec![if cut_off {
                    format!(
                        "error: the call was cut off after {} tokens; make one short call",
                        self.reserve()
                    )
                } else {
                    "error: the call is not valid JSON; make one call as the format says".into()
                }]
            } else {
                super::call_tools(self.agent, &calls, self.emit).await
            };
            self.log.push(Part::Reply { calls: calls.len() }, end);
            self.out.transcript.extend(
                calls
                    .iter()
                    .zip(&texts)
                    .map(|(c, t)| Message::tool(hermes::tool_response(&c.name, t))),
            );
            let (results, tokens) = self.fit_results(&calls, &texts).await?;
            self.ensure_room(tokens + self.open_len() + self.reserve())
                .await?;
            let n = self.session.append_messages(&results, true).await?;
            self.log.push(
                Part::Results {
                    names: calls.iter().map(|c| c.name.clone()).collect(),
                    masked: false,
                },
                n,
            );
        }
        Ok(self.out)
    }

    fn open_len(&self) -> u32 {
        self.setup.open_turn.len() as u32
    }

    async fn count(&self, text: &str) -> Result<u32, Error> {
        let client = self.session.client();
        Ok(client.tokenize(text, false).await?.len() as u32)
    }

    /// One generation, its turn closed with the template's end of turn; returns the reply,
    /// its usage and the log's length after it.
    async fn generate(&mut self, opts: &GenerateOptions) -> Result<(String, Usage, u32), Error> {
        let mut stream = self.session.generate(opts).await?;
        let (mut reply, mut usage, mut last, mut count) = (String::new(), None, None, 0u32);
        while let Some(ev) = stream.next().await {
            match ev? {
                Event::Token { id, text } => {
                    if !text.is_empty() {
                        (self.emit)(AgentEvent::Text(text.clone()));
                    }
                    reply.push_str(&text);
                    last = Some(id);
                    count += 1;
                }
                Event::Done(u) => usage = Some(u),
            }
        }
        let usage = usage.ok_or_else(|| Error::Unavailable("the stream ended early".into()))?;
        // Close the turn so the next message renders as the template expects: a reply that
        // ended with the end-of-turn token gets what follows that token, any other all of it.
        let end_turn = &self.setup.end_turn;
        let tail = match (last, end_turn.split_first()) {
            (Some(id), Some((first, rest))) if id == *first => rest.to_vec(),
            _ => end_turn.clone(),
        };
        let end = if tail.is_empty() {
            self.log.len() + count
        } else {
            self.session.append(tail).await?
        };
        Ok((reply, usage, end))
    }

    /// Compacts the log until `extra` more tokens fit the budget: masks results older than
    /// the newest few, then summarises older turns, then masks every result.
    async fn ensure_room(&mut self, extra: u32) -> Result<(), Error> {
        let agent = self.agent;
        let policy = &agent.context;
        let fits = |me: &Self| me.log.len() + extra <= me.budget;
        if fits(self) {
            return Ok(());
        }
        if policy.masking {
            self.mask(policy.keep_results).await?;
            if fits(self) {
                return Ok(());
            }
        }
        if policy.summarization {
            self.summarize(extra).await?;
            if fits(self) {
                return Ok(());
            }
        }
        if policy.masking {
            self.mask(0).await?;
            if fits(self) {
                return Ok(());
            }
        }
        Err(Error::OutOfRange(format!(
            "the context budget of {} tokens cannot hold this conversation: {} tokens after \
             compaction, {extra} more needed (a larger budget, a smaller max_tokens or \
             summarisation would help)",
            self.budget,
            self.log.len()
        )))
    }

    /// Replaces every unmasked results span but those holding the newest `keep` results by
    /// stubs, newest first so the earlier spans' offsets stay valid. One block: the daemon
    /// recomputes from the oldest rewritten span once, at the next generation.
    async fn mask(&mut self, keep: usize) -> Result<(), Error> {
        let before = self.log.len();
        let (mut first, mut results, mut epoch) = (None, 0, 0);
        for i in self.log.mask_plan(keep) {
            let span = self.log.spans()[i].clone();
            let (start, end, span_len) = (span.start, span.end, span.len());
            let Part::Results { names, .. } = span.part else {
                continue;
            };
            if span_len <= names.len() as u32 * MASKED_TOKENS + self.open_len() {
                continue; // Already as short as a stub.
            }
            let stubs: Vec<Message> = names
                .iter()
                .map(|n| Message::tool(hermes::tool_response(n, MASKED)))
                .collect();
            let (len, e) = self
                .session
                .rewrite_messages(start, end, &stubs, true)
                .await?;
            let new_len = len + span_len - self.log.len();
            results += names.len();
            let part = Part::Results {
                names,
                masked: true,
            };
            first = Some(self.log.replace(i..i + 1, Some(part), new_len));
            epoch = e;
        }
        if let Some(start) = first {
            self.compacted(Compaction {
                kind: CompactionKind::Masked { results },
                tokens_before: before,
                tokens_after: self.log.len(),
                start,
                epoch,
            });
        }
        Ok(())
    }

    /// Summarises the oldest turns with the model and replaces them by one message holding
    /// the summary (and the run's request, when it was among them): a new epoch after the
    /// prefix. The newest replies are kept verbatim when they fit, always with their results.
    async fn summarize(&mut self, extra: u32) -> Result<(), Error> {
        let agent = self.agent;
        let policy = &agent.context;
        let spans = self.log.spans();
        let start_of = |c: usize| spans.get(c).map_or(self.log.len(), |s| s.start);
        let floor = spans.first().map_or(self.log.len(), |s| s.start);
        let input = self.count(self.input).await?;
        let summary_cost = |c: usize| {
            policy.summary_tokens
                + 2 * MESSAGE_MARKUP
                + self.open_len()
                + if self.log.input_before(c) { input } else { 0 }
        };
        // The summariser's own session must fit the daemon's context too.
        let summariser_fits = |c: usize| {
            start_of(c) + SUMMARY_REQUEST_TOKENS + policy.summary_tokens < self.setup.context
        };
        let cuts: Vec<usize> = self
            .log
            .summary_cuts(policy.keep_turns)
            .into_iter()
            .filter(|&c| summariser_fits(c))
            .collect();
        let after = |c: usize| floor + summary_cost(c) + (self.log.len() - start_of(c)) + extra;
        // Keep the most recent turns that leave a third of the budget free, so the next turns
        // do not summarise again at once; else the most that fit; else as few as there are.
        let low_water = self.budget / 3 * 2;
        let Some(cut) = cuts
            .iter()
            .copied()
            .find(|&c| after(c) <= low_water)
            .or_else(|| cuts.iter().copied().find(|&c| after(c) <= self.budget))
            .or_else(|| cuts.last().copied())
        else {
            return Ok(());
        };
        let end = start_of(cut);
        let open = spans[cut - 1].part.ends_open();
        let has_input = self.log.input_before(cut);
        let kept_replies = spans[cut..]
            .iter()
            .filter(|s| matches!(s.part, Part::Reply { .. }))
            .count();
        let summary = self.summary_of(end, open).await?;
        let mut content = format!(
            "[Earlier turns of this conversation were replaced by this summary.]\n{summary}"
        );
        if has_input {
            content.push_str(&format!(
                "\n\n[The request being worked on:]\n{}",
                self.input
            ));
        }
        let before = self.log.len();
        let (len, epoch) = self
            .session
            .rewrite_messages(floor, end, &[Message::user(content)], open)
            .await?;
        let new_len = len + (end - floor) - before;
        let start = self
            .log
            .replace(0..cut, Some(Part::Summary { open, has_input }), new_len);
        self.compacted(Compaction {
            kind: CompactionKind::Summarized {
                summary,
                kept_replies,
            },
            tokens_before: before,
            tokens_after: self.log.len(),
            start,
            epoch,
        });
        Ok(())
    }

    /// The model's summary of the log's first `end` tokens, made in a session of its own that
    /// shares their cached KV (`open`: they end with a generation prompt, which is dropped).
    async fn summary_of(&self, end: u32, open: bool) -> Result<String, Error> {
        let (tokens, _) = self.session.tokens().await?;
        let mut upto = end as usize;
        let gp = &self.setup.open_turn;
        if open {
            if upto < gp.len() || tokens[upto - gp.len()..upto] != gp[..] {
                return Err(Error::FailedPrecondition(
                    "the session's log changed under the agent (a generation prompt is missing)"
                        .into(),
                ));
            }
            upto -= gp.len();
        }
        let client = self.session.client();
        let s = client.create_session(None, tokens[..upto].to_vec()).await?;
        let result = async {
            s.append_messages(&[Message::user(SUMMARY_REQUEST)], true)
                .await?;
            // A small model summarising greedily loops; the penalty breaks the loops.
            let opts = GenerateOptions::greedy()
                .repetition_penalty(1.3)
                .max_tokens(self.agent.context.summary_tokens)
                .lark(SUMMARY_GRAMMAR);
            let mut stream = s.generate(&opts).await?;
            let mut text = String::new();
            while let Some(ev) = stream.next().await {
                if let Event::Token { text: t, .. } = ev? {
                    text.push_str(&t);
                }
            }
            Ok::<_, Error>(text)
        }
        .await;
        let _ = s.close().await;
        let text = result?;
        let text = text.trim();
        Ok(if text.is_empty() {
            "(the model gave no summary)".to_owned()
        } else {
            text.to_owned()
        })
    }

    fn compacted(&mut self, c: Compaction) {
        (self.emit)(AgentEvent::Compacted(c.clone()));
        self.out.compactions.push(c);
    }

    /// Result texts as `tool` messages, each cut to the policy's longest result with a note
    /// saying what was cut; and the tokens they take once appended.
    async fn fit_results(
        &self,
        calls: &[hermes::ToolCall],
        texts: &[String],
    ) -> Result<(Vec<Message>, u32), Error> {
        let cap = self
            .agent
            .context
            .max_result_tokens
            .unwrap_or(self.budget / 4)
            .max(MIN_RESULT_TOKENS);
        let mut fitted = Vec::with_capacity(texts.len());
        let mut total = 0;
        for (call, text) in calls.iter().zip(texts) {
            // No token of a real vocabulary is longer than 64 bytes, so a longer text is cut
            // before it is counted.
            let head = &text[..floor_char_boundary(text, cap as usize * 64)];
            let mut content = hermes::tool_response(&call.name, head);
            let mut tokens = self.count(&content).await?;
            if tokens > cap || head.len() < text.len() {
                // What the markup and the note take, then the shown part cut in proportion to
                // the room left, counted again until it fits.
                let note = |shown: usize| {
                    format!("\n[truncated: the first {shown} of {} bytes]", text.len())
                };
                let overhead = self
                    .count(&hermes::tool_response(&call.name, &note(text.len())))
                    .await?;
                let room = u64::from(cap.saturating_sub(overhead).max(1));
                let (mut shown, mut shown_tokens) = (head, tokens.saturating_sub(overhead));
                for _ in 0..4 {
                    let keep = shown.len() as u64 * room / u64::from(shown_tokens.max(1));
                    shown = &shown[..floor_char_boundary(shown, keep as usize)];
                    let body = format!("{shown}{}", note(shown.len()));
                    content = hermes::tool_response(&call.name, &body);
                    tokens = self.count(&content).await?;
                    if tokens <= cap {
                        break;
                    }
                    shown_tokens = tokens.saturating_sub(overhead);
                }
            }
            total += tokens + MESSAGE_MARKUP;
            fitted.push(Message::tool(content));
        }
        Ok((fitted, total))
    }
}

/// The largest character boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, i: usize) -> usize {
    (0..=i.min(s.len()))
        .rev()
        .find(|&j| s.is_char_boundary(j))
        .unwrap_or(0)
}
