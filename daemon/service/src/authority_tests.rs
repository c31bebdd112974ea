//! Tests of the `:authority` rewrite: client traffic is built with an independent HPACK encoder
//! (httlib-hpack: Huffman, incremental indexing, never-indexed, table-size updates), fed to the
//! [`Rewriter`] at arbitrary read boundaries, and what h2 would read is decoded with a fresh
//! decoder, as h2's own would.

use super::*;
use proptest::prelude::*;

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

/// A frame as a client sends it.
#[derive(Debug, Clone)]
enum Frame {
    /// A header block, encoded on the connection's encoder.
    Block(Block),
    /// Any other frame: it must reach h2 unchanged.
    Other {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

/// A header block and how the client frames it.
#[derive(Debug, Clone)]
struct Block {
    stream: u32,
    /// Fields and httlib's encoding flags for each (Huffman, indexing, best format).
    fields: Vec<(Vec<u8>, Vec<u8>, u8)>,
    /// A dynamic table size update at the block's start.
    size_update: Option<u32>,
    /// Frames to split the block into (HEADERS, then CONTINUATIONs).
    frames: usize,
    pad: Option<u8>,
    priority: bool,
    end_stream: bool,
}

/// What h2 sees: a header block or another frame.
#[derive(Debug, PartialEq)]
enum Seen {
    Block {
        stream: u32,
        end_stream: bool,
        headers: Headers,
    },
    Other {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    FrameHeader {
        len: payload.len(),
        kind,
        flags,
        stream,
    }
    .write(out);
    out.extend_from_slice(payload);
}

/// The bytes a client sends: the preface, then `frames`, header blocks encoded on one
/// connection-wide encoder.
fn client_bytes(frames: &[Frame]) -> Vec<u8> {
    let mut enc = httlib_hpack::Encoder::default();
    let mut out = PREFACE.to_vec();
    for f in frames {
        match f {
            Frame::Other {
                kind,
                flags,
                stream,
                payload,
            } => frame(*kind, *flags, *stream, payload, &mut out),
            Frame::Block(b) => {
                let mut block = Vec::new();
                if let Some(size) = b.size_update {
                    enc.update_max_dynamic_size(size, &mut block).unwrap();
                }
                for (name, value, flags) in &b.fields {
                    enc.encode((name.clone(), value.clone(), *flags), &mut block)
                        .unwrap();
                }
                let parts = b.frames.max(1);
                let step = block.len().div_ceil(parts).max(1);
                let mut chunks: Vec<&[u8]> = block.chunks(step).collect();
                chunks.resize(parts, &[]);
                for (i, chunk) in chunks.iter().enumerate() {
                    let last = if i + 1 == parts { END_HEADERS } else { 0 };
                    if i > 0 {
                        frame(CONTINUATION, last, b.stream, chunk, &mut out);
                        continue;
                    }
                    let mut payload = Vec::new();
                    let mut flags = last;
                    if b.end_stream {
                        flags |= END_STREAM;
                    }
                    if let Some(pad) = b.pad {
                        flags |= PADDED;
                        payload.push(pad);
                    }
                    if b.priority {
                        flags |= PRIORITY;
                        payload.extend_from_slice(&[0x80, 0, 0, 1, 200]);
                    }
                    payload.extend_from_slice(chunk);
                    payload.resize(payload.len() + usize::from(b.pad.unwrap_or(0)), 0);
                    frame(HEADERS, flags, b.stream, &payload, &mut out);
                }
            }
        }
    }
    out
}

/// What h2 should see for `frames`: the same, each invalid `:authority` made `localhost`.
fn expected(frames: &[Frame]) -> Vec<Seen> {
    frames
        .iter()
        .map(|f| match f {
            Frame::Other {
                kind,
                flags,
                stream,
                payload,
            } => Seen::Other {
                kind: *kind,
                flags: *flags,
                stream: *stream,
                payload: payload.clone(),
            },
            Frame::Block(b) => Seen::Block {
                stream: b.stream,
                end_stream: b.end_stream,
                headers: b
                    .fields
                    .iter()
                    .map(|(n, v, _)| {
                        let bad =
                            n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err();
                        (
                            n.clone(),
                            if bad { REPLACEMENT.to_vec() } else { v.clone() },
                        )
                    })
                    .collect(),
            },
        })
        .collect()
}

/// Reads what the rewriter wrote as h2 would, checking the framing rules the rewrite promises:
/// frames of at most [`MAX_FRAME`] bytes, no padding or priority, only literals without
/// indexing (so a fresh decoder's dynamic table stays empty).
fn server_view(bytes: &[u8]) -> Vec<Seen> {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE, "the preface");
    let mut dec = httlib_hpack::Decoder::default();
    let mut rest = &bytes[PREFACE.len()..];
    let mut seen = Vec::new();
    let mut block: Option<(u32, bool, Vec<u8>)> = None;
    while !rest.is_empty() {
        let h = FrameHeader::parse(rest[..FRAME_HEADER].try_into().unwrap());
        let payload = &rest[FRAME_HEADER..FRAME_HEADER + h.len];
        rest = &rest[FRAME_HEADER + h.len..];
        match h.kind {
            HEADERS | CONTINUATION => {
                assert!(h.len <= MAX_FRAME, "a {}-byte header frame", h.len);
                if h.kind == HEADERS {
                    assert!(block.is_none(), "HEADERS inside a block");
                    assert_eq!(h.flags & !(END_STREAM | END_HEADERS), 0, "flags {h:?}");
                    block = Some((h.stream, h.flags & END_STREAM != 0, Vec::new()));
                } else {
                    assert_eq!(h.flags & !END_HEADERS, 0, "flags {h:?}");
                }
                let (stream, _, buf) = block.as_mut().expect("a block in progress");
                assert_eq!(*stream, h.stream);
                buf.extend_from_slice(payload);
                if h.flags & END_HEADERS != 0 {
                    let (stream, end_stream, mut buf) = block.take().unwrap();
                    let mut fields = Vec::new();
                    dec.decode(&mut buf, &mut fields)
                        .expect("h2 decodes the block");
                    assert!(
                        fields.iter().all(|(_, _, flags)| *flags == 0),
                        "only literals without indexing: {fields:?}"
                    );
                    seen.push(Seen::Block {
                        stream,
                        end_stream,
                        headers: fields.into_iter().map(|(n, v, _)| (n, v)).collect(),
                    });
                }
            }
            _ => {
                assert!(block.is_none(), "a frame inside a block");
                seen.push(Seen::Other {
                    kind: h.kind,
                    flags: h.flags,
                    stream: h.stream,
                    payload: payload.to_vec(),
                });
            }
        }
    }
    assert!(block.is_none(), "an unfinished block");
    seen
}

/// Feeds `input` to a fresh rewriter in reads of the sizes in `reads` (cycled).
fn feed_in_reads(input: &[u8], reads: &[usize]) -> Result<Vec<u8>, RewriteError> {
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    let mut rest = input;
    for &n in reads.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = n.clamp(1, rest.len());
        r.feed(&rest[..n], &mut out)?;
        rest = &rest[n..];
    }
    Ok(out)
}

/// The one check: `frames` sent in reads of `reads` bytes reach h2 as [`expected`] says, and
/// the bytes do not depend on where the reads fell.
fn check(frames: &[Frame], reads: &[usize]) {
    let input = client_bytes(frames);
    let whole = feed_in_reads(&input, &[input.len()]).expect("the rewrite");
    let split = feed_in_reads(&input, reads).expect("the rewrite");
    assert!(whole == split, "the output depends on the read boundaries");
    assert_eq!(server_view(&whole), expected(frames));
}

/// A gRPC call's header block with `authority`, every field encoded with `flags`.
fn grpc_block(stream: u32, authority: &str, flags: u8) -> Block {
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/agentd.v1.Agentd/Health"),
        (":authority", authority),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        (
            "user-agent",
            "grpc-python/1.85.0 grpc-c/51.0.0 (linux; chttp2)",
        ),
    ];
    Block {
        stream,
        fields: fields
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec(), flags))
            .collect(),
        size_update: None,
        frames: 1,
        pad: None,
        priority: false,
        end_stream: false,
    }
}

