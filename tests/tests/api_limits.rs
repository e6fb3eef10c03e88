//! The API's transports and limits, tried as an attacker would: a token revoked or expired while
//! its WebSocket is open, the same limits over HTTP and over the socket, operations that cost
//! more than they may, a document nested 250,000 deep, a token that would outlive its creator,
//! and what the operational endpoints give away.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zpanel_tests::api::{App, Socket, receive, send};

const CREATE_TOKEN: &str = "mutation($name: String!, $abilities: [String!]!, $expiresAt: String) {
    createApiToken(input: { name: $name, abilities: $abilities, expiresAt: $expiresAt }) {
        token apiToken { id abilities expiresAt } } }";
const REVOKE_TOKEN: &str = "mutation($id: ID!) { revokeApiToken(input: { id: $id }) { revoked } }";
/// What an attacker holding a socket of a dead token would run: a fresh root token.
const MINT: &str = "mutation { createApiToken(input: { name: \"minted\", abilities: [\"root\"] }) { token } }";
const PROTOCOLS: [&str; 2] = ["graphql-transport-ws", "graphql-ws"];

/// A token made by `root`: its secret and id.
async fn token(app: &App, root: &str, name: &str, abilities: &[&str], expires_at: Option<&str>) -> (String, String) {
    let vars = json!({ "name": name, "abilities": abilities, "expiresAt": expires_at });
    let data = app.graphql(Some(root), CREATE_TOKEN, vars).await.ok();
    let created = &data["createApiToken"];
    (
        created["token"].as_str().expect("a token").to_owned(),
        created["apiToken"]["id"].as_str().expect("an id").to_owned(),
    )
}

/// `time` from now, in RFC 3339.
fn from_now(time: time::Duration) -> String {
    (OffsetDateTime::now_utc() + time).format(&Rfc3339).expect("a time")
}

/// The names of the team's tokens.
async fn token_names(app: &App, root: &str) -> Vec<String> {
    let data = app.graphql(Some(root), "{ apiTokens { name } }", json!({})).await.ok();
    data["apiTokens"].as_array().expect("tokens").iter().filter_map(|t| t["name"].as_str().map(str::to_owned)).collect()
}

/// The message that starts an operation in `protocol`.
fn start(protocol: &str, id: &str, query: &str) -> Value {
    let kind = if protocol == "graphql-ws" { "start" } else { "subscribe" };
    json!({ "id": id, "type": kind, "payload": { "query": query } })
}

/// Runs `query` as operation `id` and returns its first answer (`next` or `data`).
async fn run(socket: &mut Socket, protocol: &str, id: &str, query: &str) -> Value {
    send(socket, start(protocol, id, query)).await;
    let answer = receive(socket).await.expect("an answer");
    assert_eq!(answer["id"], id, "{answer}");
    answer
}

/// A project with an application in it, made by `root`: the application's id.
async fn application(app: &App, root: &str) -> String {
    let project =
        app.graphql(Some(root), "mutation { createProject(input: { name: \"Shop\" }) { id } }", json!({})).await;
    let project = project.ok()["createProject"]["id"].as_str().expect("a project").to_owned();
    let create = "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\", image: \"nginx:1.27\", port: 80 }) { id } }";
    let application = app.graphql(Some(root), create, json!({ "p": project })).await.ok();
    application["createApplication"]["id"].as_str().expect("an application").to_owned()
}

/// Sends a ping; the messages that came before the pong (the session handles messages in order,
/// so these are the answers to everything sent before the ping).
async fn until_pong(socket: &mut Socket) -> Vec<Value> {
    send(socket, json!({ "type": "ping" })).await;
    let mut before = Vec::new();
    loop {
        let message = receive(socket).await.expect("the session answers");
        if message["type"] == "pong" {
            return before;
        }
        before.push(message);
    }
}

