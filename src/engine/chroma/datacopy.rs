//! A copy of a Chroma persist directory as a set's Chroma part.
//!
//! Not built yet: the import and the export refuse with one line.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;

pub fn import_data_copy(
    src: &Path,
    _out: EngineWriter,
    _cancel: &CancellationToken,
) -> Result<EngineEntry> {
    Err(Error::engine(
        "chroma",
        format!(
            "{}: importing a Chroma data copy is not supported by this build yet",
            src.display()
        ),
    ))
}

pub fn export_data_copy(set: &SetReader, _entry: &EngineEntry, dest: &Path) -> Result<()> {
    Err(Error::engine(
        "chroma",
        format!(
            "set {}: exporting a Chroma data copy to {} is not supported by this build yet",
            set.id(),
            dest.display()
        ),
    ))
}
