//! The file-system researcher's tools: everything resolves under one root, and a path that
//! leaves it (`..`, an absolute path elsewhere, a symlink out) is refused.

use std::path::{Path, PathBuf};

/// A path under the root.
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct PathArg {
    /// Relative to the root; "." is the root itself.
    pub path: String,
}

/// A word to look for.
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct SearchArg {
    /// The word (matched case-insensitively).
    pub word: String,
}

/// The folder the agent may see.
pub struct Root(PathBuf);

/// Most bytes `read` returns.
const READ_LIMIT: usize = 4000;
/// Most matching lines `search` returns.
const SEARCH_LIMIT: usize = 20;

impl Root {
    /// `root`, which must exist.
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        Ok(Self(root.canonicalize()?))
    }

    /// `rel` resolved under the root, or why not.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, String> {
        let joined = self.0.join(rel.trim_start_matches('/'));
        let real = joined.canonicalize().map_err(|e| format!("{rel}: {e}"))?;
        if !real.starts_with(&self.0) {
            return Err(format!("{rel}: outside the folder this agent may read"));
        }
        Ok(real)
    }

    fn rel<'a>(&self, p: &'a Path) -> std::borrow::Cow<'a, str> {
        p.strip_prefix(&self.0).unwrap_or(p).to_string_lossy()
    }

    /// The entries of a folder, one per line (folders end with `/`).
    pub fn list(&self, rel: &str) -> Result<String, String> {
        let dir = self.resolve(rel)?;
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{rel}: {e}"))?
            .flatten()
            .map(|e| {
                let slash = if e.path().is_dir() { "/" } else { "" };
                format!("{}{slash}", self.rel(&e.path()))
            })
            .collect();
        names.sort();
        Ok(names.join("\n"))
    }

    /// A text file's first [`READ_LIMIT`] bytes.
    pub fn read(&self, rel: &str) -> Result<String, String> {
        let path = self.resolve(rel)?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{rel}: {e}"))?;
        let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(READ_LIMIT)]).into_owned();
        if bytes.len() > READ_LIMIT {
            text.push_str("\n[… truncated]");
        }
        Ok(text)
    }

    /// Lines containing `word` in files under the root, as `file:line: text`.
    pub fn search(&self, word: &str) -> Result<String, String> {
        if word.trim().is_empty() {
            return Err("give a word to search for".into());
        }
        let needle = word.to_lowercase();
        let mut hits = Vec::new();
        let mut stack = vec![self.0.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(text) = std::fs::read_to_string(&p) {
                    for (i, line) in text.lines().enumerate() {
                        if line.to_lowercase().contains(&needle) && hits.len() < SEARCH_LIMIT {
                            hits.push(format!("{}:{}: {}", self.rel(&p), i + 1, line.trim()));
                        }
                    }
                }
            }
        }
        hits.sort();
        Ok(if hits.is_empty() {
            format!("no line contains {word:?}")
        } else {
            hits.join("\n")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("docs")).unwrap();
        std::fs::write(
            dir.path().join("docs/a.txt"),
            "Radix trees share prefixes.\nOther line.",
        )
        .unwrap();
        std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
        let root = Root::new(dir.path().join("docs")).unwrap();
        assert_eq!(root.list(".").unwrap(), "a.txt");
        assert!(root.read("a.txt").unwrap().starts_with("Radix"));
        assert!(root.search("radix").unwrap().starts_with("a.txt:1:"));
        for bad in ["../secret.txt", "/etc/passwd", "../../"] {
            let e = root.read(bad).unwrap_err();
            assert!(
                e.contains("outside") || e.contains("No such file"),
                "{bad}: {e}"
            );
        }
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), dir.path().join("docs/link"))
            .unwrap();
        assert!(root.read("link").unwrap_err().contains("outside"));
    }
}
