//! The `zpanel` binary, run as a user runs it, against a real PostgreSQL.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zpanel_tests::{TempDir, TestDatabase, zpanel};

fn run(command: &mut Command) -> (bool, String, String) {
    let output = command.stdin(Stdio::null()).output().expect("runs zpanel");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn poll<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bootstrap_prints_a_root_token_once_and_stores_only_its_hash() {
    let db = TestDatabase::create().await.expect("database");
    let data = TempDir::new();
    let (ok, stdout, stderr) = run(zpanel(&db, &data.0).args(["bootstrap", "--team", "Acme"]));
    assert!(ok, "bootstrap failed: {stderr}");
    let token = stdout.lines().last().expect("a last line").trim().to_owned();
    assert!(token.starts_with("zp_") && token.len() == 67, "last line is the token: {stdout:?}");

    let events: Vec<(String, String)> =
        sqlx::query_as("select event_type, payload::text || metadata::text from events order by global_position")
            .fetch_all(&db.pool)
            .await
            .expect("events");
    assert_eq!(events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["TeamCreated", "ApiTokenCreated"]);
    assert!(events.iter().all(|(_, text)| !text.contains(&token)), "the token must never be stored");
    assert!(events[1].1.contains(&zpanel_commands::tokens::hash(&token)), "its hash is what is stored");
    // The master key file was created for the install, readable by its owner only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.0.join("master.key")).expect("key file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn bad_input_names_the_flag_and_the_rule_and_writes_nothing() {
    let db = TestDatabase::create().await.expect("database");
    let data = TempDir::new();
    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["bootstrap", "--team", " padded "]));
    assert!(!ok);
    assert!(stderr.contains("--team") && stderr.contains("whitespace"), "{stderr}");
    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["replay", "--projection", "nope"]));
    assert!(!ok);
    assert!(stderr.contains("--projection nope") && stderr.contains("known"), "{stderr}");
    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["worker", "--only", "deploy,nope"]));
    assert!(!ok);
    assert!(stderr.contains("--only nope") && stderr.contains("known: deploy"), "{stderr}");
    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["serve"]).env("ZPANEL_KAFKA_PARTITIONS", "0"));
    assert!(!ok);
    assert!(stderr.contains("ZPANEL_KAFKA_PARTITIONS") || stderr.contains("kafka-partitions"), "{stderr}");
    let count: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&db.pool).await.expect("count");
    assert_eq!(count, 0);
}

#[tokio::test]
async fn serve_projects_new_events_promptly_and_stops_cleanly_on_sigterm() {
    let db = TestDatabase::create().await.expect("database");
    let data = TempDir::new();
    let mut serve = zpanel(&db, &data.0).arg("serve").stdin(Stdio::null()).spawn().expect("starts serve");

    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["bootstrap", "--team", "Projected"]));
    assert!(ok, "{stderr}");
    let pool = db.pool.clone();
    let name: String = poll("the team's read model", Duration::from_secs(20), || {
        let pool = pool.clone();
        async move { sqlx::query_scalar("select name from rm_teams").fetch_optional(&pool).await.ok().flatten() }
    })
    .await;
    assert_eq!(name, "Projected");
    // The token was appended after the team, so it may be projected in a later batch.
    let pool = db.pool.clone();
    poll("the root token's read model", Duration::from_secs(20), || {
        let pool = pool.clone();
        async move {
            let n: Option<i64> = sqlx::query_scalar("select count(*) from rm_api_tokens where 'root' = any(abilities)")
                .fetch_one(&pool)
                .await
                .ok();
            (n == Some(1)).then_some(())
        }
    })
    .await;

    let pid = nix::unistd::Pid::from_raw(i32::try_from(serve.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signals");
    let status = poll("serve to exit", Duration::from_secs(20), || {
        let status = serve.try_wait().expect("waits");
        async move { status }
    })
    .await;
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
}

#[tokio::test]
async fn events_tail_prints_the_newest_events_and_follows_new_ones() {
    let db = TestDatabase::create().await.expect("database");
    let data = TempDir::new();
    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["bootstrap", "--team", "First"]));
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = run(zpanel(&db, &data.0).args(["events", "tail", "-n", "1"]));
    assert!(ok);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("ApiTokenCreated"), "{stdout}");

    let mut follow = zpanel(&db, &data.0)
        .args(["events", "tail", "-n", "0", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("follows");
    // It says when it has found the end of the log; only then is a new event "new".
    let stderr = follow.stderr.take().expect("stderr");
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stderr).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("joins")
    .expect("reads stderr");
    assert!(ready.contains("following"), "{ready}");
    let stdout = follow.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match lines.next() {
                Some(Ok(line)) => seen.push(line),
                _ => break,
            }
        }
        seen
    });
    let (ok, _, stderr) = run(zpanel(&db, &data.0).args(["bootstrap", "--team", "Second"]));
    assert!(ok, "{stderr}");
    let seen = tokio::task::spawn_blocking(move || reader.join().expect("reader")).await.expect("joins");
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].contains("TeamCreated") && seen[0].contains("Second"), "{seen:?}");
    assert!(seen[1].contains("ApiTokenCreated"), "{seen:?}");
}