/// Polls until `token` no longer works over HTTP (it expires on its own).
async fn until_refused(app: &App, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.graphql(Some(token), "{ me { name } }", json!({})).await.errors.is_empty() {
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Revoked while its socket is open, a token runs nothing more on it: the next operation closes
/// the socket with 4403, in both protocols, and the root token it asked for is never made.
#[tokio::test]
async fn a_revoked_token_cannot_mint_a_token_over_its_open_socket() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    for protocol in PROTOCOLS {
        let (secret, id) = token(&app, &root, &format!("doomed {protocol}"), &["root"], None).await;
        let mut socket = app.session(protocol, &secret).await;
        let before = run(&mut socket, protocol, "before", "{ me { name } }").await;
        assert_eq!(before["payload"]["data"]["me"]["name"], format!("doomed {protocol}"), "{before}");

        let revoked = app.graphql(Some(&root), REVOKE_TOKEN, json!({ "id": id })).await.ok();
        assert_eq!(revoked["revokeApiToken"]["revoked"], true);
        send(&mut socket, start(protocol, "mint", MINT)).await;
        // Whatever came before (the first operation's `complete`), the socket then closes 4403.
        let closed = loop {
            match receive(&mut socket).await {
                Ok(message) => assert_ne!(message["id"], "mint", "{protocol}: the mutation ran: {message}"),
                Err(code) => break code,
            }
        };
        assert_eq!(closed, 4403, "{protocol}");
    }
    assert!(!token_names(&app, &root).await.contains(&"minted".to_owned()), "no token was minted");
}

/// Expired while its socket is open, a token runs nothing more on it either.
#[tokio::test]
async fn an_expired_token_cannot_mint_a_token_over_its_open_socket() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    for protocol in PROTOCOLS {
        let (secret, _) = token(&app, &root, "brief", &["root"], Some(&from_now(time::Duration::seconds(2)))).await;
        let mut socket = app.session(protocol, &secret).await;
        let _ = until_pong(&mut socket).await;
        until_refused(&app, &secret).await;
        send(&mut socket, start(protocol, "mint", MINT)).await;
        assert_eq!(receive(&mut socket).await, Err(4403), "{protocol}");
    }
    assert!(!token_names(&app, &root).await.contains(&"minted".to_owned()), "no token was minted");
}

/// The alias cap and the per-token rate limit hold on a socket exactly as over HTTP: the
/// refused operation gets an `error` message with the same code, and the socket stays open.
#[tokio::test]
async fn the_alias_cap_and_the_rate_limit_hold_over_the_websocket() {
    let app = App::start_with(&[("ZPANEL_API_RATE", "1"), ("ZPANEL_API_BURST", "4")]).await;
    let root = app.bootstrap("Acme");
    for protocol in PROTOCOLS {
        let mut socket = app.session(protocol, &root).await;
        let aliases: String = (0..40).map(|i| format!("a{i}: me {{ name }} ")).collect();
        let refused = run(&mut socket, protocol, "aliases", &format!("{{ {aliases} }}")).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert!(refused["payload"].to_string().contains("INVALID_INPUT"), "{refused}");
    }
    // Two operations of the burst are spent; the burst of 4 runs out within the next ones.
    let mut socket = app.session("graphql-transport-ws", &root).await;
    for i in 0..6 {
        send(&mut socket, start("graphql-transport-ws", &format!("q{i}"), "{ me { name } }")).await;
    }
    let answers = until_pong(&mut socket).await;
    let limited: Vec<&Value> = answers.iter().filter(|m| m["type"] == "error").collect();
    assert!(!limited.is_empty(), "the rate limit applies on the socket: {answers:?}");
    assert_eq!(limited[0]["payload"][0]["extensions"]["code"], "RATE_LIMITED", "{answers:?}");
    assert!(limited[0]["payload"][0]["extensions"]["retryAfterMs"].as_u64().is_some());
}

