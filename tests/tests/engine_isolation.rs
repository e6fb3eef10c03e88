//! The Docker Engine that teams share, in the attacker's shoes: another team's images cannot
//! be run, built from or copied from; containers of two teams share no network; containers and
//! builds carry the operator's limits; a deployment's log is capped.

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use zpanel_tests::api::App;
use zpanel_tests::deploy::{BASE_IMAGE, Caddy, Repo, ensure_base_image, remove_application};

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_GIT_APP: &str = "mutation($project: ID!, $name: String!, $url: String!) {
    createApplication(input: { projectId: $project, name: $name, gitUrl: $url, port: 8080 }) { id } }";
const CREATE_IMAGE_APP: &str = "mutation($project: ID!, $name: String!, $image: String!) {
    createApplication(input: { projectId: $project, name: $name, image: $image, port: 8080 }) { id } }";
const DEPLOY: &str = "mutation($app: ID!) { deployApplication(input: { applicationId: $app }) { id } }";
const DEPLOYMENT: &str = "query($id: ID!) { deployment(id: $id) { id status failedStep failure image } }";

/// A Zpanel with its own Caddy and two teams, A and B.
struct Env {
    app: App,
    _caddy: Caddy,
    a: String,
    b: String,
}

/// An application of one team, and its finished deployment.
struct Deployed {
    application: String,
    deployment: String,
    done: Value,
}

impl Env {
    async fn start(extra: &[(&str, &str)]) -> Self {
        ensure_base_image();
        let caddy = Caddy::start();
        let mut env = caddy.env();
        env.extend_from_slice(extra);
        let app = App::start_subcommand("serve", &env).await;
        let a = app.bootstrap("Team A");
        let b = app.bootstrap("Team B");
        Self { app, _caddy: caddy, a, b }
    }

    async fn gql(&self, token: &str, query: &str, variables: Value) -> zpanel_tests::api::Answer {
        self.app.graphql(Some(token), query, variables).await
    }

    async fn project(&self, token: &str) -> String {
        let name = format!("shop-{}", uuid::Uuid::new_v4().simple());
        let data = self.gql(token, CREATE_PROJECT, json!({ "name": name })).await.ok();
        data["createProject"]["id"].as_str().expect("project").to_owned()
    }

    /// Creates `token`'s team an application of `repo` and deploys it to the end.
    async fn deploy_repo(&self, token: &str, repo: &Repo) -> Deployed {
        let project = self.project(token).await;
        let vars = json!({ "project": project, "name": "web", "url": repo.url() });
        let created = self.gql(token, CREATE_GIT_APP, vars).await.ok();
        let application = created["createApplication"]["id"].as_str().expect("app").to_owned();
        self.deploy(token, &application).await
    }

