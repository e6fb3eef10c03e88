//! A running `zpanel serve` and typed helpers to speak GraphQL to it, over HTTP and over a
//! `graphql-transport-ws` WebSocket.

use crate::{TempDir, TestDatabase, zpanel};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// `zpanel serve` on a free loopback port, over a fresh database; stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct App {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where it serves `/metrics`: `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
    /// The database it uses.
    pub db: TestDatabase,
    /// Its data directory.
    pub data: TempDir,
    child: Child,
    http: reqwest::Client,
}

/// A GraphQL answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// `data`.
    pub data: Value,
    /// `errors` (empty when none).
    pub errors: Vec<Value>,
}

impl Answer {
    /// The data, asserting there were no errors.
    ///
    /// # Panics
    /// When there were errors.
    pub fn ok(self) -> Value {
        assert!(self.errors.is_empty(), "unexpected errors: {:#?}", self.errors);
        self.data
    }

    /// The first error's `extensions.code`.
    ///
    /// # Panics
    /// When there was no error.
    #[must_use]
    pub fn code(&self) -> String {
        self.errors.first().and_then(|e| e["extensions"]["code"].as_str()).map(str::to_owned).unwrap_or_else(|| {
            panic!("expected an error, got data {:#}", self.data);
        })
    }

    /// The first error.
    ///
    /// # Panics
    /// When there was no error.
    #[must_use]
    pub fn error(&self) -> &Value {
        self.errors.first().unwrap_or_else(|| panic!("expected an error, got data {:#}", self.data))
    }
}

impl App {
    /// Starts `zpanel serve` (with `env` added) over a fresh database and waits until it listens.
    ///
    /// # Panics
    /// When it does not start.
    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_subcommand("serve", env).await
    }

    /// Starts `zpanel api`: the API without workers, so nothing acts on queued deployments but
    /// the test.
    ///
    /// # Panics
    /// When it does not start.
    pub async fn start_api() -> Self {
        Self::start_subcommand("api", &[]).await
    }

    /// Starts `zpanel <subcommand>` (`serve` or `api`) with `env` added.
    ///
    /// # Panics
    /// When it does not start.
    pub async fn start_subcommand(subcommand: &str, env: &[(&str, &str)]) -> Self {
        let db = TestDatabase::create().await.expect("a test database");
        let data = TempDir::new();
        let mut command = zpanel(&db, &data.0);
        command.arg(subcommand);
        for (k, v) in env {
            command.env(k, v);
        }
        let (child, url, metrics_url) = listen(command).await;
        Self { url, metrics_url, db, data, child, http: reqwest::Client::new() }
    }

    /// Starts `zpanel serve` with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Creates a team with `zpanel bootstrap`; returns its root token.
    ///
    /// # Panics
    /// When bootstrap fails.
    #[must_use]
    pub fn bootstrap(&self, team: &str) -> String {
        let out = zpanel(&self.db, &self.data.0).args(["bootstrap", "--team", team]).output().expect("bootstrap runs");
        assert!(out.status.success(), "bootstrap: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").lines().last().expect("a token line").trim().to_owned()
    }

    /// Sends a GraphQL request with `token` (or none).
    ///
    /// # Panics
    /// When the HTTP exchange fails.
    pub async fn graphql(&self, token: Option<&str>, query: &str, variables: Value) -> Answer {
        self.graphql_at(&self.url, token, query, variables).await
    }

    /// Like [`App::graphql`], sent to the API at `url` (a [`Peer`]'s).
    ///
    /// # Panics
    /// When the request fails or the answer is not JSON.
    pub async fn graphql_at(&self, url: &str, token: Option<&str>, query: &str, variables: Value) -> Answer {
        let mut request =
            self.http.post(format!("{url}/graphql")).json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST /graphql");
        let body: Value = response.json().await.expect("a JSON answer");
        Answer {
            data: body.get("data").cloned().unwrap_or(Value::Null),
            errors: body.get("errors").and_then(Value::as_array).cloned().unwrap_or_default(),
        }
    }

    /// A plain GET; returns status and body.
    ///
    /// # Panics
    /// When the HTTP exchange fails.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(format!("{}{path}", self.url)).send().await.expect("GET");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// Polls a deployment with `query` (a `deployment(id: $id) { status … }` query) as `token`
    /// until it has finished (succeeded, failed or was cancelled); its last answer.
    ///
    /// # Panics
    /// When it does not finish within two minutes.
    pub async fn finished_deployment(&self, token: &str, query: &str, deployment: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let d = self.graphql(Some(token), query, json!({ "id": deployment })).await.ok()["deployment"].clone();
            if matches!(d["status"].as_str(), Some("SUCCEEDED" | "FAILED" | "CANCELLED")) {
                return d;
            }
            assert!(std::time::Instant::now() < deadline, "deployment {deployment} did not finish: {d}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its `/metrics`, from the operator's listener; returns status and body.
    ///
    /// # Panics
    /// When the HTTP exchange fails.
    pub async fn metrics(&self) -> (u16, String) {
        let response = self.http.get(&self.metrics_url).send().await.expect("GET /metrics");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// Opens a `graphql-transport-ws` subscription with `token`.
    ///
    /// # Panics
    /// When the WebSocket handshake or `connection_init` fails.
    pub async fn subscribe(&self, token: &str, query: &str, variables: Value) -> Subscription {
        self.subscribe_with_buffer(token, query, variables, None).await
    }

    /// [`App::subscribe`], with the socket's receive buffer set to `receive_buffer` bytes: a
    /// subscriber that stops reading then holds the server up after a few messages.
    ///
    /// # Panics
    /// When the WebSocket handshake or `connection_init` fails.
    pub async fn subscribe_with_buffer(
        &self,
        token: &str,
        query: &str,
        variables: Value,
        receive_buffer: Option<u32>,
    ) -> Subscription {
        let ws_url = format!("{}/graphql", self.url.replacen("http", "ws", 1));
        let mut request = ws_url.into_client_request().expect("a ws request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().expect("header"));
        let address = self.url.trim_start_matches("http://").parse().expect("the app's address");
        let tcp = tokio::net::TcpSocket::new_v4().expect("a socket");
        if let Some(bytes) = receive_buffer {
            tcp.set_recv_buffer_size(bytes).expect("a receive buffer");
        }
        let stream = tcp.connect(address).await.expect("connects");
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await.expect("WebSocket handshake");
        let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } });
        socket.send(Message::text(init.to_string())).await.expect("connection_init");
        let mut subscription = Subscription { socket };
        let ack = subscription.message().await.expect("an answer to connection_init");
        assert_eq!(ack["type"], "connection_ack", "connection_init answered {ack}");
        let start = json!({ "id": "1", "type": "subscribe", "payload": { "query": query, "variables": variables } });
        subscription.socket.send(Message::text(start.to_string())).await.expect("subscribe");
        subscription
    }
}

