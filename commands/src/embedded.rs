//! A private PostgreSQL cluster under the data directory, for installs without
//! `ZPANEL_DATABASE_URL` (and for the test suite). It uses the machine's PostgreSQL binaries,
//! listens only on a Unix socket inside the data directory, and — because PostgreSQL refuses to
//! run as root — runs as the `postgres` system user when Zpanel runs as root.
//!
//! Processes are spawned with argument vectors only: `pg_ctl` is avoided because it hands the
//! server's command line to a shell.

use anyhow::{Context as _, bail};
use sqlx::postgres::PgConnectOptions;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The role and database Zpanel uses in its private cluster.
pub const DATABASE: &str = "zpanel";

/// Settings given to the server on every start, so that clusters made by earlier versions get
/// them too. The defaults checkpoint after 1 GB of WAL, which a burst of writes such as a
/// replay of the read models fills in under half a minute, and every checkpoint makes the
/// next change of each page log the whole page again: more room between checkpoints, and
/// those page images compressed.
const SERVER_SETTINGS: &[(&str, &str)] = &[("max_wal_size", "4GB"), ("wal_compression", "lz4")];

/// How durable the private cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults: every commit is flushed to disk. For real installs.
    Full,
    /// No fsync: for test clusters, which are thrown away.
    Relaxed,
}

/// The machine's PostgreSQL server binaries.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    /// Folder holding `initdb` and `postgres`.
    pub bin_dir: PathBuf,
}

impl PgBinaries {
    /// Finds `initdb` and `postgres` on `PATH`, else under `/usr/lib/postgresql/*/bin` (newest first).
    ///
    /// # Errors
    /// When no PostgreSQL server is installed, with what to install.
    pub fn locate() -> anyhow::Result<Self> {
        let mut candidates: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .filter_map(Result::ok)
                .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
                .collect();
            versions.sort_by_key(|v| std::cmp::Reverse(v.0));
            candidates.extend(versions.into_iter().map(|(_, p)| p));
        }
        candidates
            .into_iter()
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
            .map(|bin_dir| Self { bin_dir })
            .context(
                "no PostgreSQL server binaries (initdb, postgres) found on PATH or under /usr/lib/postgresql/*/bin: \
                 install them (Debian/Ubuntu: apt-get install postgresql) or set ZPANEL_DATABASE_URL",
            )
    }
}

/// The account the cluster runs as.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A private cluster: its folders and, once started by this process, the server process.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    binaries: PgBinaries,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<RunAs>,
    durability: Durability,
    child: Option<Child>,
}

impl EmbeddedPostgres {
    /// A cluster under `root` (`root/postgres` for data, `root/run` for the socket).
    ///
    /// # Errors
    /// When no binaries are found, or Zpanel runs as root and no unprivileged user exists.
    pub fn new(root: &Path, durability: Durability) -> anyhow::Result<Self> {
        let binaries = PgBinaries::locate()?;
        let root = std::path::absolute(root).with_context(|| format!("resolving {}", root.display()))?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres").context("looking up the postgres user")?.context(
                "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as: \
                     create one (useradd --system postgres) or run Zpanel as an unprivileged user",
            )?;
            Some(RunAs { uid: user.uid.as_raw(), gid: user.gid.as_raw() })
        } else {
            None
        };
        Ok(Self {
            binaries,
            data_dir: root.join("postgres"),
            socket_dir: root.join("run"),
            run_as,
            durability,
            child: None,
        })
    }

    /// Connection options for the cluster's `zpanel` database, over the Unix socket.
    #[must_use]
    pub fn connect_options(&self) -> PgConnectOptions {
        self.connect_options_for(DATABASE)
    }

    /// Connection options for any database of the cluster.
    #[must_use]
    pub fn connect_options_for(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new().socket(&self.socket_dir).username(DATABASE).database(database)
    }

    /// The folder of the Unix socket.
    #[must_use]
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Initializes the cluster if needed, starts the server unless one already runs on it, waits
    /// until it accepts connections and makes sure the `zpanel` database exists.
    ///
    /// # Errors
    /// When `initdb` or the server fails; the server's log is quoted.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if !self.data_dir.join("PG_VERSION").exists() {
            self.initdb()?;
        }
        self.prepare_socket_dir()?;
        if !self.accepts_connections().await {
            self.spawn_server()?;
            self.wait_until_ready(Duration::from_secs(60)).await?;
        }
        self.ensure_database().await
    }

    /// Stops the server if this process started it (fast shutdown: running sessions end).
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Leaves the server running when this value is dropped (shared test clusters).
    pub fn detach(&mut self) {
        self.child = None;
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.binaries.bin_dir.join(program));
        if let Some(run_as) = self.run_as {
            command.uid(run_as.uid).gid(run_as.gid);
        }
        // PostgreSQL reads locale and its own PG* settings from the environment; give it a clean one.
        command.env_clear().env("LC_ALL", "C.UTF-8").env("PATH", "/usr/bin:/bin");
        command
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(run_as) = self.run_as {
            std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid))
                .with_context(|| format!("giving {} to the postgres user", path.display()))?;
        }
        Ok(())
    }

    fn initdb(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir).with_context(|| format!("creating {}", self.data_dir.display()))?;
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))?;
        self.chown(&self.data_dir)?;
        let output = self
            .command("initdb")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .args(["--username", DATABASE, "--auth", "trust", "--encoding", "UTF8", "--locale", "C.UTF-8"])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed for {}:\n{}{}\n(if it cannot enter the folder, make the data directory's parents \
                 traversable by the postgres user, or choose another ZPANEL_DATA_DIR)",
                self.data_dir.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let mut settings = format!(
            "\n# Written by Zpanel: a private cluster, reachable only through its Unix socket.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             max_connections = 200\n\
             shared_buffers = 128MB\n",
            self.socket_dir.display().to_string().replace('\'', "''")
        );
        if self.durability == Durability::Relaxed {
            settings.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("reading postgresql.conf")?;
        text.push_str(&settings);
        std::fs::write(&conf, text).context("writing postgresql.conf")?;
        Ok(())
    }

    fn prepare_socket_dir(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.socket_dir).with_context(|| format!("creating {}", self.socket_dir.display()))?;
        std::fs::set_permissions(&self.socket_dir, std::fs::Permissions::from_mode(0o700))?;
        self.chown(&self.socket_dir)
    }

    fn spawn_server(&mut self) -> anyhow::Result<()> {
        let log_path = self.data_dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data_dir)
            .args(SERVER_SETTINGS.iter().flat_map(|(name, value)| ["-c".to_owned(), format!("{name}={value}")]))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for Zpanel must not kill the database under it.
            .process_group(0)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        Ok(())
    }

    async fn accepts_connections(&self) -> bool {
        let options = self.connect_options_for("postgres");
        sqlx::ConnectOptions::connect(&options).await.is_ok()
    }

    async fn wait_until_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.accepts_connections().await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("postgres exited with {status} while starting; its log:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within {limit:?}; its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn ensure_database(&self) -> anyhow::Result<()> {
        let mut conn = sqlx::ConnectOptions::connect(&self.connect_options_for("postgres"))
            .await
            .context("connecting to the private cluster")?;
        let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            // Another process may create it at the same moment; that is fine.
            if let Err(e) = sqlx::query(&format!("create database {DATABASE}")).execute(&mut conn).await {
                let duplicate = matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P04"));
                if !duplicate {
                    return Err(e).context("creating the zpanel database");
                }
            }
        }
        Ok(())
    }
}
