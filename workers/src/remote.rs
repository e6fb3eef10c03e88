//! Servers reached over SSH, pooled: one connection per server, many channels on it.
//!
//! - [`SshPool`] keeps one [`Link`] per server: where it is, its opened key, the host key its
//!   validation recorded, and the SSH session — connected on first use, and connected anew for
//!   new work once it failed. Work already under way keeps the channels (and the session) it
//!   has until it ends or the session dies under it; it is never cut to make room.
//! - [`Dial`] is a hyper connector: each HTTP connection is one stream — on this machine a TCP
//!   or Unix socket, on a server a `direct-tcpip` or `direct-streamlocal` channel. The Docker
//!   Engine ([`crate::docker::Engine::over`]), Caddy's admin API and health checks
//!   ([`crate::http::Http`]) run over it unchanged, wherever the server is.
//! - Channels at once per server are bounded ([`CHANNELS_PER_SERVER`]); more work waits for one.
//! - Keepalives (every 15 s, three missed) notice a dead peer while the connection is idle.

use crate::ssh::{Jump, SshError, SshSession, SshTarget};
use anyhow::Context as _;
use futures::future::BoxFuture;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;
use zpanel_commands::{CommandHandler, Keyring, PgEventStore};
use zpanel_domain::ids::TeamId;
use zpanel_domain::server::Server;

/// Channels open at once on one server's connection (OpenSSH's own limit, `MaxSessions`,
/// counts only sessions; forwarded streams are not sessions).
pub const CHANNELS_PER_SERVER: usize = 16;

/// What a link was made from: when any of it changes, the next use makes a new link.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Settings {
    target: SshTarget,
    private_key_id: Uuid,
    host_key: String,
    /// The jump host and its recorded host key.
    jump: Option<(SshTarget, String)>,
}

/// One server's pooled SSH connection.
pub struct Link {
    name: String,
    settings: Settings,
    key: russh::keys::PrivateKey,
    timeout: Duration,
    session: tokio::sync::Mutex<Option<Arc<SshSession>>>,
    channels: Arc<Semaphore>,
    connects: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("target", &self.settings.target)
            .field("host_key", &self.settings.host_key)
            .finish_non_exhaustive()
    }
}

