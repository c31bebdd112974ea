//! `agentd model list|pull|rm` over the model catalog (`agentd_engine::catalog`), and what the
//! global `--model NAME|PATH` means ([`resolve`]).

use agentd_engine::catalog::{
    human_bytes, looks_like_path, percent, Catalog, CatalogEntry, ModelStore, Origin, PullEvent,
    PullOptions, Source, DEFAULT_MODEL,
};
use anyhow::{Context, Result};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// The arguments of `agentd model list`.
#[derive(Args)]
pub struct ListArgs {
    /// Print a JSON array (every field, the source included) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `agentd model pull`.
#[derive(Args)]
pub struct PullArgs {
    /// The catalog name (see `agentd model list`).
    pub name: String,
    /// Hash a file that is already present and fetch it again if its SHA-256 is wrong.
    #[arg(long)]
    pub verify: bool,
}

/// The arguments of `agentd model rm`.
#[derive(Args)]
pub struct RmArgs {
    /// The catalog name (not a path: only files in the models folder are removed).
    pub name: String,
}

fn load_catalog() -> Result<Catalog> {
    Catalog::load().context("reading the model catalog")
}

/// The model file `--model` names: the value itself when it is an existing file, else the
/// catalog model of that name (the default model without a value), pulled on first use with
/// progress on stderr.
pub fn resolve(flag: Option<PathBuf>) -> Result<PathBuf> {
    let value = flag.unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    if value.is_file() {
        return Ok(value);
    }
    let catalog = load_catalog()?;
    let entry = catalog.get(&value.to_string_lossy()).map_err(|e| {
        anyhow::anyhow!("--model: {e} (it takes a catalog name or the path of a GGUF file)")
    })?;
    let store = ModelStore::open_default()?;
    if store.is_present(entry) {
        return Ok(store.path_of(entry));
    }
    pull_entry(&store, entry, &PullOptions::default())
}

/// Writes `text` to stdout; a reader that went away (`agentd model list | head`) ends the
/// output quietly, as other Unix tools do.
fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// `agentd model list`: every catalog model with its size, quantization, architecture, whether
/// it is downloaded, and which is the default.
pub fn list(args: ListArgs) -> Result<()> {
    let catalog = load_catalog()?;
    let store = ModelStore::open_default()?;
    if args.json {
        let rows: Vec<serde_json::Value> = catalog
            .entries()
            .iter()
            .map(|e| json_row(&store, e))
            .collect();
        return print_stdout(&(serde_json::to_string_pretty(&rows)? + "\n"));
    }
    let header = ["NAME", "SIZE", "QUANT", "ARCH", "PRESENT", "DESCRIPTION"];
    let rows: Vec<[String; 6]> = catalog
        .entries()
        .iter()
        .map(|e| {
            let name = if e.name == DEFAULT_MODEL {
                format!("{} *", e.name)
            } else {
                e.name.clone()
            };
            let present = if store.is_present(e) { "yes" } else { "no" };
            [
                name,
                human_bytes(e.size),
                e.quant.clone(),
                e.architecture.clone(),
                present.to_string(),
                e.description.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s += cell;
            } else {
                s += &format!("{cell:<w$}  ", w = widths[i]);
            }
        }
        s.trim_end().to_string()
    };
    let mut text = line(&header) + "\n";
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        text += &(line(&cells) + "\n");
    }
    text += &format!("\n* default. Files in {}\n", store.dir().display());
    print_stdout(&text)
}

fn json_row(store: &ModelStore, e: &CatalogEntry) -> serde_json::Value {
    let source = match &e.source {
        Source::Pip {
            requirements,
            find_links,
        } => serde_json::json!({ "wheels": requirements, "find_links": find_links }),
        Source::Local(paths) => serde_json::json!({ "paths": paths }),
    };
    let origin = match &e.origin {
        Origin::Builtin => "builtin".to_string(),
        Origin::User(path) => path.display().to_string(),
    };
    serde_json::json!({
        "name": e.name,
        "description": e.description,
        "architecture": e.architecture,
        "quant": e.quant,
        "size": e.size,
        "file": e.file,
        "sha256": e.sha256,
        "present": store.is_present(e),
        "default": e.name == DEFAULT_MODEL,
        "path": store.path_of(e),
        "origin": origin,
        "source": source,
    })
}

/// `agentd model pull NAME`: fetches the model (progress on stderr) and prints its path.
pub fn pull(args: PullArgs) -> Result<()> {
    let catalog = load_catalog()?;
    let entry = catalog.get(&args.name)?;
    let store = ModelStore::open_default()?;
    let opts = PullOptions {
        verify: args.verify,
        ..PullOptions::default()
    };
    let path = pull_entry(&store, entry, &opts)?;
    print_stdout(&format!("{}\n", path.display()))
}

/// `agentd model rm NAME`: removes the model's file and any partial pull of it.
pub fn rm(args: RmArgs) -> Result<()> {
    let store = ModelStore::open_default()?;
    anyhow::ensure!(
        !looks_like_path(&args.name),
        "`agentd model rm` takes a catalog name (see `agentd model list`), not a path like `{}`: \
         it only removes the files it manages in {}",
        args.name,
        store.dir().display()
    );
    let catalog = load_catalog()?;
    let entry = catalog.get(&args.name)?;
    let removed = store.remove(entry)?;
    for path in removed.file.iter().chain(removed.partial.iter()) {
        print_stdout(&format!("removed {}\n", path.display()))?;
    }
    if removed.file.is_none() && removed.partial.is_none() {
        eprintln!(
            "agentd: {} is not downloaded; nothing to remove",
            entry.name
        );
    }
    Ok(())
}

/// Pulls `entry` with a progress display on stderr: one line rewritten in place on a
/// terminal, a line every tenth of the file otherwise.
fn pull_entry(store: &ModelStore, entry: &CatalogEntry, opts: &PullOptions) -> Result<PathBuf> {
    let mut display = Progress::new(&entry.name);
    let result = store.pull(entry, opts, &mut |ev| display.show(ev));
    display.end_line();
    Ok(result?)
}

/// The pull progress display.
struct Progress<'a> {
    name: &'a str,
    tty: bool,
    /// A `\r` line is on screen and needs a newline before the next message.
    open_line: bool,
    /// The last percentage drawn (terminal) or the next tenth to print (log).
    mark: u64,
}

impl<'a> Progress<'a> {
    fn new(name: &'a str) -> Progress<'a> {
        Progress {
            name,
            tty: std::io::stderr().is_terminal(),
            open_line: false,
            mark: u64::MAX,
        }
    }

    fn show(&mut self, event: &PullEvent<'_>) {
        let mut err = std::io::stderr().lock();
        if let PullEvent::Bytes { done, total } = event {
            let pct = percent(*done, *total);
            if self.tty {
                if pct != self.mark || done == total {
                    self.mark = pct;
                    self.open_line = true;
                    let _ = write!(err, "\r\x1b[Kagentd: {}: {event}", self.name);
                    let _ = err.flush();
                }
            } else {
                let tenth = pct / 10;
                if self.mark == u64::MAX || tenth > self.mark {
                    self.mark = tenth;
                    let _ = writeln!(err, "agentd: {}: {event}", self.name);
                }
            }
            return;
        }
        self.end_line_on(&mut err);
        let _ = writeln!(err, "agentd: {}: {event}", self.name);
    }

    fn end_line(&mut self) {
        let mut err = std::io::stderr().lock();
        self.end_line_on(&mut err);
    }

    fn end_line_on(&mut self, err: &mut impl Write) {
        if self.open_line {
            let _ = writeln!(err);
            self.open_line = false;
        }
    }
}
