//! The event store against a real PostgreSQL, a fresh database per test.

use futures::future::join_all;
use rand::Rng as _;
use sqlx::Row as _;
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;
use zpanel_commands::store::{Append, AppendError, NewEvent, Payload, event_id_for};
use zpanel_commands::testing::TestDatabase;
use zpanel_commands::{
    Actor, AppendSignal, CommandContext, CommandError, CommandHandler, Cursor, EventStore, PgEventStore,
};
use zpanel_domain::ids::{TeamId, UserId};
use zpanel_domain::team::{Role, Team, TeamCommand, TeamError};
use zpanel_domain::values::Name;

async fn store() -> (TestDatabase, PgEventStore) {
    let db = TestDatabase::create_with(40).await.expect("test database");
    let store = PgEventStore::new(db.pool.clone(), AppendSignal::new());
    (db, store)
}

fn ctx(team: TeamId) -> CommandContext {
    CommandContext::new(team, Actor::system("test"), "test")
}

fn create_team(id: TeamId) -> TeamCommand {
    TeamCommand::CreateTeam { id, name: Name::parse("Acme").expect("name") }
}

fn new_event(command_id: Uuid, i: usize) -> NewEvent {
    NewEvent {
        event_id: event_id_for(command_id, i),
        event_type: "TeamRenamed".into(),
        schema_version: 1,
        payload: Payload::from_value(&serde_json::json!({ "name": format!("n{i}") })).expect("json"),
        metadata: zpanel_commands::store::Metadata {
            actor: Actor::system("test"),
            command_id,
            correlation_id: command_id,
            causation_id: None,
            origin: "test".into(),
        },
    }
}

#[tokio::test]
async fn of_n_concurrent_writers_at_one_version_exactly_one_wins() {
    let (_db, store) = store().await;
    let team = TeamId::new();
    let handler = CommandHandler::new(store.clone());
    handler.execute::<Team>(&ctx(team), *team.as_uuid(), &create_team(team)).await.expect("created");
    let stream_id = team.stream_id();

    let attempts = (0..16).map(|_| {
        let store = store.clone();
        let stream_id = stream_id.clone();
        async move {
            store
                .append(Append {
                    stream_id: &stream_id,
                    kind: "team",
                    team_id: team,
                    expected_version: 1,
                    events: vec![new_event(Uuid::now_v7(), 0)],
                    domains: None,
                })
                .await
        }
    });
    let results = join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results.iter().filter(|r| matches!(r, Err(AppendError::Conflict))).count();
    assert_eq!((wins, conflicts), (1, 15), "{results:?}");
    assert_eq!(store.read_stream(&stream_id, 0).await.expect("reads").version(), 2);
}

#[tokio::test]
async fn creating_a_stream_twice_concurrently_conflicts_for_all_but_one() {
    let (_db, store) = store().await;
    let team = TeamId::new();
    let stream_id = team.stream_id();
    let attempts = (0..8).map(|_| {
        let store = store.clone();
        let stream_id = stream_id.clone();
        async move {
            store
                .append(Append {
                    stream_id: &stream_id,
                    kind: "team",
                    team_id: team,
                    expected_version: 0,
                    events: vec![new_event(Uuid::now_v7(), 0)],
                    domains: None,
                })
                .await
        }
    });
    let results = join_all(attempts).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
}

#[tokio::test]
async fn racing_commands_are_redecided_and_none_is_lost() {
    let (_db, store) = store().await;
    let team = TeamId::new();
    let handler = CommandHandler::new(store.clone());
    handler.execute::<Team>(&ctx(team), *team.as_uuid(), &create_team(team)).await.expect("created");

    let users: Vec<UserId> = (0..8).map(|_| UserId::new()).collect();
    let runs = users.iter().map(|user| {
        let handler = handler.clone();
        let command = TeamCommand::AddMember { user_id: *user, role: Role::Member };
        async move { handler.execute::<Team>(&ctx(team), *team.as_uuid(), &command).await }
    });
    let results = join_all(runs).await;
    let succeeded = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results.iter().all(|r| r.is_ok() || matches!(r, Err(CommandError::Conflict { .. }))),
        "only conflicts may fail: {results:?}"
    );
    assert!(succeeded >= 2, "retries should let most racing commands through, got {succeeded}");
    let (state, version) = handler.load::<Team>(team, *team.as_uuid()).await.expect("loads");
    let Team::Active { members, .. } = state else { panic!("team exists") };
    assert_eq!(members.len(), succeeded);
    assert_eq!(version, 1 + i64::try_from(succeeded).expect("small"));
}

