//! Projections against a real PostgreSQL: read models, checkpoints, the audit log, time travel
//! and rebuilds.

use futures::future::BoxFuture;
use std::collections::BTreeSet;
use std::sync::Arc;
use zpanel_commands::testing::TestDatabase;
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, PgEventStore, RecordedEvent};
use zpanel_domain::ids::{ProjectId, TeamId};
use zpanel_domain::project::{Project, ProjectCommand};
use zpanel_domain::team::{Team, TeamCommand};
use zpanel_domain::values::{EnvironmentName, Name};
use zpanel_projections::history::{AsOf, diff_versions, load_as_of};
use zpanel_projections::{Projection, ProjectionRunner};

struct Fixture {
    db: TestDatabase,
    handler: CommandHandler<PgEventStore>,
    runner: ProjectionRunner,
}

async fn fixture() -> Fixture {
    let db = TestDatabase::create().await.expect("database");
    let handler = CommandHandler::new(PgEventStore::new(db.pool.clone(), AppendSignal::new()));
    let runner = ProjectionRunner::new(db.pool.clone(), zpanel_projections::all());
    runner.register().await.expect("registers");
    Fixture { db, handler, runner }
}

fn name(s: &str) -> Name {
    Name::parse(s).expect("name")
}

fn ctx(team: TeamId) -> CommandContext {
    CommandContext::new(team, Actor::system("test"), "test")
}

async fn team(f: &Fixture, team_name: &str) -> TeamId {
    let id = TeamId::new();
    f.handler
        .execute::<Team>(&ctx(id), *id.as_uuid(), &TeamCommand::CreateTeam { id, name: name(team_name) })
        .await
        .expect("team");
    id
}

async fn project(f: &Fixture, team: TeamId, project_name: &str) -> ProjectId {
    let id = ProjectId::new();
    let command =
        ProjectCommand::CreateProject { id, team_id: team, name: name(project_name), names_in_use: BTreeSet::new() };
    f.handler.execute::<Project>(&ctx(team), *id.as_uuid(), &command).await.expect("project");
    id
}

async fn checksum(db: &TestDatabase) -> Vec<(&'static str, String)> {
    zpanel_projections::checksums(&db.pool).await.expect("checksums")
}

#[tokio::test]
async fn read_models_show_the_fold_of_the_log() {
    let f = fixture().await;
    let acme = team(&f, "Acme").await;
    let shop = project(&f, acme, "Shop").await;
    f.handler
        .execute::<Project>(
            &ctx(acme),
            *shop.as_uuid(),
            &ProjectCommand::CreateEnvironment { name: EnvironmentName::parse("staging").expect("env") },
        )
        .await
        .expect("environment");
    f.runner.catch_up().await.expect("projects");

    let (name, environments, version): (String, Vec<String>, i64) =
        sqlx::query_as("select name, environments, version from rm_projects where project_id = $1")
            .bind(shop.as_uuid())
            .fetch_one(&f.db.pool)
            .await
            .expect("row");
    assert_eq!(name, "Shop");
    assert_eq!(environments, ["production", "staging"]);
    assert_eq!(version, 2);
    let team_name: String = sqlx::query_scalar("select name from rm_teams where team_id = $1")
        .bind(acme.as_uuid())
        .fetch_one(&f.db.pool)
        .await
        .expect("team row");
    assert_eq!(team_name, "Acme");
}

/// A projection that fails on a chosen event type, to show that a failed batch commits nothing.
struct FailsOn(&'static str);

impl Projection for FailsOn {
    fn name(&self) -> &'static str {
        "fails_on"
    }
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }
    fn apply<'a>(
        &'a self,
        _tx: &'a mut sqlx::PgConnection,
        events: &'a [RecordedEvent],
        _memo: &'a mut zpanel_projections::projection::Memo,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let fail = events.iter().any(|e| e.event_type == self.0);
        Box::pin(async move { if fail { anyhow::bail!("refusing {}", self.0) } else { Ok(()) } })
    }
}

