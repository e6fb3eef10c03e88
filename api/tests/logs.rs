//! Log queries and subscriptions through the schema, against a real PostgreSQL database: a
//! deployment's log read in pages and followed (without and with gaps), and a container's log
//! from a fake source, with the rules on `tail`, teams and a missing source.

use async_graphql::{Request, Variables};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;
use zpanel_api::ApiState;
use zpanel_api::auth::Caller;
use zpanel_api::logs::{ContainerLogLine, ContainerLogs, ContainerStream, LogNotifier};
use zpanel_api::schema::{Suggestions, ZpanelSchema};
use zpanel_commands::sample::{self, HandlerSink, SampleTeam, Shape};
use zpanel_commands::testing::TestDatabase;
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, Keyring, PgEventStore};
use zpanel_domain::api_token::{ApiToken, ApiTokenCommand};
use zpanel_domain::application::Application;
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentReason};
use zpanel_domain::ids::{ApiTokenId, DeploymentId};
use zpanel_domain::values::{Abilities, Ability, Name};
use zpanel_projections::ProjectionRunner;

/// Longest wait for anything a test expects.
const DEADLINE: Duration = Duration::from_secs(20);

/// A schema over a fresh database with two sample teams; the caller is a `read` token of the
/// first.
struct Env {
    db: TestDatabase,
    handler: CommandHandler<PgEventStore>,
    runner: ProjectionRunner,
    state: ApiState,
    schema: ZpanelSchema,
    caller: Caller,
    mine: SampleTeam,
    theirs: SampleTeam,
}

async fn env(container_logs: Option<Arc<dyn ContainerLogs>>) -> Env {
    let db = TestDatabase::create().await.expect("a database");
    let signal = AppendSignal::new();
    let handler = CommandHandler::new(PgEventStore::new(db.pool.clone(), signal.clone()));
    let keyring = Keyring::generate();
    let shape = Shape { applications: 1, variables: 0, updates: 0, deployments: 1 };
    let mine = sample::team(&mut HandlerSink(&handler), &keyring, shape, "Mine").await.expect("a team");
    let theirs = sample::team(&mut HandlerSink(&handler), &keyring, shape, "Theirs").await.expect("a team");
    let token = zpanel_commands::tokens::generate();
    let token_id = ApiTokenId::new();
    let command = ApiTokenCommand::CreateApiToken {
        id: token_id,
        team_id: mine.team_id,
        name: Name::parse("reader").expect("a name"),
        abilities: Abilities::new([Ability::Read]),
        token_hash: token.hash.clone(),
        expires_at: None,
        creator_abilities: Abilities::new(Ability::ALL),
        creator_expires_at: None,
        now: OffsetDateTime::now_utc(),
    };
    let ctx = CommandContext::new(mine.team_id, Actor::system("test"), "test");
    handler.execute::<ApiToken>(&ctx, *token_id.as_uuid(), &command).await.expect("a token");
    let runner = ProjectionRunner::new(db.pool.clone(), zpanel_projections::all());
    runner.register().await.expect("register");
    runner.catch_up().await.expect("project");
    let caller = zpanel_api::auth::authenticate(&db.pool, token.token.expose()).await.expect("the token works");
    let names = runner.names().into_iter().map(str::to_owned).collect();
    let state = ApiState {
        pool: db.pool.clone(),
        handler: handler.clone(),
        keyring: Arc::new(keyring),
        feed: zpanel_api::feed::Feed::new(db.pool.clone(), names, runner.projected()),
        rate: Arc::new(zpanel_api::limits::RateLimiter::new(1000, 1000)),
        limits: zpanel_api::limits::Limits::default(),
        subscriptions: Arc::new(zpanel_api::limits::Subscriptions::new(1000)),
        metrics: Arc::default(),
        token_checks: Arc::default(),
        cache: Arc::default(),
        logs: LogNotifier::new(db.pool.clone()),
        container_logs,
        subscription_buffer: zpanel_api::hub::CAPACITY,
        git_local_roots: Arc::default(),
        tenancy: Arc::default(),
    };
    let schema = zpanel_api::schema::build(state.clone(), Suggestions::On);
    Env { db, handler, runner, state, schema, caller, mine, theirs }
}

