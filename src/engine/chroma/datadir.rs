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

/// What an interrupted preseed may have moved into place before `chroma.sqlite3`: segment
/// directories (UUID-named) and SQLite's companions of `chroma.sqlite3`.
fn moved_early(name: &str, is_dir: bool) -> bool {
    let uuid = name.len() == 36
        && name.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    (is_dir && uuid) || (!is_dir && name.starts_with(&format!("{SQLITE}-")))
}

/// Whether a Chroma persist directory may be preseeded. Any entry not hidden (other than a
/// filesystem's `lost+found`) is data: a preseed never writes into a directory holding
/// something it did not put there, even files Chroma would ignore. The exception is an
/// unfinished preseed: its temp directory still there, no `chroma.sqlite3` yet (the last thing
/// moved into place) and nothing but what it moves before that: `Interrupted`.
pub fn data_dir_state(dir: &Path) -> Result<Emptiness> {
    let mut found = Vec::new();
    let mut ours = true;
    let mut tmp = false;
    for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == TMP_DIR {
            tmp = true;
        } else if !name.starts_with('.') && name != "lost+found" {
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            ours &= moved_early(&name, is_dir);
            found.push(name);
        }
    }
    Ok(if tmp && ours {
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
    // What an interrupted preseed moved into place before it stopped (data_dir_state found
    // nothing else).
    if dir.join(TMP_DIR).exists() {
        for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if !moved_early(&name, p.is_dir()) {
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(entries: &[&str]) -> Emptiness {
        let d = tempfile::tempdir().unwrap();
        for e in entries {
            let p = d.path().join(e.trim_end_matches('/'));
            if e.ends_with('/') {
                fs::create_dir(&p).unwrap();
            } else {
                fs::write(&p, b"x").unwrap();
            }
        }
        data_dir_state(d.path()).unwrap()
    }

    #[test]
    fn state_of_a_persist_directory() {
        let seg = "d143022f-51b8-44a1-b102-fe16b17d544e/";
        assert_eq!(state(&[]), Emptiness::Empty);
        assert_eq!(state(&[".hidden", "lost+found/"]), Emptiness::Empty);
        assert!(matches!(state(&["chroma.sqlite3"]), Emptiness::HasData(_)));
        assert!(matches!(state(&["notes.txt"]), Emptiness::HasData(_)));
        // An interrupted preseed: its temp directory and what it moves before chroma.sqlite3.
        let tmp = format!("{TMP_DIR}/");
        assert_eq!(state(&[&tmp]), Emptiness::Interrupted);
        assert_eq!(
            state(&[&tmp, seg, "chroma.sqlite3-wal"]),
            Emptiness::Interrupted
        );
        // chroma.sqlite3 in place, or anything else beside the temp directory: data.
        assert!(matches!(
            state(&[&tmp, seg, "chroma.sqlite3"]),
            Emptiness::HasData(_)
        ));
        assert!(matches!(state(&[&tmp, "notes.txt"]), Emptiness::HasData(_)));
    }
}