/// Where a channel goes on the server.
#[derive(Clone, Copy, Debug)]
enum Destination<'a> {
    /// A Unix socket (`direct-streamlocal`).
    Socket(&'a str),
    /// A TCP address as seen from the server (`direct-tcpip`).
    Tcp(&'a str, u16),
}

impl Link {
    /// A link to `target`, logging in with `key` and accepting only the host key
    /// `host_key` (`SHA256:…`, as its validation recorded it). Nothing connects until used.
    #[must_use]
    pub fn new(name: &str, target: SshTarget, key: russh::keys::PrivateKey, host_key: &str, timeout: Duration) -> Self {
        Self::with_settings(
            name,
            Settings { target, private_key_id: Uuid::nil(), host_key: host_key.to_owned(), jump: None },
            key,
            timeout,
        )
    }

    fn with_settings(name: &str, settings: Settings, key: russh::keys::PrivateKey, timeout: Duration) -> Self {
        Self {
            name: name.to_owned(),
            settings,
            key,
            timeout,
            session: tokio::sync::Mutex::default(),
            channels: Arc::new(Semaphore::new(CHANNELS_PER_SERVER)),
            connects: AtomicU64::new(0),
        }
    }

    /// The server's name and address, for messages: `web-1 (10.0.0.5:22)`.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("server {} ({})", self.name, self.settings.target.address())
    }

    /// How many times the connection was made (1 while the first one lives).
    #[must_use]
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Whether the connection is down now (failed, and not made again yet).
    pub async fn is_down(&self) -> bool {
        self.session.lock().await.as_ref().is_none_or(|s| s.is_closed())
    }

    /// The live session, connecting when there is none or the last one failed.
    async fn session(&self) -> Result<Arc<SshSession>, SshError> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref().filter(|s| !s.is_closed()) {
            return Ok(Arc::clone(session));
        }
        let settings = &self.settings;
        let jump = settings.jump.as_ref().map(|(target, host_key)| Jump { target, expected_host_key: Some(host_key) });
        let session =
            SshSession::connect_via(jump, &settings.target, self.key.clone(), Some(&settings.host_key), self.timeout)
                .await?;
        let session = Arc::new(session);
        self.connects.fetch_add(1, Ordering::Relaxed);
        if current.is_some() {
            tracing::info!(server = %self.name, "the SSH connection failed; connected anew for new work");
        }
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Drops `failed` as the session new work gets, if it still is.
    async fn forget(&self, failed: &Arc<SshSession>) {
        let mut current = self.session.lock().await;
        if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, failed)) {
            *current = None;
        }
    }

    /// A channel to `to`, waiting for a free one of the server's [`CHANNELS_PER_SERVER`]. A
    /// channel that cannot be opened on a session that turns out to be dead is tried once
    /// more on a new connection.
    async fn open(&self, to: Destination<'_>) -> Result<Pipe, SshError> {
        let permit = Arc::clone(&self.channels).acquire_owned().await.map_err(|_| SshError::Protocol {
            address: self.settings.target.address(),
            reason: "the connection pool is closed".into(),
        })?;
        let mut retried = false;
        loop {
            let session = self.session().await?;
            let opened = match to {
                Destination::Socket(path) => session.open_socket(path).await,
                Destination::Tcp(host, port) => session.open_tcp(host, port).await,
            };
            match opened {
                Ok(stream) => {
                    return Ok(Pipe { io: Box::new(stream), _hold: Some(Hold { _permit: permit, _session: session }) });
                }
                Err(SshError::Protocol { .. } | SshError::Timeout { .. }) if !retried => {
                    retried = true;
                    self.forget(&session).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where and as whom a server's pool entry was made, so a changed server gets a new link.
impl Settings {
    /// `None` while the jump host's key was not recorded yet.
    fn of(server: &zpanel_domain::server::ServerDetails, host_key: &str) -> Option<Self> {
        let (target, jump) = crate::servers::targets(server);
        let jump = match jump {
            Some(jump) => Some((jump, server.jump_host_key_fingerprint.clone()?)),
            None => None,
        };
        Some(Self {
            target,
            private_key_id: *server.connection.private_key_id.as_uuid(),
            host_key: host_key.to_owned(),
            jump,
        })
    }
}

/// One pooled SSH connection per server, for the workers of this process.
pub struct SshPool {
    handler: CommandHandler<PgEventStore>,
    keyring: Arc<Keyring>,
    timeout: Duration,
    links: std::sync::Mutex<HashMap<Uuid, Arc<Link>>>,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool").finish_non_exhaustive()
    }
}

impl SshPool {
    /// A pool reading servers and keys through `handler`, opening keys with `keyring`; each
    /// step of connecting has `timeout`.
    #[must_use]
    pub fn new(handler: CommandHandler<PgEventStore>, keyring: Arc<Keyring>, timeout: Duration) -> Self {
        Self { handler, keyring, timeout, links: std::sync::Mutex::default() }
    }

    /// The link to `team`'s server `server_id`: the pooled one while the server's settings
    /// and recorded host key are unchanged, a new one otherwise.
    ///
    /// # Errors
    /// When the server does not exist in the team, was never validated (no host key to trust
    /// yet), or its key cannot be opened; each with what to do.
    pub async fn link(&self, team: TeamId, server_id: Uuid) -> anyhow::Result<Arc<Link>> {
        let (server, _) = self.handler.load::<Server>(team, server_id).await.context("loading the server")?;
        let details =
            server.details().with_context(|| format!("the server {server_id} does not exist (or was removed)"))?;
        let name = details.name.as_str();
        let host_key = details.host_key_fingerprint.as_deref().with_context(|| {
            format!("the server {name} has not been validated yet: validate it (validateServer) before deploying to it")
        })?;
        let settings = Settings::of(details, host_key).with_context(|| {
            format!("the jump host of server {name} has not been validated yet: validate the server (validateServer)")
        })?;
        if let Some(link) = self.links.lock().ok().and_then(|links| links.get(&server_id).cloned())
            && link.settings == settings
        {
            return Ok(link);
        }
        let key = crate::servers::open_key(&self.handler, &self.keyring, team, details)
            .await?
            .map_err(|reason| anyhow::anyhow!("the server {name}: {reason}"))?;
        let link = Arc::new(Link::with_settings(name, settings, key, self.timeout));
        if let Ok(mut links) = self.links.lock() {
            links.insert(server_id, Arc::clone(&link));
        }
        Ok(link)
    }
}

/// Keeps a channel's slot and its session while the channel is open.
struct Hold {
    _permit: OwnedSemaphorePermit,
    _session: Arc<SshSession>,
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// One connection's byte stream: a local socket or an SSH channel.
pub struct Pipe {
    io: Box<dyn Stream>,
    _hold: Option<Hold>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe").field("over_ssh", &self._hold.is_some()).finish_non_exhaustive()
    }
}

impl AsyncRead for Pipe {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

impl Connection for Pipe {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[derive(Clone, Debug)]
enum Via {
    Local,
    Ssh(Arc<Link>),
}

/// How HTTP connections reach a place: this machine or a server's pooled SSH connection, to
/// the request's host and port or always to one Unix socket. A hyper connector.
#[derive(Clone, Debug)]
pub struct Dial {
    via: Via,
    socket: Option<Arc<str>>,
}

impl Dial {
    /// Connections made on this machine.
    #[must_use]
    pub fn local() -> Self {
        Self { via: Via::Local, socket: None }
    }

    /// Connections made from `link`'s server, through its SSH connection.
    #[must_use]
    pub fn ssh(link: Arc<Link>) -> Self {
        Self { via: Via::Ssh(link), socket: None }
    }

    /// The same, but every connection goes to the Unix socket at `path`, whatever the URI.
    #[must_use]
    pub fn to_socket(self, path: &str) -> Self {
        Self { socket: Some(path.into()), ..self }
    }

    /// Where connections are made from: `this machine` or `server NAME (host:port)`.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.via {
            Via::Local => "this machine".to_owned(),
            Via::Ssh(link) => link.describe(),
        }
    }

    /// A stream to the request's host and port, or to the socket.
    ///
    /// # Errors
    /// When it cannot be made; an SSH failure carries its [`SshError`] message.
    pub async fn connect(&self, uri: &Uri) -> std::io::Result<Pipe> {
        if let Some(path) = &self.socket {
            return match &self.via {
                Via::Local => {
                    let stream = tokio::net::UnixStream::connect(&**path).await?;
                    Ok(Pipe { io: Box::new(stream), _hold: None })
                }
                Via::Ssh(link) => link.open(Destination::Socket(path)).await.map_err(std::io::Error::other),
            };
        }
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri} names no host")))?;
        let port = uri.port_u16().unwrap_or(80);
        match &self.via {
            Via::Local => {
                let stream = tokio::net::TcpStream::connect((host, port)).await?;
                let _ = stream.set_nodelay(true);
                Ok(Pipe { io: Box::new(stream), _hold: None })
            }
            Via::Ssh(link) => link.open(Destination::Tcp(host, port)).await.map_err(std::io::Error::other),
        }
    }
}

impl tower_service::Service<Uri> for Dial {
    type Response = TokioIo<Pipe>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, std::io::Result<TokioIo<Pipe>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = self.clone();
        Box::pin(async move { dial.connect(&uri).await.map(TokioIo::new) })
    }
}