impl Env {
    fn request(&self, query: &str, variables: Value) -> Request {
        Request::new(query).variables(Variables::from_json(variables)).data(self.caller.clone())
    }

    async fn query(&self, query: &str, variables: Value) -> Value {
        serde_json::to_value(self.schema.execute(self.request(query, variables)).await).expect("json")
    }

    fn subscribe(&self, query: &str, variables: Value) -> impl Stream<Item = Value> + use<> {
        self.schema.execute_stream(self.request(query, variables)).map(|r| serde_json::to_value(r).expect("json"))
    }

    /// Queues a deployment of the first team's application; it stays queued (no worker here).
    async fn queue(&self) -> Uuid {
        let app = *self.mine.applications[0].as_uuid();
        let (application, _) = self.handler.load::<Application>(self.mine.team_id, app).await.expect("load");
        let id = DeploymentId::new();
        let command = DeploymentCommand::QueueDeployment {
            id,
            application,
            reason: DeploymentReason::Manual,
            image: None,
            release: None,
            now: OffsetDateTime::now_utc(),
        };
        self.execute(*id.as_uuid(), &command).await;
        *id.as_uuid()
    }

    async fn execute(&self, deployment: Uuid, command: &DeploymentCommand) {
        let ctx = CommandContext::new(self.mine.team_id, Actor::worker("test"), "test");
        self.handler.execute::<Deployment>(&ctx, deployment, command).await.expect("a deployment command");
        self.runner.catch_up().await.expect("project");
    }

    /// Writes lines `from..=to` of `deployment`'s log as the deploy worker does: a batch, then
    /// a notification.
    async fn write(&self, deployment: Uuid, from: i32, to: i32) {
        sqlx::query(
            "insert into deployment_logs (deployment_id, sequence, stream, at, text)
             select $1, s, case when s % 2 = 0 then 'stderr' else 'stdout' end, now(), 'line ' || s
               from generate_series($2::int, $3::int) s",
        )
        .bind(deployment)
        .bind(from)
        .bind(to)
        .execute(&self.db.pool)
        .await
        .expect("insert lines");
        sqlx::query("select pg_notify($1, $2)")
            .bind(zpanel_api::logs::CHANNEL)
            .bind(deployment.to_string())
            .execute(&self.db.pool)
            .await
            .expect("notify");
    }
}

/// The next item of `stream`, within [`DEADLINE`]; `None` when it ended.
async fn next(stream: &mut (impl Stream<Item = Value> + Unpin)) -> Option<Value> {
    tokio::time::timeout(DEADLINE, stream.next()).await.expect("an item or the end in time")
}

/// The sequences of the next `n` lines of a `deploymentLogs` subscription.
async fn sequences(stream: &mut (impl Stream<Item = Value> + Unpin), n: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let item = next(stream).await.expect("a line");
        assert!(item.get("errors").is_none(), "{item}");
        out.push(item["data"]["deploymentLogs"]["sequence"].as_i64().expect("a sequence"));
    }
    out
}

fn code(answer: &Value) -> &str {
    answer["errors"][0]["extensions"]["code"].as_str().unwrap_or_else(|| panic!("expected an error: {answer}"))
}

const FOLLOW: &str =
    "subscription($id: ID!, $after: Int) { deploymentLogs(deploymentId: $id, after: $after) { sequence stream text } }";

#[tokio::test]
async fn a_long_deployment_log_is_read_in_pages_then_followed_until_the_deployment_ends() {
    let env = env(None).await;
    let listener = tokio::spawn(env.state.logs.clone().run(std::future::pending()));
    let deployment = env.queue().await;
    env.write(deployment, 1, 1200).await;

    let mut follow = Box::pin(env.subscribe(FOLLOW, json!({ "id": deployment })));
    let first = next(&mut follow).await.expect("the first line");
    assert_eq!(first["data"]["deploymentLogs"], json!({ "sequence": 1, "stream": "STDOUT", "text": "line 1" }));
    assert_eq!(sequences(&mut follow, 1199).await, (2..=1200).collect::<Vec<_>>());
    assert_eq!(env.state.logs.followed(), 1);

    // Live: a new batch is delivered as it is written.
    env.write(deployment, 1201, 1203).await;
    assert_eq!(sequences(&mut follow, 3).await, vec![1201, 1202, 1203]);

    // The deployment ends after its last lines: they come, then the end.
    env.write(deployment, 1204, 1204).await;
    let fail = DeploymentCommand::FailDeployment { step: None, reason: "boom".into(), now: OffsetDateTime::now_utc() };
    env.execute(deployment, &fail).await;
    assert_eq!(sequences(&mut follow, 1).await, vec![1204]);
    assert_eq!(next(&mut follow).await, None, "the subscription completes");
    drop(follow);
    assert_eq!(env.state.logs.followed(), 0, "the last follower's watch is gone");
    listener.abort();
}

