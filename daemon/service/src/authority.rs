//! Any gRPC client's `:authority` on the Unix socket.
//!
//! gRPC clients built on grpc-core (Python, C++, Ruby, PHP) send the socket path, percent-encoded
//! (`%2Ftmp%2Fagentd.sock`), as the `:authority` of calls over a Unix socket; grpc-java may send
//! the raw path. h2, under hyper and tonic, checks `:authority` with `http::uri::Authority` and
//! resets such a stream with PROTOCOL_ERROR, and it has no option to relax the check. So every
//! accepted Unix connection is wrapped in a [`RewriteStream`], which rewrites the client's bytes
//! before h2 reads them:
//!
//! - the 24-byte client preface and every frame other than HEADERS and CONTINUATION pass through
//!   untouched (a DATA frame's payload is copied as it arrives, never buffered whole);
//! - each header block (HEADERS plus its CONTINUATIONs, padding and priority fields stripped) is
//!   HPACK-decoded by a [`Rewriter`]'s decoder, which follows the client's dynamic table, and
//!   re-encoded for h2 as literals *without indexing*, with an `:authority` that h2 would refuse
//!   replaced by `localhost`. A valid authority is kept as sent, so clients that already worked
//!   see no difference. Every block is re-encoded, not only those with a bad authority: h2 never
//!   sees the client's dynamic-table insertions, so a block that referred to the table could not
//!   be forwarded as it came. h2's own dynamic table stays empty, so it can never disagree with
//!   ours; the client's table-size updates are consumed by our decoder and not forwarded.
//! - re-encoded blocks go out as a HEADERS frame and CONTINUATION frames of at most 16,384 bytes
//!   (the smallest SETTINGS_MAX_FRAME_SIZE a peer may have), END_STREAM kept on the HEADERS frame
//!   and END_HEADERS on the last.
//!
//! Bytes from the daemon to the client pass through unmodified. Everything is bounded: a header
//! block over [`MAX_BLOCK`] bytes, a header list that decodes to more than [`MAX_BLOCK`] bytes
//! (HPACK's measure: name + value + 32 per field), an undecodable block or a malformed frame
//! closes the connection (logged at warn), before anything more is buffered.
//!
//! **Architecture Invariant:** the decoder sees every header block of the connection, in order,
//! and h2 is sent only literals without indexing, so neither side's dynamic table depends on a
//! block the other did not see. The decoder's table is bounded by h2's
//! SETTINGS_HEADER_TABLE_SIZE, the protocol's default of 4,096 bytes, which the server never
//! changes ([`TABLE_SIZE`]; a client's size update above it closes the connection).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes in a frame header: length (24 bits), type, flags, stream id (31 bits).
const FRAME_HEADER: usize = 9;
/// The largest header block accepted from a client (all its fragments together, padding and
/// priority included), and the largest header list it may decode to.
pub(crate) const MAX_BLOCK: usize = 256 * 1024;
/// The largest frame payload written for h2: the minimum SETTINGS_MAX_FRAME_SIZE.
pub(crate) const MAX_FRAME: usize = 16_384;
/// The HPACK dynamic table size the server allows its clients (SETTINGS_HEADER_TABLE_SIZE):
/// the protocol's default, which neither tonic nor hyper changes.
pub(crate) const TABLE_SIZE: usize = 4096;
/// The authority put in place of one h2 would refuse.
pub(crate) const REPLACEMENT: &[u8] = b"localhost";
/// How much is read from the socket at once.
const READ_CHUNK: usize = 16 * 1024;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RewriteError {
    /// The first 24 bytes were not the HTTP/2 client preface.
    #[error("the connection did not start with the HTTP/2 client preface")]
    Preface,
    /// A header block's fragments add up to more than [`MAX_BLOCK`] bytes.
    #[error("a header block is over {MAX_BLOCK} bytes")]
    BlockTooLarge,
    /// A header block decodes to more than [`MAX_BLOCK`] bytes of fields.
    #[error("a header list decodes to over {MAX_BLOCK} bytes")]
    ListTooLarge,
    /// A frame breaks HTTP/2's framing rules.
    #[error("malformed frame: {0}")]
    Frame(&'static str),
    /// HPACK cannot decode a header block.
    #[error("undecodable header block: {0}")]
    Hpack(loona_hpack::decoder::DecoderError),
    /// The connection failed earlier.
    #[error("the connection already failed")]
    Failed,
}

/// A frame header.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; FRAME_HEADER]) -> Self {
        Self {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = self.len as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[self.kind, self.flags]);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug)]