    async fn deploy(&self, token: &str, application: &str) -> Deployed {
        let data = self.gql(token, DEPLOY, json!({ "app": application })).await.ok();
        let deployment = data["deployApplication"]["id"].as_str().expect("deployment").to_owned();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let d = self.gql(token, DEPLOYMENT, json!({ "id": deployment })).await.ok()["deployment"].clone();
            if matches!(d["status"].as_str(), Some("SUCCEEDED" | "FAILED" | "CANCELLED")) {
                return Deployed { application: application.to_owned(), deployment, done: d };
            }
            assert!(Instant::now() < deadline, "deployment {deployment} did not finish: {d}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The deployment's log: stream and text of each line.
    async fn log(&self, deployment: &str) -> Vec<(String, String)> {
        let id: uuid::Uuid = deployment.parse().expect("uuid");
        sqlx::query_as("select stream, text from deployment_logs where deployment_id = $1 order by sequence")
            .bind(id)
            .fetch_all(&self.app.db.pool)
            .await
            .expect("log lines")
    }
}

/// `docker inspect -f format` of `object`.
fn inspect(object: &str, format: &str) -> String {
    let out = Command::new("docker").args(["inspect", "-f", format, object]).output().expect("docker inspect");
    assert!(out.status.success(), "docker inspect {object}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether `container` gets an answer from `http://ip:8080/` (busybox nc, 3 s at most to
/// connect).
fn fetches(container: &str, ip: &str) -> bool {
    let out = Command::new("docker")
        .args(["exec", container, "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 \"$0\" 8080", ip])
        .output()
        .expect("docker exec");
    String::from_utf8_lossy(&out.stdout).contains("200 OK")
}

#[tokio::test]
async fn another_teams_image_application_cannot_run_or_overwrite_a_built_image_by_tag_or_id() {
    let env = Env::start(&[]).await;
    let repo = Repo::new("team A's page");
    let a = env.deploy_repo(&env.a, &repo).await;
    assert_eq!(a.done["status"], "SUCCEEDED", "{}", a.done);
    let image_id = a.done["image"].as_str().expect("an image id").to_owned();
    let hex = image_id.trim_start_matches("sha256:");

    let project = env.project(&env.b).await;
    // Pulling one of these from a registry would also overwrite the tag A's next build re-uses.
    let names = [
        format!("zpanel/{}:{}", a.application, a.deployment),
        format!("zpanel/{}:build-{}", a.application, "0".repeat(64)),
        format!("docker.io/zpanel/{}:{}", a.application, a.deployment),
        format!("zpanel/{}", a.application),
        hex[..12].to_owned(),
        hex.to_owned(),
        image_id.clone(),
    ];
    for name in &names {
        let vars = json!({ "project": project, "name": "thief", "image": name });
        let answer = env.gql(&env.b, CREATE_IMAGE_APP, vars).await;
        assert_eq!(answer.code(), "INVALID_INPUT", "{name} must be refused: {:?}", answer.errors);
        assert_eq!(answer.error()["extensions"]["field"], "image", "{name}");
    }

    // An image the engine has but nobody pulled for this deployment, nor the operator shared,
    // is not run when its pull fails.
    let present = format!("127.0.0.1:9/zpanel-test/present:{}", uuid::Uuid::new_v4().simple());
    let tagged = Command::new("docker").args(["tag", &image_id, &present]).output().expect("docker tag");
    assert!(tagged.status.success(), "{}", String::from_utf8_lossy(&tagged.stderr));
    let vars = json!({ "project": project, "name": "present", "image": present });
    let created = env.gql(&env.b, CREATE_IMAGE_APP, vars).await.ok();
    let b_app = created["createApplication"]["id"].as_str().expect("app").to_owned();
    let b = env.deploy(&env.b, &b_app).await;
    assert_eq!(b.done["status"], "FAILED", "{}", b.done);
    assert_eq!(b.done["failedStep"], "pull", "{}", b.done);
    assert!(b.done["failure"].as_str().unwrap_or_default().contains("127.0.0.1:9"), "{}", b.done);
    let _ = Command::new("docker").args(["rmi", &present]).output();
    remove_application(&a.application);
    remove_application(&b_app);
}

#[tokio::test]
async fn another_teams_dockerfile_cannot_build_from_or_copy_from_a_built_image() {
    let env = Env::start(&[]).await;
    let repo = Repo::new("team A's secret page");
    let a = env.deploy_repo(&env.a, &repo).await;
    assert_eq!(a.done["status"], "SUCCEEDED", "{}", a.done);
    let image_id = a.done["image"].as_str().expect("an image id").to_owned();
    let short = image_id.trim_start_matches("sha256:")[..12].to_owned();
    let a_tag = format!("zpanel/{}:{}", a.application, a.deployment);

    let cmd = "CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n";
    let attempts = [
        (format!("FROM {a_tag}\n{cmd}"), "Zpanel's own images"),
        (
            format!("FROM {BASE_IMAGE}\nCOPY --from={a_tag} /www/index.html /www/index.html\n{cmd}"),
            "Zpanel's own images",
        ),
        (format!("FROM {short}\n{cmd}"), "image id"),
        (format!("FROM {BASE_IMAGE}\nCOPY --from={short} /www/index.html /www/index.html\n{cmd}"), "image id"),
    ];
    let b_repo = Repo::new("team B");
    let mut b_apps = Vec::new();
    for (dockerfile, reason) in attempts {
        b_repo.commit_files(&[("Dockerfile", &dockerfile)], "steal");
        let b = env.deploy_repo(&env.b, &b_repo).await;
        b_apps.push(b.application.clone());
        assert_eq!(b.done["status"], "FAILED", "{dockerfile}: {}", b.done);
        assert_eq!(b.done["failedStep"], "build", "{dockerfile}: {}", b.done);
        let failure = b.done["failure"].as_str().unwrap_or_default();
        assert!(failure.contains(reason), "{dockerfile}: the reason says {reason:?}: {failure}");
        let log: Vec<String> = env.log(&b.deployment).await.into_iter().map(|(_, t)| t).collect();
        assert!(!log.iter().any(|l| l.contains("Step 1/")), "the build never started: {log:?}");
    }
    remove_application(&a.application);
    for b in b_apps {
        remove_application(&b);
    }
}

#[tokio::test]
async fn teams_containers_share_no_network_and_carry_the_operators_limits() {
    let env = Env::start(&[
        ("ZPANEL_CONTAINER_MEMORY_BYTES", "100663296"),
        ("ZPANEL_CONTAINER_MAX_CPU_MILLIS", "1500"),
        ("ZPANEL_CONTAINER_PIDS", "64"),
    ])
    .await;
    let a_repo = Repo::new("team A");
    let a = env.deploy_repo(&env.a, &a_repo).await;
    assert_eq!(a.done["status"], "SUCCEEDED", "{}", a.done);
    // B asks for more CPU than the operator allows.
    let b_repo = Repo::new("team B");
    let project = env.project(&env.b).await;
    let create = "mutation($project: ID!, $url: String!) {
        createApplication(input: { projectId: $project, name: \"web\", gitUrl: $url, port: 8080, cpuMillis: 2000 }) { id } }";
    let created = env.gql(&env.b, create, json!({ "project": project, "url": b_repo.url() })).await.ok();
    let b_app = created["createApplication"]["id"].as_str().expect("app").to_owned();
    let b = env.deploy(&env.b, &b_app).await;
    assert_eq!(b.done["status"], "SUCCEEDED", "{}", b.done);

    let a_container = format!("zpanel-{}", a.deployment);
    let b_container = format!("zpanel-{}", b.deployment);
    let limits = "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}} {{json .HostConfig.SecurityOpt}}";
    assert_eq!(inspect(&a_container, limits), "100663296 100663296 1000000000 64 [\"no-new-privileges:true\"]");
    assert_eq!(inspect(&b_container, limits), "100663296 100663296 1500000000 64 [\"no-new-privileges:true\"]");

    // Each container is on its team's network only.
    let networks = "{{range $name, $n := .NetworkSettings.Networks}}{{$name}} {{$n.IPAddress}}\n{{end}}";
    let on = |container: &str| -> (String, String) {
        let text = inspect(container, networks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{container} is on one network: {text}");
        let (name, ip) = lines[0].split_once(' ').expect("name and address");
        (name.to_owned(), ip.to_owned())
    };
    let (a_network, a_ip) = on(&a_container);
    let (b_network, b_ip) = on(&b_container);
    assert_eq!(a_network, format!("zpanel-team-{}", inspect(&a_container, "{{index .Config.Labels \"zpanel.team\"}}")));
    assert_ne!(a_network, b_network);

    // A container reaches its own team's (itself, here), and never the other team's.
    assert!(fetches(&a_container, &a_ip), "wget works inside the team's network");
    assert!(fetches(&b_container, &b_ip), "wget works inside the team's network");
    assert!(!fetches(&b_container, &a_ip), "team B reached team A's container at {a_ip}");
    assert!(!fetches(&a_container, &b_ip), "team A reached team B's container at {b_ip}");
    remove_application(&a.application);
    remove_application(&b_app);
}

#[tokio::test]
async fn a_build_runs_within_the_operators_limits_and_is_stopped_at_its_time_limit() {
    let env = Env::start(&[
        ("ZPANEL_BUILD_MEMORY_BYTES", "134217728"),
        ("ZPANEL_BUILD_CPU_MILLIS", "500"),
        ("ZPANEL_BUILD_TIMEOUT_SECONDS", "10"),
    ])
    .await;
    let repo = Repo::new("limited");
    // The step's own cgroup, as cgroup v2 or v1 shows it.
    repo.commit_app(
        "limited",
        "RUN cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory/memory.limit_in_bytes \
         /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null; true",
    );
    let built = env.deploy_repo(&env.a, &repo).await;
    assert_eq!(built.done["status"], "SUCCEEDED", "{}", built.done);
    let log: Vec<String> = env.log(&built.deployment).await.into_iter().map(|(_, t)| t).collect();
    assert!(log.iter().any(|l| l.trim() == "134217728"), "the build step's memory limit: {log:?}");
    assert!(log.iter().any(|l| matches!(l.trim(), "50000 100000" | "50000")), "the build step's CPU limit: {log:?}");

    repo.commit_app("slow", "RUN sleep 60");
    let slow = env.deploy(&env.a, &built.application).await;
    assert_eq!(slow.done["status"], "FAILED", "{}", slow.done);
    assert_eq!(slow.done["failedStep"], "build", "{}", slow.done);
    assert!(slow.done["failure"].as_str().unwrap_or_default().contains("limit of 10 s"), "{}", slow.done);
    remove_application(&built.application);
}

#[tokio::test]
async fn a_build_printing_past_the_log_limit_is_cut_there_and_the_deployment_still_completes() {
    let env = Env::start(&[("ZPANEL_DEPLOY_LOG_MAX_LINES", "200")]).await;
    let repo = Repo::new("chatty");
    repo.commit_app("chatty", "RUN i=0; while [ $i -lt 5000 ]; do echo \"line $i\"; i=$((i+1)); done");
    let d = env.deploy_repo(&env.a, &repo).await;
    assert_eq!(d.done["status"], "SUCCEEDED", "{}", d.done);
    let log = env.log(&d.deployment).await;
    let output = log.iter().filter(|(stream, _)| stream != "system").count();
    assert_eq!(output, 200, "the output is cut at the limit");
    let cut = log.iter().position(|(_, t)| t.contains("log limit (200 lines")).expect("the log says where it was cut");
    assert!(log[..cut].iter().filter(|(s, _)| s != "system").count() == 200, "it says so where it was cut");
    assert!(log.iter().any(|(_, t)| t.contains("lines of output were left out")), "and how much was left out");
    assert!(
        log.last().is_some_and(|(_, t)| t.starts_with("released image")),
        "the log ends with the release: {:?}",
        log.last()
    );
    remove_application(&d.application);
}