#[tokio::test]
async fn a_follower_waits_for_a_batch_committed_late_and_skips_one_that_never_comes() {
    let env = env(None).await;
    let deployment = env.queue().await;
    env.write(deployment, 1, 2).await;
    // Line 3's batch is not committed yet; 4 is.
    env.write(deployment, 4, 4).await;
    let mut follow = Box::pin(env.subscribe(FOLLOW, json!({ "id": deployment, "after": 1 })));
    assert_eq!(sequences(&mut follow, 1).await, vec![2]);
    // No listener runs in this test: the follower finds the late batch by polling.
    env.write(deployment, 3, 3).await;
    assert_eq!(sequences(&mut follow, 2).await, vec![3, 4]);

    // Once the deployment is over, a hole in its log will never fill: the follower goes on.
    env.write(deployment, 6, 6).await;
    let cancel = DeploymentCommand::CancelDeployment { now: OffsetDateTime::now_utc() };
    env.execute(deployment, &cancel).await;
    assert_eq!(sequences(&mut follow, 1).await, vec![6]);
    assert_eq!(next(&mut follow).await, None);
}

#[tokio::test]
async fn log_queries_page_and_are_scoped_to_the_team() {
    let env = env(None).await;
    let deployment = env.queue().await;
    env.write(deployment, 1, 5).await;
    let q = "query($id: ID!, $after: Int, $first: Int) {
        deploymentLogs(deploymentId: $id, after: $after, first: $first) { sequence }
        deployment(id: $id) { logs(after: $after, first: $first) { sequence stream text } } }";
    let page = env.query(q, json!({ "id": deployment, "after": 1, "first": 2 })).await;
    assert_eq!(page["data"]["deploymentLogs"], json!([{ "sequence": 2 }, { "sequence": 3 }]));
    assert_eq!(
        page["data"]["deployment"]["logs"],
        json!([{ "sequence": 2, "stream": "STDERR", "text": "line 2" }, { "sequence": 3, "stream": "STDOUT", "text": "line 3" }])
    );
    let rest = env.query(q, json!({ "id": deployment, "after": 3 })).await;
    assert_eq!(rest["data"]["deploymentLogs"], json!([{ "sequence": 4 }, { "sequence": 5 }]));

    for (vars, field) in [
        (json!({ "id": deployment, "first": 1001 }), "first"),
        (json!({ "id": deployment, "first": -1 }), "first"),
        (json!({ "id": deployment, "after": -1 }), "after"),
    ] {
        let answer = env.query(q, vars.clone()).await;
        assert_eq!(code(&answer), "INVALID_INPUT", "{vars}");
        assert_eq!(answer["errors"][0]["extensions"]["field"], field, "{vars}");
    }
    let mut follow = Box::pin(env.subscribe(FOLLOW, json!({ "id": deployment, "after": -1 })));
    let refused = next(&mut follow).await.expect("an error");
    assert_eq!((code(&refused), &refused["errors"][0]["extensions"]["field"]), ("INVALID_INPUT", &json!("after")));

    let theirs = *env.theirs.deployments[0].as_uuid();
    env.write(theirs, 1, 1).await;
    for id in [theirs.to_string(), Uuid::now_v7().to_string(), "not-an-id".to_owned()] {
        let answer =
            env.query("query($id: ID!) { deploymentLogs(deploymentId: $id) { text } }", json!({ "id": id })).await;
        assert_eq!(code(&answer), "NOT_FOUND", "{id}");
        let mut follow = Box::pin(env.subscribe(FOLLOW, json!({ "id": id })));
        assert_eq!(code(&next(&mut follow).await.expect("an error")), "NOT_FOUND", "{id}");
        assert_eq!(next(&mut follow).await, None);
    }
}