enum State {
    /// Matching the preface; this many bytes matched so far.
    Preface(usize),
    /// Reading a frame header; this many bytes read so far.
    Header([u8; FRAME_HEADER], usize),
    /// Copying this many more payload bytes of a frame that passes through.
    Pass(usize),
    /// Collecting a HEADERS or CONTINUATION frame's payload; this many bytes still to come.
    Collect(FrameHeader, usize),
    /// An error closed the connection.
    Failed,
}

/// A header block in progress: its HEADERS frame came without END_HEADERS.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
}

/// The client → server half of a connection, rewritten as described in the module's docs. It
/// does no I/O: [`Rewriter::feed`] takes the bytes read from the client and appends what h2
/// should read.
pub(crate) struct Rewriter {
    state: State,
    /// Follows the client's HPACK dynamic table.
    decoder: loona_hpack::Decoder<'static>,
    /// The payload of the HEADERS or CONTINUATION frame being collected.
    payload: Vec<u8>,
    /// The header block so far (fragments, without padding or priority).
    block: Vec<u8>,
    /// The HEADERS frame whose block is not finished.
    open: Option<OpenBlock>,
    /// The re-encoded block.
    encoded: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            state: State::Preface(0),
            decoder,
            payload: Vec::new(),
            block: Vec::new(),
            open: None,
            encoded: Vec::new(),
        }
    }
}

impl Rewriter {
    /// Takes `input`, the next bytes from the client, and appends to `out` what h2 should read.
    /// What `out` gains is bounded by `input`'s length plus one re-encoded block per header
    /// block finished. After an error every call fails.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let r = self.feed_inner(input, out);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn feed_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Failed => return Err(RewriteError::Failed),
                State::Preface(got) => {
                    let n = (PREFACE.len() - *got).min(input.len());
                    if input[..n] != PREFACE[*got..*got + n] {
                        return Err(RewriteError::Preface);
                    }
                    out.extend_from_slice(&input[..n]);
                    *got += n;
                    input = &input[n..];
                    if *got == PREFACE.len() {
                        self.state = State::Header([0; FRAME_HEADER], 0);
                    }
                }
                State::Header(buf, got) => {
                    let n = (FRAME_HEADER - *got).min(input.len());
                    buf[*got..*got + n].copy_from_slice(&input[..n]);
                    *got += n;
                    input = &input[n..];
                    if *got == FRAME_HEADER {
                        let raw = *buf;
                        self.begin_frame(&raw, out)?;
                    }
                }
                State::Pass(left) => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.state = State::Header([0; FRAME_HEADER], 0);
                    }
                }
                State::Collect(frame, left) => {
                    let n = (*left).min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        let frame = *frame;
                        self.end_frame(frame, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A frame header has been read (`raw`): decide what happens to its payload.
    fn begin_frame(
        &mut self,
        raw: &[u8; FRAME_HEADER],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let frame = FrameHeader::parse(raw);
        if self.open.is_some() && frame.kind != CONTINUATION {
            return Err(RewriteError::Frame(
                "a header block interrupted by another frame",
            ));
        }
        match frame.kind {
            HEADERS | CONTINUATION => {
                if frame.len > MAX_BLOCK - self.block.len() {
                    return Err(RewriteError::BlockTooLarge);
                }
                self.payload.clear();
                self.state = State::Collect(frame, frame.len);
                if frame.len == 0 {
                    self.end_frame(frame, out)?;
                }
            }
            PUSH_PROMISE => return Err(RewriteError::Frame("PUSH_PROMISE from a client")),
            _ => {
                out.extend_from_slice(raw);
                self.state = State::Pass(frame.len);
                if frame.len == 0 {
                    self.state = State::Header([0; FRAME_HEADER], 0);
                }
            }
        }
        Ok(())
    }

    /// A HEADERS or CONTINUATION frame's payload is complete: add its fragment to the block,
    /// and forward the block if it ends here.
    fn end_frame(&mut self, frame: FrameHeader, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        self.state = State::Header([0; FRAME_HEADER], 0);
        let open = if frame.kind == HEADERS {
            if frame.stream == 0 {
                return Err(RewriteError::Frame("HEADERS on stream 0"));
            }
            let mut p = &self.payload[..];
            let mut pad = 0;
            if frame.flags & PADDED != 0 {
                let (&n, rest) = p
                    .split_first()
                    .ok_or(RewriteError::Frame("PADDED HEADERS without a pad length"))?;
                pad = usize::from(n);
                p = rest;
            }
            if frame.flags & PRIORITY != 0 {
                p = p
                    .get(5..)
                    .ok_or(RewriteError::Frame("HEADERS too short for its priority"))?;
            }
            let end = p
                .len()
                .checked_sub(pad)
                .ok_or(RewriteError::Frame("padding longer than the frame"))?;
            self.block.extend_from_slice(&p[..end]);
            OpenBlock {
                stream: frame.stream,
                end_stream: frame.flags & END_STREAM != 0,
            }
        } else {
            let open = self
                .open
                .take()
                .ok_or(RewriteError::Frame("CONTINUATION without HEADERS"))?;
            if open.stream != frame.stream {
                return Err(RewriteError::Frame(
                    "CONTINUATION on another stream than its HEADERS",
                ));
            }
            self.block.extend_from_slice(&self.payload);
            open
        };
        shrink(&mut self.payload);
        if frame.flags & END_HEADERS != 0 {
            self.forward_block(open, out)
        } else {
            self.open = Some(open);
            Ok(())
        }
    }

    /// Decodes the finished block, re-encodes it for h2 and writes it as frames.
    fn forward_block(&mut self, open: OpenBlock, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        self.encoded.clear();
        let mut size = 0usize;
        let mut too_large = false;
        let encoded = &mut self.encoded;
        self.decoder
            .decode_with_cb(&self.block, |name, value| {
                size += name.len() + value.len() + 32;
                if size > MAX_BLOCK {
                    too_large = true;
                }
                if too_large {
                    return;
                }
                let value: &[u8] = if &name[..] == b":authority"
                    && http::uri::Authority::try_from(&value[..]).is_err()
                {
                    tracing::trace!(authority = ?String::from_utf8_lossy(&value), "replacing an :authority h2 would refuse");
                    REPLACEMENT
                } else {
                    &value
                };
                encode_literal(&name, value, encoded);
            })
            .map_err(RewriteError::Hpack)?;
        if too_large {
            return Err(RewriteError::ListTooLarge);
        }
        self.block.clear();
        shrink(&mut self.block);
        let mut chunks = self.encoded.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        let mut flags = if open.end_stream { END_STREAM } else { 0 };
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            let header = FrameHeader {
                len: chunk.len(),
                kind,
                flags,
                stream: open.stream,
            };
            header.write(out);
            out.extend_from_slice(chunk);
            if flags & END_HEADERS != 0 {
                break;
            }
            kind = CONTINUATION;
            flags = 0;
        }
        shrink(&mut self.encoded);
        Ok(())
    }
}

