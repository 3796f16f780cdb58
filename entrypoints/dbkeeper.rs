//! The multi-call binary: `dbkeeper`, or a role picked by the name it is called by
//! (`dbkeeper-health`, `dbkeeper-init`).

use std::ffi::OsString;
use std::path::Path;

use clap::Parser;
use dbkeeper::ExitCode;
use dbkeeper::cli::{Cli, Command};
use dbkeeper::shutdown::Shutdown;

fn main() -> std::process::ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `dbkeeper health …` is the same probe as `dbkeeper-health …`: exit 0 or 1 and one line,
    // whatever the flags or the environment hold (a malformed DBKEEPER_* URL included).
    let health_args = match name.as_str() {
        "dbkeeper-health" => Some(1),
        _ if args.get(1).is_some_and(|a| a == "health") => Some(2),
        _ => None,
    };
    if let Some(from) = health_args {
        let code = dbkeeper::role::health::healthcheck_main(&args[from..]);
        return std::process::ExitCode::from(code as u8);
    }
    if name == "dbkeeper-init" {
        args.insert(1, "init".into());
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            // A malformed DBKEEPER_* value is a configuration error: name the variable in one
            // line, not the flag clap would blame (with a usage hint for a flag never typed).
            if let Some(line) = dbkeeper::cli::env_value_error(&e, &args) {
                eprintln!("dbkeeper: {line}");
                return ExitCode::Usage.into();
            }
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::Usage
            } else {
                ExitCode::Ok
            }
            .into();
        }
    };
    if let Err(e) = dbkeeper::logging::init(&cli.global.log_filter, &cli.global.log_format) {
        eprintln!("dbkeeper: {e:#}");
        return e.exit_code().into();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dbkeeper: cannot start the async runtime: {e}");
            return ExitCode::Failed.into();
        }
    };
    let shutdown = Shutdown::new();
    let result = runtime.block_on(async {
        shutdown
            .listen()
            .map_err(|e| dbkeeper::Error::engine("signals", e.to_string()))?;
        match cli.command {
            Command::Sidecar(_) | Command::Stats { .. } => {
                dbkeeper::sidecar::run_cli(cli, &shutdown).await
            }
            _ => dbkeeper::role::run(cli, &shutdown).await,
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::Ok.into(),
        Err(e) => {
            eprintln!("dbkeeper: {e:#}");
            e.exit_code().into()
        }
    }
}
