//! Logs end to end: the real `zpanel api` (no workers: the test plays the deploy worker, writing
//! log lines and notifying as it does, and reporting the deployment's end through commands),
//! spoken to over HTTP and `graphql-transport-ws`.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, PgEventStore};
use zpanel_domain::deployment::{Deployment, DeploymentCommand};
use zpanel_domain::ids::TeamId;
use zpanel_tests::api::{App, Subscription};

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_APP: &str = "mutation($project: ID!, $name: String!) {
    createApplication(input: { projectId: $project, name: $name, image: \"nginx:1.27\", port: 8080 }) { id } }";
const DEPLOY: &str = "mutation($id: ID!) { deployApplication(input: { applicationId: $id }) { id } }";
const FOLLOW: &str = "subscription($id: ID!, $after: Int) {
    deploymentLogs(deploymentId: $id, after: $after) { sequence at stream text } }";

/// A team with an application and a queued deployment of it.
struct Deployed {
    token: String,
    team: TeamId,
    application: String,
    deployment: Uuid,
}

async fn deployed(app: &App, team: &str) -> Deployed {
    let token = app.bootstrap(team);
    let project = app.graphql(Some(&token), CREATE_PROJECT, json!({ "name": "Shop" })).await.ok();
    let project = project["createProject"]["id"].as_str().expect("project id").to_owned();
    let created = app.graphql(Some(&token), CREATE_APP, json!({ "project": project, "name": "web" })).await.ok();
    let application = created["createApplication"]["id"].as_str().expect("application id").to_owned();
    let queued = app.graphql(Some(&token), DEPLOY, json!({ "id": application })).await.ok();
    let deployment = queued["deployApplication"]["id"].as_str().expect("deployment id").parse().expect("a uuid");
    let me = app.graphql(Some(&token), "{ me { teamId } }", json!({})).await.ok();
    let team = TeamId::from_uuid(me["me"]["teamId"].as_str().expect("team id").parse().expect("a uuid"));
    Deployed { token, team, application, deployment }
}

/// Writes lines `from..=to` of `deployment`'s log as the deploy worker does: one batch, then a
/// notification naming the deployment. The first line is Zpanel's own, the others alternate.
async fn write(app: &App, deployment: Uuid, from: i32, to: i32) {
    sqlx::query(
        "insert into deployment_logs (deployment_id, sequence, stream, at, text)
         select $1, s, case when s = 1 then 'system' when s % 2 = 0 then 'stdout' else 'stderr' end,
                now(), 'line ' || s
           from generate_series($2::int, $3::int) s",
    )
    .bind(deployment)
    .bind(from)
    .bind(to)
    .execute(&app.db.pool)
    .await
    .expect("insert lines");
    sqlx::query("select pg_notify('zpanel_deployment_logs', $1)")
        .bind(deployment.to_string())
        .execute(&app.db.pool)
        .await
        .expect("notify");
}

/// The next `n` lines of a `deploymentLogs` subscription.
async fn lines(subscription: &mut Subscription, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let data = subscription.next_data().await.unwrap_or_else(|m| panic!("expected a line, got {m:?}"));
        out.push(data["deploymentLogs"].clone());
    }
    out
}

fn sequences(lines: &[Value]) -> Vec<i64> {
    lines.iter().map(|l| l["sequence"].as_i64().expect("a sequence")).collect()
}

/// The code of the error a subscription was refused with, checking that it then completes.
async fn refused(subscription: &mut Subscription) -> String {
    let message = subscription.message().await.expect("an answer");
    assert_eq!(message["type"], "next", "{message}");
    let code = message["payload"]["errors"][0]["extensions"]["code"].as_str().expect("a code").to_owned();
    let end = subscription.message().await.expect("the end");
    assert_eq!(end["type"], "complete", "{end}");
    code
}