#[tokio::test]
async fn a_retried_command_returns_its_first_result_and_appends_nothing() {
    let (db, store) = store().await;
    let team = TeamId::new();
    let handler = CommandHandler::new(store);
    let context = ctx(team);
    let first = handler.execute::<Team>(&context, *team.as_uuid(), &create_team(team)).await.expect("created");
    assert!(!first.repeated);
    let user = UserId::new();
    let add = TeamCommand::AddMember { user_id: user, role: Role::Admin };
    let add_ctx = ctx(team);
    let added = handler.execute::<Team>(&add_ctx, *team.as_uuid(), &add).await.expect("added");

    // The same create again (same command id): decided on the fresh state it would be rejected
    // as "already exists"; the handler recognizes the command and answers with the first result.
    let again = handler.execute::<Team>(&context, *team.as_uuid(), &create_team(team)).await.expect("repeated");
    assert!(again.repeated);
    assert_eq!(again.version, first.version);
    assert_eq!(
        again.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        first.events.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    let added_again = handler.execute::<Team>(&add_ctx, *team.as_uuid(), &add).await.expect("repeated");
    assert!(added_again.repeated);
    assert_eq!(added_again.version, added.version);

    let count: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&db.pool).await.expect("counts");
    assert_eq!(count, 2);

    // A fresh command id with the same intent is a new command, and the rule applies.
    let rejected = handler.execute::<Team>(&ctx(team), *team.as_uuid(), &add).await;
    assert!(matches!(rejected, Err(CommandError::Rejected(TeamError::AlreadyAMember))), "{rejected:?}");
}

#[tokio::test]
async fn a_stream_of_another_team_is_not_found() {
    let (_db, store) = store().await;
    let handler = CommandHandler::new(store);
    let team = TeamId::new();
    handler.execute::<Team>(&ctx(team), *team.as_uuid(), &create_team(team)).await.expect("created");
    let other = TeamId::new();
    let renamed = handler
        .execute::<Team>(
            &ctx(other),
            *team.as_uuid(),
            &TeamCommand::RenameTeam { name: Name::parse("Mine").expect("name") },
        )
        .await;
    assert!(matches!(renamed, Err(CommandError::NotFound)), "{renamed:?}");
    assert!(matches!(handler.load::<Team>(other, *team.as_uuid()).await, Err(CommandError::NotFound)));
}

