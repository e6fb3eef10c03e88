//! The server worker: answers `ServerValidationRequested` by connecting to the server over SSH
//! ([`crate::ssh`]) and looking around — operating system, CPUs, memory, free disk, and the
//! Docker Engine's version through its socket — then reports `RecordValidationSucceeded` with
//! the facts and the host key, or `RecordValidationFailed` with a reason a user can act on.
//!
//! The host key is trusted on first use: the fingerprint recorded by the last successful
//! validation is the only one accepted afterwards (it is forgotten when the server's host or
//! port changes). The private key is opened from its sealed half here, only for the connection.
//!
//! Health checks connect the same way — every `ZPANEL_SERVER_CHECK_SECONDS`, one process at a
//! time, and on `ServerCheckRequested` (`runServerCheck`) — and report `RecordCheck`; the
//! domain records only changes (`ServerBecameUnreachable`, `ServerRecovered`).

use crate::runtime::{Handler, HandlerError};
use crate::ssh::{DOCKER_SOCKET, Jump, SshError, SshSession, SshTarget};
use anyhow::Context as _;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;
use zpanel_commands::{Actor, CommandContext, CommandError, CommandHandler, Keyring, PgEventStore, RecordedEvent};
use zpanel_domain::ids::TeamId;
use zpanel_domain::private_key::PrivateKey;
use zpanel_domain::server::{Server, ServerCommand, ServerDetails, ServerError, ServerFacts, ServerStatus};

const EVENT_TYPES: &[&str] = &["ServerValidationRequested", "ServerCheckRequested"];

/// Servers checked at once by the periodic health check.
const CHECKS_AT_ONCE: usize = 4;

/// How long connecting, the handshake, logging in, and each command may take.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(10);

/// `server`'s private key, opened from its sealed half; `Err` with a reason for the user when it
/// cannot be (removed, or not readable).
///
/// # Errors
/// When the key cannot be loaded.
pub(crate) async fn open_key(
    handler: &CommandHandler<PgEventStore>,
    keyring: &Keyring,
    team: TeamId,
    server: &ServerDetails,
) -> anyhow::Result<Result<russh::keys::PrivateKey, String>> {
    let key_id = *server.connection.private_key_id.as_uuid();
    let (key, _) = handler.load::<PrivateKey>(team, key_id).await.context("loading the private key")?;
    let Some(key) = key.details() else {
        return Ok(Err("the server's private key was removed: choose another".into()));
    };
    let opened = match keyring.open(&key.private_key) {
        Ok(opened) => opened,
        Err(e) => return Ok(Err(format!("the private key could not be opened: {e}"))),
    };
    // Parsing is CPU work whose cost the key chooses (its size): on the blocking pool, never
    // on a runtime thread.
    let parsed = tokio::task::spawn_blocking(move || crate::ssh::parse_private_key(opened.expose()))
        .await
        .context("parsing the private key")?;
    Ok(parsed.map_err(|e| e.to_string()))
}

/// Where and as whom to log in to `server`, and to its jump host on the way (same key).
pub(crate) fn targets(server: &ServerDetails) -> (SshTarget, Option<SshTarget>) {
    let connection = &server.connection;
    let target = SshTarget {
        host: connection.host.as_str().to_owned(),
        port: connection.port.get(),
        user: connection.user.as_str().to_owned(),
    };
    let jump = connection.jump.as_ref().map(|jump| SshTarget {
        host: jump.host.as_str().to_owned(),
        port: jump.port.get(),
        user: jump.user.as_str().to_owned(),
    });
    (target, jump)
}

/// Free disk is measured where Docker keeps its data, or at `/` on a server without it. A
/// constant: no value from a user or a server goes into a command line.
const DISK_FREE: &str = "df -P -B1 /var/lib/docker 2>/dev/null || df -P -B1 /";

/// The server worker's handler.
#[derive(Clone)]
pub struct ServerValidator {
    handler: CommandHandler<PgEventStore>,
    keyring: Arc<Keyring>,
    worker_id: String,
    timeout: Duration,
}

impl std::fmt::Debug for ServerValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerValidator").field("worker_id", &self.worker_id).finish_non_exhaustive()
    }
}

impl ServerValidator {
    /// A validator sending its results through `handler`, opening keys with `keyring`.
    #[must_use]
    pub fn new(handler: CommandHandler<PgEventStore>, keyring: Arc<Keyring>, worker_id: &str) -> Self {
        Self { handler, keyring, worker_id: worker_id.to_owned(), timeout: SSH_TIMEOUT }
    }

    /// The same validator with another SSH timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to a validated server as its validation does and says whether that worked:
    /// `None` when the server is not validated (nothing to check), else the check's command.
    async fn check(&self, team: TeamId, server_id: Uuid) -> anyhow::Result<Option<ServerCommand>> {
        let (server, _) = self.handler.load::<Server>(team, server_id).await.context("loading the server")?;
        let Some(details) =
            server.details().filter(|s| matches!(s.status, ServerStatus::Reachable | ServerStatus::Unreachable))
        else {
            return Ok(None);
        };
        let error = match self.key_of(team, details).await? {
            Ok(key) => self.look_around(details, key).await.err().map(|e| e.to_string()),
            Err(reason) => Some(reason),
        };
        Ok(Some(ServerCommand::RecordCheck { error }))
    }