/// A container engine that replays up to three lines, then fails or ends.
#[derive(Debug, Default)]
struct FakeEngine {
    asked: Mutex<Vec<(Uuid, u32)>>,
    fails: bool,
}

impl ContainerLogs for FakeEngine {
    fn follow(&self, application_id: Uuid, tail: u32) -> BoxStream<'static, anyhow::Result<ContainerLogLine>> {
        self.asked.lock().expect("lock").push((application_id, tail));
        let at = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let lines = [(ContainerStream::Stdout, "listening on :8080"), (ContainerStream::Stderr, "GET / 500")]
            .into_iter()
            .take(usize::try_from(tail).unwrap_or(usize::MAX))
            .map(move |(stream, text)| Ok(ContainerLogLine { at, stream, text: text.to_owned() }));
        let end = self.fails.then(|| Err(anyhow::anyhow!("the engine went away")));
        futures::stream::iter(lines.chain(end)).boxed()
    }
}

const CONTAINER: &str = "subscription($id: ID!, $tail: Int) {
    containerLogs(applicationId: $id, tail: $tail) { sequence at stream text } }";

#[tokio::test]
async fn container_logs_come_from_the_source_numbered_from_one() {
    let engine = Arc::new(FakeEngine::default());
    let env = env(Some(engine.clone())).await;
    let app = *env.mine.applications[0].as_uuid();
    let lines: Vec<Value> = env.subscribe(CONTAINER, json!({ "id": app })).collect().await;
    assert_eq!(
        lines,
        vec![
            json!({ "data": { "containerLogs": {
                "sequence": 1, "at": "2024-10-04T00:00:00Z", "stream": "STDOUT", "text": "listening on :8080" } } }),
            json!({ "data": { "containerLogs": {
                "sequence": 2, "at": "2024-10-04T00:00:00Z", "stream": "STDERR", "text": "GET / 500" } } }),
        ]
    );
    let _: Vec<Value> = env.subscribe(CONTAINER, json!({ "id": app, "tail": 10_000 })).collect().await;
    let one: Vec<Value> = env.subscribe(CONTAINER, json!({ "id": app, "tail": 1 })).collect().await;
    assert_eq!(one.len(), 1);
    assert_eq!(*engine.asked.lock().expect("lock"), vec![(app, 100), (app, 10_000), (app, 1)]);
}

#[tokio::test]
async fn container_logs_check_the_tail_the_team_and_the_source() {
    let engine = Arc::new(FakeEngine { fails: true, ..FakeEngine::default() });
    let env = env(Some(engine.clone())).await;
    let app = *env.mine.applications[0].as_uuid();
    for tail in [-1, 10_001] {
        let answer: Vec<Value> = env.subscribe(CONTAINER, json!({ "id": app, "tail": tail })).collect().await;
        assert_eq!(code(&answer[0]), "INVALID_INPUT", "{tail}");
        assert_eq!(answer[0]["errors"][0]["extensions"]["field"], "tail");
    }
    let theirs = *env.theirs.applications[0].as_uuid();
    let answer: Vec<Value> = env.subscribe(CONTAINER, json!({ "id": theirs })).collect().await;
    assert_eq!(code(&answer[0]), "NOT_FOUND");
    assert!(engine.asked.lock().expect("lock").is_empty(), "the source is not asked for refused subscriptions");

    // A failing source: the lines before the failure, then an internal error, then the end.
    let answer: Vec<Value> = env.subscribe(CONTAINER, json!({ "id": app })).collect().await;
    assert_eq!(answer.len(), 3, "{answer:?}");
    assert_eq!(answer[1]["data"]["containerLogs"]["sequence"], 2);
    assert_eq!(code(&answer[2]), "INTERNAL");

    // A process without a source says so.
    let without = self::env(None).await;
    let app = *without.mine.applications[0].as_uuid();
    let answer: Vec<Value> = without.subscribe(CONTAINER, json!({ "id": app })).collect().await;
    assert_eq!(answer.len(), 1);
    assert_eq!(code(&answer[0]), "CONFLICT");
    assert_eq!(answer[0]["errors"][0]["message"], "container logs are not available in this process");
}