/// A token holds at most so many subscriptions open, and a socket so many: one more is refused
/// with `LIMIT_EXCEEDED`, and room comes back when one ends.
#[tokio::test]
async fn subscriptions_are_capped_per_socket_and_per_token() {
    let app =
        App::start_with(&[("ZPANEL_SUBSCRIPTIONS_PER_SOCKET", "2"), ("ZPANEL_SUBSCRIPTIONS_PER_TOKEN", "3")]).await;
    let root = app.bootstrap("Acme");
    let events = "subscription { events { eventType } }";
    let mut first = app.session("graphql-transport-ws", &root).await;
    for id in ["a", "b", "c"] {
        send(&mut first, start("graphql-transport-ws", id, events)).await;
    }
    let refused = until_pong(&mut first).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["id"], "c");
    assert_eq!(refused[0]["payload"][0]["extensions"]["code"], "LIMIT_EXCEEDED", "{refused:?}");
    assert!(refused[0]["payload"][0]["message"].as_str().is_some_and(|m| m.contains("socket")), "{refused:?}");
    // Queries still run beside them.
    assert_eq!(run(&mut first, "graphql-transport-ws", "q", "{ me { name } }").await["type"], "next");

    let mut second = app.session("graphql-ws", &root).await;
    for id in ["d", "e"] {
        send(&mut second, start("graphql-ws", id, events)).await;
    }
    let refused = until_pong(&mut second).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["id"], "e");
    assert!(refused[0]["payload"]["message"].as_str().is_some_and(|m| m.contains("token")), "{refused:?}");

    send(&mut first, json!({ "id": "a", "type": "complete" })).await;
    let _ = until_pong(&mut first).await;
    send(&mut second, start("graphql-ws", "e", events)).await;
    assert!(until_pong(&mut second).await.is_empty(), "an ended subscription makes room");
}

const COSTLY: &str = "query($app: ID!) { deployments(applicationId: $app, first: 100) {
    nodes { logs(first: 1000) { text } } } }";

/// An operation whose lists would multiply into a huge answer is refused before it runs, with
/// a rule the client can act on, over HTTP and over the socket; ordinary ones still pass.
#[tokio::test]
async fn a_query_that_would_build_a_huge_answer_is_refused_before_it_runs() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let application = application(&app, &root).await;
    let deployment = app
        .graphql(
            Some(&root),
            "mutation($a: ID!) { deployApplication(input: { applicationId: $a }) { id } }",
            json!({ "a": application }),
        )
        .await
        .ok()["deployApplication"]["id"]
        .as_str()
        .expect("a deployment")
        .to_owned();

    let refused = app.graphql(Some(&root), COSTLY, json!({ "app": application })).await;
    assert_eq!(refused.code(), "INVALID_INPUT", "{:?}", refused.errors);
    assert_eq!(refused.error()["extensions"]["field"], "query");
    assert!(refused.error()["message"].as_str().is_some_and(|m| m.contains("costs more than")), "{:?}", refused.errors);
    // Through a variable too: the cost counts the value sent, not the default page.
    let by_variable = "query($d: ID!, $n: Int) { deployment(id: $d) { logs(first: $n) { text } } }";
    let refused = app.graphql(Some(&root), by_variable, json!({ "d": deployment, "n": 100_000 })).await;
    assert_eq!(refused.error()["extensions"]["field"], "query", "{:?}", refused.errors);

    let ordinary = [
        "query($app: ID!) { deployments(applicationId: $app, first: 10) { nodes { id status logs(first: 100) { text } } } }",
        "query($app: ID!) { applications(first: 100) { totalCount nodes { id name env { key value } } } deployments(applicationId: $app) { nodes { id } } }",
    ];
    for query in ordinary {
        app.graphql(Some(&root), query, json!({ "app": application })).await.ok();
    }
    let one_log = "query($d: ID!) { deployment(id: $d) { logs(first: 1000) { sequence at stream text } } }";
    app.graphql(Some(&root), one_log, json!({ "d": deployment })).await.ok();

    let mut socket = app.session("graphql-transport-ws", &root).await;
    let costly = json!({ "query": COSTLY, "variables": { "app": application } });
    send(&mut socket, json!({ "id": "costly", "type": "subscribe", "payload": costly })).await;
    let answer = receive(&mut socket).await.expect("an answer");
    assert_eq!(answer["payload"]["errors"][0]["extensions"]["code"], "INVALID_INPUT", "{answer}");
}