#[tokio::test]
async fn a_failed_batch_moves_neither_rows_nor_checkpoints() {
    let f = fixture().await;
    let mut projections = zpanel_projections::all();
    projections.push(Arc::new(FailsOn("ProjectCreated")));
    let runner = ProjectionRunner::new(f.db.pool.clone(), projections);
    runner.register().await.expect("registers");
    let acme = team(&f, "Acme").await;
    runner.catch_up().await.expect("the team alone applies");
    let before = runner.checkpoints().await.expect("checkpoints");
    let teams_before = checksum(&f.db).await;

    project(&f, acme, "Shop").await;
    // Step until the batch with the project is read (other tests' transactions in the same
    // cluster can briefly hold the log's horizon back).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let failed = loop {
        match runner.step().await {
            Ok(step) if step.read == 0 && std::time::Instant::now() < deadline => tokio::task::yield_now().await,
            other => break other,
        }
    };
    assert!(failed.is_err(), "the batch fails: {failed:?}");
    assert_eq!(runner.checkpoints().await.expect("checkpoints"), before, "no checkpoint moved");
    assert_eq!(checksum(&f.db).await, teams_before, "no read model changed");
}

#[tokio::test]
async fn two_runners_racing_apply_every_event_exactly_once() {
    let f = fixture().await;
    for i in 0..30 {
        let t = team(&f, &format!("Team {i}")).await;
        project(&f, t, "P").await;
    }
    let other = ProjectionRunner::new(f.db.pool.clone(), zpanel_projections::all()).with_batch_size(3);
    let mine = ProjectionRunner::new(f.db.pool.clone(), zpanel_projections::all()).with_batch_size(5);
    let (a, b) = tokio::join!(other.catch_up(), mine.catch_up());
    a.expect("one runner");
    b.expect("the other");
    // The audit log's primary key is the global position: a double application would have failed.
    let audited: i64 =
        sqlx::query_scalar("select count(*) from rm_audit_log").fetch_one(&f.db.pool).await.expect("count");
    assert_eq!(audited, 60);
    let versions: Vec<i64> =
        sqlx::query_scalar("select version from rm_projects").fetch_all(&f.db.pool).await.expect("rows");
    assert!(versions.iter().all(|v| *v == 1));
}

#[tokio::test]
async fn a_runner_says_it_projected_a_position_only_once_all_its_projections_reached_it() {
    // Mutations answer once the runner of their process says it projected their events; a
    // batch that could not lock every projection (another process held one) must not say so.
    let f = fixture().await;
    team(&f, "Acme").await;
    let mut projected = f.runner.projected();
    let held = f.runner.names()[0];
    let checkpoint_of = |all: Vec<(String, zpanel_commands::Cursor)>| all.into_iter().find(|(n, _)| n == held);
    let before = checkpoint_of(f.runner.checkpoints().await.expect("checkpoints"));
    let mut other = f.db.pool.begin().await.expect("begins");
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('zpanel.projection.' || $1, 0))")
        .bind(held)
        .execute(&mut *other)
        .await
        .expect("locks");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while f.runner.step().await.expect("steps").read == 0 {
        assert!(std::time::Instant::now() < deadline, "the team's events are read");
        tokio::task::yield_now().await;
    }
    assert!(!projected.has_changed().expect("open"), "{held} was held elsewhere: {:?}", *projected.borrow());
    assert_eq!(checkpoint_of(f.runner.checkpoints().await.expect("checkpoints")), before, "{held} did not move");
    other.rollback().await.expect("releases");

    f.runner.catch_up().await.expect("catches up");
    assert!(projected.has_changed().expect("open"), "every projection holds the team now");
    let horizon = *projected.borrow_and_update();
    let checkpoints = f.runner.checkpoints().await.expect("checkpoints");
    assert!(checkpoints.iter().all(|(_, c)| *c >= horizon), "{horizon:?} <= {checkpoints:?}");
}

#[tokio::test]
async fn a_rebuild_produces_identical_tables() {
    let f = fixture().await;
    for i in 0..5 {
        let t = team(&f, &format!("Team {i}")).await;
        let p = project(&f, t, "Web").await;
        f.handler
            .execute::<Project>(
                &ctx(t),
                *p.as_uuid(),
                &ProjectCommand::RenameProject { name: name("Website"), names_in_use: BTreeSet::new() },
            )
            .await
            .expect("renamed");
    }
    f.runner.catch_up().await.expect("live");
    let live = checksum(&f.db).await;
    assert!(live.iter().any(|(t, s)| *t == "rm_audit_log" && s.starts_with("15:")), "{live:?}");
    f.runner.reset(&f.runner.names()).await.expect("resets");
    assert!(checksum(&f.db).await.iter().all(|(_, s)| s.starts_with("0:")), "reset empties the tables");
    f.runner.with_batch_size(4).catch_up().await.expect("replays");
    assert_eq!(checksum(&f.db).await, live);
}