const HUFFMAN_INDEXED: u8 = 0x1 | 0x2 | 0x4 | 0x10;

#[test]
fn grpc_cores_percent_encoded_socket_path_becomes_localhost() {
    // What h2 refuses: the cause of "Received RST_STREAM with error code 1" in grpc-python.
    assert!(http::uri::Authority::try_from(&b"%2Ftmp%2Fagentd.sock"[..]).is_err());
    assert!(http::uri::Authority::try_from(&b"/tmp/agentd.sock"[..]).is_err());
    // The second and third calls find the authority in the dynamic table (one indexed byte).
    let frames: Vec<Frame> = [1, 3, 5]
        .into_iter()
        .map(|s| Frame::Block(grpc_block(s, "%2Ftmp%2Fagentd.sock", HUFFMAN_INDEXED)))
        .collect();
    check(&frames, &[1, 7, 3]);
    let raw_path = [Frame::Block(grpc_block(1, "/tmp/agentd.sock", 0))];
    check(&raw_path, &[5]);
}

#[test]
fn a_valid_authority_is_kept_as_sent() {
    for authority in ["localhost", "x", "example.com:50051", "[::1]:8080"] {
        let input = client_bytes(&[Frame::Block(grpc_block(1, authority, HUFFMAN_INDEXED))]);
        let Seen::Block { headers, .. } = &server_view(&feed_in_reads(&input, &[64]).unwrap())[0]
        else {
            panic!("not a block");
        };
        assert!(headers.contains(&(b":authority".to_vec(), authority.as_bytes().to_vec())));
    }
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn rfc7541s_huffman_requests_with_dynamic_table_references_decode_in_order() {
    // RFC 7541 C.4: three requests on one connection, Huffman-coded, the later ones indexing
    // entries the earlier ones inserted.
    let blocks = [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ];
    let mut input = PREFACE.to_vec();
    for (i, b) in blocks.iter().enumerate() {
        frame(HEADERS, END_HEADERS, 2 * i as u32 + 1, &hex(b), &mut input);
    }
    let seen = server_view(&feed_in_reads(&input, &[3]).unwrap());
    let h = |pairs: &[(&str, &str)]| -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    };
    let base = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    let want = [
        h(&base),
        h(&[&base[..], &[("cache-control", "no-cache")]].concat()),
        h(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ]),
    ];
    for (i, (s, w)) in seen.iter().zip(&want).enumerate() {
        assert_eq!(
            s,
            &Seen::Block {
                stream: 2 * i as u32 + 1,
                end_stream: false,
                headers: w.clone()
            }
        );
    }
}

