//! GGUF → GGUF requantization (`agentd model quantize`), following llama.cpp's type mixtures.
//!
//! Every tensor is read with candle's GGUF reader, dequantised to f32 when its type changes, and
//! quantized again with candle's quantizers (rows split across rayon's threads); the file is
//! written with candle's GGUF writer. Which type each tensor gets follows llama.cpp's
//! `llama_tensor_get_type` for the formats offered here ([`QuantFormat`]):
//!
//! - 1-D tensors, norms and names not ending in `weight` keep their type.
//! - `output.weight` — or `token_embd.weight` when there is no `output.weight` (tied
//!   embeddings) — gets Q6_K (Q8_0 stays Q8_0; Q8_0 when its rows do not fit the format's blocks).
//! - For Q4_K_M and Q5_K_M, `attn_v` and `ffn_down` get Q6_K on the "more bits" layers: the
//!   first and last eighth, and every third layer in between.
//! - A row length that is not a multiple of the chosen format's block falls back: Q4_K → Q5_0,
//!   Q5_K → Q5_1, Q6_K → Q8_0, and to F16 if even that does not fit (llama.cpp refuses the last
//!   case for Q4_0/Q8_0; F16 is lossless enough to be the safer answer).
//! - A tensor whose chosen type is already its type is copied byte for byte.
//!
//! Metadata is copied, except `general.file_type` (set to llama.cpp's `LLAMA_FTYPE` number),
//! `general.quantization_version` (2) and `general.alignment` (dropped: candle's writer aligns
//! tensor data to 32 bytes, the GGUF default, so a copied larger alignment would make readers
//! look for the data in the wrong place). Keys are written sorted, `general.architecture` first;
//! tensors keep their order in the input.
//!
//! The output is written to a temporary file in its directory, synced and renamed over the
//! destination, so a crash or an error never leaves a half-written file under the final name.
//! Memory: one f32 tensor at a time plus the quantized output (candle's writer takes every
//! tensor at once), so about the output's size.

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// The target mixtures, named as llama.cpp's `llama-quantize` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum QuantFormat {
    /// Q4_K with Q6_K on sensitive tensors (`LLAMA_FTYPE_MOSTLY_Q4_K_M` = 15).
    #[serde(rename = "q4_k_m")]
    Q4KM,
    /// Q5_K with Q6_K on sensitive tensors (`LLAMA_FTYPE_MOSTLY_Q5_K_M` = 17).
    #[serde(rename = "q5_k_m")]
    Q5KM,
    /// Q6_K throughout (`LLAMA_FTYPE_MOSTLY_Q6_K` = 18).
    #[serde(rename = "q6_k")]
    Q6K,
    /// Q8_0 throughout (`LLAMA_FTYPE_MOSTLY_Q8_0` = 7).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Q4_0, output head Q6_K (`LLAMA_FTYPE_MOSTLY_Q4_0` = 2).
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl QuantFormat {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [QuantFormat; 5] = [
        QuantFormat::Q4KM,
        QuantFormat::Q5KM,
        QuantFormat::Q6K,
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
    ];

    /// The name on the command line (`q4_k_m`, …).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4KM => "q4_k_m",
            QuantFormat::Q5KM => "q5_k_m",
            QuantFormat::Q6K => "q6_k",
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// llama.cpp's `LLAMA_FTYPE` number, written as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            QuantFormat::Q4_0 => 2,
            QuantFormat::Q8_0 => 7,
            QuantFormat::Q4KM => 15,
            QuantFormat::Q5KM => 17,
            QuantFormat::Q6K => 18,
        }
    }

    /// The type of every tensor the mixture does not single out.
    pub fn base_type(self) -> GgmlDType {
        match self {
            QuantFormat::Q4KM => GgmlDType::Q4K,
            QuantFormat::Q5KM => GgmlDType::Q5K,
            QuantFormat::Q6K => GgmlDType::Q6K,
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantFormat {
    type Err = QuantizeError;

    /// Parses a name case-insensitively (`Q4_K_M` and `q4_k_m` alike).
    fn from_str(s: &str) -> Result<Self, QuantizeError> {
        QuantFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| QuantizeError::UnknownFormat(s.to_owned()))
    }
}

/// What quantizing a file can fail with.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The input cannot be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The input.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The input is not a GGUF file candle can parse.
    #[error("{} is not a GGUF file: {reason}", path.display())]
    NotGguf {
        /// The input.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// A format name that is not one of [`QuantFormat::ALL`].
    #[error("unknown quantization type `{0}`; expected one of q4_k_m, q5_k_m, q6_k, q8_0, q4_0")]
    UnknownFormat(String),
    /// The output path names the input file (quantizing in place is not supported).
    #[error("the output {} is the input file; write to another path", .0.display())]
    SameFile(PathBuf),
    /// A tensor that cannot be read, dequantised or quantized.
    #[error("tensor {name}: {reason}")]
    Tensor {
        /// The tensor.
        name: String,
        /// Why.
        reason: String,
    },
    /// The output cannot be written.
    #[error("cannot write {}: {reason}", path.display())]
    Write {
        /// The output.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One tensor's fate: its type in the input and in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    /// The tensor's name.
    pub name: String,
    /// Its shape, candle's order (rows first; the last dimension is the row length).
    pub shape: Vec<usize>,
    /// Its type in the input.
    pub from: GgmlDType,
    /// Its type in the output.
    pub to: GgmlDType,
}

/// What [`quantize_file`] did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// The mixture written.
    pub format: QuantFormat,
    /// Tensors written.
    pub tensors: usize,
    /// Output tensors per type (llama.cpp's type names: `q4_k`, `f32`, …).
    pub by_type: BTreeMap<&'static str, usize>,
    /// Tensors copied unchanged (their type did not change).
    pub copied: usize,
    /// The input file's size.
    pub input_bytes: u64,
    /// The output file's size.
    pub output_bytes: u64,
    /// Wall time of the whole conversion.
    pub seconds: f64,
}

/// llama.cpp's name for a tensor type (`q4_k`, `q8_0`, `f32`, …).
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one in
/// between get more bits in the _M mixtures.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row length
/// `ncols` is replaced by a compatible one (F16 as the last resort).
fn fallback(t: GgmlDType, ncols: usize) -> GgmlDType {
    if ncols.is_multiple_of(t.block_size()) {
        return t;
    }
    let f = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if ncols.is_multiple_of(f.block_size()) {
        f
    } else {
        GgmlDType::F16
    }
}

/// Whether llama.cpp would quantize this tensor at all (`tensor_allows_quantization`, for the
/// tensors a Llama-family file holds): 2-D or more, a name ending in `weight`, not a norm.
fn quantizable(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight")
}

/// Decides every tensor's output type. `tensors` are (name, shape, type) in file order (the
/// per-layer counters of the _M rules count in that order, as llama.cpp's do).
pub fn plan(tensors: &[(String, Vec<usize>, GgmlDType)], format: QuantFormat) -> Vec<TensorPlan> {
    let count = |pat: &str| tensors.iter().filter(|(n, ..)| n.contains(pat)).count();
    let (n_attn_v, n_ffn_down) = (count("attn_v.weight"), count("ffn_down"));
    let tied = !tensors.iter().any(|(n, ..)| n == "output.weight");
    let (mut i_attn_v, mut i_ffn_down) = (0, 0);
    let base = format.base_type();
    let more_bits = matches!(format, QuantFormat::Q4KM | QuantFormat::Q5KM);
    tensors
        .iter()
        .map(|(name, shape, from)| {
            let ncols = shape.last().copied().unwrap_or(0);
            let to = if !quantizable(name, shape) {
                *from
            } else {
                let mut t = base;
                if name == "output.weight" || (tied && name == "token_embd.weight") {
                    if !ncols.is_multiple_of(base.block_size()) {
                        t = GgmlDType::Q8_0;
                    } else if base != GgmlDType::Q8_0 {
                        t = GgmlDType::Q6K;
                    }
                } else if name.contains("attn_v.weight") {
                    if more_bits && use_more_bits(i_attn_v, n_attn_v) {
                        t = GgmlDType::Q6K;
                    }
                    i_attn_v += 1;
                } else if name.contains("ffn_down") {
                    if more_bits && use_more_bits(i_ffn_down, n_ffn_down) {
                        t = GgmlDType::Q6K;
                    }
                    i_ffn_down += 1;
                }
                fallback(t, ncols)
            };
            TensorPlan {
                name: name.clone(),
                shape: shape.clone(),
                from: *from,
                to,
            }
        })
        .collect()
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set.
fn message(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Whether `a` and `b` name the same existing file (same device and inode: a symlink or a hard
/// link to the input counts as the input).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Quantizes `t` (f32) to `to`, rows split across rayon's threads (each row's blocks are
/// independent, so the bytes equal a single-threaded quantization's).
fn quantize_rows(t: &Tensor, to: GgmlDType) -> candle_core::Result<QTensor> {
    let dims = t.dims().to_vec();
    let cols = dims.last().copied().unwrap_or(0);
    if cols == 0 || t.elem_count() == 0 {
        return QTensor::quantize(t, to);
    }
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    let rows = data.len() / cols;
    let per_chunk = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
    let parts = data
        .par_chunks(per_chunk * cols)
        .map(|c| {
            let part = Tensor::from_slice(c, (c.len() / cols, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, to)?.data()?.into_owned())
        })
        .collect::<candle_core::Result<Vec<Vec<u8>>>>()?;
    let storage = QStorage::from_data(Cow::Owned(parts.concat()), &Device::Cpu, to)?;
    QTensor::new(storage, dims)
}

/// Reads `input`, quantizes it to `format` and writes `output` (see the module docs for the
/// rules). `output` may exist (it is replaced) but must not be `input`.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    format: QuantFormat,
) -> Result<QuantizeReport, QuantizeError> {
    let start = Instant::now();
    let read_err = |source| QuantizeError::Read {
        path: input.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(input).map_err(read_err)?;
    let input_bytes = f.metadata().map_err(read_err)?.len();
    if same_file(input, output) {
        return Err(QuantizeError::SameFile(output.to_owned()));
    }
    let content = Content::read(&mut f).map_err(|e| QuantizeError::NotGguf {
        path: input.to_owned(),
        reason: message(&e),
    })?;
    // File order: by data offset.
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let listed: Vec<(String, Vec<usize>, GgmlDType)> = infos
        .iter()
        .map(|(name, info)| ((*name).clone(), info.shape.dims().to_vec(), info.ggml_dtype))
        .collect();
    let plans = plan(&listed, format);

    let mut tensors = Vec::with_capacity(plans.len());
    let mut by_type = BTreeMap::new();
    let mut copied = 0;
    for p in &plans {
        let bad = |e: candle_core::Error| QuantizeError::Tensor {
            name: p.name.clone(),
            reason: message(&e),
        };
        let qt = content.tensor(&mut f, &p.name, &Device::Cpu).map_err(bad)?;
        let qt = if p.to == p.from {
            copied += 1;
            qt
        } else {
            let dense = qt.dequantize(&Device::Cpu).map_err(bad)?;
            drop(qt);
            quantize_rows(&dense, p.to).map_err(bad)?
        };
        *by_type.entry(type_name(p.to)).or_insert(0) += 1;
        tensors.push((p.name.clone(), qt));
    }

    let mut meta: Vec<(String, Value)> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.alignment" | "general.file_type" | "general.quantization_version"
            )
        })
        .collect();
    meta.push(("general.file_type".into(), Value::U32(format.file_type())));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    meta.sort_by(|(a, _), (b, _)| {
        (a != "general.architecture", a.as_str()).cmp(&(b != "general.architecture", b.as_str()))
    });

    let write_err = |reason: String| QuantizeError::Write {
        path: output.to_owned(),
        reason,
    };
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".agentd-quantize-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| {
            write_err(format!(
                "creating a temporary file in {}: {e}",
                dir.display()
            ))
        })?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta_refs, &tensor_refs).map_err(|e| write_err(message(&e)))?;
        w.flush().map_err(|e| write_err(e.to_string()))?;
    }
    drop(tensors);
    let file = tmp.as_file();
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| write_err(e.to_string()))?;
    }
    file.sync_all().map_err(|e| write_err(e.to_string()))?;
    let output_bytes = file.metadata().map_err(|e| write_err(e.to_string()))?.len();
    tmp.persist(output)
        .map_err(|e| write_err(format!("renaming the temporary file: {}", e.error)))?;
    // The rename is durable once the directory is synced (best effort: some file systems
    // refuse to open a directory for syncing).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(QuantizeReport {
        format,
        tensors: plans.len(),
        by_type,
        copied,
        input_bytes,
        output_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol_like(
        layers: usize,
        hidden: usize,
        ffn: usize,
        tied: bool,
    ) -> Vec<(String, Vec<usize>, GgmlDType)> {
        let q = GgmlDType::Q4_1;
        let mut t = vec![(
            "token_embd.weight".to_string(),
            vec![1000, hidden],
            GgmlDType::Q8_0,
        )];
        for i in 0..layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            t.push((n("attn_norm"), vec![hidden], GgmlDType::F32));
            t.push((n("attn_q"), vec![hidden, hidden], q));
            t.push((n("attn_k"), vec![hidden / 3, hidden], q));
            t.push((n("attn_v"), vec![hidden / 3, hidden], q));
            t.push((n("attn_output"), vec![hidden, hidden], q));
            t.push((n("ffn_norm"), vec![hidden], GgmlDType::F32));
            t.push((n("ffn_gate"), vec![ffn, hidden], q));
            t.push((n("ffn_up"), vec![ffn, hidden], q));
            t.push((n("ffn_down"), vec![hidden, ffn], q));
        }
        t.push(("output_norm.weight".into(), vec![hidden], GgmlDType::F32));
        if !tied {
            t.push(("output.weight".into(), vec![1000, hidden], q));
        }
        t
    }

    fn type_of(plans: &[TensorPlan], name: &str) -> GgmlDType {
        plans.iter().find(|p| p.name == name).unwrap().to
    }

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // n = 30: n/8 = 3, 7n/8 = 26; every third layer from 3 on, starting at 5.
        let want = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29];
        let got: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn q4_k_m_on_a_256_aligned_untied_model() {
        let plans = plan(&smol_like(32, 512, 1536, false), QuantFormat::Q4KM);
        assert_eq!(type_of(&plans, "output.weight"), GgmlDType::Q6K);
        assert_eq!(type_of(&plans, "token_embd.weight"), GgmlDType::Q4K);
        assert_eq!(type_of(&plans, "blk.0.attn_norm.weight"), GgmlDType::F32);
        assert_eq!(type_of(&plans, "blk.0.attn_q.weight"), GgmlDType::Q4K);
        // n = 32: layers 0..4 and 28.. get more bits, then 6, 9, …
        for (layer, more) in [
            (0, true),
            (3, true),
            (4, false),
            (6, true),
            (7, false),
            (28, true),
        ] {
            let want = if more { GgmlDType::Q6K } else { GgmlDType::Q4K };
            assert_eq!(type_of(&plans, &format!("blk.{layer}.attn_v.weight")), want);
            assert_eq!(
                type_of(&plans, &format!("blk.{layer}.ffn_down.weight")),
                want
            );
        }
        let plans = plan(&smol_like(32, 512, 1536, false), QuantFormat::Q5KM);
        assert_eq!(type_of(&plans, "blk.4.attn_v.weight"), GgmlDType::Q5K);
        assert_eq!(type_of(&plans, "blk.6.ffn_down.weight"), GgmlDType::Q6K);
        assert_eq!(type_of(&plans, "output.weight"), GgmlDType::Q6K);
    }

    #[test]
    fn rows_not_a_multiple_of_256_fall_back() {
        // SmolLM2-135M: hidden 576 (not a multiple of 256), ffn 1536 (one), tied embeddings.
        let t = smol_like(30, 576, 1536, true);
        let plans = plan(&t, QuantFormat::Q4KM);
        assert_eq!(type_of(&plans, "token_embd.weight"), GgmlDType::Q8_0);
        assert_eq!(type_of(&plans, "blk.1.attn_q.weight"), GgmlDType::Q5_0);
        assert_eq!(type_of(&plans, "blk.0.attn_v.weight"), GgmlDType::Q8_0);
        assert_eq!(type_of(&plans, "blk.3.attn_v.weight"), GgmlDType::Q5_0);
        assert_eq!(type_of(&plans, "blk.0.ffn_down.weight"), GgmlDType::Q6K);
        assert_eq!(type_of(&plans, "blk.3.ffn_down.weight"), GgmlDType::Q4K);
        let plans = plan(&t, QuantFormat::Q5KM);
        assert_eq!(type_of(&plans, "blk.1.ffn_gate.weight"), GgmlDType::Q5_1);
        let plans = plan(&t, QuantFormat::Q6K);
        assert_eq!(type_of(&plans, "blk.1.ffn_gate.weight"), GgmlDType::Q8_0);
        assert_eq!(type_of(&plans, "blk.1.ffn_down.weight"), GgmlDType::Q6K);
        // Q4_0: the tied embedding is the output head, Q6_K → Q8_0 on 576-wide rows.
        let plans = plan(&t, QuantFormat::Q4_0);
        assert_eq!(type_of(&plans, "token_embd.weight"), GgmlDType::Q8_0);
        assert_eq!(type_of(&plans, "blk.1.attn_v.weight"), GgmlDType::Q4_0);
        assert_eq!(type_of(&plans, "blk.1.ffn_down.weight"), GgmlDType::Q4_0);
        let plans = plan(&t, QuantFormat::Q8_0);
        assert!(plans.iter().all(|p| p.to
            == if p.shape.len() == 1 {
                GgmlDType::F32
            } else {
                GgmlDType::Q8_0
            }));
        // Rows that fit no block: F16.
        assert_eq!(fallback(GgmlDType::Q4K, 100), GgmlDType::F16);
        assert_eq!(fallback(GgmlDType::Q8_0, 48), GgmlDType::F16);
    }

    #[test]
    fn format_names_parse_and_number_as_llama_cpp() {
        for f in QuantFormat::ALL {
            assert_eq!(f.name().parse::<QuantFormat>().unwrap(), f);
            assert_eq!(f.name().to_uppercase().parse::<QuantFormat>().unwrap(), f);
        }
        let ft: Vec<u32> = QuantFormat::ALL.iter().map(|f| f.file_type()).collect();
        assert_eq!(ft, [15, 17, 18, 7, 2]);
        let e = "q3_k_s".parse::<QuantFormat>().unwrap_err().to_string();
        assert!(
            e.contains("unknown quantization type `q3_k_s`") && e.contains("q4_k_m"),
            "{e}"
        );
    }

    /// Deterministic values in about ±0.5.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// A small Llama-shaped F32 file whose metadata has arrays of several types.
    fn write_source(path: &Path) -> Vec<(String, Vec<usize>)> {
        let shapes: Vec<(String, Vec<usize>)> = vec![
            ("token_embd.weight".into(), vec![64, 256]),
            ("blk.0.attn_norm.weight".into(), vec![256]),
            ("blk.0.attn_q.weight".into(), vec![64, 256]),
            ("blk.0.attn_v.weight".into(), vec![64, 256]),
            ("blk.0.ffn_down.weight".into(), vec![256, 96]),
            ("output_norm.weight".into(), vec![256]),
        ];
        let tensors: Vec<(String, QTensor)> = shapes
            .iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let len = s.iter().product();
                let t =
                    Tensor::from_vec(values(len, i as u64 + 1), s.clone(), &Device::Cpu).unwrap();
                (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
            })
            .collect();
        let meta = source_meta();
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
        shapes
    }

    fn source_meta() -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.file_type".into(), Value::U32(0)),
            ("llama.block_count".into(), Value::U32(1)),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(vec![
                    Value::String("a".into()),
                    Value::String("<|x|>".into()),
                ]),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(vec![Value::F32(-1.5), Value::F32(0.25)]),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(vec![Value::I32(1), Value::I32(3)]),
            ),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ]
    }

    fn read_back(path: &Path) -> (Content, std::fs::File) {
        let mut f = std::fs::File::open(path).unwrap();
        (Content::read(&mut f).unwrap(), f)
    }

    /// The written file reads back: metadata equal but for the file type, tensor types as
    /// planned, values within each format's error of the source, norms bit for bit.
    #[test]
    fn written_files_read_back_with_metadata_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.gguf");
        let shapes = write_source(&src);
        let (source, mut sf) = read_back(&src);
        for (format, tol) in [
            (QuantFormat::Q4KM, 0.09),
            (QuantFormat::Q5KM, 0.045),
            (QuantFormat::Q6K, 0.025),
            (QuantFormat::Q8_0, 0.008),
            (QuantFormat::Q4_0, 0.09),
        ] {
            let out = dir.path().join(format!("{format}.gguf"));
            let report = quantize_file(&src, &out, format).unwrap();
            assert_eq!(report.tensors, shapes.len());
            assert_eq!(report.output_bytes, std::fs::metadata(&out).unwrap().len());
            let (got, mut gf) = read_back(&out);
            let mut want_meta: BTreeMap<String, String> = source_meta()
                .into_iter()
                .map(|(k, v)| (k, format!("{v:?}")))
                .collect();
            want_meta.insert(
                "general.file_type".into(),
                format!("{:?}", Value::U32(format.file_type())),
            );
            want_meta.insert(
                "general.quantization_version".into(),
                format!("{:?}", Value::U32(2)),
            );
            let got_meta: BTreeMap<String, String> = got
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:?}")))
                .collect();
            assert_eq!(got_meta, want_meta, "{format}");
            let listed: Vec<_> = shapes
                .iter()
                .map(|(n, s)| (n.clone(), s.clone(), GgmlDType::F32))
                .collect();
            for p in plan(&listed, format) {
                let a = source.tensor(&mut sf, &p.name, &Device::Cpu).unwrap();
                let b = got.tensor(&mut gf, &p.name, &Device::Cpu).unwrap();
                assert_eq!(b.dtype(), p.to, "{format} {}", p.name);
                assert_eq!(b.shape().dims(), &p.shape[..]);
                let a = a.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
                let b = b.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
                let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                if p.to == GgmlDType::F32 {
                    assert_eq!(a, b, "{format} {}", p.name);
                    continue;
                }
                let rms = |v: &mut dyn Iterator<Item = f32>, n| {
                    (v.map(|x| x * x).sum::<f32>() / n as f32).sqrt()
                };
                let err = rms(&mut a.iter().zip(&b).map(|(x, y)| x - y), a.len());
                let scale = rms(&mut a.iter().copied(), a.len());
                assert!(
                    err <= tol * scale,
                    "{format} {}: rms error {err} vs {scale}",
                    p.name
                );
            }
        }
    }

    /// An already-quantized input is dequantised and quantized again; a tensor whose type does
    /// not change is copied byte for byte.
    #[test]
    fn requantizing_dequantizes_and_copies_unchanged_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.gguf");
        write_source(&src);
        let q8 = dir.path().join("q8.gguf");
        quantize_file(&src, &q8, QuantFormat::Q8_0).unwrap();
        let again = dir.path().join("q8-again.gguf");
        let report = quantize_file(&q8, &again, QuantFormat::Q8_0).unwrap();
        assert_eq!(report.copied, report.tensors);
        assert_eq!(std::fs::read(&q8).unwrap(), std::fs::read(&again).unwrap());
        let k = dir.path().join("q4km.gguf");
        let report = quantize_file(&q8, &k, QuantFormat::Q4KM).unwrap();
        assert_eq!(report.by_type.get("q6_k"), Some(&2), "{report:?}");
        assert_eq!(report.by_type.get("q5_0"), None);
        assert_eq!(report.by_type.get("q4_k"), Some(&1), "{report:?}");
        // The two norms, and ffn_down: Q8_0 in both (its 96-wide rows fit no K-quant block).
        assert_eq!(report.copied, 3);
    }

    #[test]
    fn bad_inputs_are_clear_errors_and_leave_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.gguf");
        let missing = dir.path().join("missing.gguf");
        let e = quantize_file(&missing, &out, QuantFormat::Q8_0).unwrap_err();
        assert!(matches!(e, QuantizeError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.gguf"), "{e}");

        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a model at all").unwrap();
        let e = quantize_file(&text, &out, QuantFormat::Q8_0).unwrap_err();
        assert!(matches!(e, QuantizeError::NotGguf { .. }), "{e}");
        assert!(e.to_string().contains("is not a GGUF file"), "{e}");

        let src = dir.path().join("src.gguf");
        write_source(&src);
        let before = std::fs::read(&src).unwrap();
        let e = quantize_file(&src, &src, QuantFormat::Q8_0).unwrap_err();
        assert!(matches!(e, QuantizeError::SameFile(_)), "{e}");
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        let e = quantize_file(&src, &link, QuantFormat::Q8_0).unwrap_err();
        assert!(matches!(e, QuantizeError::SameFile(_)), "{e}");
        assert_eq!(std::fs::read(&src).unwrap(), before);

        let e = quantize_file(
            &src,
            &dir.path().join("no/such/dir/out.gguf"),
            QuantFormat::Q8_0,
        )
        .unwrap_err();
        assert!(matches!(e, QuantizeError::Write { .. }), "{e}");
        // Nothing was left behind: no output, no temporary file.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["link.gguf", "notes.txt", "src.gguf"]);
    }
}