#[tokio::test]
async fn a_rebuild_writes_new_rows_in_bulk_exactly_as_the_live_projection_writes_them_one_by_one() {
    use zpanel_commands::Keyring;
    use zpanel_commands::sample::{MemorySink, Shape, team};
    let f = fixture().await;
    // Enough teams that a rebuild's batch holds more new rows of every kind than the live
    // runner's batches do, so the rebuild writes them with `COPY` (arrays, JSON, nulls, times).
    let keyring = Keyring::generate();
    let mut sink = MemorySink::default();
    let shape = Shape { applications: 1, variables: 2, updates: 1, deployments: 2 };
    for i in 0..80 {
        team(&mut sink, &keyring, shape, &format!("Team {i}")).await.expect("sample team");
        sink.forget_states();
    }
    sink.flush(&f.db.pool).await.expect("written");
    f.runner.catch_up().await.expect("live");
    let live = checksum(&f.db).await;
    for table in ["rm_teams", "rm_projects", "rm_applications", "rm_deployments", "rm_api_tokens"] {
        let rows = live.iter().find(|(t, _)| *t == table).expect("a checksum").1.clone();
        assert!(rows.starts_with("80:") || rows.starts_with("160:"), "{table}: {rows}");
    }
    zpanel_projections::rebuild::rebuild(&f.db.pool, zpanel_projections::all(), |_| {}).await.expect("rebuilds");
    assert_eq!(checksum(&f.db).await, live);
}

/// The read models' indexes: (name, definition), in name order.
async fn indexes(db: &TestDatabase) -> Vec<(String, String)> {
    sqlx::query_as(
        "select indexname::text, indexdef from pg_indexes
          where schemaname = current_schema() and tablename like 'rm\\_%' order by indexname",
    )
    .fetch_all(&db.pool)
    .await
    .expect("indexes")
}

async fn deferred(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("select count(*) from rebuild_deferred_indexes").fetch_one(&db.pool).await.expect("deferred")
}

#[tokio::test]
async fn a_rebuild_drops_the_secondary_indexes_and_creates_them_again_from_the_rows() {
    let f = fixture().await;
    for i in 0..3 {
        let t = team(&f, &format!("Team {i}")).await;
        project(&f, t, "Web").await;
    }
    f.runner.catch_up().await.expect("live");
    let live = checksum(&f.db).await;
    let before = indexes(&f.db).await;
    assert!(before.iter().any(|(name, _)| name == "rm_audit_log_stream"), "{before:?}");

    let rebuilt =
        zpanel_projections::rebuild::rebuild(&f.db.pool, zpanel_projections::all(), |_| {}).await.expect("rebuilds");
    // The secondary ones (not the primary keys, nor the unique constraint tokens are found by).
    let secondary = before.iter().filter(|(name, _)| !name.ends_with("_pkey") && !name.ends_with("_key")).count();
    assert_eq!(rebuilt.indexes.0, secondary, "{before:?}");
    assert_eq!(indexes(&f.db).await, before, "every index is back, as it was defined");
    assert_eq!(deferred(&f.db).await, 0);
    assert_eq!(checksum(&f.db).await, live);
}

#[tokio::test]
async fn the_indexes_an_interrupted_rebuild_dropped_come_back_at_the_next_start_but_not_during_a_rebuild() {
    let f = fixture().await;
    let before = indexes(&f.db).await;
    // What a rebuild killed mid-replay leaves: an index dropped, its definition kept.
    let (name, definition) = before.iter().find(|(name, _)| name == "rm_audit_log_team").expect("the index").clone();
    sqlx::query(
        "insert into rebuild_deferred_indexes (index_name, table_name, definition) values ($1, 'rm_audit_log', $2)",
    )
    .bind(&name)
    .bind(&definition)
    .execute(&f.db.pool)
    .await
    .expect("recorded");
    sqlx::query(&format!("drop index {name}")).execute(&f.db.pool).await.expect("dropped");

    // A rebuild running (it holds the lock) restores them itself at its end: a start leaves them.
    let mut rebuilding = f.db.pool.acquire().await.expect("connection");
    sqlx::query("select pg_advisory_lock(hashtextextended('zpanel.rebuild.indexes', 0))")
        .execute(&mut *rebuilding)
        .await
        .expect("locked");
    assert_eq!(zpanel_projections::rebuild::restore_interrupted(&f.db.pool).await.expect("restores"), 0);
    assert_eq!(deferred(&f.db).await, 1);
    sqlx::query("select pg_advisory_unlock_all()").execute(&mut *rebuilding).await.expect("unlocked");
    drop(rebuilding);

    f.runner.register().await.expect("registers");
    assert_eq!(indexes(&f.db).await, before, "the index is back");
    assert_eq!(deferred(&f.db).await, 0);
}

