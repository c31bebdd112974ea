//! Reading a GGUF file: its metadata (typed look-ups that name the key on error) and its tensors.

use super::error::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An open GGUF file: parsed header and metadata, with tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses `path`'s header. A malformed or truncated header is an error, never a
    /// panic (the parser is also guarded against panics on hostile input).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(ModelError::Format {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ModelError::Format {
                    path: path.to_owned(),
                    reason: "the header is inconsistent".into(),
                })
            }
        };
        Ok(Self {
            path: path.to_owned(),
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata entries.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// A metadata view for typed look-ups.
    pub fn meta(&self) -> Meta<'_> {
        Meta(&self.content.metadata)
    }

    /// The GGML type and shape (outermost first, e.g. `[rows, cols]`) of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| (t.ggml_dtype, t.shape.dims().to_vec()))
    }

    /// Reads tensor `name`, checking that its shape is `dims`.
    pub fn tensor(&mut self, name: &str, dims: &[usize]) -> Result<QTensor> {
        let Some((_, shape)) = self.tensor_info(name) else {
            return Err(ModelError::MissingTensor {
                name: name.to_owned(),
            });
        };
        if shape != dims {
            return Err(ModelError::BadTensor {
                name: name.to_owned(),
                reason: format!("shape {shape:?}, expected {dims:?}"),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::BadTensor {
                name: name.to_owned(),
                reason: e.to_string(),
            })
    }
}

/// Typed access to GGUF metadata; every error names the key.
#[derive(Clone, Copy)]
pub struct Meta<'a>(pub &'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    /// The raw value, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn bad(key: &str, reason: impl Into<String>) -> ModelError {
        ModelError::BadKey {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<&'a str> {
        match self.get(key) {
            None => Err(ModelError::MissingKey {
                key: key.to_owned(),
            }),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(Self::bad(
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }

    /// A non-negative integer of any GGUF integer type, if present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: i128 = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            other => {
                return Err(Self::bad(
                    key,
                    format!("expected an integer, found {:?}", other.value_type()),
                ))
            }
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| Self::bad(key, format!("{n} is not a valid count")))
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| ModelError::MissingKey {
            key: key.to_owned(),
        })
    }

    /// A float (f32 or f64), if present.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(Self::bad(
                key,
                format!("expected a float, found {:?}", v.value_type()),
            )),
        }
    }
}