/// A raw WebSocket to an [`App`].
pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl App {
    /// A WebSocket to the API speaking `protocol`, nothing sent yet.
    ///
    /// # Panics
    /// When the handshake fails.
    pub async fn socket(&self, protocol: &str) -> Socket {
        let mut request =
            format!("{}/graphql", self.url.replacen("http", "ws", 1)).into_client_request().expect("request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
        tokio_tungstenite::connect_async(request).await.expect("WebSocket handshake").0
    }

    /// A WebSocket speaking `protocol`, initialised with `token` and acknowledged.
    ///
    /// # Panics
    /// When the handshake or `connection_init` fails.
    pub async fn session(&self, protocol: &str, token: &str) -> Socket {
        let mut socket = self.socket(protocol).await;
        send(
            &mut socket,
            json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } }),
        )
        .await;
        let ack = receive(&mut socket).await;
        assert_eq!(ack.as_ref().map(|m| m["type"].clone()), Ok(json!("connection_ack")), "{ack:?}");
        socket
    }
}

/// Sends `message` as text.
///
/// # Panics
/// When the socket is closed.
pub async fn send(socket: &mut Socket, message: Value) {
    socket.send(Message::text(message.to_string())).await.expect("sent");
}

/// The next text message as JSON, or the close code (pings are skipped).
///
/// # Panics
/// When nothing comes within 20 s.
pub async fn receive(socket: &mut Socket) -> Result<Value, u16> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(20), socket.next()).await.expect("an answer");
        match next {
            None | Some(Err(_)) => return Err(1006),
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(text.as_str()).expect("JSON")),
            Some(Ok(Message::Close(frame))) => return Err(frame.map_or(1005, |f| u16::from(f.code))),
            Some(Ok(_)) => {}
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Another Zpanel process on an [`App`]'s database and data directory, as a second instance
/// of a multi-process installation.
#[derive(Debug)]
pub struct Peer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    child: Child,
}

impl App {
    /// Starts `zpanel <subcommand>` on this app's database and data directory.
    ///
    /// # Panics
    /// When it does not start.
    pub async fn peer(&self, subcommand: &str) -> Peer {
        let mut command = zpanel(&self.db, &self.data.0);
        command.arg(subcommand);
        let (child, url, _) = listen(command).await;
        Peer { url, child }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Spawns `command` and waits until it says where it listens: the API's address, and where it
/// serves `/metrics` (said first).
async fn listen(mut command: std::process::Command) -> (Child, String, String) {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = command.spawn().expect("starts zpanel");
    let stdout = child.stdout.take().expect("stdout");
    let (url, metrics) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics = String::new();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                if let Some(at) = line.strip_prefix("metrics on ") {
                    at.clone_into(&mut metrics);
                }
                line.strip_prefix("listening on ").map(str::to_owned)
            })
            .expect("zpanel prints where it listens");
        // Keep draining, so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        (url, metrics)
    })
    .await
    .expect("reading stdout");
    (child, url, metrics)
}

fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let _ = child.wait();
}

/// An open subscription.
#[derive(Debug)]
pub struct Subscription {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl Subscription {
    /// The next protocol message (pings answered and skipped), or `None` when the socket
    /// closed or nothing came within 20 s.
    pub async fn message(&mut self) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(20), self.socket.next()).await.ok()??;
            match next.ok()? {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str()).ok()?;
                    if value["type"] == "ping" {
                        let _ = self.socket.send(Message::text(json!({ "type": "pong" }).to_string())).await;
                        continue;
                    }
                    return Some(value);
                }
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    /// The data of the next `next` message; `Err` with the message when it is something else.
    ///
    /// # Errors
    /// When the next message is not data (an error, completion, or nothing).
    pub async fn next_data(&mut self) -> Result<Value, Option<Value>> {
        match self.message().await {
            Some(m) if m["type"] == "next" && m["payload"]["errors"].is_null() => Ok(m["payload"]["data"].clone()),
            other => Err(other),
        }
    }
}