/// Without `ZPANEL_DATABASE_URL`, Zpanel starts a private cluster under its data directory and
/// stops it when done.
#[tokio::test]
async fn without_a_database_url_a_private_cluster_is_started_and_stopped() {
    let data = TempDir::new();
    let output = Command::new(zpanel_tests::zpanel_bin())
        .env_remove("ZPANEL_DATABASE_URL")
        .env_remove("ZPANEL_MASTER_KEY")
        .env("ZPANEL_DATA_DIR", &data.0)
        .args(["bootstrap", "--team", "Embedded"])
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.lines().last().is_some_and(|l| l.starts_with("zp_")), "{stdout}");
    assert!(data.0.join("postgres/PG_VERSION").is_file(), "the cluster lives in the data directory");
    assert!(!data.0.join("postgres/postmaster.pid").exists(), "the server was stopped on exit");

    // A second run finds the cluster and its data again.
    let output = Command::new(zpanel_tests::zpanel_bin())
        .env_remove("ZPANEL_DATABASE_URL")
        .env("ZPANEL_DATA_DIR", &data.0)
        .args(["events", "tail", "-n", "5"])
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("TeamCreated") && stdout.contains("Embedded"), "{stdout}");
}

/// `zpanel replay` rebuilds every read model from the log into exactly the tables the live
/// projections built, and says how many events it replayed and how fast.
#[tokio::test]
async fn replay_rebuilds_identical_read_models_and_reports_its_rate() {
    use zpanel_commands::sample::{self, HandlerSink, Shape};
    use zpanel_commands::{AppendSignal, CommandHandler, Keyring, PgEventStore};

    let db = TestDatabase::create().await.expect("database");
    let handler = CommandHandler::new(PgEventStore::new(db.pool.clone(), AppendSignal::new()));
    let keyring = Keyring::generate();
    // Applications of 32 events and more, so the audit log stores states too (every 32nd version).
    let shape = Shape { applications: 3, variables: 28, updates: 3, deployments: 3 };
    for i in 0..3 {
        sample::team(&mut HandlerSink(&handler), &keyring, shape, &format!("Team {i}")).await.expect("sample");
    }
    let runner = zpanel_projections::ProjectionRunner::new(db.pool.clone(), zpanel_projections::all());
    runner.register().await.expect("registers");
    let live_count = runner.catch_up().await.expect("live projections");
    let events = 3 * shape.events() as u64;
    assert_eq!(live_count, events);
    let live = zpanel_projections::checksums(&db.pool).await.expect("checksums");
    assert!(live.iter().all(|(_, sum)| !sum.starts_with("0:")), "every table has rows: {live:?}");

    let data = TempDir::new();
    let (ok, stdout, stderr) = run(zpanel(&db, &data.0).arg("replay"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("replayed {events} events")) && stdout.contains("events/s"), "{stdout}");
    assert_eq!(zpanel_projections::checksums(&db.pool).await.expect("checksums"), live);

    let (ok, stdout, stderr) = run(zpanel(&db, &data.0).args(["replay", "--projection", "applications"]));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("into applications"), "{stdout}");
    assert_eq!(zpanel_projections::checksums(&db.pool).await.expect("checksums"), live);
}
