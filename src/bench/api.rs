//! Benchmarks of the GraphQL API: query throughput beside a trivial axum handler, and many
//! concurrent subscriptions (memory per subscriber, delivery latency).

use super::{ms, percentiles, throughput};
use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::json;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt as _;
use zpanel_commands::sample::{self, HandlerSink, Shape};
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, Keyring, PgEventStore};
use zpanel_domain::api_token::{ApiToken, ApiTokenCommand};
use zpanel_domain::ids::ApiTokenId;
use zpanel_domain::values::{Abilities, Ability, Name};
use zpanel_projections::ProjectionRunner;

/// The API in this process over `pool`, with a team of `applications` and a root token.
struct Fixture {
    url: String,
    token: String,
    team: sample::SampleTeam,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

async fn fixture(pool: &PgPool, applications: usize) -> anyhow::Result<Fixture> {
    let signal = AppendSignal::new();
    let handler = CommandHandler::new(PgEventStore::new(pool.clone(), signal.clone()));
    let keyring = Keyring::generate();
    let shape = Shape { applications, variables: 5, updates: 0, deployments: 0 };
    let team = sample::team(&mut HandlerSink(&handler), &keyring, shape, "Bench").await?;
    let generated = zpanel_commands::tokens::generate();
    let id = ApiTokenId::new();
    let root = Abilities::new([Ability::Root]);
    let command = ApiTokenCommand::CreateApiToken {
        id,
        team_id: team.team_id,
        name: Name::parse("bench").map_err(|e| anyhow::anyhow!("{e}"))?,
        abilities: root.clone(),
        token_hash: generated.hash.clone(),
        expires_at: None,
        creator_abilities: root,
        creator_expires_at: None,
        now: time::OffsetDateTime::now_utc(),
    };
    let ctx = CommandContext::new(team.team_id, Actor::system("bench"), "bench");
    handler.execute::<ApiToken>(&ctx, *id.as_uuid(), &command).await.map_err(|e| anyhow::anyhow!("{e}"))?;

    // The read models show the team before the first request.
    let runner = ProjectionRunner::new(pool.clone(), zpanel_projections::all());
    runner.register().await?;
    runner.catch_up().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let unlimited = zpanel_api::limits::RateLimiter::new(u32::MAX, u32::MAX);
    let app = crate::app::start(
        pool.clone(),
        signal,
        Arc::new(keyring),
        listener,
        crate::app::ApiSettings {
            rate: unlimited,
            subscription_buffer: zpanel_api::hub::CAPACITY,
            // The subscription benchmark holds thousands of one token's subscriptions.
            limits: zpanel_api::limits::Limits {
                subscriptions_per_token: usize::MAX,
                ..zpanel_api::limits::Limits::default()
            },
            metrics: None,
            git_local_roots: zpanel_domain::values::GitLocalRoots::default(),
            tenancy: zpanel_api::tenancy::Tenancy::default(),
        },
        None,
    )?;
    let url = format!("http://{}", app.address);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    Ok(Fixture { url, token: generated.token.expose().to_owned(), team, stop, running, http: reqwest::Client::new() })
}

impl Fixture {
    /// Sends a GraphQL request with the fixture's token.
    async fn graphql(&self, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response =
            self.http.post(format!("{}/graphql", self.url)).bearer_auth(&self.token).json(body).send().await?;
        Ok(response.json().await?)
    }

    /// Stops the API and its parts.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.running.await.context("the API panicked")?
    }
}

