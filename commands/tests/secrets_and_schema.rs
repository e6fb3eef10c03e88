//! Sealed secrets and old event shapes, through the real store.

use zpanel_commands::sample::{HandlerSink, Shape};
use zpanel_commands::testing::TestDatabase;
use zpanel_commands::{AppendSignal, CommandHandler, Keyring, PgEventStore, sample};
use zpanel_domain::application::Application;
use zpanel_domain::ids::TeamId;

#[tokio::test]
async fn sealed_secrets_round_trip_and_never_reach_the_events_table_in_clear() {
    let db = TestDatabase::create().await.expect("database");
    let handler = CommandHandler::new(PgEventStore::new(db.pool.clone(), AppendSignal::new()));
    let keyring = Keyring::generate();
    let shape = Shape { applications: 2, variables: 8, updates: 1, deployments: 2 };
    let team = sample::team(&mut HandlerSink(&handler), &keyring, shape, "Secretive").await.expect("sample");
    assert_eq!(team.secrets.len(), 4, "every fourth variable is secret");

    let everything: String = sqlx::query_scalar("select string_agg(payload::text || metadata::text, ' ') from events")
        .fetch_one(&db.pool)
        .await
        .expect("reads");
    for secret in &team.secrets {
        assert!(!everything.contains(secret.as_str()), "secret {secret} is stored in clear");
    }
    assert!(!everything.contains("OPENSSH PRIVATE KEY"), "a private key is stored in clear");

    // The sealed values open again with the keyring, to exactly what was set.
    let (app, _) = handler.load::<Application>(team.team_id, *team.applications[0].as_uuid()).await.expect("loads");
    let state = app.state().expect("exists");
    let opened: Vec<String> = state
        .env
        .values()
        .filter_map(|var| match &var.value {
            zpanel_domain::application::EnvValue::Secret(sealed) => {
                Some(keyring.open(sealed).expect("opens").expose().to_owned())
            }
            zpanel_domain::application::EnvValue::Plain(_) => None,
        })
        .collect();
    assert_eq!(opened.len(), 2);
    assert!(opened.iter().all(|o| team.secrets.contains(o)));
}

#[tokio::test]
async fn an_event_stored_in_an_old_shape_is_upcast_on_read() {
    let db = TestDatabase::create().await.expect("database");
    let handler = CommandHandler::new(PgEventStore::new(db.pool.clone(), AppendSignal::new()));
    let keyring = Keyring::generate();
    let shape = Shape { applications: 1, variables: 0, updates: 0, deployments: 0 };
    let team = sample::team(&mut HandlerSink(&handler), &keyring, shape, "Old").await.expect("sample");
    let app = team.applications[0];

    // Rewrite the stored ApplicationCreated into schema version 1, where a single optional
    // `domain` stood instead of the `domains` list — as an event written by older code would be.
    let updated = sqlx::query(
        "update events
            set schema_version = 1,
                payload = ((payload::jsonb - 'domains') || jsonb_build_object('domain', payload->'domains'->0))::json
          where stream_id = $1 and event_type = 'ApplicationCreated'",
    )
    .bind(format!("application-{app}"))
    .execute(&db.pool)
    .await
    .expect("rewrites");
    assert_eq!(updated.rows_affected(), 1);

    let (state, version) =
        handler.load::<Application>(team.team_id, *app.as_uuid()).await.expect("loads the old shape");
    assert_eq!(version, 1);
    let domains: Vec<String> = state.state().expect("exists").domains.iter().map(ToString::to_string).collect();
    assert_eq!(domains, [format!("app-0.t{}.shop.example.com", team.team_id.as_uuid().simple())]);

    // Another team still cannot see it.
    assert!(handler.load::<Application>(TeamId::new(), *app.as_uuid()).await.is_err());
}

#[tokio::test]
async fn large_documents_are_compressed_with_lz4_where_the_server_has_it() {
    let db = TestDatabase::create().await.expect("database");
    // A server built without lz4 refuses the setting; the migrations then keep pglz.
    let lz4: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_settings where name = 'default_toast_compression' and 'lz4' = any(enumvals))",
    )
    .fetch_one(&db.pool)
    .await
    .expect("settings");
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "select c.relname::text, a.attname::text, a.attcompression::text
           from pg_attribute a join pg_class c on c.oid = a.attrelid
          where c.relnamespace = current_schema()::regnamespace and c.relkind = 'r'
            and (c.relname, a.attname) in (('events', 'payload'), ('rm_applications', 'config'),
                 ('rm_applications', 'state'), ('rm_deployments', 'release'), ('rm_deployments', 'state'),
                 ('rm_audit_log', 'changes'), ('rm_audit_state', 'state'))
          order by 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .expect("columns");
    assert_eq!(columns.len(), 7, "{columns:?}");
    let expected = if lz4 { "l" } else { "" };
    for (table, column, compression) in &columns {
        assert_eq!(compression, expected, "{table}.{column}");
    }
}
