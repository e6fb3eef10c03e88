//! Deployments end to end: a local git repository → an image built by the Docker Engine → a
//! container → a health check → a route in Caddy, with the real binary, engine and proxy.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use zpanel_tests::api::App;
use zpanel_tests::deploy::{Caddy, Repo, deployment_log, ensure_base_image, remove_application, until_log_shows};

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_APP: &str = "mutation($project: ID!, $name: String!, $url: String!, $domain: String!) {
    createApplication(input: { projectId: $project, name: $name, gitUrl: $url, gitRef: \"main\",
                               port: 8080, healthCheckPath: \"/\", domains: [$domain] }) { id } }";
const DEPLOY: &str = "mutation($app: ID!) { deployApplication(input: { applicationId: $app }) { id status } }";
const DEPLOYMENT: &str = "query($id: ID!) { deployment(id: $id) { id status commit failedStep failure image } }";
const ROLLBACK: &str = "mutation($app: ID!, $to: ID!) {
    rollbackApplication(input: { applicationId: $app, deploymentId: $to }) { id status } }";
const CANCEL: &str = "mutation($id: ID!) { cancelDeployment(input: { deploymentId: $id }) { id status } }";

/// A Zpanel wired to its own Caddy, with one team.
struct Env {
    app: App,
    caddy: Caddy,
    token: String,
    http: reqwest::Client,
}

impl Env {
    async fn start() -> Self {
        Self::start_as("serve").await
    }

    /// `zpanel serve`, or `zpanel api` (workers are then started by the test).
    async fn start_as(subcommand: &str) -> Self {
        Self::start_with(subcommand, &[]).await
    }

    async fn start_with(subcommand: &str, extra: &[(&str, &str)]) -> Self {
        ensure_base_image();
        let caddy = Caddy::start();
        let mut env = caddy.env();
        env.extend_from_slice(extra);
        let app = App::start_subcommand(subcommand, &env).await;
        let token = app.bootstrap("Acme");
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().expect("client");
        Self { app, caddy, token, http }
    }

    async fn gql(&self, query: &str, variables: Value) -> Value {
        self.app.graphql(Some(&self.token), query, variables).await.ok()
    }

    async fn create_app(&self, repo: &Repo, domain: &str) -> String {
        let project = self.gql(CREATE_PROJECT, json!({ "name": "shop" })).await;
        let project = project["createProject"]["id"].as_str().expect("project").to_owned();
        let vars = json!({ "project": project, "name": "web", "url": repo.url(), "domain": domain });
        let created = self.gql(CREATE_APP, vars).await;
        created["createApplication"]["id"].as_str().expect("app").to_owned()
    }

    async fn deploy(&self, application: &str) -> String {
        let data = self.gql(DEPLOY, json!({ "app": application })).await;
        data["deployApplication"]["id"].as_str().expect("deployment").to_owned()
    }

    /// Polls the deployment until it is finished.
    async fn finished(&self, deployment: &str) -> Value {
        self.app.finished_deployment(&self.token, DEPLOYMENT, deployment).await
    }

    /// Sends GitHub's push webhook for `commit` on `main`, signed with the application's
    /// secret (the body is the real fixture's, with the ref and commit of this push); returns
    /// the deployment it queued.
    async fn push_webhook(&self, application: &str, commit: &str) -> String {
        use hmac::Mac as _;
        let secret = self
            .gql("query($id: ID!) { application(id: $id) { webhookSecret } }", json!({ "id": application }))
            .await["application"]["webhookSecret"]
            .as_str()
            .expect("the root token sees the webhook secret")
            .to_owned();
        let fixture = include_str!("../../api/fixtures/webhooks/github/push_payload.json");
        let mut payload: Value = serde_json::from_str(fixture).expect("the fixture is JSON");
        payload["ref"] = json!("refs/heads/main");
        payload["after"] = json!(commit);
        let body = serde_json::to_vec(&payload).expect("JSON");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
        mac.update(&body);
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let answer = self
            .http
            .post(format!("{}/webhooks/github/{application}", self.app.url))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", uuid::Uuid::new_v4().to_string())
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
            .await
            .expect("POST the webhook");
        assert_eq!(answer.status().as_u16(), 202, "the push is accepted");
        let answer: Value = answer.json().await.expect("JSON");
        answer["deploymentId"].as_str().expect("a deployment").to_owned()
    }

    /// The deployment's log so far, one string per line.
    async fn log(&self, deployment: &str) -> Vec<String> {
        deployment_log(&self.app.db.pool, deployment).await
    }

    /// Polls the log until a line contains `needle`.
    async fn log_shows(&self, deployment: &str, needle: &str) {
        until_log_shows(&self.app.db.pool, deployment, needle).await;
    }

    /// Polls the page until `wanted` says it is as expected.
    async fn until_page(&self, domain: &str, wanted: impl Fn(Result<(u16, String), String>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let page = self.page(domain).await;
            if wanted(page.clone()) {
                return;
            }
            assert!(Instant::now() < deadline, "the page of {domain} stayed {page:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A `zpanel worker` process on this Zpanel's database, data and Caddy, sweeping leases
    /// every second, with `extra` settings.
    fn worker(&self, extra: &[(&str, &str)]) -> std::process::Child {
        let mut command = zpanel_tests::zpanel(&self.app.db, &self.app.data.0);
        command
            .arg("worker")
            .envs(self.caddy.env())
            .env("ZPANEL_LEASE_SWEEP_SECONDS", "1")
            .envs(extra.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        command.spawn().expect("a worker process")
    }

    /// `GET /` through Caddy with `Host: domain`.
    async fn page(&self, domain: &str) -> Result<(u16, String), String> {
        zpanel_tests::deploy::page(&self.http, &self.caddy.listen, domain).await
    }
}

#[tokio::test]
async fn a_git_application_is_built_started_checked_and_routed_through_caddy() {
    let env = Env::start().await;
    let repo = Repo::new("hello from v1");
    let domain = "shop.zpanel.test";
    let application = env.create_app(&repo, domain).await;

    let deployment = env.deploy(&application).await;
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(done["commit"].as_str().map(str::len), Some(40));
    assert!(done["image"].as_str().is_some_and(|i| i.starts_with("sha256:")), "{done}");
    assert_eq!(env.page(domain).await, Ok((200, "hello from v1".to_owned())));
    let log = env.log(&deployment).await.join("\n");
    assert!(log.contains("COPY index.html /www/index.html"), "the build's output is in the log:\n{log}");
    assert!(log.contains("healthy after"), "{log}");

    // A new commit: while it is released, a client polling every few milliseconds never sees
    // an error — the old release serves until the new one is routed.
    let v2 = repo.commit_app("hello from v2", "");
    let set = "mutation($app: ID!) {
        setEnvironmentVariable(input: { applicationId: $app, key: \"GREETING\", value: \"hej\" }) { id } }";
    env.gql(set, json!({ "app": application })).await;
    // A new connection per request: a config load makes Caddy close idle kept-alive
    // connections (as any HTTP/1.1 server may; clients retry those), while the listener — what a
    // new visitor meets — never closes.
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    // Without it, the kernel resets connections queued on the listener Caddy closes in a reload.
    let migrates = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default();
    assert!(
        zpanel_workers::proxy::migrates(&migrates),
        "net.ipv4.tcp_migrate_req must be 1 for Caddy to reload without resetting connections (scripts/test sets it)"
    );
    let poller = Poller::start(fresh, env.caddy.listen.clone(), domain);
    // The push reaches Zpanel as GitHub would send it: a signed webhook.
    let second = env.push_webhook(&application, &v2).await;
    let done = env.finished(&second).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    let polled = poller.stop().await;
    assert_eq!(env.page(domain).await, Ok((200, "hello from v2".to_owned())));
    assert!(polled.requests > 50, "the poller ran: {polled:?}");
    assert!(polled.seen_v2, "the poller saw the new release: {polled:?}");
    assert_eq!(polled.failures, Vec::<String>::new(), "no request failed during the switch");
    assert_eq!(containers(&application).len(), 1, "the previous container is gone");
    let diff = env
        .gql(
            "query($a: ID!, $b: ID!) { releaseDiff(fromDeploymentId: $a, toDeploymentId: $b) {
                fromCommit toCommit commitRange changes { field before after } } }",
            json!({ "a": deployment, "b": second }),
        )
        .await["releaseDiff"]
        .clone();
    let range = format!(
        "{}..{}",
        diff["fromCommit"].as_str().unwrap_or_default(),
        diff["toCommit"].as_str().unwrap_or_default()
    );
    assert_eq!(diff["commitRange"], range.as_str());
    assert_eq!(
        diff["changes"],
        json!([
            { "field": "env.GREETING", "before": null, "after": "hej" },
            { "field": "env.GREETING.buildTime", "before": null, "after": false },
        ]),
        "{diff}"
    );

    // A broken commit: it exits at once. The deployment fails with the container's last
    // words, and the previous release keeps serving.
    repo.commit_files(
        &[(
            "Dockerfile",
            "FROM zpanel-test/busybox:latest\nCMD [\"sh\", \"-c\", \"echo configuration missing >&2; exit 3\"]\n",
        )],
        "broken",
    );
    let broken = env.deploy(&application).await;
    let done = env.finished(&broken).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert_eq!(done["failedStep"], "health_check", "{done}");
    let failure = done["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("exited with code 3") && failure.contains("configuration missing"), "{failure}");
    assert_eq!(env.page(domain).await, Ok((200, "hello from v2".to_owned())));
    assert_eq!(containers(&application).len(), 1, "the failed release's container is removed");

    // Rollback to the first release: its image, without a build.
    let first = env.gql(DEPLOYMENT, json!({ "id": deployment })).await;
    let rollback = env.gql(ROLLBACK, json!({ "app": application, "to": deployment })).await;
    let rollback = rollback["rollbackApplication"]["id"].as_str().expect("rollback").to_owned();
    let done = env.finished(&rollback).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(done["image"], first["deployment"]["image"], "the same image");
    assert_eq!(env.page(domain).await, Ok((200, "hello from v1".to_owned())));
    let log = env.log(&rollback).await.join("\n");
    assert!(log.contains("without a rebuild") && !log.contains("Step 1/"), "{log}");

    remove_application(&application);
}

#[tokio::test]
async fn a_cancelled_build_stops_at_once_and_the_current_release_keeps_serving() {
    let env = Env::start().await;
    let repo = Repo::new("steady");
    let domain = "steady.zpanel.test";
    let application = env.create_app(&repo, domain).await;
    let first = env.deploy(&application).await;
    assert_eq!(env.finished(&first).await["status"], "SUCCEEDED");

    repo.commit_app("never", "RUN sleep 300");
    let slow = env.deploy(&application).await;
    env.log_shows(&slow, "RUN sleep 300").await;
    let cancelled = env.gql(CANCEL, json!({ "id": slow })).await;
    assert_eq!(cancelled["cancelDeployment"]["status"], "RUNNING", "a running deployment is asked to stop");
    // Within the poll's deadline, far less than the 300 s the build would take.
    let done = env.finished(&slow).await;
    assert_eq!(done["status"], "CANCELLED", "{done}");
    assert_eq!(env.page(domain).await, Ok((200, "steady".to_owned())));
    assert_eq!(containers(&application).len(), 1);

    // The application's queue moves on: the next deployment runs.
    repo.commit_app("next", "");
    let next = env.deploy(&application).await;
    assert_eq!(env.finished(&next).await["status"], "SUCCEEDED");
    assert_eq!(env.page(domain).await, Ok((200, "next".to_owned())));
    remove_application(&application);
}

#[tokio::test]
async fn a_second_deployment_waits_for_the_first() {
    let env = Env::start().await;
    let repo = Repo::new("one");
    let domain = "queue.zpanel.test";
    let application = env.create_app(&repo, domain).await;
    repo.commit_app("one", "RUN sleep 2");
    let first = env.deploy(&application).await;
    let second = env.deploy(&application).await;
    let first_done = env.finished(&first).await;
    let second_done = env.finished(&second).await;
    assert_eq!((first_done["status"].as_str(), second_done["status"].as_str()), (Some("SUCCEEDED"), Some("SUCCEEDED")));
    let times = |id: &str| {
        let id: uuid::Uuid = id.parse().expect("uuid");
        let pool = env.app.db.pool.clone();
        async move {
            sqlx::query_as::<_, (time::OffsetDateTime, time::OffsetDateTime)>(
                "select started_at, finished_at from rm_deployments where deployment_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("times")
        }
    };
    let (_, first_finished) = times(&first).await;
    let (second_started, _) = times(&second).await;
    assert!(second_started >= first_finished, "the second started only after the first finished");
    remove_application(&application);
}

#[tokio::test]
async fn a_worker_killed_mid_build_is_replaced_by_another_that_finishes_the_deployment() {
    let env = Env::start_as("api").await;
    let short_lease = [("ZPANEL_LEASE_SECONDS", "3")];
    let mut workers = vec![env.worker(&short_lease), env.worker(&short_lease)];
    let repo = Repo::new("survivor");
    let domain = "survivor.zpanel.test";
    let application = env.create_app(&repo, domain).await;
    repo.commit_app("survivor", "RUN sleep 4");
    let deployment = env.deploy(&application).await;
    env.log_shows(&deployment, "RUN sleep 4").await;

    // Kill the worker that holds the lease, mid-build.
    let id: uuid::Uuid = deployment.parse().expect("uuid");
    let holder: String = sqlx::query_scalar("select worker_id from rm_deployments where deployment_id = $1")
        .bind(id)
        .fetch_one(&env.app.db.pool)
        .await
        .expect("a lease holder");
    let index = workers
        .iter()
        .position(|w| holder.contains(&format!("-{}-", w.id())))
        .unwrap_or_else(|| panic!("the holder {holder} is one of the test's workers"));
    let mut doomed = workers.remove(index);
    doomed.kill().expect("kills the worker");
    doomed.wait().expect("reaps it");

    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(env.page(domain).await, Ok((200, "survivor".to_owned())));
    let events: Vec<String> =
        sqlx::query_scalar("select event_type from events where stream_id = $1 order by stream_position")
            .bind(format!("deployment-{deployment}"))
            .fetch_all(&env.app.db.pool)
            .await
            .expect("events");
    assert!(events.iter().any(|e| e == "DeploymentTakenOver"), "{events:?}");
    let log = env.log(&deployment).await.join("\n");
    assert_eq!(log.matches("RUN sleep 4").count(), 2, "the build ran again after the takeover:\n{log}");
    assert_eq!(containers(&application).len(), 1, "{:?}", containers(&application));
    for mut w in workers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(w.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = w.wait();
    }
    remove_application(&application);
}

const CREATE_IMAGE_APP: &str = "mutation($project: ID!, $name: String!, $image: String!, $domain: String!) {
    createApplication(input: { projectId: $project, name: $name, image: $image,
                               port: 8080, domains: [$domain] }) { id } }";
const CONTROL: &str = "mutation($id: ID!) {
    stop: stopApplication(input: { id: $id }) { id } }";

#[tokio::test]
async fn an_image_application_runs_its_image_and_a_pull_that_cannot_reach_its_registry_fails_with_why() {
    // The operator put the `web` images on the engine: they are used without a pull.
    let local = format!("{},127.0.0.1:9/zpanel-test/web:*", zpanel_tests::deploy::BASE_IMAGE);
    let env = Env::start_with("serve", &[("ZPANEL_LOCAL_IMAGES", local.as_str())]).await;
    // A registry on a closed loopback port: the pull fails at once, and stays on this machine.
    let image = format!("127.0.0.1:9/zpanel-test/web:{}", uuid::Uuid::new_v4().simple());
    let repo = Repo::new("from an image");
    repo.commit_files(
        &[(
            "Dockerfile",
            "FROM zpanel-test/busybox:latest\nCOPY index.html /www/index.html\n\
             CMD [\"sh\", \"-c\", \"echo serving from the image; exec httpd -f -p 8080 -h /www\"]\n",
        )],
        "says something",
    );
    let built = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &image])
        .arg(repo.path())
        .output()
        .expect("docker build");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let project = env.gql(CREATE_PROJECT, json!({ "name": "images" })).await["createProject"]["id"].clone();
    let create = |name: &str, image: &str, domain: &str| json!({ "project": project, "name": name, "image": image, "domain": domain });
    let present = env.gql(CREATE_IMAGE_APP, create("present", &image, "present.zpanel.test")).await;
    let present = present["createApplication"]["id"].as_str().expect("app").to_owned();
    let deployment = env.deploy(&present).await;
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(env.page("present.zpanel.test").await, Ok((200, "from an image".to_owned())));
    let log = env.log(&deployment).await.join("\n");
    assert!(log.contains("using the copy the Docker Engine has"), "{log}");

    // The running release's output, live.
    let mut output = env
        .app
        .subscribe(
            &env.token,
            "subscription($app: ID!) { containerLogs(applicationId: $app, tail: 10) { sequence stream text } }",
            json!({ "app": present }),
        )
        .await;
    let first = output.next_data().await.expect("a container log line");
    assert_eq!(first["containerLogs"]["text"], "serving from the image", "{first}");
    assert_eq!(first["containerLogs"]["sequence"], 1);
    drop(output);

    // Stop, start, restart: the running release, without a deployment.
    env.gql(CONTROL, json!({ "id": present })).await;
    env.until_page("present.zpanel.test", |page| page.is_ok_and(|(status, _)| status == 502)).await;
    env.gql("mutation($id: ID!) { startApplication(input: { id: $id }) { id } }", json!({ "id": present })).await;
    env.until_page("present.zpanel.test", |page| page.is_ok_and(|(status, _)| status == 200)).await;
    let started_at = || {
        let out = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.State.StartedAt}}", &format!("zpanel-{deployment}")])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = started_at();
    env.gql("mutation($id: ID!) { restartApplication(input: { id: $id }) { id } }", json!({ "id": present })).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while started_at() == before {
        assert!(Instant::now() < deadline, "the container was not restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.until_page("present.zpanel.test", |page| page.is_ok_and(|(status, _)| status == 200)).await;
    let events: Vec<String> =
        sqlx::query_scalar("select event_type from events where stream_id = $1 order by stream_position")
            .bind(format!("application-{present}"))
            .fetch_all(&env.app.db.pool)
            .await
            .expect("events");
    assert_eq!(
        events[1..],
        ["ApplicationStopRequested", "ApplicationStartRequested", "ApplicationRestartRequested"],
        "the audit log says who stopped, started and restarted it"
    );

    let missing = format!("127.0.0.1:9/zpanel-test/missing:{}", uuid::Uuid::new_v4().simple());
    let absent = env.gql(CREATE_IMAGE_APP, create("absent", &missing, "absent.zpanel.test")).await;
    let absent = absent["createApplication"]["id"].as_str().expect("app").to_owned();
    let failed = env.deploy(&absent).await;
    let done = env.finished(&failed).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert_eq!(done["failedStep"], "pull", "{done}");
    let failure = done["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains(&missing) && failure.contains("127.0.0.1:9"),
        "the reason names the image and registry: {failure}"
    );
    remove_application(&present);
    remove_application(&absent);
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &image]).output();
}

#[tokio::test]
async fn a_private_repository_is_cloned_over_ssh_with_the_applications_deploy_key() {
    let env = Env::start().await;
    let sshd = zpanel_tests::deploy::Sshd::start();
    let key = env.gql("mutation { addPrivateKey(input: { name: \"deploy\" }) { id publicKey } }", json!({})).await;
    let key_id = key["addPrivateKey"]["id"].as_str().expect("key").to_owned();
    let repo = Repo::new("private");
    let url = format!("ssh://root@127.0.0.1:{}{}", sshd.port, repo.url());
    let project = env.gql(CREATE_PROJECT, json!({ "name": "private" })).await["createProject"]["id"].clone();
    let create = "mutation($project: ID!, $url: String!, $key: ID!) {
        createApplication(input: { projectId: $project, name: \"web\", gitUrl: $url, deployKeyId: $key,
                                   port: 8080, domains: [\"private.zpanel.test\"] }) { id } }";
    let app = env.gql(create, json!({ "project": project, "url": url, "key": key_id })).await;
    let application = app["createApplication"]["id"].as_str().expect("app").to_owned();

    // Without the key installed, the clone is refused, and the deployment says so.
    let refused = env.deploy(&application).await;
    let done = env.finished(&refused).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert_eq!(done["failedStep"], "resolve", "{done}");
    assert!(done["failure"].as_str().unwrap_or_default().contains("Permission denied"), "{done}");

    sshd.authorize(key["addPrivateKey"]["publicKey"].as_str().expect("public key"));
    let deployment = env.deploy(&application).await;
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(env.page("private.zpanel.test").await, Ok((200, "private".to_owned())));
    // The key was on disk only for the clone.
    let keys = env.app.data.0.join("builds/keys");
    let left: Vec<_> = std::fs::read_dir(&keys).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "no deploy key is left on disk: {left:?}");
    remove_application(&application);
}

#[tokio::test]
async fn a_route_caddy_forgot_is_put_back() {
    let env = Env::start_with("serve", &[("ZPANEL_ROUTE_SYNC_SECONDS", "1")]).await;
    let repo = Repo::new("remembered");
    let domain = "remembered.zpanel.test";
    let application = env.create_app(&repo, domain).await;
    let deployment = env.deploy(&application).await;
    assert_eq!(env.finished(&deployment).await["status"], "SUCCEEDED");
    // As if Caddy had restarted without its API-made config.
    let forgot =
        env.http.delete(format!("{}/id/zpanel-app-{application}", env.caddy.admin)).send().await.expect("caddy admin");
    assert!(forgot.status().is_success());
    assert_ne!(env.page(domain).await, Ok((200, "remembered".to_owned())), "the route is gone");
    env.until_page(domain, |page| page == Ok((200, "remembered".to_owned()))).await;
    remove_application(&application);
}

#[tokio::test]
async fn deployments_run_the_same_when_workers_are_fed_through_kafka() {
    let broker = zpanel_tests::kafka::Broker::start();
    let topic = format!("deploy{}", uuid::Uuid::now_v7().simple());
    let address = broker.address();
    let env = Env::start_with("serve", &[("ZPANEL_KAFKA_BROKERS", &address), ("ZPANEL_KAFKA_TOPIC", &topic)]).await;
    let repo = Repo::new("through kafka");
    let domain = "kafka.zpanel.test";
    let application = env.create_app(&repo, domain).await;
    let first = env.deploy(&application).await;
    // Queued behind the first: it starts when the first's end comes back through the topic.
    repo.commit_app("through kafka, again", "");
    let second = env.deploy(&application).await;
    assert_eq!(env.finished(&first).await["status"], "SUCCEEDED");
    assert_eq!(env.finished(&second).await["status"], "SUCCEEDED");
    assert_eq!(env.page(domain).await, Ok((200, "through kafka, again".to_owned())));
    remove_application(&application);
}

/// The catalogue of shell and argument injections. `{canary}` is a file path no payload may
/// ever create.
const INJECTIONS: &[&str] = &[
    "$(touch {canary})",
    "`touch {canary}`",
    "x; touch {canary}",
    "x | touch {canary}",
    "x && touch {canary}",
    "x\ntouch {canary}",
    "-x --upload-pack=touch {canary}",
    "--upload-pack=touch {canary}",
    "../../../../{canary}",
    "x\0touch {canary}",
    "ext::sh -c touch% {canary}",
    "> {canary}",
];

#[tokio::test]
async fn injections_are_rejected_naming_the_field_and_accepted_values_never_reach_a_shell() {
    let env = Env::start().await;
    let canary_dir = zpanel_tests::TempDir::new();
    let canary = canary_dir.0.join("canary");
    let canary_text = canary.display().to_string();
    let payloads: Vec<String> = INJECTIONS.iter().map(|p| p.replace("{canary}", &canary_text)).collect();
    let repo = Repo::new("safe");
    let domain = "safe.zpanel.test";
    let application = env.create_app(&repo, domain).await;
    let project = env.gql("query { projects { id } }", json!({})).await["projects"][0]["id"].clone();

    let create = "mutation($input: CreateApplicationInput!) { createApplication(input: $input) { id } }";
    let update = "mutation($input: UpdateApplicationInput!) { updateApplication(input: $input) { id } }";
    let set = "mutation($app: ID!, $key: String!) {
        setEnvironmentVariable(input: { applicationId: $app, key: $key, value: \"v\", buildTime: true }) { id } }";
    let mut rejected = 0;
    for payload in &payloads {
        let base = json!({ "projectId": project, "name": "probe", "gitUrl": repo.url(), "port": 8080 });
        let cases: [(&str, &str, Value); 7] = [
            (create, "gitUrl", json!({ "gitUrl": payload })),
            (create, "gitRef", json!({ "gitRef": payload })),
            (create, "dockerfile", json!({ "dockerfile": payload })),
            (create, "healthCheckPath", json!({ "healthCheckPath": payload })),
            (create, "domains", json!({ "domains": [payload] })),
            (update, "image", json!({ "id": application, "image": payload })),
            (update, "gitRef", json!({ "id": application, "gitRef": payload })),
        ];
        for (mutation, field, fields) in cases {
            let mut input = if mutation == create { base.clone() } else { json!({}) };
            for (k, v) in fields.as_object().expect("fields") {
                input[k] = v.clone();
            }
            let answer = env.app.graphql(Some(&env.token), mutation, json!({ "input": input })).await;
            assert!(!answer.errors.is_empty(), "{field} = {payload:?} must be rejected");
            assert_eq!(answer.code(), "INVALID_INPUT", "{field} = {payload:?} must be rejected");
            assert_eq!(answer.error()["extensions"]["field"], field, "the error names {field}: {:?}", answer.error());
            rejected += 1;
        }
        let answer = env.app.graphql(Some(&env.token), set, json!({ "app": application, "key": payload })).await;
        assert_eq!(answer.code(), "INVALID_INPUT", "env key {payload:?}");
        assert_eq!(answer.error()["extensions"]["field"], "key");
        rejected += 1;
    }
    assert_eq!(rejected, payloads.len() * 8);

    // Values that may hold anything — environment values, build arguments, secrets — are
    // accepted, and go to the engine as data: deploying with all of them creates no file.
    let set_value = "mutation($app: ID!, $key: String!, $value: String!, $secret: Boolean!, $build: Boolean!) {
        setEnvironmentVariable(input: { applicationId: $app, key: $key, value: $value, secret: $secret,
                                         buildTime: $build }) { id } }";
    for (n, payload) in payloads.iter().filter(|p| !p.contains('\0')).enumerate() {
        let vars = json!({ "app": application, "key": format!("V{n}"), "value": payload, "secret": n % 2 == 0, "build": n % 3 == 0 });
        env.gql(set_value, vars).await;
    }
    repo.commit_app("safe", "ARG V0\nARG V3\nRUN echo \"$V0 $V3\" > /www/args.txt");
    let deployment = env.deploy(&application).await;
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(env.page(domain).await, Ok((200, "safe".to_owned())));
    assert!(!canary.exists(), "a payload reached a shell: {} exists", canary.display());
    let log = env.log(&deployment).await.join("\n");
    assert!(!log.contains(&payloads[0]), "secret values are redacted from the log:\n{log}");
    remove_application(&application);
}

#[tokio::test]
async fn a_deployment_that_takes_too_long_fails_with_the_timeout_and_undoes_itself() {
    let env = Env::start_with("serve", &[("ZPANEL_DEPLOY_TIMEOUT_SECONDS", "10")]).await;
    let repo = Repo::new("slow");
    let application = env.create_app(&repo, "slow.zpanel.test").await;
    repo.commit_app("slow", "RUN sleep 120");
    let deployment = env.deploy(&application).await;
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert_eq!(done["failedStep"], "build", "{done}");
    assert_eq!(done["failure"], "timed out after 10 s", "{done}");
    assert!(containers(&application).is_empty());
    remove_application(&application);
}

#[tokio::test]
async fn with_supersede_a_new_deployment_cancels_the_waiting_ones() {
    let env = Env::start_with("serve", &[("ZPANEL_DEPLOY_SUPERSEDE", "true")]).await;
    let repo = Repo::new("first");
    let application = env.create_app(&repo, "supersede.zpanel.test").await;
    repo.commit_app("first", "RUN sleep 3");
    let running = env.deploy(&application).await;
    env.log_shows(&running, "RUN sleep 3").await;
    let waiting = env.deploy(&application).await;
    let newest = env.deploy(&application).await;
    assert_eq!(env.finished(&running).await["status"], "SUCCEEDED", "the running one finishes");
    assert_eq!(env.finished(&waiting).await["status"], "CANCELLED", "the waiting one is superseded");
    assert_eq!(env.finished(&newest).await["status"], "SUCCEEDED", "the newest runs");
    remove_application(&application);
}

#[tokio::test]
async fn a_worker_that_shuts_down_hands_its_deployment_back_and_another_finishes_it() {
    let env = Env::start_as("api").await;
    let mut first = env.worker(&[]);
    let repo = Repo::new("handed back");
    let application = env.create_app(&repo, "handback.zpanel.test").await;
    repo.commit_app("handed back", "RUN sleep 3");
    let deployment = env.deploy(&application).await;
    env.log_shows(&deployment, "RUN sleep 3").await;

    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let stopped = first.wait().expect("the worker stops");
    assert!(stopped.success(), "a clean stop: {stopped}");
    let events = || async {
        sqlx::query_scalar::<_, String>("select event_type from events where stream_id = $1 order by stream_position")
            .bind(format!("deployment-{deployment}"))
            .fetch_all(&env.app.db.pool)
            .await
            .expect("events")
    };
    assert_eq!(events().await.last().map(String::as_str), Some("DeploymentLeaseReleased"), "handed back at once");

    let metrics_port = zpanel_tests::deploy::free_port().to_string();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let mut second = env.worker(&[("ZPANEL_WORKER_LISTEN", &metrics_listen)]);
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    let events = events().await;
    let released = events.iter().position(|e| e == "DeploymentLeaseReleased").expect("released");
    assert_eq!(events.get(released + 1).map(String::as_str), Some("DeploymentTakenOver"), "{events:?}");
    assert_eq!(env.page("handback.zpanel.test").await, Ok((200, "handed back".to_owned())));
    // The worker process shows what it handled on its own /metrics.
    let metrics = env
        .http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .expect("the worker's /metrics")
        .text()
        .await
        .expect("text");
    let handled = metrics
        .lines()
        .find_map(|l| l.strip_prefix("zpanel_worker_events_total{worker=\"deploy\",outcome=\"handled\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(handled.is_some_and(|n| n >= 1), "{metrics}");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(second.id()).expect("pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = second.wait();
    remove_application(&application);
}

#[tokio::test]
async fn an_unchanged_commit_is_not_rebuilt_limits_apply_and_old_images_are_pruned() {
    let env = Env::start_with("serve", &[("ZPANEL_DEPLOY_KEEP_IMAGES", "1")]).await;
    let repo = Repo::new("kept");
    let project = env.gql(CREATE_PROJECT, json!({ "name": "limits" })).await["createProject"]["id"].clone();
    let create = "mutation($project: ID!, $url: String!) {
        createApplication(input: { projectId: $project, name: \"web\", gitUrl: $url, port: 8080,
                                   memoryBytes: 67108864, cpuMillis: 500, domains: [\"kept.zpanel.test\"] }) { id } }";
    let app = env.gql(create, json!({ "project": project, "url": repo.url() })).await;
    let application = app["createApplication"]["id"].as_str().expect("app").to_owned();

    let first = env.deploy(&application).await;
    let first_done = env.finished(&first).await;
    assert_eq!(first_done["status"], "SUCCEEDED", "{first_done}");
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.Init}}"])
        .arg(format!("zpanel-{first}"))
        .output()
        .expect("docker inspect");
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), "67108864 500000000 true");

    // The same commit and build configuration again: the image is re-used, not rebuilt.
    let again = env.deploy(&application).await;
    let again_done = env.finished(&again).await;
    assert_eq!(again_done["status"], "SUCCEEDED", "{again_done}");
    assert_eq!(again_done["image"], first_done["image"]);
    let log = env.log(&again).await.join("\n");
    assert!(log.contains("re-using image") && !log.contains("Step 1/"), "{log}");

    // A new commit: a new image, and only the newest is kept.
    repo.commit_app("kept, v2", "");
    let second = env.deploy(&application).await;
    assert_eq!(env.finished(&second).await["status"], "SUCCEEDED");
    let repo = format!("zpanel/{application}");
    let images = std::process::Command::new("docker").args(["images", "-q", &repo]).output().expect("images");
    let images: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&images.stdout).split_whitespace().map(str::to_owned).collect();
    assert_eq!(images.len(), 1, "{images:?}");

    // So the first release can no longer be rolled back to, and the deployment says why.
    let rollback = env.gql(ROLLBACK, json!({ "app": application, "to": first })).await;
    let rollback = rollback["rollbackApplication"]["id"].as_str().expect("rollback").to_owned();
    let done = env.finished(&rollback).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert!(done["failure"].as_str().unwrap_or_default().contains("pruned"), "{done}");
    assert_eq!(env.page("kept.zpanel.test").await, Ok((200, "kept, v2".to_owned())));
    remove_application(&application);
}

/// Containers Zpanel runs for `application`.
fn containers(application: &str) -> Vec<String> {
    let label = format!("label=zpanel.application={application}");
    let out = std::process::Command::new("docker").args(["ps", "-aq", "--filter", &label]).output().expect("docker ps");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

/// Requests the application through Caddy every few milliseconds until stopped.
struct Poller {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Polled>,
}

#[derive(Debug, Default)]
struct Polled {
    requests: u64,
    seen_v2: bool,
    failures: Vec<String>,
}

impl Poller {
    fn start(http: reqwest::Client, listen: String, domain: &str) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let domain = domain.to_owned();
        let task = tokio::spawn(async move {
            let mut polled = Polled::default();
            while !*stopped.borrow_and_update() {
                polled.requests += 1;
                let answer = http.get(format!("http://{listen}/")).header("host", &domain).send().await;
                match answer {
                    Ok(a) if a.status().is_success() => {
                        let body = a.text().await.unwrap_or_default();
                        match body.as_str() {
                            "hello from v1" => {}
                            "hello from v2" => polled.seen_v2 = true,
                            other => polled.failures.push(format!("unexpected body {other:?}")),
                        }
                    }
                    Ok(a) => polled.failures.push(format!("status {}", a.status())),
                    Err(e) => {
                        // The whole chain: reqwest's own message does not say what happened.
                        let mut failure = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(cause) = source {
                            failure = format!("{failure}: {cause}");
                            source = cause.source();
                        }
                        polled.failures.push(failure);
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
            polled
        });
        Self { stop, task }
    }

    async fn stop(self) -> Polled {
        let _ = self.stop.send(true);
        self.task.await.expect("the poller")
    }
}
