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

/// Runs `dbkeeper install DIR --own …` with the given `--own` values.
fn install_owning(dir: &Path, own: &[String]) -> std::process::Output {
    let repo = tempfile::tempdir().unwrap();
    let mut cmd = dbkeeper(repo.path());
    cmd.arg("install").arg(dir);
    for o in own {
        cmd.arg("--own").arg(o);
    }
    run(&mut cmd)
}

#[test]
fn install_own_hands_a_tree_over_without_following_symlinks() {
    use std::os::unix::fs::MetadataExt;
    // Changing an owner needs root (CAP_CHOWN), as the compose install container has.
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED install_own_hands_a_tree_over…: needs root (CAP_CHOWN)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A backup directory written by an older root-run stack: root-owned sets, a lock file, a
    // private file, and a symlink pointing outside the tree (its target must stay root's).
    let tree = tmp.path().join("backups");
    std::fs::create_dir_all(tree.join("20260101T000000Z/redis")).unwrap();
    std::fs::write(tree.join("20260101T000000Z/manifest.json"), b"{}").unwrap();
    std::fs::write(tree.join("20260101T000000Z/redis/dump.rdb.zst"), b"x").unwrap();
    std::fs::write(tree.join(".lock"), b"").unwrap();
    std::fs::set_permissions(tree.join(".lock"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let outside = tmp.path().join("outside");
    std::fs::write(&outside, b"not theirs").unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
    let bin_dir = tmp.path().join("bin");

    let o = install_owning(&bin_dir, &[format!("{}=10001:10002", tree.display())]);
    assert_code(&o, 0);
    assert_installed(&bin_dir);
    let mut seen = 0;
    let mut stack = vec![tree.clone()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (10001, 10002),
            "{} handed over",
            p.display()
        );
        seen += 1;
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert_eq!(
        seen, 7,
        "the root, the set, its redis dir, two files, .lock and the link"
    );
    let m = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (0, 0),
        "the symlink's target is not followed"
    );

    // A second run changes nothing and says so.
    let o = install_owning(&bin_dir, &[format!("{}=10001:10002", tree.display())]);
    assert_code(&o, 0);
    assert!(stderr(&o).contains("changed=0"), "{}", stderr(&o));
}

#[test]
fn install_own_refuses_bad_values_before_installing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bin");
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for bad in [
        "relative/path=1:1".to_string(),
        format!("{}", tree.display()),
        format!("{}=10001", tree.display()),
        format!("{}=dbkeeper:dbkeeper", tree.display()),
        format!("{}=1:-1", tree.display()),
    ] {
        let o = install_owning(&dir, std::slice::from_ref(&bad));
        assert_code(&o, 2);
        assert!(stderr(&o).contains("PATH=UID:GID"), "{bad}: {}", stderr(&o));
        assert!(!dir.exists(), "{bad}: nothing installed");
    }
    // A path that is missing, or not a directory: one line naming it, exit 1, nothing installed.
    for (what, path) in [
        ("missing", tmp.path().join("gone")),
        ("a file", tmp.path().join("f")),
    ] {
        if what == "a file" {
            std::fs::write(&path, b"x").unwrap();
        }
        let o = install_owning(&dir, &[format!("{}=10001:10001", path.display())]);
        assert_code(&o, 1);
        assert_eq!(
            stderr(&o).trim().lines().count(),
            1,
            "{what}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains(&*path.to_string_lossy()),
            "{what}: {}",
            stderr(&o)
        );
        assert!(!dir.exists(), "{what}: nothing installed");
    }
}