/// Sends a deployment command as a worker would, through the log (bridged, so the server's
/// projections wake at once), and waits until the API shows the deployment `shows`.
async fn report(app: &App, d: &Deployed, command: &DeploymentCommand, shows: &str) {
    let signal = AppendSignal::new();
    let bridge = signal.bridge(app.db.pool.clone()).await.expect("the notify bridge");
    let handler = CommandHandler::new(PgEventStore::new(app.db.pool.clone(), signal.clone()));
    let ctx = CommandContext::new(d.team, Actor::worker("test-worker"), "worker");
    handler.execute::<Deployment>(&ctx, d.deployment, command).await.expect("the command is accepted");
    let query = "query($id: ID!) { deployment(id: $id) { status } }";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let data = app.graphql(Some(&d.token), query, json!({ "id": d.deployment })).await.ok();
        if data["deployment"]["status"] == shows {
            break;
        }
        assert!(Instant::now() < deadline, "the deployment does not show {shows}: {data}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bridge.abort();
}

#[tokio::test]
async fn a_deployment_log_replays_then_follows_live_and_completes_when_the_deployment_ends() {
    let app = App::start_api().await;
    let d = deployed(&app, "Acme").await;
    write(&app, d.deployment, 1, 3).await;

    let mut follow = app.subscribe(&d.token, FOLLOW, json!({ "id": d.deployment })).await;
    let replayed = lines(&mut follow, 3).await;
    assert_eq!(sequences(&replayed), vec![1, 2, 3]);
    assert_eq!(replayed[0]["stream"], "SYSTEM");
    assert_eq!(replayed[1]["stream"], "STDOUT");
    assert_eq!(replayed[2], json!({ "sequence": 3, "at": replayed[2]["at"], "stream": "STDERR", "text": "line 3" }));
    let at = replayed[0]["at"].as_str().expect("at");
    OffsetDateTime::parse(at, &Rfc3339).unwrap_or_else(|e| panic!("{at} is not RFC 3339: {e}"));

    // Live: lines written after subscribing arrive as they are written.
    write(&app, d.deployment, 4, 5).await;
    assert_eq!(sequences(&lines(&mut follow, 2).await), vec![4, 5]);
    let now = OffsetDateTime::now_utc();
    let start = DeploymentCommand::StartDeployment {
        worker_id: "test-worker".into(),
        lease_until: now + time::Duration::minutes(5),
        now,
    };
    report(&app, &d, &start, "RUNNING").await;
    write(&app, d.deployment, 6, 7).await;
    assert_eq!(sequences(&lines(&mut follow, 2).await), vec![6, 7]);

    // The worker writes its last line, then reports the end: the line comes, then completion.
    write(&app, d.deployment, 8, 8).await;
    let fail = DeploymentCommand::FailDeployment {
        step: None,
        reason: "the health check failed".into(),
        now: OffsetDateTime::now_utc(),
    };
    report(&app, &d, &fail, "FAILED").await;
    assert_eq!(sequences(&lines(&mut follow, 1).await), vec![8]);
    let end = follow.message().await.expect("the end");
    assert_eq!(end["type"], "complete", "{end}");

    // A subscription to a finished deployment's log replays it and completes.
    let mut late = app.subscribe(&d.token, FOLLOW, json!({ "id": d.deployment, "after": 6 })).await;
    assert_eq!(sequences(&lines(&mut late, 2).await), vec![7, 8]);
    assert_eq!(late.message().await.expect("the end")["type"], "complete");

    // The same lines, queried.
    let q = "query($id: ID!) { deploymentLogs(deploymentId: $id, after: 5, first: 2) { sequence text }
                               deployment(id: $id) { status logs(first: 2) { sequence stream } } }";
    let data = app.graphql(Some(&d.token), q, json!({ "id": d.deployment })).await.ok();
    assert_eq!(
        data["deploymentLogs"],
        json!([{ "sequence": 6, "text": "line 6" }, { "sequence": 7, "text": "line 7" }])
    );
    assert_eq!(
        data["deployment"],
        json!({ "status": "FAILED", "logs": [{ "sequence": 1, "stream": "SYSTEM" }, { "sequence": 2, "stream": "STDOUT" }] })
    );
}

#[tokio::test]
async fn after_skips_lines_and_only_the_team_may_read_its_deployments_log() {
    let app = App::start_api().await;
    let a = deployed(&app, "Team A").await;
    let b = deployed(&app, "Team B").await;
    write(&app, a.deployment, 1, 3).await;

    let mut follow = app.subscribe(&a.token, FOLLOW, json!({ "id": a.deployment, "after": 2 })).await;
    assert_eq!(sequences(&lines(&mut follow, 1).await), vec![3]);
    write(&app, a.deployment, 4, 4).await;
    assert_eq!(sequences(&lines(&mut follow, 1).await), vec![4]);

    // Another team's deployment answers exactly like a missing one.
    for id in [a.deployment, Uuid::now_v7()] {
        let mut theirs = app.subscribe(&b.token, FOLLOW, json!({ "id": id })).await;
        assert_eq!(refused(&mut theirs).await, "NOT_FOUND", "{id}");
        let q = "query($id: ID!) { deploymentLogs(deploymentId: $id) { text } }";
        assert_eq!(app.graphql(Some(&b.token), q, json!({ "id": id })).await.code(), "NOT_FOUND", "{id}");
    }

    // Reading logs takes the `read` ability.
    let create = "mutation { createApiToken(input: { name: \"ci\", abilities: [\"deploy\"] }) { token } }";
    let deployer = app.graphql(Some(&a.token), create, json!({})).await.ok();
    let deployer = deployer["createApiToken"]["token"].as_str().expect("a token");
    let mut forbidden = app.subscribe(deployer, FOLLOW, json!({ "id": a.deployment })).await;
    assert_eq!(refused(&mut forbidden).await, "FORBIDDEN");
}