/// An answer larger than the operator allows is replaced by an error saying so, over HTTP and
/// over the socket.
#[tokio::test]
async fn an_answer_larger_than_allowed_is_refused_with_a_clear_error() {
    let app = App::start_with(&[("ZPANEL_API_MAX_RESPONSE_BYTES", "4096")]).await;
    let root = app.bootstrap("Acme");
    let application = application(&app, &root).await;
    let set = "mutation($a: ID!, $v: String!) { setEnvironmentVariable(input: { applicationId: $a, key: \"BIG\", value: $v }) { version } }";
    app.graphql(Some(&root), set, json!({ "a": application, "v": "x".repeat(10_000) })).await.ok();

    let large = "query($a: ID!) { application(id: $a) { env { value } } }";
    let refused = app.graphql(Some(&root), large, json!({ "a": application })).await;
    assert_eq!(refused.code(), "LIMIT_EXCEEDED", "{:?}", refused.errors);
    assert!(refused.error()["message"].as_str().is_some_and(|m| m.contains("4096 bytes")), "{:?}", refused.errors);
    app.graphql(Some(&root), "query($a: ID!) { application(id: $a) { name } }", json!({ "a": application })).await.ok();

    let mut socket = app.session("graphql-transport-ws", &root).await;
    let payload = json!({ "query": large, "variables": { "a": application } });
    send(&mut socket, json!({ "id": "large", "type": "subscribe", "payload": payload })).await;
    let answer = receive(&mut socket).await.expect("an answer");
    assert_eq!(answer["payload"]["errors"][0]["extensions"]["code"], "LIMIT_EXCEEDED", "{answer}");
}

/// A 750 KB document nested 250,000 deep is refused by the parser, over HTTP and over the
/// socket, and the process goes on answering.
#[tokio::test]
async fn a_document_nested_250000_deep_is_refused_and_the_process_goes_on() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let deep = format!("{}{}", "{a".repeat(250_000), "}".repeat(250_000));
    assert_eq!(deep.len(), 750_000);

    let refused = app.graphql(Some(&root), &deep, json!({})).await;
    assert!(!refused.errors.is_empty(), "the parser refuses it");
    app.graphql(Some(&root), "{ me { name } }", json!({})).await.ok();

    let mut socket = app.session("graphql-transport-ws", &root).await;
    let answer = run(&mut socket, "graphql-transport-ws", "deep", &deep).await;
    assert!(!answer["payload"]["errors"].as_array().is_none_or(Vec::is_empty), "{answer}");
    assert_eq!(receive(&mut socket).await, Ok(json!({ "id": "deep", "type": "complete" })));
    let after = run(&mut socket, "graphql-transport-ws", "after", "{ me { name } }").await;
    assert_eq!(after["payload"]["data"]["me"]["name"], "bootstrap root token", "{after}");
    app.graphql(Some(&root), "{ me { name } }", json!({})).await.ok();
}