    /// Checks every validated server every `every`, until `until`; each change of
    /// reachability is recorded (`ServerBecameUnreachable`, `ServerRecovered`). One process
    /// checks at a time: a round holds an advisory lock that others skip.
    ///
    /// # Errors
    /// Never on its own: failed rounds are logged and tried again at the next tick.
    pub async fn check_periodically(
        &self,
        pool: sqlx::PgPool,
        every: Duration,
        until: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(until);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut until => return Ok(()),
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.check_round(&pool).await {
                tracing::warn!(error = format!("{e:#}"), "a round of server health checks failed");
            }
        }
    }

    async fn check_round(&self, pool: &sqlx::PgPool) -> anyhow::Result<()> {
        use futures::StreamExt as _;
        // A transaction without writes takes no transaction id, so holding it does not hold
        // back readers of the log.
        let mut tx = pool.begin().await?;
        let mine: bool =
            sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtextextended('zpanel.server-checks', 0))")
                .fetch_one(&mut *tx)
                .await?;
        if !mine {
            return Ok(());
        }
        let servers: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "select team_id, server_id from rm_servers where status in ('reachable', 'unreachable') order by server_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(servers)
            .map(|(team, server_id)| async move {
                let team = TeamId::from_uuid(team);
                let Some(command) = self.check(team, server_id).await? else { return Ok(()) };
                let ctx = CommandContext::new(team, Actor::worker(&self.worker_id), "worker:server");
                self.record(&ctx, server_id, &command).await
            })
            .buffer_unordered(CHECKS_AT_ONCE)
            .collect()
            .await;
        tx.commit().await?;
        results.into_iter().collect()
    }

    /// Answers `ServerCheckRequested` (`runServerCheck`).
    async fn check_requested(&self, event: &RecordedEvent) -> anyhow::Result<()> {
        let team = TeamId::from_uuid(event.team_id);
        let server_id = server_id_of(event)?;
        let Some(command) = self.check(team, server_id).await? else { return Ok(()) };
        let ctx = CommandContext::caused_by(event, Actor::worker(&self.worker_id), "worker:server", "check");
        self.record(&ctx, server_id, &command).await
    }

    async fn record(&self, ctx: &CommandContext, server_id: Uuid, command: &ServerCommand) -> anyhow::Result<()> {
        match self.handler.execute::<Server>(ctx, server_id, command).await {
            Ok(_) | Err(CommandError::Rejected(ServerError::ServerNotFound)) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("recording a check of server {server_id}: {e}")),
        }
    }

    async fn validate(&self, event: &RecordedEvent) -> anyhow::Result<()> {
        let team = TeamId::from_uuid(event.team_id);
        let server_id = server_id_of(event)?;
        let (server, _) = self.handler.load::<Server>(team, server_id).await.context("loading the server")?;
        // A validation already answered, or settings changed since: nothing to report.
        let Some(details) = server.details().filter(|s| s.status == ServerStatus::Validating) else {
            return Ok(());
        };
        let result = match self.key_of(team, details).await? {
            Ok(key) => {
                let key_fingerprint = crate::ssh::fingerprint(key.public_key());
                self.look_around(details, key).await.map_err(|e| as_told(&e, details, &key_fingerprint))
            }
            Err(reason) => Err(reason),
        };
        let command = match result {
            Ok((facts, host_key_fingerprint, jump_host_key_fingerprint)) => {
                ServerCommand::RecordValidationSucceeded { facts, host_key_fingerprint, jump_host_key_fingerprint }
            }
            Err(error) => ServerCommand::RecordValidationFailed { error },
        };
        self.report(event, server_id, &command, "result").await
    }

    /// The server's private key, opened; `Err` with a reason for the user when it cannot be.
    async fn key_of(
        &self,
        team: TeamId,
        server: &ServerDetails,
    ) -> anyhow::Result<Result<russh::keys::PrivateKey, String>> {
        open_key(&self.handler, &self.keyring, team, server).await
    }

    /// Connects (through the jump host, if any) and gathers the facts; returns them with the
    /// host keys seen: the server's, and the jump host's.
    async fn look_around(
        &self,
        server: &ServerDetails,
        key: russh::keys::PrivateKey,
    ) -> Result<(ServerFacts, String, Option<String>), SshError> {
        let (target, jump) = targets(server);
        let jump =
            jump.as_ref().map(|target| Jump { target, expected_host_key: server.jump_host_key_fingerprint.as_deref() });
        let session =
            SshSession::connect_via(jump, &target, key, server.host_key_fingerprint.as_deref(), self.timeout).await?;
        let facts = gather(&session).await;
        let fingerprint = session.host_key_fingerprint().to_owned();
        let jump_fingerprint = session.jump_host_key_fingerprint().map(str::to_owned);
        session.close().await;
        Ok((facts?, fingerprint, jump_fingerprint))
    }

    async fn report(
        &self,
        event: &RecordedEvent,
        server_id: Uuid,
        command: &ServerCommand,
        purpose: &str,
    ) -> anyhow::Result<()> {
        let ctx = CommandContext::caused_by(event, Actor::worker(&self.worker_id), "worker:server", purpose);
        match self.handler.execute::<Server>(&ctx, server_id, command).await {
            // Stale: the settings changed while this validation ran, or it was answered already.
            Ok(_) | Err(CommandError::Rejected(ServerError::NoValidationPending | ServerError::ServerNotFound)) => {
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!("reporting the validation of server {server_id}: {e}")),
        }
    }
}