#[tokio::test]
async fn the_audit_log_records_before_and_after_values() {
    let f = fixture().await;
    let acme = team(&f, "Acme").await;
    let shop = project(&f, acme, "Shop").await;
    f.handler
        .execute::<Project>(
            &ctx(acme),
            *shop.as_uuid(),
            &ProjectCommand::RenameProject { name: name("Store"), names_in_use: BTreeSet::new() },
        )
        .await
        .expect("renamed");
    f.runner.catch_up().await.expect("projects");
    let (event_type, changes, actor): (String, serde_json::Value, serde_json::Value) = sqlx::query_as(
        "select event_type, changes, actor from rm_audit_log where stream_id = $1 order by global_position desc limit 1",
    )
    .bind(shop.stream_id())
    .fetch_one(&f.db.pool)
    .await
    .expect("audit row");
    assert_eq!(event_type, "ProjectRenamed");
    assert_eq!(actor["name"], "test");
    let name_change = changes.as_array().expect("array").iter().find(|c| c["field"] == "name").expect("name changed");
    assert_eq!(name_change["before"], "Shop");
    assert_eq!(name_change["after"], "Store");
}

#[tokio::test]
async fn the_audit_log_continues_long_streams_from_stored_states_and_the_log() {
    use zpanel_projections::audit::SNAPSHOT_EVERY;
    let f = fixture().await;
    let acme = team(&f, "Acme").await;
    let shop = project(&f, acme, "Name 0").await;
    // ProjectCreated, then renames to past the second stored state.
    let renames = 2 * SNAPSHOT_EVERY + 5;
    for i in 1..=renames {
        f.handler
            .execute::<Project>(
                &ctx(acme),
                *shop.as_uuid(),
                &ProjectCommand::RenameProject { name: name(&format!("Name {i}")), names_in_use: BTreeSet::new() },
            )
            .await
            .expect("renamed");
    }
    // Small batches without memos: every batch continues the stream from what is stored.
    f.runner.clone().with_batch_size(5).catch_up().await.expect("projects");
    let stored: (i64, String) = sqlx::query_as("select version, state from rm_audit_state where stream_id = $1")
        .bind(shop.stream_id())
        .fetch_one(&f.db.pool)
        .await
        .expect("a stored state");
    assert_eq!(stored.0, 2 * SNAPSHOT_EVERY, "the state at the last multiple of {SNAPSHOT_EVERY}");
    let expected_name = format!("Name {}", 2 * SNAPSHOT_EVERY - 1);
    assert!(stored.1.contains(&format!("\"{expected_name}\"")), "{}", stored.1);
    let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
        "select version, changes from rm_audit_log where stream_id = $1 and event_type = 'ProjectRenamed' order by version",
    )
    .bind(shop.stream_id())
    .fetch_all(&f.db.pool)
    .await
    .expect("audit rows");
    assert_eq!(rows.len(), usize::try_from(renames).expect("small"));
    for (i, (_, changes)) in (1..).zip(&rows) {
        let change = changes.as_array().expect("array").iter().find(|c| c["field"] == "name").expect("name changed");
        assert_eq!(change["before"], format!("Name {}", i - 1), "rename {i}: {changes}");
        assert_eq!(change["after"], format!("Name {i}"), "rename {i}: {changes}");
    }
    // A rebuild (memos, other batch ends) stores and writes exactly the same.
    let live = checksum(&f.db).await;
    zpanel_projections::rebuild::rebuild(&f.db.pool, zpanel_projections::all(), |_| {}).await.expect("rebuilds");
    assert_eq!(checksum(&f.db).await, live);
}

