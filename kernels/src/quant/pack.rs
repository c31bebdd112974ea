//! GGUF blocks → 8-row panels, and back to f32.
//!
//! A panel record holds one GGUF block of each of eight rows. Its sub-blocks of 32 elements
//! come first, each as:
//! - 4-, 5- and 6-bit formats: 128 bytes of nibbles in four 32-byte groups `g`; in group `g`,
//!   bytes `4r..4r + 4` belong to row `r` and hold elements `4g + t` (low nibble) and
//!   `16 + 4g + t` (high nibble), `t < 4`. Then the bits above the nibble, by byte position
//!   `i` of the groups: 5-bit formats, 32 bytes whose byte `i` holds in bit `g` the 5th bit of
//!   group `g`'s low value at `i` and in bit `4 + g` that of its high value; `Q6_K`, 32 bytes
//!   for the low values (bits `2g, 2g + 1`: bits 5–6 of group `g`'s value at `i`) and 32 for
//!   the high values. A shift and a mask bring them above the nibbles, as llama.cpp does.
//! - `Q8_0`: 256 bytes in eight groups, group `g` holding elements `4g..4g + 4` of each row,
//!   stored as `q + 128` (unsigned).
//! - `F16`: 32 runs of eight f16 values, run `k` holding element `k` of each row.
//!
//! Then the scales: eight f16 `d` (and eight f16 minimums for `Q4_1`/`Q5_1`); for `Q4_K`/`Q5_K`
//! eight f16 `d`, eight f16 `dmin`, then per sub-block eight 6-bit scales and eight minimums as
//! bytes; for `Q6_K` eight f16 `d` then per 16-element sub-block eight signed scales.

use super::formats::{QuantType, BLOCK, GROUP};
use half::f16;

/// One GGUF block of one row, decoded: unsigned values (before the offset) and raw scales.
#[derive(Clone)]
pub(crate) struct Decoded {
    /// Values, `q` in the format's formula (0..=255), `block_elems` of them.
    pub u: [u8; 256],
    /// f16 bits of `d`.
    pub d: u16,
    /// f16 bits of the minimum (`Q4_1`/`Q5_1`) or of `dmin` (`Q4_K`/`Q5_K`).
    pub m: u16,
    /// Sub-block scales (`Q4_K`/`Q5_K`: 8 × 6 bits; `Q6_K`: 16 × i8 as bytes).
    pub sc: [u8; 16],
    /// Sub-block minimums (`Q4_K`/`Q5_K`: 8 × 6 bits).
    pub mn: [u8; 8],
}

