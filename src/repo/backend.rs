//! Where a repository's bytes live: a local directory (sets published by rename) or an
//! S3-compatible bucket (sets published by writing their manifest last). The rest of `repo`
//! goes through these two types, so engines and roles never know which one they use.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::s3::S3Store;
use crate::error::{Error, Result};

/// A repository's storage.
#[derive(Debug, Clone)]
pub enum Backend {
    Local(PathBuf),
    S3(S3Store),
}

impl Backend {
    /// The repository as an operator names it: a path or `s3://bucket/prefix`.
    pub fn display(&self) -> String {
        match self {
            Backend::Local(p) => p.display().to_string(),
            Backend::S3(s) => s.url(),
        }
    }

    /// A published set (or one being written, for local sets the `.tmp-` directory).
    pub fn set(&self, dir: &str) -> SetPlace {
        match self {
            Backend::Local(root) => SetPlace::Local(root.join(dir)),
            Backend::S3(store) => SetPlace::S3 {
                store: store.clone(),
                id: dir.to_owned(),
            },
        }
    }
}

/// One set's place in a backend.
#[derive(Debug, Clone)]
pub enum SetPlace {
    Local(PathBuf),
    S3 { store: S3Store, id: String },
}

impl SetPlace {
    /// A file of the set, for messages: a path, or an `s3://` URL.
    pub fn path(&self, rel: &str) -> PathBuf {
        match self {
            SetPlace::Local(dir) => dir.join(rel),
            SetPlace::S3 { store, id } => PathBuf::from(format!("{}/{id}/{rel}", store.url())),
        }
    }

    pub fn display(&self) -> String {
        match self {
            SetPlace::Local(dir) => dir.display().to_string(),
            SetPlace::S3 { store, id } => format!("{}/{id}", store.url()),
        }
    }

    /// Streams a stored file.
    pub fn open(&self, rel: &str) -> io::Result<Box<dyn Read + Send>> {
        match self {
            SetPlace::Local(dir) => Ok(Box::new(fs::File::open(dir.join(rel))?)),
            SetPlace::S3 { store, id } => store
                .get(&format!("{id}/{rel}"))
                .map_err(|e| io::Error::other(e.to_string())),
        }
    }

    /// A small file whole; `None` when it does not exist.
    pub fn read_small(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            SetPlace::Local(dir) => match fs::read(dir.join(rel)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(dir.join(rel), e)),
            },
            SetPlace::S3 { store, id } => store.read_all(&format!("{id}/{rel}")),
        }
    }

    /// Every stored file of the set with its size, relative to the set.
    pub fn sizes(&self) -> Result<BTreeMap<String, u64>> {
        match self {
            SetPlace::Local(dir) => {
                let mut out = BTreeMap::new();
                walk(dir, "", &mut out).map_err(|e| Error::io(dir, e))?;
                Ok(out)
            }
            SetPlace::S3 { store, id } => {
                let prefix = format!("{id}/");
                Ok(store
                    .list_files(id)?
                    .into_iter()
                    .filter_map(|(p, n)| p.strip_prefix(&prefix).map(|r| (r.to_owned(), n)))
                    .collect())
            }
        }
    }
}

fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, u64>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let t = entry.file_type()?;
        if t.is_dir() {
            walk(&entry.path(), &r, out)?;
        } else {
            out.insert(r, entry.metadata()?.len());
        }
    }
    Ok(())
}
