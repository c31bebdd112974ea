//! A quantized weight matrix and its product with a batch of activation rows: one product for
//! decode rows and prompt rows alike.
//!
//! [`QMatrix`] holds a weight in 8-row panels ([`crate::quant::pack`]). [`matmul_many`]
//! multiplies several matrices that share an input (Q, K and V; gate and up) with every
//! activation row in one parallel pass: the weight row groups are split into contiguous ranges,
//! one task each; a task walks its groups for a chunk of activation rows that stays in cache,
//! and for each group runs tiles of up to eight activation rows, so each weight block is read
//! once per tile. On AVX-512 VNNI the groups go two at a time through 512-bit registers
//! (sixteen weight rows per tile). A row's result does not depend on the tile, the chunk, the
//! thread or the batch it was computed in (see [`crate::quant`]).

use crate::cpu;
use crate::quant::formats::GROUP;
use crate::quant::{pack, scalar, ActKind, QuantType, QuantizedRows};
use crate::{KernelError, Result};
use rayon::prelude::*;

/// A row-major weight of `rows` rows (output features) by `cols` columns (input features), in
/// panels of eight rows.
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: QuantType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    /// Takes GGUF block bytes for `rows × cols` elements, checks their length and packs them
    /// into panels.
    pub fn new(ty: QuantType, rows: usize, cols: usize, gguf: &[u8]) -> Result<Self> {
        let block = ty.block_elems();
        if !cols.is_multiple_of(block) {
            return Err(KernelError::PartialBlock { cols, block });
        }
        let expected = rows * ty.row_bytes(cols);
        if gguf.len() != expected {
            return Err(KernelError::Length {
                what: "quantized matrix bytes",
                expected,
                got: gguf.len(),
            });
        }
        let groups = rows.div_ceil(GROUP);
        let mut data = huge_page_buffer(groups * (cols / block) * ty.rec_bytes());
        pack::pack_matrix(ty, rows, cols, gguf, &mut data);
        Ok(Self {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// The format.
    pub fn quant_type(&self) -> QuantType {
        self.ty
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data held.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    fn group_bytes(&self) -> usize {
        self.cols / self.ty.rec_elems() * self.ty.rec_bytes()
    }

    fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    fn group(&self, g: usize) -> &[u8] {
        let gb = self.group_bytes();
        &self.data[g * gb..(g + 1) * gb]
    }

    /// Dequantises row `r` into `out` (`cols` elements), e.g. for an embedding lookup.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        pack::dequantize_group_row(self.ty, self.group(r / GROUP), r % GROUP, out);
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, o)| self.dequantize_row_into(r, o));
        }
        out
    }

    /// `out = acts · Wᵀ`: for each activation row, `rows` outputs.
    pub fn matmul(&self, acts: &QuantizedRows, out: &mut [f32]) -> Result<()> {
        matmul_many(&[self], acts, out)
    }
}

/// A zeroed buffer for weights that are streamed every step. On Linux the kernel is asked to
/// back it with transparent huge pages before it is touched: streaming 100 MB per token through
/// 4 KiB pages costs a TLB miss per page, and in a virtual machine each miss is a nested walk.
fn huge_page_buffer(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the allocation just made; MADV_HUGEPAGE is advice
            // only and cannot change the memory's contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(len, 0);
    v
}

