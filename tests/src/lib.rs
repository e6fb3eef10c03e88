//! End-to-end test support: the real `zpanel` binary against real services.
#![forbid(unsafe_code)]

pub mod api;
pub mod deploy;
pub mod kafka;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub use zpanel_commands::testing::TestDatabase;

/// The `zpanel` binary, built once per test process if it is not there yet.
///
/// `ZPANEL_BIN` names it explicitly (`scripts/test` builds it first and sets it); otherwise it is
/// the one next to the test executable's `deps/` folder, built here when missing. (Building from
/// inside `cargo test` can wait on cargo's lock of the target folder, hence the script's way.)
///
/// # Panics
/// When the binary cannot be found or built.
#[must_use]
pub fn zpanel_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("ZPANEL_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
        let bin = profile_dir.join("zpanel");
        if bin.is_file() {
            return bin;
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bin", "zpanel", "--manifest-path"])
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .env("CARGO_TARGET_DIR", profile_dir.parent().expect("target dir"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building zpanel failed");
        bin
    })
    .clone()
}

/// A `zpanel` command using `db` and a fresh data directory `data_dir`.
#[must_use]
pub fn zpanel(db: &TestDatabase, data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(zpanel_bin());
    command
        .env_remove("ZPANEL_MASTER_KEY")
        .env("ZPANEL_DATABASE_URL", &db.url)
        .env("ZPANEL_DATA_DIR", data_dir)
        .env("ZPANEL_LISTEN", "127.0.0.1:0")
        .env("ZPANEL_METRICS_LISTEN", "127.0.0.1:0")
        // Test applications are built from local repositories, which an installation allows
        // only under the directories it names.
        .env("ZPANEL_GIT_LOCAL_ROOTS", deploy::repositories_root())
        .env("RUST_LOG", "warn");
    command
}

/// A fresh temporary folder, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates one under the system temp folder, traversable by other users (the private
    /// PostgreSQL cluster runs as `postgres` when tests run as root).
    ///
    /// # Panics
    /// When it cannot be created.
    #[must_use]
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("zpanel-e2e-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).expect("temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(path)
    }
}

impl TempDir {
    /// Creates one in `parent` (created too when missing), traversable by other users.
    ///
    /// # Panics
    /// When it cannot be created.
    #[must_use]
    pub fn within(parent: &std::path::Path) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = parent.join(format!("zpanel-e2e-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).expect("temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(path)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
