//! The readiness probe: one round trip on the calling thread.

use std::time::Duration;

use crate::engine::Probe;
use crate::error::Result;
use crate::secret::Secret;

use super::*;

/// One PING on the calling thread (the `dbkeeper-health` path: no runtime, no client
/// library). AUTH, PING and `INFO server` go out in one write, so a probe is one round trip.
pub fn probe_blocking(url: &Secret, opts: &EngineOptions, timeout: Duration) -> Result<Probe> {
    let cfg = RedisConfig::with_options(url, opts)?;
    probe_cfg(&cfg, timeout)
}

pub(super) fn probe_cfg(cfg: &RedisConfig, timeout: Duration) -> Result<Probe> {
    let mut c = Conn::connect(cfg, timeout)?;
    let auth = c.auth_command();
    let mut cmds: Vec<&[&[u8]]> = Vec::new();
    let auth_args: Vec<&[u8]> = auth.iter().flatten().map(Vec::as_slice).collect();
    if auth.is_some() {
        cmds.push(&auth_args);
    }
    cmds.push(&[b"PING"]);
    cmds.push(&[b"INFO", b"server"]);
    c.send(&cmds)?;
    if auth.is_some() {
        let r = c.read_reply()?;
        c.check_auth(r)?;
    }
    match c.read_reply()? {
        Reply::Status(s) if s.eq_ignore_ascii_case("PONG") => {}
        Reply::Error(e) => {
            let code = e.split_whitespace().next().unwrap_or("");
            return Err(match code {
                "LOADING" => cfg.unreachable("loading the dataset into memory"),
                "BUSY" | "MASTERDOWN" | "TRYAGAIN" => cfg.unreachable(first_line(&e)),
                "NOAUTH" => cfg.refused(
                    "the server requires a password; put it in the URL (redis://:PASSWORD@host)",
                ),
                _ => cfg.refused(first_line(&e).to_owned()),
            });
        }
        other => return Err(cfg.refused(format!("PING answered {other:?}"))),
    }
    let version = match c.read_reply()? {
        Reply::Bulk(Some(b)) => {
            info_field(&String::from_utf8_lossy(&b), "redis_version").map(str::to_owned)
        }
        // INFO may be renamed or forbidden by an ACL: the server is still up.
        _ => None,
    };
    Ok(Probe {
        version,
        detail: String::new(),
    })
}