/// Drops a buffer's memory after an unusually large block, so an idle connection keeps little.
fn shrink(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 4 * MAX_FRAME {
        *buf = Vec::new();
    }
}

/// Appends HPACK's "literal header field without indexing — new name" (RFC 7541 §6.2.2), with
/// neither string Huffman-coded.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    encode_string(name, out);
    encode_string(value, out);
}

/// A string literal without Huffman coding: its length (a 7-bit prefix integer), its bytes.
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// HPACK's integer encoding (RFC 7541 §5.1) with an `prefix`-bit prefix, `flags` in the first
/// byte's high bits.
fn encode_integer(mut value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A client connection whose bytes to the server go through a [`Rewriter`]; writes to the
/// client and the connection's info (the Unix peer's credentials, for tenancy) are the inner
/// stream's.
pub struct RewriteStream<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by h2, from `pos` on.
    out: Vec<u8>,
    pos: usize,
    /// What was read from the client, before rewriting.
    scratch: Box<[u8]>,
    eof: bool,
}

impl<S> RewriteStream<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            out: Vec::new(),
            pos: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<S: Connected> Connected for RewriteStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RewriteStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.out.len() {
                let n = (this.out.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.out.len() {
                    this.out.clear();
                    this.pos = 0;
                    shrink(&mut this.out);
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            if let Err(e) = this.rewriter.feed(&this.scratch[..n], &mut this.out) {
                if !matches!(e, RewriteError::Failed) {
                    tracing::warn!(error = %e, "closing a Unix-socket connection");
                }
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RewriteStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;