/// `applications(first: 50)` over HTTP from `clients` connections, beside a trivial handler.
pub(super) async fn queries(pool: &PgPool, clients: usize, duration: Duration) -> anyhow::Result<()> {
    let fixture = fixture(pool, 60).await?;
    let trivial = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let trivial_url = format!("http://{}/", trivial.local_addr()?);
    tokio::spawn(async move {
        axum::serve(trivial, axum::Router::new().route("/", axum::routing::get(|| async { "ok" }))).await
    });
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    let query = json!({ "query": "{ applications(first: 50) { totalCount nodes { id name version env { key value secret } } } }" });
    let check = fixture.graphql(&query).await?;
    anyhow::ensure!(
        check["data"]["applications"]["nodes"].as_array().map(Vec::len) == Some(50),
        "query answered {check}"
    );

    let (mut trivial_rates, mut api_rates) = (Vec::new(), Vec::new());
    for round in 0..4 {
        let (client, url) = (http.clone(), trivial_url.clone());
        let trivial_rate = throughput(clients, duration / 2, move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client.get(&url).send().await?.error_for_status()?.bytes().await?;
                Ok(())
            }
        })
        .await?;
        let (client, url, token, query) =
            (http.clone(), format!("{}/graphql", fixture.url), fixture.token.clone(), query.clone());
        let api_rate = throughput(clients, duration / 2, move || {
            let (client, url, token, query) = (client.clone(), url.clone(), token.clone(), query.clone());
            async move {
                let body = client.post(&url).bearer_auth(&token).json(&query).send().await?.bytes().await?;
                anyhow::ensure!(!body.starts_with(b"{\"data\":null"), "an error: {}", String::from_utf8_lossy(&body));
                Ok(())
            }
        })
        .await?;
        let label = if round == 0 { "warm-up".to_owned() } else { format!("round {round}") };
        println!("{label}: trivial handler {trivial_rate:.0}/s, applications(first: 50) {api_rate:.0}/s");
        if round > 0 {
            trivial_rates.push(trivial_rate);
            api_rates.push(api_rate);
        }
    }
    let trivial = trivial_rates.iter().sum::<f64>() / trivial_rates.len() as f64;
    let api = api_rates.iter().sum::<f64>() / api_rates.len() as f64;
    println!(
        "| applications(first: 50), {clients} connections | trivial axum handler {trivial:.0}/s | zpanel {api:.0}/s | ratio {:.2} (target ≥ 0.30) |",
        api / trivial
    );
    fixture.stop().await
}

/// The server's resident memory, in bytes.
fn resident_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/self/status")?;
    Ok(kb * 1024)
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

/// `count` `events` subscriptions held by a child process; memory per subscriber in this
/// (the server's) process, and the time from each mutation's answer to its delivery on all.
pub(super) async fn subscriptions(pool: &PgPool, count: usize, mutations: usize) -> anyhow::Result<()> {
    let fixture = fixture(pool, 1).await?;
    let app = fixture.team.applications[0];
    let fixture = Arc::new(fixture);
    // Let the server settle before the baseline of its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident_bytes()?;
    let zpanel = fan_out(&fixture.url, &fixture.token, count, mutations, Some(before), |i| {
        let fixture = Arc::clone(&fixture);
        async move {
            let query = json!({
                "query": "mutation($app: ID!, $v: String!) { setEnvironmentVariable(input: { applicationId: $app, key: \"BENCH\", value: $v }) { version } }",
                "variables": { "app": app.to_string(), "v": i.to_string() },
            });
            let body = fixture.graphql(&query).await?;
            anyhow::ensure!(body["errors"].is_null(), "the mutation failed: {body}");
            Ok(())
        }
    })
    .await?;
    // Then the baseline (second, so that the memory per subscriber is measured on a fresh
    // process): a plain WebSocket server that, when told, sends one ready-made frame to
    // every open socket — the least any server can do to deliver an update to each subscriber.
    let (plain_url, fire) = plain_fan_out().await?;
    let http = reqwest::Client::new();
    let plain = fan_out(&plain_url, "", count, mutations, None, |_| {
        let (http, fire) = (http.clone(), fire.clone());
        async move {
            http.post(&fire).send().await?.error_for_status()?;
            Ok(())
        }
    })
    .await?;

    println!(
        "| {count} events subscriptions, {mutations} updates 0.5 s apart | plain WebSocket fan-out (one ready-made frame to every socket): delivery p50 {:.1} ms, p99 {:.1} ms | server RSS {:.1} MiB before; {:.1} KiB per subscriber; delivery after the mutation's answer p50 {:.1} ms, p99 {:.1} ms (slowest per update: {}) | ≤ 32 KiB; p99 ≤ 200 ms |",
        ms(plain.p50),
        ms(plain.p99),
        before as f64 / 1_048_576.0,
        zpanel.per_subscriber / 1024.0,
        ms(zpanel.p50),
        ms(zpanel.p99),
        zpanel.slowest.iter().map(|d| format!("{:.0} ms", ms(*d))).collect::<Vec<_>>().join(", ")
    );
    Arc::try_unwrap(fixture).map_err(|_| anyhow::anyhow!("the fixture is still in use"))?.stop().await
}

