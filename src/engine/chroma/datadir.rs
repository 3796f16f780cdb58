//! Chroma's persist directory (`DBKEEPER_CHROMA_DATA_DIR`, the server stopped): its state, and
//! the pre-start preseed of a data-copy set into it.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Instant;

use tracing::info;

use super::ENGINE;
use super::datacopy::{self, SQLITE, TMP_DIR};
use crate::engine::Emptiness;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

fn dir_error(dir: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::config(format!(
            "DBKEEPER_CHROMA_DATA_DIR {}: no such directory; mount the Chroma data volume there",
            dir.display()
        ))
    } else {
        Error::io(dir, e)
    }
}

/// Whether a Chroma persist directory may be preseeded. An unfinished preseed (its temp
/// directory still there) is `Interrupted`; otherwise any entry not hidden (other than a
/// filesystem's `lost+found`) is data: a preseed never writes into a directory holding
/// something it did not put there, even files Chroma would ignore.
pub fn data_dir_state(dir: &Path) -> Result<Emptiness> {
    let mut found = Vec::new();
    let mut half_done = false;
    for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == TMP_DIR {
            half_done = true;
        } else if !name.starts_with('.') && name != "lost+found" {
            found.push(name);
        }
    }
    Ok(if half_done {
        Emptiness::Interrupted
    } else if found.is_empty() {
        Emptiness::Empty
    } else {
        // chroma.sqlite3 first: it is what says "a Chroma directory".
        found.sort_by_key(|n| (n != SQLITE, n.clone()));
        let more = found.len().saturating_sub(3);
        found.truncate(3);
        Emptiness::HasData(format!(
            "{} holds {}{}",
            dir.display(),
            found.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ))
    })
}

/// Writes a set's data copy into an empty persist directory, owned by the directory's owner.
/// A logical export cannot be preseeded this way: refused with one line.
pub fn preseed_data_dir(dir: &Path, set: &SetReader, entry: &EngineEntry) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !datacopy::is_data_copy(entry) {
        return Err(Error::config(format!(
            "set {} is a logical Chroma export, not a data copy: DBKEEPER_CHROMA_DATA_DIR preseeds data copies only; unset it and set DBKEEPER_CHROMA_URL to restore through the running server",
            set.id()
        )));
    }
    let meta = fs::metadata(dir).map_err(|e| dir_error(dir, e))?;
    // What an interrupted preseed moved into place before it stopped (the directory held
    // nothing else: data_dir_state said so).
    if dir.join(TMP_DIR).exists() {
        for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "lost+found" {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|err| Error::io(&p, err))?;
        }
    }
    let start = Instant::now();
    let bytes = datacopy::materialise(dir, set, entry, Some((meta.uid(), meta.gid())))?;
    info!(
        engine = ENGINE,
        dir = %dir.display(),
        set = set.id(),
        bytes,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "persist directory preseeded from a data copy"
    );
    Ok(())
}
