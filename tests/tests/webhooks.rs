//! Git push webhooks end to end: the real `zpanel serve`, real GitHub payloads signed with the
//! application's webhook secret as GitHub signs them, and the deployments they queue.

use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use std::time::{Duration, Instant};
use zpanel_tests::api::App;

/// A push of `refs/heads/master` to `6113728f…`.
const PUSH: &[u8] = include_bytes!("../../api/fixtures/webhooks/github/push_with-new-branch.payload.json");
const PING: &[u8] = include_bytes!("../../api/fixtures/webhooks/github/ping_payload.json");

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_GIT_APP: &str = "mutation($project: ID!, $name: String!, $ref: String!) {
    createApplication(input: { projectId: $project, name: $name,
                               gitUrl: \"https://github.com/Codertocat/Hello-World.git\", gitRef: $ref }) { id } }";
const CREATE_IMAGE_APP: &str = "mutation($project: ID!, $name: String!) {
    createApplication(input: { projectId: $project, name: $name, image: \"nginx:1.27\" }) { id } }";
const SECRET: &str = "query($id: ID!) { application(id: $id) { webhookSecret } }";
const DEPLOYMENTS: &str =
    "query($app: ID!) { deployments(applicationId: $app) { nodes { id applicationId status reason } } }";

/// A Zpanel with a team, a project and an application built from the fixture's repository,
/// tracking `git_ref`.
struct Setup {
    app: App,
    root: String,
    project: String,
    application: String,
    secret: String,
    http: reqwest::Client,
}

impl Setup {
    async fn start(git_ref: &str) -> Self {
        // No workers: the application's repository is GitHub's, which tests never reach; the
        // queued deployments just wait.
        let app = App::start_api().await;
        let root = app.bootstrap("Acme");
        let project = app.graphql(Some(&root), CREATE_PROJECT, json!({ "name": "Shop" })).await.ok();
        let project = project["createProject"]["id"].as_str().expect("project id").to_owned();
        let vars = json!({ "project": project, "name": "web", "ref": git_ref });
        let created = app.graphql(Some(&root), CREATE_GIT_APP, vars).await.ok();
        let application = created["createApplication"]["id"].as_str().expect("application id").to_owned();
        let secret = app.graphql(Some(&root), SECRET, json!({ "id": application })).await.ok();
        let secret =
            secret["application"]["webhookSecret"].as_str().expect("the root token sees the secret").to_owned();
        Self { app, root, project, application, secret, http: reqwest::Client::new() }
    }

    /// POSTs `body` to `/webhooks/{provider}/{application}` with `headers`; status and JSON answer.
    async fn deliver(
        &self,
        provider: &str,
        application: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/webhooks/{provider}/{application}", self.app.url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("POST /webhooks");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A GitHub delivery of `event` with `body`, signed with the application's secret.
    async fn github(&self, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
        let headers = [
            ("X-GitHub-Event", event.to_owned()),
            ("X-GitHub-Delivery", delivery.to_owned()),
            ("X-Hub-Signature-256", signature(&self.secret, body)),
        ];
        self.deliver("github", &self.application, &headers, body).await
    }

    async fn deployments(&self, application: &str) -> Vec<Value> {
        let data = self.app.graphql(Some(&self.root), DEPLOYMENTS, json!({ "app": application })).await.ok();
        data["deployments"]["nodes"].as_array().expect("nodes").clone()
    }

    /// The application's deployments once there are `n`, waiting for the read models.
    async fn wait_for_deployments(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let deployments = self.deployments(&self.application).await;
            if deployments.len() >= n || Instant::now() > deadline {
                return deployments;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes something through the API and waits until the read models show it: everything
    /// appended before (a deployment a webhook queued) is then visible too.
    async fn settle(&self) {
        let name = format!("barrier-{}", uuid::Uuid::now_v7().simple());
        self.app.graphql(Some(&self.root), CREATE_PROJECT, json!({ "name": name })).await.ok();
    }
}

fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The GitHub push fixture with its `ref` and `after` replaced: another push.
fn push_of(git_ref: &str, after: &str) -> Vec<u8> {
    let mut payload: Value = serde_json::from_slice(PUSH).expect("the fixture is JSON");
    payload["ref"] = json!(git_ref);
    payload["after"] = json!(after);
    serde_json::to_vec(&payload).expect("serializes")
}

/// The GitHub push fixture with its `ref` replaced.
fn push_to(git_ref: &str) -> Vec<u8> {
    let mut payload: Value = serde_json::from_slice(PUSH).expect("the fixture is JSON");
    payload["ref"] = json!(git_ref);
    serde_json::to_vec(&payload).expect("serializes")
}

fn delivery_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn a_signed_push_to_the_tracked_branch_queues_one_deployment_however_often_it_is_delivered() {
    let setup = Setup::start("master").await;
    let delivery = delivery_id();

    let (status, answer) = setup.github("push", &delivery, PUSH).await;
    assert_eq!(status, 202, "{answer}");
    let deployment = answer["deploymentId"].as_str().expect("a deployment id").to_owned();
    assert_eq!(answer["repeated"], false);

    let deployments = setup.wait_for_deployments(1).await;
    assert_eq!(deployments.len(), 1, "{deployments:?}");
    assert_eq!(deployments[0]["id"], deployment.as_str());
    assert_eq!(deployments[0]["applicationId"], setup.application.as_str());
    assert_eq!(
        deployments[0]["reason"],
        json!({ "kind": "webhook", "commit": "6113728f27ae82c7b1a177c8d03f9e96e0adf246" })
    );

    // GitHub redelivers with the same delivery id: the same deployment, nothing new.
    let (status, again) = setup.github("push", &delivery, PUSH).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["deploymentId"], deployment.as_str());
    assert_eq!(again["repeated"], true);
    setup.settle().await;
    assert_eq!(setup.deployments(&setup.application).await.len(), 1);

    // The audit log says a webhook queued it (a deploy worker may have taken it since).
    let audit = setup
        .app
        .graphql(
            Some(&setup.root),
            "query($stream: String) { auditLog(filter: { streamId: $stream, eventType: \"DeploymentQueued\" }) {
                nodes { eventType actor { kind name } } } }",
            json!({ "stream": format!("deployment-{deployment}") }),
        )
        .await
        .ok();
    let queued = &audit["auditLog"]["nodes"][0];
    assert_eq!(queued["eventType"], "DeploymentQueued", "{audit}");
    assert_eq!(queued["actor"], json!({ "kind": "system", "name": "webhook:github" }));

    // A new delivery of another push is another deployment.
    let another_push = push_of("refs/heads/master", "0123456789abcdef0123456789abcdef01234567");
    let (status, other) = setup.github("push", &delivery_id(), &another_push).await;
    assert_eq!(status, 202, "{other}");
    assert_ne!(other["deploymentId"], deployment.as_str());
    assert_eq!(setup.wait_for_deployments(2).await.len(), 2);
}

#[tokio::test]
async fn a_captured_delivery_replayed_with_a_fresh_delivery_id_queues_nothing() {
    let setup = Setup::start("master").await;
    let (status, first) = setup.github("push", &delivery_id(), PUSH).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(setup.wait_for_deployments(1).await.len(), 1);

    // An attacker who saw the delivery (a proxy's log, a shared CI runner) sends the same
    // signed body again; the delivery id is outside the signature, so it makes up new ones.
    for _ in 0..3 {
        let (status, replay) = setup.github("push", &delivery_id(), PUSH).await;
        assert_eq!(status, 202, "{replay}");
        assert_eq!(replay["deploymentId"], first["deploymentId"], "{replay}");
        assert_eq!(replay["repeated"], true, "{replay}");
    }
    let bare = [("X-GitHub-Event", "push".to_owned()), ("X-Hub-Signature-256", signature(&setup.secret, PUSH))];
    let (status, replay) = setup.deliver("github", &setup.application, &bare, PUSH).await;
    assert_eq!((status, &replay["repeated"]), (202, &json!(true)), "without a delivery id: {replay}");
    setup.settle().await;
    assert_eq!(setup.deployments(&setup.application).await.len(), 1, "a replay queued a deployment");
}

#[tokio::test]
async fn a_wrong_or_missing_signature_is_refused_and_queues_nothing() {
    let setup = Setup::start("master").await;
    let wrong = [
        ("X-GitHub-Event", "push".to_owned()),
        ("X-GitHub-Delivery", delivery_id()),
        ("X-Hub-Signature-256", signature("not the secret", PUSH)),
    ];
    let (status, answer) = setup.deliver("github", &setup.application, &wrong, PUSH).await;
    assert_eq!(status, 401, "{answer}");

    // Signed for another body.
    let other_body = push_to("refs/heads/other");
    let swapped = [
        ("X-GitHub-Event", "push".to_owned()),
        ("X-GitHub-Delivery", delivery_id()),
        ("X-Hub-Signature-256", signature(&setup.secret, &other_body)),
    ];
    assert_eq!(setup.deliver("github", &setup.application, &swapped, PUSH).await.0, 401);

    let unsigned = [("X-GitHub-Event", "push".to_owned()), ("X-GitHub-Delivery", delivery_id())];
    assert_eq!(setup.deliver("github", &setup.application, &unsigned, PUSH).await.0, 401);

    // A GitLab token that is not the secret, and none at all.
    let gitlab = [("X-Gitlab-Event", "Push Hook".to_owned()), ("X-Gitlab-Token", "guess".to_owned())];
    assert_eq!(setup.deliver("gitlab", &setup.application, &gitlab, PUSH).await.0, 401);
    assert_eq!(setup.deliver("gitlab", &setup.application, &gitlab[..1], PUSH).await.0, 401);

    setup.settle().await;
    assert_eq!(setup.deployments(&setup.application).await, Vec::<Value>::new());
}

#[tokio::test]
async fn other_branches_pings_image_applications_and_archived_ones_queue_nothing() {
    let setup = Setup::start("main").await;

    // The fixture pushes `master`; this application deploys `main`.
    let (status, answer) = setup.github("push", &delivery_id(), PUSH).await;
    assert_eq!(status, 200, "{answer}");
    let why = answer["ignored"].as_str().expect("a reason");
    assert!(why.contains("refs/heads/master") && why.contains("main"), "{why}");

    let (status, answer) = setup.github("ping", &delivery_id(), PING).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["ignored"].as_str().expect("a reason").contains("ping"), "{answer}");

    let (status, answer) = setup.github("pull_request", &delivery_id(), b"{}").await;
    assert_eq!(status, 200, "{answer}");

    // A push to `main` with a GitLab token: the application's own branch, so this one queues.
    let main = push_to("refs/heads/main");
    let gitlab = [("X-Gitlab-Event", "Push Hook".to_owned()), ("X-Gitlab-Token", setup.secret.clone())];
    let (status, answer) = setup.deliver("gitlab", &setup.application, &gitlab, &main).await;
    assert_eq!(status, 202, "{answer}");

    // An application built from an image has no branch to follow.
    let vars = json!({ "project": setup.project, "name": "cache" });
    let image = setup.app.graphql(Some(&setup.root), CREATE_IMAGE_APP, vars).await.ok();
    let image = image["createApplication"]["id"].as_str().expect("application id").to_owned();
    let image_secret = setup.app.graphql(Some(&setup.root), SECRET, json!({ "id": image })).await.ok();
    let image_secret = image_secret["application"]["webhookSecret"].as_str().expect("a secret").to_owned();
    let headers = [
        ("X-GitHub-Event", "push".to_owned()),
        ("X-GitHub-Delivery", delivery_id()),
        ("X-Hub-Signature-256", signature(&image_secret, &main)),
    ];
    let (status, answer) = setup.deliver("github", &image, &headers, &main).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["ignored"].as_str().expect("a reason").contains("image"), "{answer}");

    // An archived application refuses, so the host shows the hook as broken.
    setup
        .app
        .graphql(
            Some(&setup.root),
            "mutation($id: ID!) { archiveApplication(input: { id: $id }) { id } }",
            json!({ "id": setup.application }),
        )
        .await
        .ok();
    let (status, answer) = setup.github("push", &delivery_id(), &main).await;
    assert_eq!(status, 409, "{answer}");

    setup.settle().await;
    assert_eq!(setup.deployments(&setup.application).await.len(), 1, "only the push to main queued");
    assert_eq!(setup.deployments(&image).await, Vec::<Value>::new());
}

#[tokio::test]
async fn unknown_applications_and_providers_are_not_found_and_large_bodies_too_large() {
    let setup = Setup::start("master").await;
    let headers = [
        ("X-GitHub-Event", "push".to_owned()),
        ("X-GitHub-Delivery", delivery_id()),
        ("X-Hub-Signature-256", signature(&setup.secret, PUSH)),
    ];
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(setup.deliver("github", &unknown, &headers, PUSH).await.0, 404);
    assert_eq!(setup.deliver("github", "not-an-id", &headers, PUSH).await.0, 404);
    // The project's id is a stream of another kind, not an application.
    assert_eq!(setup.deliver("github", &setup.project, &headers, PUSH).await.0, 404);
    assert_eq!(setup.deliver("sourcehut", &setup.application, &headers, PUSH).await.0, 404);

    let large = vec![b' '; (1 << 20) + 1];
    assert_eq!(setup.deliver("github", &setup.application, &headers, &large).await.0, 413);

    let (status, metrics) = setup.app.metrics().await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("zpanel_webhook_deliveries_total{provider=\"github\",outcome=\"not_found\"} 3"),
        "{metrics}"
    );
}