/// What a failed validation says: everything, about a server the team has logged in to before
/// (its host key is recorded); about any other address, only that Zpanel could not log in
/// there. Otherwise `validateServer` would answer, for any host and port the workers reach,
/// whether nothing listens there, something that is not SSH, or an SSH server.
fn as_told(error: &SshError, server: &ServerDetails, key_fingerprint: &str) -> String {
    if server.host_key_fingerprint.is_some() || !error.before_login() {
        return error.to_string();
    }
    let (target, _) = targets(server);
    format!(
        "could not log in as {user} at {address} with the key {key_fingerprint}: check the host and the port, \
         that sshd runs there, and that the key's public half is in ~{user}/.ssh/authorized_keys \
         (once the server has been validated, failures say more)",
        user = target.user,
        address = target.address(),
    )
}

/// The facts, each from a fixed command on a channel of its own, all on one connection.
async fn gather(session: &SshSession) -> Result<ServerFacts, SshError> {
    // A kernel without the setting (older than 5.14) has no such file: `cat` fails, and
    // connections are reset just the same.
    let migrates = async { Ok(session.run("cat /proc/sys/net/ipv4/tcp_migrate_req").await.ok()) };
    let (os, cpus, memory, disk, docker_version, migrates) = tokio::try_join!(
        session.run("cat /etc/os-release"),
        session.run("nproc"),
        session.run("cat /proc/meminfo"),
        session.run(DISK_FREE),
        session.docker_version(DOCKER_SOCKET),
        migrates,
    )?;
    Ok(ServerFacts {
        os: os_name(&os.stdout),
        docker_version,
        cpus: cpus.stdout.trim().parse().unwrap_or(0),
        memory_bytes: memory_total(&memory.stdout),
        disk_free_bytes: disk_available(&disk.stdout),
        accept_queue_migrates: Some(migrates.is_some_and(|m| crate::proxy::migrates(&m.stdout))),
    })
}

/// `PRETTY_NAME` of `/etc/os-release`, else `NAME VERSION`, else `unknown`.
fn os_name(os_release: &str) -> String {
    let field = |name: &str| {
        os_release.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix('=')?;
            let value = value.trim().trim_matches('"').trim_matches('\'').trim();
            (!value.is_empty()).then(|| value.to_owned())
        })
    };
    field("PRETTY_NAME")
        .or_else(|| Some(format!("{} {}", field("NAME")?, field("VERSION").unwrap_or_default()).trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn memory_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

/// The `Available` column of `df -P -B1`, in bytes.
fn disk_available(df: &str) -> u64 {
    df.lines().nth(1).and_then(|line| line.split_whitespace().nth(3)?.parse().ok()).unwrap_or(0)
}

fn server_id_of(event: &RecordedEvent) -> anyhow::Result<Uuid> {
    event
        .stream_id
        .strip_prefix("server-")
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("{} is not a server stream", event.stream_id))
}

impl Handler for ServerValidator {
    fn event_types(&self) -> &[&str] {
        EVENT_TYPES
    }

    fn handle<'a>(&'a self, event: &'a RecordedEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        // Only the database can fail here: an unreachable server is a result, not a failure.
        Box::pin(async move {
            let handled = match event.event_type.as_str() {
                "ServerCheckRequested" => self.check_requested(event).await,
                _ => self.validate(event).await,
            };
            handled.map_err(HandlerError::Transient)
        })
    }

    fn give_up<'a>(&'a self, event: &'a RecordedEvent, reason: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let server_id = server_id_of(event)?;
            if event.event_type == "ServerCheckRequested" {
                // A check that could not run changes nothing: the next one will tell.
                tracing::warn!(server = %server_id, reason, "a requested server check could not run");
                return Ok(());
            }
            let error = format!("the server worker could not validate it: {reason}");
            self.report(event, server_id, &ServerCommand::RecordValidationFailed { error }, "give-up").await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_is_its_pretty_name_or_its_name_and_version() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n";
        assert_eq!(os_name(debian), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_name("NAME=Alpine\nVERSION=3.20\n"), "Alpine 3.20");
        assert_eq!(os_name(""), "unknown");
    }

    #[test]
    fn memory_and_disk_are_read_in_bytes() {
        assert_eq!(memory_total("MemTotal:       16314680 kB\nMemFree: 1 kB\n"), 16_314_680 * 1024);
        let df = "Filesystem     1-blocks      Used  Available Capacity Mounted on\n\
                  /dev/sda1   100000000  40000000   60000000      40% /\n";
        assert_eq!(disk_available(df), 60_000_000);
        assert_eq!(disk_available(""), 0);
    }
}