impl Default for Decoded {
    fn default() -> Self {
        Self {
            u: [0; 256],
            d: 0,
            m: 0,
            sc: [0; 16],
            mn: [0; 8],
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The 6-bit scale and minimum of sub-block `j` from a K-quant's 12 packed scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one GGUF block (`block_bytes` bytes) of a quantized format (not `F16`).
pub(crate) fn decode_block(ty: QuantType, b: &[u8], out: &mut Decoded) {
    let u = &mut out.u;
    match ty {
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let qs = if ty == QuantType::Q4_0 {
                &b[2..18]
            } else {
                &b[4..20]
            };
            for j in 0..16 {
                u[j] = qs[j] & 0x0f;
                u[j + 16] = qs[j] >> 4;
            }
            out.d = le16(b, 0);
            out.m = if ty == QuantType::Q4_1 { le16(b, 2) } else { 0 };
        }
        QuantType::Q5_0 | QuantType::Q5_1 => {
            let at = if ty == QuantType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                u[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            out.d = le16(b, 0);
            out.m = if ty == QuantType::Q5_1 { le16(b, 2) } else { 0 };
        }
        QuantType::Q8_0 => {
            out.d = le16(b, 0);
            for j in 0..32 {
                u[j] = b[2 + j] ^ 0x80;
            }
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            out.d = le16(b, 0);
            out.m = le16(b, 2);
            let scales = &b[4..16];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, scales);
                out.sc[j] = s;
                out.mn[j] = m;
            }
            let (qh, qs) = if ty == QuantType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for c in 0..4 {
                let ql = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    let (mut lo, mut hi) = (ql[l] & 0x0f, ql[l] >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    u[64 * c + l] = lo;
                    u[64 * c + 32 + l] = hi;
                }
            }
        }
        QuantType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = le16(b, 208);
            out.sc.copy_from_slice(sc);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                let y = &mut u[128 * n..];
                for l in 0..32 {
                    y[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        QuantType::F16 => unreachable!("F16 has no integer blocks"),
    }
}

/// Writes the panel record of one GGUF block of each of eight rows (`rows[r]`: that row's
/// block, `None` for a padding row) into `rec` (`rec_bytes` long, zeroed).
pub(crate) fn pack_record(ty: QuantType, rows: &[Option<&[u8]>; GROUP], rec: &mut [u8]) {
    if ty == QuantType::F16 {
        for (r, row) in rows.iter().enumerate() {
            if let Some(b) = row {
                for k in 0..BLOCK {
                    rec[16 * k + 2 * r..16 * k + 2 * r + 2].copy_from_slice(&b[2 * k..2 * k + 2]);
                }
            }
        }
        return;
    }
    let mut dec: [Decoded; GROUP] = Default::default();
    for (r, row) in rows.iter().enumerate() {
        if let Some(b) = row {
            decode_block(ty, b, &mut dec[r]);
        } else if ty == QuantType::Q8_0 {
            // A padding row of Q8_0 is zero: q + 128 = 128.
            dec[r].u = [0x80; 256];
        } else if ty.offset() > 0 {
            // Offsets do not matter: padding rows have d = 0.
        }
    }
    let subs = ty.rec_elems() / BLOCK;
    let sb = ty.sub_bytes();
    for s in 0..subs {
        let out = &mut rec[s * sb..(s + 1) * sb];
        let u = |r: usize, e: usize| dec[r].u[s * BLOCK + e];
        if ty == QuantType::Q8_0 {
            for g in 0..8 {
                for r in 0..GROUP {
                    for t in 0..4 {
                        out[32 * g + 4 * r + t] = u(r, 4 * g + t);
                    }
                }
            }
            continue;
        }
        for g in 0..4 {
            for r in 0..GROUP {
                for t in 0..4 {
                    let (lo, hi) = (u(r, 4 * g + t), u(r, 16 + 4 * g + t));
                    out[32 * g + 4 * r + t] = (lo & 0x0f) | ((hi & 0x0f) << 4);
                }
            }
        }
        // Bits above the nibble: one byte per nibble byte position `i` (per 32-byte group
        // position), holding that bit for all four groups (see the module docs).
        let planes = ty.high_planes();
        if planes > 0 {
            let hb = &mut out[128..128 + 32 * planes];
            for g in 0..4 {
                for r in 0..GROUP {
                    for t in 0..4 {
                        let i = 4 * r + t;
                        let (lo, hi) = (u(r, 4 * g + t) >> 4, u(r, 16 + 4 * g + t) >> 4);
                        if planes == 1 {
                            hb[i] |= (lo & 1) << g | (hi & 1) << (4 + g);
                        } else {
                            hb[i] |= (lo & 3) << (2 * g);
                            hb[32 + i] |= (hi & 3) << (2 * g);
                        }
                    }
                }
            }
        }
    }
    let tail = &mut rec[subs * sb..];
    for r in 0..GROUP {
        tail[2 * r..2 * r + 2].copy_from_slice(&dec[r].d.to_le_bytes());
        if ty.has_min() {
            tail[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&dec[r].m.to_le_bytes());
        }
        match ty {
            QuantType::Q4_K | QuantType::Q5_K => {
                for j in 0..8 {
                    tail[32 + 8 * j + r] = dec[r].sc[j];
                    tail[96 + 8 * j + r] = dec[r].mn[j];
                }
            }
            QuantType::Q6_K => {
                for h in 0..16 {
                    tail[16 + 8 * h + r] = dec[r].sc[h];
                }
            }
            _ => {}
        }
    }
}

/// Packs a whole matrix (`rows` rows of `cols` elements in GGUF bytes) into panels: groups of
/// eight rows, each group `cols / rec_elems` records long. Runs in parallel over groups.
pub fn pack_matrix(ty: QuantType, rows: usize, cols: usize, gguf: &[u8], out: &mut [u8]) {
    use rayon::prelude::*;
    let rb = ty.row_bytes(cols);
    let bb = ty.block_bytes();
    let recs = cols / ty.rec_elems();
    let group_bytes = recs * ty.rec_bytes();
    if group_bytes == 0 {
        return;
    }
    out.par_chunks_mut(group_bytes)
        .enumerate()
        .for_each(|(g, panel)| {
            for (i, rec) in panel.chunks_exact_mut(ty.rec_bytes()).enumerate() {
                let blocks: [Option<&[u8]>; GROUP] = std::array::from_fn(|r| {
                    let row = g * GROUP + r;
                    (row < rows).then(|| &gguf[row * rb + i * bb..row * rb + (i + 1) * bb])
                });
                pack_record(ty, &blocks, rec);
            }
        });
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(le16(b, at)).to_f32()
}

/// Dequantises row `r` (`0..8`) of one panel group (`recs` records) into `out`.
pub fn dequantize_group_row(ty: QuantType, panel: &[u8], r: usize, out: &mut [f32]) {
    let rb = ty.rec_bytes();
    let subs = ty.rec_elems() / BLOCK;
    let sb = ty.sub_bytes();
    for (i, out) in out.chunks_exact_mut(ty.rec_elems()).enumerate() {
        let rec = &panel[i * rb..(i + 1) * rb];
        if ty == QuantType::F16 {
            for (k, o) in out.iter_mut().enumerate() {
                *o = f16_at(rec, 16 * k + 2 * r);
            }
            continue;
        }
        let tail = &rec[subs * sb..];
        let d = f16_at(tail, 2 * r);
        let m = if ty.has_min() {
            f16_at(tail, 16 + 2 * r)
        } else {
            0.0
        };
        for s in 0..subs {
            let vals = &rec[s * sb..(s + 1) * sb];
            for e in 0..BLOCK {
                let q = value(ty, vals, r, e) as i32 - ty.offset();
                let x = match ty {
                    QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => q as f32 * d,
                    QuantType::Q4_1 | QuantType::Q5_1 => q as f32 * d + m,
                    QuantType::Q4_K | QuantType::Q5_K => {
                        let (sc, mn) = (tail[32 + 8 * s + r], tail[96 + 8 * s + r]);
                        d * sc as f32 * q as f32 - m * mn as f32
                    }
                    QuantType::Q6_K => {
                        let sc = tail[16 + 8 * (2 * s + e / 16) + r] as i8;
                        d * sc as f32 * q as f32
                    }
                    QuantType::F16 => unreachable!(),
                };
                out[s * BLOCK + e] = x;
            }
        }
    }
}

/// Value `e` (`0..32`) of row `r` in one packed sub-block (before the offset).
#[inline]
pub(crate) fn value(ty: QuantType, vals: &[u8], r: usize, e: usize) -> u8 {
    if ty == QuantType::Q8_0 {
        return vals[32 * (e / 4) + 4 * r + e % 4];
    }
    let (half, w) = (e / 16, e % 16);
    let (g, t) = (w / 4, w % 4);
    let byte = vals[32 * g + 4 * r + t];
    let mut v = if half == 0 { byte & 0x0f } else { byte >> 4 };
    let i = 4 * r + t;
    match ty.high_planes() {
        1 => v |= ((vals[128 + i] >> (4 * half + g)) & 1) << 4,
        2 => v |= ((vals[128 + 32 * half + i] >> (2 * g)) & 3) << 4,
        _ => {}
    }
    v
}