/// The activation forms a set of matrices reads (pass to [`QuantizedRows::prepare`]).
pub fn act_kinds(mats: &[&QMatrix]) -> Vec<ActKind> {
    let mut kinds = Vec::new();
    for m in mats {
        let k = m.ty.act_kind();
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds
}

/// Which kernel family runs the products on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The portable scalar twin.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-VNNI.
    AvxVnni,
    /// AVX-512 VNNI (with BW and VL).
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU offers.
    pub fn detect() -> Isa {
        let f = cpu::features();
        if f.avx512_vnni {
            Isa::Avx512Vnni
        } else if f.avx_vnni {
            Isa::AvxVnni
        } else if f.avx2 {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Every family this CPU can run (for tests that compare them).
    pub fn available() -> Vec<Isa> {
        let f = cpu::features();
        let mut v = vec![Isa::Scalar];
        if f.avx2 {
            v.push(Isa::Avx2);
        }
        if f.avx_vnni {
            v.push(Isa::AvxVnni);
        }
        if f.avx512_vnni {
            v.push(Isa::Avx512Vnni);
        }
        v
    }
}

/// The products of several matrices with the same activation rows, in one parallel pass:
/// `out` holds, for each activation row in turn, the outputs of every matrix one after another
/// (`acts.rows() × Σ rows` elements).
pub fn matmul_many(mats: &[&QMatrix], acts: &QuantizedRows, out: &mut [f32]) -> Result<()> {
    matmul_many_with(Isa::detect(), mats, acts, out)
}

/// A pointer to the output that tasks writing disjoint elements share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct weight rows), see `matmul_many_with`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Activation rows a task keeps in cache while it walks its weight groups.
const ACT_CHUNK_BYTES: usize = 192 << 10;

/// [`matmul_many`] on a chosen kernel family (the CPU must have it).
pub fn matmul_many_with(
    isa: Isa,
    mats: &[&QMatrix],
    acts: &QuantizedRows,
    out: &mut [f32],
) -> Result<()> {
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let n = acts.rows();
    if out.len() != total * n {
        return Err(KernelError::Length {
            what: "matmul output",
            expected: total * n,
            got: out.len(),
        });
    }
    if let Some(m) = mats.iter().find(|m| m.cols != acts.cols()) {
        return Err(KernelError::Length {
            what: "matmul input",
            expected: m.cols,
            got: acts.cols(),
        });
    }
    if let Some(m) = mats.iter().find(|m| !acts.has(m.ty.act_kind())) {
        return Err(KernelError::Unprepared {
            format: m.ty.name(),
        });
    }
    if n == 0 || total == 0 {
        return Ok(());
    }
    // Units of work: (matrix, first group, end group, first output column).
    let all_groups: usize = mats.iter().map(|m| m.groups()).sum();
    let threads = rayon::current_num_threads().max(1);
    let work = all_groups * n;
    let per_unit = if work < 256 {
        all_groups
    } else {
        all_groups.div_ceil(threads * 4).max(1)
    };
    // The 512-bit kernel takes panel groups two at a time.
    let per_unit = if isa == Isa::Avx512Vnni {
        per_unit.next_multiple_of(2)
    } else {
        per_unit
    };
    let mut units = Vec::new();
    let mut col0 = 0;
    for (mi, m) in mats.iter().enumerate() {
        let mut g = 0;
        while g < m.groups() {
            let end = (g + per_unit).min(m.groups());
            units.push((mi, g, end, col0));
            g = end;
        }
        col0 += m.rows;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let table = ActTable::new(isa, mats, acts);
    let run = |&(mi, g0, g1, col0): &(usize, usize, usize, usize)| {
        let m = mats[mi];
        let rows = table.rows(m.ty);
        let emit = |t: usize, g: usize, vals: &[f32; 8]| {
            let valid = (m.rows - g * GROUP).min(GROUP);
            // SAFETY: rows `g * GROUP..g * GROUP + valid` of matrix `mi` exist; its outputs
            // occupy columns `col0..col0 + rows` of each activation row, and units cover
            // disjoint groups, so no two tasks write the same element.
            unsafe {
                let dst = ptr.get().add(t * total + col0 + g * GROUP);
                std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, valid);
            }
        };
        run_unit(isa, m, g0..g1, acts, rows, emit);
    };
    if units.len() == 1 {
        run(&units[0]);
    } else {
        units.par_iter().for_each(run);
    }
    Ok(())
}

/// Per activation form, a pointer bundle per activation row, built once per product.
struct ActTable {
    #[cfg(target_arch = "x86_64")]
    by_kind: [Vec<crate::quant::x86::ActPtr>; 3],
}

// SAFETY: the pointers point into a `QuantizedRows` borrowed for the whole product, which no
// one writes while it runs.
unsafe impl Sync for ActTable {}

fn kind_index(kind: ActKind) -> usize {
    match kind {
        ActKind::Block32 => 0,
        ActKind::Super256 => 1,
        ActKind::Float => 2,
    }
}

impl ActTable {
    fn new(isa: Isa, mats: &[&QMatrix], acts: &QuantizedRows) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let mut by_kind: [Vec<_>; 3] = Default::default();
            if isa != Isa::Scalar {
                for m in mats {
                    let k = kind_index(m.ty.act_kind());
                    if by_kind[k].is_empty() {
                        by_kind[k] = (0..acts.rows()).map(|t| act_ptr(m.ty, acts, t)).collect();
                    }
                }
            }
            Self { by_kind }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, mats, acts);
            Self {}
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn rows(&self, ty: QuantType) -> &[crate::quant::x86::ActPtr] {
        &self.by_kind[kind_index(ty.act_kind())]
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn rows(&self, _ty: QuantType) -> &[()] {
        &[]
    }
}

#[cfg(target_arch = "x86_64")]
type RowPtrs<'a> = &'a [crate::quant::x86::ActPtr];
#[cfg(not(target_arch = "x86_64"))]
type RowPtrs<'a> = &'a [()];

/// Runs groups `groups` of `m` against every activation row, handing each (activation row,
/// group, its eight outputs) to `emit`.
fn run_unit(
    isa: Isa,
    m: &QMatrix,
    groups: std::ops::Range<usize>,
    acts: &QuantizedRows,
    rows: RowPtrs<'_>,
    emit: impl Fn(usize, usize, &[f32; 8]),
) {
    let n = acts.rows();
    let chunk = (ACT_CHUNK_BYTES / m.cols.max(1)).clamp(8, 512);
    let recs = m.cols / m.ty.rec_elems();
    let mut t0 = 0;
    while t0 < n {
        let t1 = (t0 + chunk).min(n);
        let mut g = groups.start;
        while g < groups.end {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512Vnni && g + 1 < groups.end {
                let (p0, p1) = (m.group(g), m.group(g + 1));
                wide_tiles(m.ty, p0, p1, recs, &rows[t0..t1], |k, o| {
                    let (a, b) = o.split_at(GROUP);
                    emit(t0 + k, g, a.try_into().expect("eight outputs"));
                    emit(t0 + k, g + 1, b.try_into().expect("eight outputs"));
                });
                g += 2;
                continue;
            }
            let this = g;
            g += 1;
            let panel = m.group(this);
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Scalar {
                simd_tiles(isa, m.ty, panel, recs, &rows[t0..t1], |k, o| {
                    emit(t0 + k, this, o)
                });
                continue;
            }
            let _ = (isa, recs, &rows);
            for t in t0..t1 {
                let mut o = [0f32; 8];
                scalar::group_dot(m.ty, panel, acts, t, &mut o);
                emit(t, this, &o);
            }
        }
        t0 = t1;
    }
}

/// Tiles of eight (AVX-512), four or one activation rows against one panel group.
#[cfg(target_arch = "x86_64")]
fn simd_tiles(
    isa: Isa,
    ty: QuantType,
    panel: &[u8],
    recs: usize,
    rows: &[crate::quant::x86::ActPtr],
    mut emit: impl FnMut(usize, &[f32; 8]),
) {
    use crate::quant::x86;
    let tag = match isa {
        Isa::Avx512Vnni => x86::AVX512,
        Isa::AvxVnni => x86::VNNI,
        _ => x86::AVX2,
    };
    let (k8, k4, k1) = (
        x86::kernel::<8>(ty, tag),
        x86::kernel::<4>(ty, tag),
        x86::kernel::<1>(ty, tag),
    );
    let wide = isa == Isa::Avx512Vnni;
    let mut t = 0;
    macro_rules! run {
        ($f:expr, $r:expr) => {{
            let a: &[x86::ActPtr; $r] = rows[t..t + $r].try_into().expect("tile rows");
            let mut o = [[0f32; 8]; $r];
            // SAFETY: the CPU has `isa` (checked by the caller), the panel holds `recs`
            // records, and every activation row holds `recs` records' worth of elements in the
            // form `ty` reads (checked in `matmul_many_with`).
            unsafe { $f(panel.as_ptr(), recs, a, &mut o) };
            for (k, o) in o.iter().enumerate() {
                emit(t + k, o);
            }
            t += $r;
        }};
    }
    while t < rows.len() {
        let left = rows.len() - t;
        if wide && left >= 8 {
            run!(k8, 8)
        } else if left >= 4 {
            run!(k4, 4)
        } else {
            run!(k1, 1)
        }
    }
}

/// Tiles of eight, four or one activation rows against two panel groups at once, on 512-bit
/// registers.
#[cfg(target_arch = "x86_64")]
fn wide_tiles(
    ty: QuantType,
    p0: &[u8],
    p1: &[u8],
    recs: usize,
    rows: &[crate::quant::x86::ActPtr],
    mut emit: impl FnMut(usize, &[f32; 16]),
) {
    use crate::quant::x86;
    let (k8, k4, k1) = (
        x86::kernel16::<8>(ty),
        x86::kernel16::<4>(ty),
        x86::kernel16::<1>(ty),
    );
    let mut t = 0;
    macro_rules! run {
        ($f:expr, $r:expr) => {{
            let a: &[x86::ActPtr; $r] = rows[t..t + $r].try_into().expect("tile rows");
            let mut o = [[0f32; 16]; $r];
            // SAFETY: the caller checked AVX-512 VNNI; both panels hold `recs` records, and
            // every activation row holds `recs` records' worth of elements in the form `ty`
            // reads (checked in `matmul_many_with`).
            unsafe { $f(p0.as_ptr(), p1.as_ptr(), recs, a, &mut o) };
            for (k, o) in o.iter().enumerate() {
                emit(t + k, o);
            }
            t += $r;
        }};
    }
    while t < rows.len() {
        let left = rows.len() - t;
        if left >= 8 {
            run!(k8, 8)
        } else if left >= 4 {
            run!(k4, 4)
        } else {
            run!(k1, 1)
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn act_ptr(ty: QuantType, acts: &QuantizedRows, t: usize) -> crate::quant::x86::ActPtr {
    use crate::quant::x86::ActPtr;
    let cols = acts.cols();
    let null = ActPtr {
        qs: std::ptr::null(),
        d: std::ptr::null(),
        s: std::ptr::null(),
        sum16: std::ptr::null(),
        f: std::ptr::null(),
    };
    match ty.act_kind() {
        ActKind::Float => {
            let f = acts.f.as_ref().expect("checked");
            ActPtr {
                f: f[t * cols..].as_ptr(),
                ..null
            }
        }
        kind => {
            let (b, block) = if kind == ActKind::Super256 {
                (acts.b256.as_ref().expect("checked"), 256)
            } else {
                (acts.b32.as_ref().expect("checked"), 32)
            };
            let blocks = cols / block;
            ActPtr {
                qs: b.qs[t * cols..].as_ptr(),
                d: b.d[t * blocks..].as_ptr(),
                s: if b.s.is_empty() {
                    std::ptr::null()
                } else {
                    b.s[t * blocks..].as_ptr()
                },
                sum16: b.sum16[t * cols / 16..].as_ptr(),
                f: std::ptr::null(),
            }
        }
    }
}