/// The gap test: 8 writers append with random delays inside their transactions, so transactions
/// commit out of the order in which they got their positions. A reader polling the whole log
/// with the `(tx_id, position)` cursor must see every event exactly once.
#[tokio::test]
async fn a_polling_reader_never_skips_or_repeats_while_writers_commit_out_of_order() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 40;
    let (db, store) = store().await;
    let team = Uuid::now_v7();

    let writers = (0..WRITERS).map(|w| {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..PER_WRITER {
                let delay_ms = rand::thread_rng().gen_range(0..15);
                let event_id = Uuid::now_v7();
                let stream_id = format!("team-{}", Uuid::now_v7());
                let mut tx = pool.begin().await.expect("begins");
                sqlx::query("insert into streams (stream_id, kind, team_id, version) values ($1, 'team', $2, 1)")
                    .bind(&stream_id)
                    .bind(team)
                    .execute(&mut *tx)
                    .await
                    .expect("stream");
                sqlx::query(
                    "insert into events (stream_id, stream_position, event_id, event_type, schema_version, team_id, payload, metadata)
                     values ($1, 1, $2, 'TeamRenamed', 1, $3, $4, $5)",
                )
                .bind(&stream_id)
                .bind(event_id)
                .bind(team)
                .bind(serde_json::json!({ "name": format!("w{w}-{i}") }))
                .bind(serde_json::json!({
                    "actor": { "kind": "system", "id": null, "name": "test" },
                    "command_id": event_id, "correlation_id": event_id, "origin": "test"
                }))
                .execute(&mut *tx)
                .await
                .expect("event");
                // The position is taken; hold the transaction open for a while before committing.
                sqlx::query("select pg_sleep($1)").bind(f64::from(delay_ms) / 1000.0).execute(&mut *tx).await.expect("sleeps");
                tx.commit().await.expect("commits");
                written.push(event_id);
            }
            written
        })
    });
    let writers: Vec<_> = writers.collect();

    let mut cursor = Cursor::START;
    let mut seen = Vec::new();
    let expected = WRITERS * PER_WRITER;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < expected {
        assert!(tokio::time::Instant::now() < deadline, "reader saw {} of {expected}", seen.len());
        let batch = store.read_all(cursor, 7).await.expect("reads");
        for event in &batch.events {
            assert!(event.cursor() > cursor, "the cursor only moves forward");
            cursor = event.cursor();
            seen.push(event.event_id);
        }
        if batch.events.is_empty() {
            tokio::task::yield_now().await;
        }
    }
    let mut written = BTreeSet::new();
    for writer in writers {
        written.extend(writer.await.expect("writer"));
    }
    let seen_set: BTreeSet<_> = seen.iter().copied().collect();
    assert_eq!(seen.len(), seen_set.len(), "an event was read twice");
    assert_eq!(seen_set, written, "the reader must see exactly the written events");
    // And nothing more turns up later.
    assert!(store.read_all(cursor, 100).await.expect("reads").events.is_empty());
}

#[tokio::test]
async fn a_reader_is_told_when_committed_events_wait_behind_an_open_transaction() {
    let (db, store) = store().await;
    let handler = CommandHandler::new(store.clone());
    // An open transaction that holds an xid, begun before the append.
    let mut open = db.pool.begin().await.expect("begins");
    let xid: String = sqlx::query("select pg_current_xact_id()::text").fetch_one(&mut *open).await.expect("xid").get(0);
    assert!(!xid.is_empty());
    let team = TeamId::new();
    handler.execute::<Team>(&ctx(team), *team.as_uuid(), &create_team(team)).await.expect("created");
    let held = store.read_all(Cursor::START, 10).await.expect("reads");
    assert!(held.events.is_empty() && held.held_back, "{held:?}");
    open.rollback().await.expect("rolls back");
    // Transactions of other tests (same cluster) may hold the horizon for a moment longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let released = loop {
        let batch = store.read_all(Cursor::START, 10).await.expect("reads");
        if !batch.events.is_empty() || std::time::Instant::now() > deadline {
            break batch;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(released.events.len(), 1);
}

#[tokio::test]
async fn of_streams_claiming_overlapping_domains_at_once_exactly_one_gets_them() {
    use zpanel_domain::values::DomainName;
    let (_db, store) = store().await;
    let names = ["race.example.com", "*.example.com"];
    let streams: Vec<(String, TeamId, &str)> =
        (0..8).map(|n| (format!("application-{}", Uuid::now_v7()), TeamId::new(), names[n % 2])).collect();
    let attempts = streams.iter().map(|(stream_id, team, name)| {
        let store = store.clone();
        async move {
            store
                .append(Append {
                    stream_id,
                    kind: "application",
                    team_id: *team,
                    expected_version: 0,
                    events: vec![new_event(Uuid::now_v7(), 0)],
                    domains: Some(BTreeSet::from([DomainName::parse(name).expect("a domain")])),
                })
                .await
        }
    });
    let results = join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let taken = results.iter().filter(|r| matches!(r, Err(AppendError::DomainTaken { .. }))).count();
    assert_eq!((wins, taken), (1, 7), "{results:?}");
    // The losers wrote nothing: no stream, no claim.
    let claims: i64 =
        sqlx::query_scalar("select count(*) from domain_claims").fetch_one(store.pool()).await.expect("count");
    assert_eq!(claims, 1);
    let streams: i64 = sqlx::query_scalar("select count(*) from streams").fetch_one(store.pool()).await.expect("count");
    assert_eq!(streams, 1);
}