#[test]
fn a_large_header_list_goes_out_in_frames_of_at_most_16_kib() {
    let mut b = grpc_block(1, "%2Fs", 0x2);
    b.fields.push((b"x-big".to_vec(), vec![b'a'; 40_000], 0));
    b.frames = 4;
    b.end_stream = true;
    let frames = [Frame::Block(b)];
    check(&frames, &[4096, 1]);
    let out = feed_in_reads(&client_bytes(&frames), &[100_000]).unwrap();
    let kinds: Vec<u8> = {
        let mut rest = &out[PREFACE.len()..];
        let mut k = Vec::new();
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest[..FRAME_HEADER].try_into().unwrap());
            k.push(h.kind);
            rest = &rest[FRAME_HEADER + h.len..];
        }
        k
    };
    assert_eq!(kinds, [HEADERS, CONTINUATION, CONTINUATION]);
}

/// A connection carrying one HEADERS frame with `flags` and `payload` on `stream`.
fn one_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = PREFACE.to_vec();
    frame(kind, flags, stream, payload, &mut v);
    v
}

#[test]
fn malformed_or_oversized_input_closes_the_connection() {
    let block = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
    let mut interrupted = one_frame(HEADERS, 0, 1, &block);
    frame(0, 0, 1, b"data", &mut interrupted);
    let mut other_stream = one_frame(HEADERS, 0, 1, &block);
    frame(CONTINUATION, END_HEADERS, 3, b"", &mut other_stream);
    let mut too_big = PREFACE.to_vec();
    FrameHeader {
        len: MAX_BLOCK + 1,
        kind: HEADERS,
        flags: END_HEADERS,
        stream: 1,
    }
    .write(&mut too_big);
    let mut too_big_in_pieces = one_frame(HEADERS, 0, 1, &vec![0; MAX_BLOCK / 2]);
    frame(
        CONTINUATION,
        0,
        1,
        &vec![0; MAX_BLOCK / 2],
        &mut too_big_in_pieces,
    );
    frame(CONTINUATION, END_HEADERS, 1, &[0], &mut too_big_in_pieces);
    // One 4,000-byte entry in the dynamic table, then referred to 100 times: a 4 KiB block that
    // would decode to 400 KiB.
    let mut bomb = vec![0x40, 0x01, b'x', 0x7f];
    let mut len = 4000 - 127;
    while len >= 128 {
        bomb.push((len % 128) as u8 | 0x80);
        len /= 128;
    }
    bomb.push(len as u8);
    bomb.extend(std::iter::repeat_n(b'v', 4000));
    bomb.extend(std::iter::repeat_n(0xbe, 100));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not HTTP/2", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "preface"),
        (
            "CONTINUATION alone",
            one_frame(CONTINUATION, END_HEADERS, 1, &block),
            "without HEADERS",
        ),
        ("a block interrupted", interrupted, "interrupted"),
        ("CONTINUATION elsewhere", other_stream, "another stream"),
        ("a 256 KiB + 1 frame", too_big, "is over"),
        ("256 KiB + 1 in pieces", too_big_in_pieces, "is over"),
        (
            "padding too long",
            one_frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
            "padding",
        ),
        (
            "no pad length",
            one_frame(HEADERS, END_HEADERS | PADDED, 1, &[]),
            "pad length",
        ),
        (
            "priority cut short",
            one_frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0, 0]),
            "priority",
        ),
        (
            "an empty dynamic table indexed",
            one_frame(HEADERS, END_HEADERS, 1, &[0xbe]),
            "undecodable",
        ),
        (
            "a table size over 4,096",
            one_frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe2, 0x1f, 0x82]),
            "undecodable",
        ),
        (
            "a truncated string",
            one_frame(HEADERS, END_HEADERS, 1, &[0x00, 0x05, b'a']),
            "undecodable",
        ),
        (
            "an HPACK bomb",
            one_frame(HEADERS, END_HEADERS, 1, &bomb),
            "decodes to over",
        ),
        (
            "PUSH_PROMISE",
            one_frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
            "PUSH_PROMISE",
        ),
        (
            "stream 0",
            one_frame(HEADERS, END_HEADERS, 0, &[0x82]),
            "stream 0",
        ),
    ];
    for (what, input, want) in cases {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        let e = r.feed(&input, &mut out).expect_err(what).to_string();
        assert!(e.contains(want), "{what}: {e}");
        assert!(
            out.len() <= input.len(),
            "{what}: nothing buffered past the input"
        );
        assert!(
            matches!(r.feed(b"more", &mut out), Err(RewriteError::Failed)),
            "{what}: the connection stays failed"
        );
    }
}