#[tokio::test]
async fn time_travel_loads_any_version_position_or_moment() {
    let f = fixture().await;
    let acme = team(&f, "Acme").await;
    let shop = project(&f, acme, "Shop").await;
    let renamed = f
        .handler
        .execute::<Project>(
            &ctx(acme),
            *shop.as_uuid(),
            &ProjectCommand::RenameProject { name: name("Store"), names_in_use: BTreeSet::new() },
        )
        .await
        .expect("renamed");
    let rename = &renamed.events[0];

    let at_v1 = load_as_of::<Project>(&f.db.pool, *acme.as_uuid(), *shop.as_uuid(), AsOf::Version(1))
        .await
        .expect("loads")
        .expect("exists");
    assert_eq!(at_v1.version, 1);
    assert_eq!(at_v1.state.details().expect("created").name.as_str(), "Shop");
    let before_rename =
        load_as_of::<Project>(&f.db.pool, *acme.as_uuid(), *shop.as_uuid(), AsOf::Position(rename.global_position - 1))
            .await
            .expect("loads")
            .expect("exists");
    assert_eq!(before_rename.version, 1);
    let now = load_as_of::<Project>(&f.db.pool, *acme.as_uuid(), *shop.as_uuid(), AsOf::Time(rename.recorded_at))
        .await
        .expect("loads")
        .expect("exists");
    assert_eq!(now.state.details().expect("created").name.as_str(), "Store");

    let changes = diff_versions::<Project>(&f.db.pool, *acme.as_uuid(), *shop.as_uuid(), 1, 2)
        .await
        .expect("diffs")
        .expect("exists");
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].field, "name");

    let other_team = TeamId::new();
    assert!(
        load_as_of::<Project>(&f.db.pool, *other_team.as_uuid(), *shop.as_uuid(), AsOf::Latest)
            .await
            .expect("loads")
            .is_none()
    );
}

#[tokio::test]
async fn secrets_show_only_as_changed_and_never_in_clear_in_any_read_model() {
    use zpanel_commands::Keyring;
    use zpanel_commands::sample::{self, HandlerSink, Shape};
    use zpanel_domain::application::Application;

    let f = fixture().await;
    let keyring = Keyring::generate();
    let shape = Shape { applications: 1, variables: 4, updates: 1, deployments: 1 };
    let team = sample::team(&mut HandlerSink(&f.handler), &keyring, shape, "Secretive").await.expect("sample");
    f.runner.catch_up().await.expect("projects");

    // VAR_3 is the secret one: its audit entry says it changed, and nothing more.
    let changes: serde_json::Value = sqlx::query_scalar(
        "select changes from rm_audit_log where event_type = 'EnvironmentVariableSet' and changes::text like '%VAR_3%'",
    )
    .fetch_one(&f.db.pool)
    .await
    .expect("audit row");
    let change = &changes[0];
    assert_eq!(change["field"], "env.VAR_3");
    assert_eq!(change["secret"], true);
    assert_eq!(change["after"], "[secret]");

    // The shown configuration masks it.
    let config: serde_json::Value = sqlx::query_scalar("select config from rm_applications where application_id = $1")
        .bind(team.applications[0].as_uuid())
        .fetch_one(&f.db.pool)
        .await
        .expect("row");
    let var = config["env"].as_array().expect("env").iter().find(|v| v["key"] == "VAR_3").expect("VAR_3");
    assert_eq!(var["secret"], true);
    assert!(var["value"].is_null());
    let plain = config["env"].as_array().expect("env").iter().find(|v| v["key"] == "VAR_0").expect("VAR_0");
    assert_eq!(plain["value"], "value-0");

    // No read model holds a secret's plaintext anywhere.
    for table in ["rm_applications", "rm_deployments", "rm_audit_log", "rm_audit_state", "rm_private_keys"] {
        let text: Option<String> = sqlx::query_scalar(&format!("select string_agg(t::text, ' ') from {table} t"))
            .fetch_one(&f.db.pool)
            .await
            .expect("reads");
        let text = text.unwrap_or_default();
        for secret in &team.secrets {
            assert!(!text.contains(secret.as_str()), "{table} holds a secret in clear");
        }
        assert!(!text.contains("OPENSSH PRIVATE KEY"), "{table} holds a private key in clear");
    }

    // And the configuration diff between two versions shows the secret only as changed.
    let changes =
        diff_versions::<Application>(&f.db.pool, *team.team_id.as_uuid(), *team.applications[0].as_uuid(), 1, 5)
            .await
            .expect("diffs")
            .expect("exists");
    let secret = changes.iter().find(|c| c.field == "env.VAR_3").expect("VAR_3 changed");
    assert!(secret.secret && secret.before.is_none());
    assert_eq!(secret.after, Some(serde_json::json!("[secret]")));
}
