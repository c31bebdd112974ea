//! Typed look-ups in a GGUF file's metadata, each error naming the key it is about.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::{Result, TokenizerError};

/// A GGUF file's metadata, as candle reads it.
pub(super) type Metadata = HashMap<String, Value>;

fn describe(value: &Value) -> String {
    format!("{:?}", value.value_type())
}

fn wrong_type(key: String, expected: &'static str, found: &Value) -> TokenizerError {
    TokenizerError::WrongType {
        key,
        expected,
        found: describe(found),
    }
}

fn get<'a>(md: &'a Metadata, key: &'static str) -> Result<&'a Value> {
    md.get(key).ok_or(TokenizerError::MissingKey { key })
}

/// A string value.
pub(super) fn get_str<'a>(md: &'a Metadata, key: &'static str) -> Result<&'a str> {
    match get(md, key)? {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(key.to_string(), "a string", other)),
    }
}

/// A string value, if the key is present.
pub(super) fn get_str_opt<'a>(md: &'a Metadata, key: &'static str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(_) => get_str(md, key).map(Some),
    }
}

fn get_array<'a>(md: &'a Metadata, key: &'static str) -> Result<&'a [Value]> {
    match get(md, key)? {
        Value::Array(items) => Ok(items),
        other => Err(wrong_type(key.to_string(), "an array", other)),
    }
}

/// An array of strings.
pub(super) fn get_str_array<'a>(md: &'a Metadata, key: &'static str) -> Result<Vec<&'a str>> {
    get_array(md, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(wrong_type(format!("{key}[{i}]"), "a string", other)),
        })
        .collect()
}

/// An array of 32-bit integers (any integer type whose values fit).
pub(super) fn get_i32_array(md: &Metadata, key: &'static str) -> Result<Vec<i32>> {
    get_array(md, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            as_i64(v)
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| wrong_type(format!("{key}[{i}]"), "a 32-bit integer", v))
        })
        .collect()
}

/// An array of numbers as `f32`: llama.cpp reads `tokenizer.ggml.scores` as F32 or as I32.
pub(super) fn get_f32_array(md: &Metadata, key: &'static str) -> Result<Vec<f32>> {
    get_array(md, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match *v {
            Value::F32(x) => Ok(x),
            // An I32 score array is converted as llama.cpp does (`static_cast<float>`).
            Value::I32(n) => Ok(n as f32),
            _ => Err(wrong_type(format!("{key}[{i}]"), "an F32 or I32 number", v)),
        })
        .collect()
}

fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(n) => Some(n.into()),
        Value::I8(n) => Some(n.into()),
        Value::U16(n) => Some(n.into()),
        Value::I16(n) => Some(n.into()),
        Value::U32(n) => Some(n.into()),
        Value::I32(n) => Some(n.into()),
        Value::U64(n) => i64::try_from(n).ok(),
        Value::I64(n) => Some(n),
        _ => None,
    }
}

/// A non-negative integer, if the key is present.
pub(super) fn get_u64_opt(md: &Metadata, key: &'static str) -> Result<Option<u64>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    as_i64(value)
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| wrong_type(key.to_string(), "a non-negative integer", value))
}

/// A boolean, if the key is present.
pub(super) fn get_bool_opt(md: &Metadata, key: &'static str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(key.to_string(), "a bool", other)),
    }
}

/// A token id, if the key is present; an id outside the vocabulary is an error.
pub(super) fn get_token_id_opt(
    md: &Metadata,
    key: &'static str,
    vocab_size: usize,
) -> Result<Option<u32>> {
    let Some(id) = get_u64_opt(md, key)? else {
        return Ok(None);
    };
    match u32::try_from(id) {
        Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
        _ => Err(TokenizerError::IdOutOfRange {
            what: key.to_string(),
            id,
            vocab_size,
        }),
    }
}