#[tokio::test]
async fn the_wrapped_socket_keeps_its_peer_credentials_and_rewrites_what_it_reads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
    let mut s = RewriteStream::new(a);
    let cred = s.connect_info().peer_cred.expect("peer credentials");
    // SAFETY: getuid has no preconditions.
    assert_eq!(cred.uid(), unsafe { libc::getuid() });
    let input = client_bytes(&[Frame::Block(grpc_block(1, "%2Fx.sock", HUFFMAN_INDEXED))]);
    b.write_all(&input).await.unwrap();
    drop(b);
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let Seen::Block { headers, .. } = &server_view(&out)[0] else {
        panic!("not a block");
    };
    assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
}

fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("localhost".to_string()),
        Just("%2Ftmp%2Fagentd.sock".to_string()),
        Just("/run/user/1000/agentd/agentd.sock".to_string()),
        Just(String::new()),
        Just("example.com:50051".to_string()),
        "[ -~]{0,24}",
    ]
}

/// httlib's flags: Huffman name and value bits, with incremental indexing or never indexed,
/// best format (indexed from the table when it can).
fn encoding() -> impl Strategy<Value = u8> {
    (
        0u8..4,
        prop::sample::select(vec![0u8, 0x4, 0x8]),
        any::<bool>(),
    )
        .prop_map(|(huff, idx, best)| huff | idx | if best { 0x10 } else { 0 })
}

fn block() -> impl Strategy<Value = Block> {
    // A few names and values, so later blocks find earlier ones in the dynamic table.
    let extra = (
        prop::sample::select(vec!["grpc-timeout", "x-trace", "authorization", "x-a"]),
        prop_oneof![
            4 => prop::sample::select(vec!["1S", "abc", "Bearer t0k3n", ""]).prop_map(|s| s.to_string()),
            2 => "[ -~]{0,40}",
            1 => (1usize..20_000).prop_map(|n| "v".repeat(n)),
        ],
        encoding(),
    );
    (
        (0u32..8).prop_map(|s| 2 * s + 1),
        authority(),
        prop::collection::vec(encoding(), 7),
        prop::collection::vec(extra, 0..4),
        prop::option::weighted(0.2, 0u32..=4096),
        1usize..4,
        prop::option::weighted(0.3, any::<u8>()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(stream, authority, enc, extra, size_update, frames, pad, priority, end_stream)| {
                let mut b = grpc_block(stream, &authority, 0);
                for (f, e) in b.fields.iter_mut().zip(enc) {
                    f.2 = e;
                }
                b.fields.extend(
                    extra
                        .into_iter()
                        .map(|(n, v, e)| (n.as_bytes().to_vec(), v.into_bytes(), e)),
                );
                b.size_update = size_update;
                b.frames = frames;
                b.pad = pad;
                b.priority = priority;
                b.end_stream = end_stream;
                b
            },
        )
}

fn other() -> impl Strategy<Value = Frame> {
    (
        prop::sample::select(vec![0x0u8, 0x2, 0x3, 0x4, 0x6, 0x8, 0xb]),
        any::<u8>(),
        0u32..8,
        prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..64),
            1 => prop::collection::vec(any::<u8>(), 0..20_000),
        ],
    )
        .prop_map(|(kind, flags, stream, payload)| Frame::Other {
            kind,
            flags,
            stream,
            payload,
        })
}

proptest! {
    #[test]
    fn any_connection_reaches_h2_with_the_same_headers_and_a_valid_authority(
        frames in prop::collection::vec(prop_oneof![3 => block().prop_map(Frame::Block), 2 => other()], 1..12),
        reads in prop::collection::vec(1usize..200, 1..8),
    ) {
        check(&frames, &reads);
    }
}