#[tokio::test]
async fn container_logs_of_an_application_without_a_release_end_at_once() {
    // The process reads container logs from the Docker Engine; this application never had a
    // release, so there is no container and the subscription completes without a line. (A
    // running release's output is followed in tests/tests/deploy.rs.)
    let app = App::start_api().await;
    let a = deployed(&app, "Team A").await;
    let b = deployed(&app, "Team B").await;
    let q = "subscription($id: ID!, $tail: Int) { containerLogs(applicationId: $id, tail: $tail) { sequence text } }";

    let mut sub = app.subscribe(&a.token, q, json!({ "id": a.application })).await;
    let message = sub.message().await.expect("an answer");
    assert_eq!(message["type"], "complete", "{message}");

    let mut sub = app.subscribe(&a.token, q, json!({ "id": a.application, "tail": 10_001 })).await;
    assert_eq!(refused(&mut sub).await, "INVALID_INPUT");
    let mut sub = app.subscribe(&b.token, q, json!({ "id": a.application })).await;
    assert_eq!(refused(&mut sub).await, "NOT_FOUND");
}

/// The server's connections listening for log notifications (their process ids). A listener
/// that reconnected shows `LISTEN "…";`.
async fn listeners(app: &App) -> Vec<i32> {
    sqlx::query_scalar(
        "select pid from pg_stat_activity
          where datname = current_database() and query like 'LISTEN \"zpanel_deployment_logs\"%'",
    )
    .fetch_all(&app.db.pool)
    .await
    .expect("pg_stat_activity")
}

/// Polls until the server has exactly one listener other than `not`; returns it.
async fn one_listener(app: &App, not: Option<i32>) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = listeners(app).await;
        if let [pid] = pids[..]
            && Some(pid) != not
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "expected one new listener, found {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_listener_serves_every_subscriber_and_comes_back_when_its_connection_is_killed() {
    let app = App::start_api().await;
    let d = deployed(&app, "Acme").await;
    let mut first = app.subscribe(&d.token, FOLLOW, json!({ "id": d.deployment })).await;
    let mut second = app.subscribe(&d.token, FOLLOW, json!({ "id": d.deployment, "after": 1 })).await;
    write(&app, d.deployment, 1, 2).await;
    assert_eq!(sequences(&lines(&mut first, 2).await), vec![1, 2]);
    assert_eq!(sequences(&lines(&mut second, 1).await), vec![2]);
    let listener = one_listener(&app, None).await;

    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(listener)
        .fetch_one(&app.db.pool)
        .await
        .expect("terminate the listener");
    assert!(killed);
    // Lines written meanwhile are not lost: followers poll, and read once it is back.
    write(&app, d.deployment, 3, 3).await;
    assert_eq!(sequences(&lines(&mut first, 1).await), vec![3]);
    assert_eq!(sequences(&lines(&mut second, 1).await), vec![3]);
    one_listener(&app, Some(listener)).await;
    write(&app, d.deployment, 4, 4).await;
    assert_eq!(sequences(&lines(&mut first, 1).await), vec![4]);
    assert_eq!(sequences(&lines(&mut second, 1).await), vec![4]);
}

#[tokio::test]
async fn revoking_the_token_ends_a_log_subscription() {
    let app = App::start_api().await;
    let d = deployed(&app, "Acme").await;
    let create =
        "mutation { createApiToken(input: { name: \"tail\", abilities: [\"read\"] }) { token apiToken { id } } }";
    let reader = app.graphql(Some(&d.token), create, json!({})).await.ok();
    let token = reader["createApiToken"]["token"].as_str().expect("a token");
    let mut follow = app.subscribe(token, FOLLOW, json!({ "id": d.deployment })).await;
    write(&app, d.deployment, 1, 1).await;
    assert_eq!(sequences(&lines(&mut follow, 1).await), vec![1]);

    let revoke = "mutation($id: ID!) { revokeApiToken(input: { id: $id }) { revoked } }";
    let id = &reader["createApiToken"]["apiToken"]["id"];
    app.graphql(Some(&d.token), revoke, json!({ "id": id })).await.ok();
    // Within the re-check interval, the subscription is told and delivers nothing more.
    assert_eq!(refused(&mut follow).await, "UNAUTHENTICATED");
}
