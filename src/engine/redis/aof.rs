//! Importing a Redis append-only file (`appendonlydir/` or `appendonly.aof`).
//!
//! Not built yet: the import refuses with one line.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::writer::EngineWriter;

pub fn import_aof(
    src: &Path,
    _out: EngineWriter,
    _cancel: &CancellationToken,
) -> Result<EngineEntry> {
    Err(Error::engine(
        "redis",
        format!(
            "{}: importing an AOF is not supported by this build yet",
            src.display()
        ),
    ))
}
