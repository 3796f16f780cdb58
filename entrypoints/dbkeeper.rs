//! The multi-call binary: `dbkeeper`, or a role picked by the name it is called by
//! (`dbkeeper-health`, `dbkeeper-init`).

use std::ffi::OsString;
use std::path::Path;

use clap::Parser;
use dbkeeper::ExitCode;
use dbkeeper::cli::Cli;
use dbkeeper::shutdown::Shutdown;

fn main() -> std::process::ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.as_str() {
        "dbkeeper-health" => {
            let code = dbkeeper::role::health::healthcheck_main(&args[1..]);
            return std::process::ExitCode::from(code as u8);
        }
        "dbkeeper-init" => args.insert(1, "init".into()),
        _ => {}
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
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
        dbkeeper::role::run(cli, &shutdown).await
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