/// A token that expires cannot make one that lives longer: neither one that never expires nor
/// one that expires later is made (`INVALID_INPUT` naming `expiresAt`); one within its life is.
#[tokio::test]
async fn a_token_that_expires_cannot_mint_one_that_outlives_it() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let (brief, _) = token(&app, &root, "brief", &["root"], Some(&from_now(time::Duration::hours(1)))).await;
    for expires_at in [None, Some(from_now(time::Duration::hours(2)))] {
        let vars = json!({ "name": "forever", "abilities": ["root"], "expiresAt": expires_at });
        let refused = app.graphql(Some(&brief), CREATE_TOKEN, vars).await;
        assert_eq!(refused.code(), "INVALID_INPUT", "{expires_at:?}: {:?}", refused.errors);
        assert_eq!(refused.error()["extensions"]["field"], "expiresAt");
        assert!(refused.error()["message"].as_str().is_some_and(|m| m.contains("outlive")), "{:?}", refused.errors);
    }
    assert!(!token_names(&app, &root).await.contains(&"forever".to_owned()), "nothing was written");
    let (_, _) = token(&app, &brief, "shorter", &["read"], Some(&from_now(time::Duration::minutes(30)))).await;
}

/// A `read` token reading a token's events sees no hash of it.
#[tokio::test]
async fn a_tokens_events_never_show_its_hash() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let (secret, id) = token(&app, &root, "ci", &["deploy"], None).await;
    let (reader, _) = token(&app, &root, "reader", &["read"], None).await;
    let events = app
        .graphql(
            Some(&reader),
            "query($s: ID!) { events(streamId: $s) { eventType payload } }",
            json!({ "s": format!("api_token-{id}") }),
        )
        .await
        .ok();
    let text = events.to_string();
    assert!(text.contains("ApiTokenCreated"), "{text}");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
    assert!(!text.contains(&hash) && !text.contains(&hash[..16]), "{text}");
    assert!(text.contains("[secret]"), "{text}");
}

/// `/metrics` is served on the operator's listener only, not on the API's; `/readyz` says the
/// database is unavailable without repeating what the database said.
#[tokio::test]
async fn metrics_stay_off_the_api_and_readiness_shows_no_database_text() {
    let app = App::start_api().await;
    assert_eq!(app.get("/metrics").await.0, 404, "not on the API's listener");
    let (status, metrics) = app.metrics().await;
    assert_eq!(status, 200);
    assert!(metrics.contains("zpanel_subscribers"), "{metrics}");

    assert_eq!(app.get("/readyz").await.0, 200);
    sqlx::query("alter table checkpoints rename to checkpoints_away").execute(&app.db.pool).await.expect("rename");
    let (status, body) = app.get("/readyz").await;
    sqlx::query("alter table checkpoints_away rename to checkpoints").execute(&app.db.pool).await.expect("rename back");
    assert_eq!((status, body.as_str()), (503, "database unavailable\n"));
}

/// A client that accepts only `application/json` is answered in it; one that prefers
/// `application/graphql-response+json` gets that; one that accepts neither is told `406`.
#[tokio::test]
async fn the_answer_comes_in_the_media_type_the_client_accepts() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let http = reqwest::Client::new();
    let ask = |accept: Option<&'static str>| {
        let mut request = http
            .post(format!("{}/graphql", app.url))
            .bearer_auth(&root)
            .header("content-type", "application/json")
            .body(r#"{"query": "{ team { name } }"}"#);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    // Twice each: the second answer comes from the answer cache, which must not keep the first
    // one's media type.
    for (accept, expected) in [
        (Some("application/graphql-response+json, application/json;q=0.9"), "application/graphql-response+json"),
        (Some("application/json"), "application/json"),
        (None, "application/json"),
        (Some("application/graphql-response+json"), "application/graphql-response+json"),
    ] {
        for _ in 0..2 {
            let response = ask(accept).await.expect("POST");
            assert_eq!(response.status(), 200);
            let content_type = response.headers()["content-type"].to_str().expect("ascii").to_owned();
            assert_eq!(content_type, expected, "{accept:?}");
            let body: Value = response.json().await.expect("JSON");
            assert_eq!(body["data"]["team"]["name"], "Acme");
        }
    }
    assert_eq!(ask(Some("text/html")).await.expect("POST").status(), 406);
}
