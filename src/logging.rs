//! tracing set-up: filter from `DBKEEPER_LOG`, `text` or `json` from `DBKEEPER_LOG_FORMAT`,
//! always to stderr (stdout is for data).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::error::{Error, Result};

pub fn init(filter: &str, format: &str) -> Result<()> {
    let mut env_filter = EnvFilter::try_new(filter)
        .map_err(|e| Error::config(format!("DBKEEPER_LOG={filter:?}: {e}")))?;
    // object_store logs every retried request at info; the failure, if it comes, is ours to
    // report in one line. A filter that names object_store decides for itself.
    if !filter.contains("object_store") {
        env_filter =
            env_filter.add_directive("object_store=warn".parse().expect("static directive"));
    }
    let filter = env_filter;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into `docker logs` or a file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = match format {
        "json" => builder.json().flatten_event(true).try_init(),
        "text" => builder.try_init(),
        other => {
            return Err(Error::config(format!(
                "DBKEEPER_LOG_FORMAT={other:?}: expected text or json"
            )));
        }
    };
    // A second init (tests) is harmless.
    let _ = result;
    Ok(())
}
