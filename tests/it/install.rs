//! `dbkeeper install DIR`: the binary and its role names land in a shared directory, runnable
//! from there, and a second install replaces whatever is in the way atomically.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common::{assert_code, bin, dbkeeper, free_port, run, stderr, stdout};

fn install(dir: &Path) -> std::process::Output {
    let repo = tempfile::tempdir().unwrap();
    run(dbkeeper(repo.path()).arg("install").arg(dir))
}

/// Names in `dir`, sorted, hidden ones included (leftover temp files would show here).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_installed(dir: &Path) {
    assert_eq!(
        names(dir),
        ["dbkeeper", "dbkeeper-health", "dbkeeper-init"],
        "exactly the binary and its role names, no temp file left"
    );
    let exe = dir.join("dbkeeper");
    assert_eq!(
        std::fs::read(&exe).unwrap(),
        std::fs::read(bin()).unwrap(),
        "the installed binary is a byte copy of the running one"
    );
    let meta = std::fs::symlink_metadata(&exe).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    for name in ["dbkeeper-health", "dbkeeper-init"] {
        let link = dir.join(name);
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name} is a symlink"
        );
        // Relative, so it resolves inside whatever path the volume is mounted at.
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("dbkeeper"));
    }
}

#[test]
fn install_copies_binary_and_role_names_that_run_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shared/dbkeeper");
    let o = install(&dir);
    assert_code(&o, 0);
    assert_installed(&dir);

    // The role is picked by the link's name: dbkeeper-health probes and answers 0/1 with one
    // line, from any working directory, with no environment.
    let port = free_port();
    let o = Command::new(dir.join("dbkeeper-health"))
        .arg(format!("redis://127.0.0.1:{port}"))
        .env_clear()
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().count() + stderr(&o).lines().count(),
        1,
        "one line: {}{}",
        stdout(&o),
        stderr(&o)
    );

    // dbkeeper-init is `dbkeeper init`: with nothing configured it is a configuration error.
    let o = Command::new(dir.join("dbkeeper-init"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let o = Command::new(dir.join("dbkeeper"))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("install"));
}

#[test]
fn install_is_idempotent_and_replaces_stale_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bin");
    assert_code(&install(&dir), 0);
    assert_code(&install(&dir), 0);
    assert_installed(&dir);

    // An older or damaged binary, a role name that is a stale regular copy, and a dangling
    // link: all replaced by the next install.
    std::fs::remove_file(dir.join("dbkeeper")).unwrap();
    std::fs::write(dir.join("dbkeeper"), b"#!old binary").unwrap();
    std::fs::set_permissions(dir.join("dbkeeper"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(dir.join("dbkeeper-health")).unwrap();
    std::fs::write(dir.join("dbkeeper-health"), b"stale copy").unwrap();
    std::fs::remove_file(dir.join("dbkeeper-init")).unwrap();
    std::os::unix::fs::symlink("nowhere", dir.join("dbkeeper-init")).unwrap();

    assert_code(&install(&dir), 0);
    assert_installed(&dir);
}

#[test]
fn install_into_a_file_or_without_dir_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let o = install(&file);
    assert_code(&o, 1);
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not-a-dir"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file is untouched");

    // A directory standing where a role link goes is refused, not deleted.
    let dir = tmp.path().join("in-the-way");
    std::fs::create_dir_all(dir.join("dbkeeper-health/keep")).unwrap();
    let o = install(&dir);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("dbkeeper-health"), "{}", stderr(&o));
    assert!(dir.join("dbkeeper-health/keep").is_dir());
    assert!(
        names(&dir).iter().all(|n| !n.starts_with('.')),
        "no temp file left: {:?}",
        names(&dir)
    );

    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path()).arg("install"));
    assert_code(&o, 2);
}