/// What one fan-out run measured.
struct FanOut {
    p50: Duration,
    p99: Duration,
    /// The slowest delivery of each update.
    slowest: Vec<Duration>,
    /// Resident bytes per subscriber (when a baseline was given).
    per_subscriber: f64,
}

/// Opens `count` subscriptions to `url` from a second process, then `updates` times calls
/// `update` (0.5 s apart) and times the delivery of each on every subscription from the moment
/// `update` returned.
async fn fan_out<F, Fut>(
    url: &str,
    token: &str,
    count: usize,
    updates: usize,
    rss_before: Option<u64>,
    mut update: F,
) -> anyhow::Result<FanOut>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "subscribe-clients", "--url", url, "--count", &count.to_string()])
        .args(["--events", &updates.to_string()])
        .env("ZPANEL_BENCH_TOKEN", token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the subscribing process")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("child stdout")?).lines();
    let started = Instant::now();
    let ready = lines.next_line().await?.context("the subscribers ended early")?;
    anyhow::ensure!(ready == "ready", "the subscribers said {ready}");
    println!("{count} subscriptions open to {url} in {:.1}s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_subscriber = match rss_before {
        Some(before) => resident_bytes()?.saturating_sub(before) as f64 / count as f64,
        None => 0.0,
    };
    let mut answered = Vec::with_capacity(updates);
    for i in 0..updates {
        update(i).await?;
        answered.push(unix_nanos());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The child prints, per update, the delivery time on every subscription.
    let mut latencies = Vec::with_capacity(count * updates);
    let mut slowest = Vec::new();
    for answered_at in &answered {
        let line = lines.next_line().await?.context("the subscribers ended early")?;
        let mut worst = Duration::ZERO;
        for at in line.split_whitespace() {
            let at: u128 = at.parse()?;
            let latency = Duration::from_nanos(u64::try_from(at.saturating_sub(*answered_at))?);
            worst = worst.max(latency);
            latencies.push(latency);
        }
        slowest.push(worst);
    }
    let _ = child.kill().await;
    anyhow::ensure!(latencies.len() == count * updates, "{} of {} deliveries", latencies.len(), count * updates);
    let (p50, p99) = percentiles(&mut latencies);
    Ok(FanOut { p50, p99, slowest, per_subscriber })
}

/// A plain `graphql-transport-ws` fan-out server on loopback: it acknowledges
/// `connection_init`, remembers each `subscribe` id, and on each `POST /fire` sends every socket
/// one `next` frame made once. Returns its URL and the URL that fires.
async fn plain_fan_out() -> anyhow::Result<(String, String)> {
    use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
    let (updates, _) = tokio::sync::broadcast::channel::<Arc<str>>(16);
    let sender = updates.clone();
    let fired = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let router = axum::Router::new()
        .route(
            "/graphql",
            axum::routing::get(move |upgrade: WebSocketUpgrade| {
                let updates = sender.subscribe();
                async move {
                    upgrade
                        .read_buffer_size(zpanel_api::http::WS_BUFFER)
                        .write_buffer_size(zpanel_api::http::WS_BUFFER)
                        .protocols(["graphql-transport-ws"])
                        .on_upgrade(move |socket| plain_subscriber(socket, updates))
                }
            }),
        )
        .route(
            "/fire",
            axum::routing::post(move || {
                let (updates, fired) = (updates.clone(), Arc::clone(&fired));
                async move {
                    let position = fired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let payload = json!({ "data": { "events": { "position": position } } }).to_string();
                    let _ = updates.send(payload.into());
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });

    async fn plain_subscriber(mut socket: WebSocket, mut updates: tokio::sync::broadcast::Receiver<Arc<str>>) {
        let mut id = None;
        while id.is_none() {
            let Some(Ok(Message::Text(text))) = socket.recv().await else { return };
            let Ok(message) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { return };
            match message["type"].as_str() {
                Some("connection_init") => {
                    let ack = json!({ "type": "connection_ack" }).to_string();
                    if socket.send(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
                Some("subscribe") => id = message["id"].as_str().map(str::to_owned),
                _ => {}
            }
        }
        let id = serde_json::Value::from(id.unwrap_or_default()).to_string();
        while let Ok(payload) = updates.recv().await {
            let frame = format!("{{\"id\":{id},\"type\":\"next\",\"payload\":{payload}}}");
            if socket.send(Message::Text(frame.into())).await.is_err() {
                return;
            }
        }
    }
    Ok((format!("http://{address}"), format!("http://{address}/fire")))
}

/// The subscribing side of [`subscriptions`], in its own process: opens `count` subscriptions,
/// prints `ready`, then for each of `events` deliveries a line of receive times (Unix ns).
pub async fn subscribe_clients(url: &str, count: usize, events: usize) -> anyhow::Result<()> {
    let token = std::env::var("ZPANEL_BENCH_TOKEN").context("ZPANEL_BENCH_TOKEN")?;
    let ws_url = format!("{}/graphql", url.replacen("http", "ws", 1));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u128)>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let connect = Arc::new(tokio::sync::Semaphore::new(64));
    for _ in 0..count {
        let (ws_url, token, tx, ready_tx, connect) =
            (ws_url.clone(), token.clone(), tx.clone(), ready_tx.clone(), Arc::clone(&connect));
        tokio::spawn(async move {
            let result: anyhow::Result<()> = async {
                use tokio_tungstenite::tungstenite::Message;
                use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
                let permit = connect.acquire().await?;
                let mut request = ws_url.into_client_request()?;
                request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
                // Small buffers, as the server has: tungstenite's default 128 KiB read buffer is
                // zeroed on each read, which would make this harness, on the same two cores,
                // cost more than the server it measures.
                let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(4096);
                let (mut socket, _) =
                    tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
                let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } });
                socket.send(Message::text(init.to_string())).await?;
                socket.next().await.context("no ack")??;
                let subscribe = json!({ "id": "1", "type": "subscribe", "payload": { "query": "subscription { events { position } }" } });
                socket.send(Message::text(subscribe.to_string())).await?;
                drop(permit);
                let _ = ready_tx.send(());
                let mut seen = 0;
                while let Some(message) = socket.next().await {
                    if let Message::Text(text) = message?
                        && text.as_str().contains("\"next\"")
                    {
                        let _ = tx.send((seen, unix_nanos()));
                        seen += 1;
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                eprintln!("a subscriber failed: {e:#}");
            }
        });
    }
    drop(ready_tx);
    for _ in 0..count {
        ready_rx.recv().await.context("a subscriber failed to subscribe")?;
    }
    // The subscribe messages are sent; give the server a moment to register them all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("ready");
    let mut per_event: Vec<Vec<u128>> = vec![Vec::with_capacity(count); events];
    let mut done = 0;
    while done < events {
        let (index, at) = rx.recv().await.context("the subscribers stopped")?;
        if let Some(times) = per_event.get_mut(index) {
            times.push(at);
            if times.len() == count {
                let line: Vec<String> = times.iter().map(u128::to_string).collect();
                println!("{}", line.join(" "));
                done += 1;
            }
        }
    }
    Ok(())
}
