//! The parser and the signature checks, per provider, on real GitHub payloads and on GitLab,
//! Gitea and Bitbucket bodies built from the GitHub push's values; and a property: no input
//! makes them panic.

use super::*;
use proptest::prelude::*;
use serde_json::Value;

const PUSH: &[u8] = include_bytes!("../../fixtures/webhooks/github/push_with-new-branch.payload.json");
const TAG_DELETED: &[u8] = include_bytes!("../../fixtures/webhooks/github/push_payload.json");
const TAG_DELETED_IN_ORG: &[u8] = include_bytes!("../../fixtures/webhooks/github/push_1.payload.json");
const PING: &[u8] = include_bytes!("../../fixtures/webhooks/github/ping_payload.json");
const PULL_REQUEST: &[u8] = include_bytes!("../../fixtures/webhooks/github/pull_request_opened.payload.json");
const PULL_REQUEST_SYNC: &[u8] = include_bytes!("../../fixtures/webhooks/github/pull_request_synchronize.payload.json");

const SECRET: &str = "0b7c1e4f6a2d9e8c3b5a7f1d2e4c6b8a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c";
const DELIVERY: &str = "72d3162e-cc78-11e3-81ab-4c9367dc0958";

/// The GitHub push fixture's ref and head commit.
fn fixture_push() -> (String, String) {
    let value: Value = serde_json::from_slice(PUSH).expect("the fixture is JSON");
    let field = |name: &str| value[name].as_str().expect("a string field").to_owned();
    (field("ref"), field("after"))
}

fn hmac_hex(body: &[u8], secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn branch(name: &str) -> PushedRef {
    PushedRef::Branch(GitRef::parse(name).expect("a valid ref"))
}

fn tag(name: &str) -> PushedRef {
    PushedRef::Tag(GitRef::parse(name).expect("a valid ref"))
}

fn pushed(delivery: &Delivery) -> &Push {
    match &delivery.event {
        Event::Push(push) => push,
        Event::Ignored(why) => panic!("expected a push, got ignored: {why}"),
    }
}

fn ignored(delivery: &Delivery) -> &Ignored {
    match &delivery.event {
        Event::Ignored(why) => why,
        Event::Push(push) => panic!("expected an ignored delivery, got a push of {}", push.pushed),
    }
}

// GitHub

#[test]
fn a_github_push_names_its_branch_commit_and_delivery() {
    let headers = [("X-GitHub-Event", "push"), ("X-GitHub-Delivery", DELIVERY)];
    let delivery = parse_push(Provider::GitHub, &headers[..], PUSH).expect("parses");
    assert_eq!(delivery.id, DELIVERY);
    let push = pushed(&delivery);
    assert_eq!(push.pushed, branch("master"));
    assert_eq!(push.pushed.to_string(), "refs/heads/master");
    assert_eq!(push.commit, "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
}

#[test]
fn a_github_ping_and_pull_requests_are_ignored() {
    let ping = [("X-GitHub-Event", "ping"), ("X-GitHub-Delivery", DELIVERY)];
    assert_eq!(ignored(&parse_push(Provider::GitHub, &ping[..], PING).expect("parses")), &Ignored::Ping);
    let pull = [("X-GitHub-Event", "pull_request"), ("X-GitHub-Delivery", DELIVERY)];
    for body in [PULL_REQUEST, PULL_REQUEST_SYNC] {
        let delivery = parse_push(Provider::GitHub, &pull[..], body).expect("parses");
        assert_eq!(ignored(&delivery), &Ignored::OtherEvent("pull_request".into()));
    }
}

#[test]
fn a_github_push_that_deletes_a_ref_is_ignored() {
    let headers = [("X-GitHub-Event", "push"), ("X-GitHub-Delivery", DELIVERY)];
    for body in [TAG_DELETED, TAG_DELETED_IN_ORG] {
        let delivery = parse_push(Provider::GitHub, &headers[..], body).expect("parses");
        assert_eq!(ignored(&delivery), &Ignored::Deleted("refs/tags/simple-tag".into()));
    }
}

#[test]
fn a_delivery_without_an_event_header_is_refused() {
    let headers = [("X-GitHub-Delivery", DELIVERY)];
    let error = parse_push(Provider::GitHub, &headers[..], PUSH).expect_err("no event header");
    assert_eq!(error, WebhookError::MissingHeader("X-GitHub-Event"));
    assert_eq!(error.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn a_push_whose_body_is_not_a_push_payload_is_refused() {
    let headers = [("X-GitHub-Event", "push")];
    for body in [&b"not json"[..], b"{}", b"[]", br#"{"ref": 1, "after": "x"}"#, PING] {
        let error = parse_push(Provider::GitHub, &headers[..], body).expect_err("not a push");
        assert!(matches!(error, WebhookError::InvalidPayload(_)), "{error:?}");
    }
}

#[test]
fn a_push_with_a_malformed_commit_or_ref_is_refused() {
    let headers = [("X-GitHub-Event", "push")];
    let short = br#"{"ref": "refs/heads/main", "after": "6113728f"}"#;
    let not_hex = br#"{"ref": "refs/heads/main", "after": "zz13728f27ae82c7b1a177c8d03f9e96e0adf246"}"#;
    let bad_ref = br#"{"ref": "refs/heads/-rf", "after": "6113728f27ae82c7b1a177c8d03f9e96e0adf246"}"#;
    for body in [&short[..], &not_hex[..], &bad_ref[..]] {
        let error = parse_push(Provider::GitHub, &headers[..], body).expect_err("malformed");
        assert!(matches!(error, WebhookError::InvalidPayload(_)), "{error:?}");
    }
}

#[test]
fn a_commit_is_lowercased_and_a_ref_outside_heads_and_tags_is_ignored() {
    let headers = [("X-GitHub-Event", "push")];
    let upper = br#"{"ref": "refs/tags/v1.2", "after": "6113728F27AE82C7B1A177C8D03F9E96E0ADF246"}"#;
    let push = parse_push(Provider::GitHub, &headers[..], upper).expect("parses");
    assert_eq!(pushed(&push).pushed, tag("v1.2"));
    assert_eq!(pushed(&push).commit, "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
    let notes = br#"{"ref": "refs/notes/commits", "after": "6113728f27ae82c7b1a177c8d03f9e96e0adf246"}"#;
    let delivery = parse_push(Provider::GitHub, &headers[..], notes).expect("parses");
    assert_eq!(ignored(&delivery), &Ignored::OtherRef("refs/notes/commits".into()));
}

#[test]
fn a_github_signature_is_checked_against_the_secret() {
    let good = format!("sha256={}", hmac_hex(PUSH, SECRET));
    let headers = [("X-Hub-Signature-256", good.as_str())];
    assert_eq!(verify(Provider::GitHub, &headers[..], PUSH, SECRET.as_bytes()), Ok(()));
    let upper = good.to_ascii_uppercase().replacen("SHA256=", "sha256=", 1);
    assert_eq!(
        verify(Provider::GitHub, &[("x-hub-signature-256", upper.as_str())][..], PUSH, SECRET.as_bytes()),
        Ok(())
    );

    let other_secret = format!("sha256={}", hmac_hex(PUSH, "another secret"));
    let other_body = format!("sha256={}", hmac_hex(PING, SECRET));
    let unprefixed = hmac_hex(PUSH, SECRET);
    let truncated = good[..good.len() - 2].to_owned();
    for wrong in [other_secret.as_str(), &other_body, &unprefixed, &truncated, "sha256=", "sha256=zz", "sha1=00"] {
        let result = verify(Provider::GitHub, &[("X-Hub-Signature-256", wrong)][..], PUSH, SECRET.as_bytes());
        assert_eq!(result, Err(WebhookError::BadSignature), "{wrong}");
    }
}

#[test]
fn a_missing_signature_or_secret_is_never_taken_for_no_check() {
    let good = format!("sha256={}", hmac_hex(PUSH, SECRET));
    let none: [(&str, &str); 0] = [];
    for provider in Provider::ALL {
        let missing = verify(provider, &none[..], PUSH, SECRET.as_bytes()).expect_err("no header");
        assert_eq!(missing, WebhookError::MissingSignature(provider.signature_header()));
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        let empty = verify(provider, &[(provider.signature_header(), " ")][..], PUSH, SECRET.as_bytes());
        assert_eq!(empty, Err(WebhookError::MissingSignature(provider.signature_header())));
        let headers = [(provider.signature_header(), good.as_str())];
        assert_eq!(verify(provider, &headers[..], PUSH, b""), Err(WebhookError::NoSecret));
        assert_eq!(WebhookError::NoSecret.status(), StatusCode::UNAUTHORIZED);
    }
    // An empty secret signs nothing, even a body signed with the empty key.
    let empty_key = format!("sha256={}", hmac_hex(PUSH, ""));
    assert_eq!(
        verify(Provider::GitHub, &[("X-Hub-Signature-256", empty_key.as_str())][..], PUSH, b""),
        Err(WebhookError::NoSecret)
    );
    assert_eq!(verify(Provider::GitLab, &[("X-Gitlab-Token", "x")][..], PUSH, b""), Err(WebhookError::NoSecret));
}

// GitLab

fn gitlab_push(object_kind: &str, git_ref: &str, after: &str) -> Vec<u8> {
    json!({
        "object_kind": object_kind,
        "event_name": object_kind,
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "ref": git_ref,
        "checkout_sha": after,
        "user_name": "Codertocat",
        "project_id": 15,
        "project": { "name": "Hello-World", "path_with_namespace": "Codertocat/Hello-World",
                     "git_http_url": "https://gitlab.example.com/Codertocat/Hello-World.git" },
        "commits": [],
        "total_commits_count": 0
    })
    .to_string()
    .into_bytes()
}

#[test]
fn a_gitlab_push_hook_names_its_branch_and_commit() {
    let (git_ref, after) = fixture_push();
    let body = gitlab_push("push", &git_ref, &after);
    let headers = [("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Event-UUID", DELIVERY)];
    let delivery = parse_push(Provider::GitLab, &headers[..], &body).expect("parses");
    assert_eq!(delivery.id, DELIVERY);
    assert_eq!(pushed(&delivery).pushed, branch("master"));
    assert_eq!(pushed(&delivery).commit, after);

    let tag_body = gitlab_push("tag_push", "refs/tags/v1.0.0", &after);
    let tag_push = parse_push(Provider::GitLab, &[("X-Gitlab-Event", "Tag Push Hook")][..], &tag_body).expect("parses");
    assert_eq!(pushed(&tag_push).pushed, tag("v1.0.0"));

    let issue = parse_push(Provider::GitLab, &[("X-Gitlab-Event", "Issue Hook")][..], b"{}").expect("parses");
    assert_eq!(ignored(&issue), &Ignored::OtherEvent("Issue Hook".into()));
    let deleted = gitlab_push("push", &git_ref, "0000000000000000000000000000000000000000");
    let deleted = parse_push(Provider::GitLab, &[("X-Gitlab-Event", "Push Hook")][..], &deleted).expect("parses");
    assert_eq!(ignored(&deleted), &Ignored::Deleted(git_ref));
}

#[test]
fn a_gitlab_delivery_without_a_uuid_is_known_by_its_body() {
    let (git_ref, after) = fixture_push();
    let body = gitlab_push("push", &git_ref, &after);
    let headers = [("X-Gitlab-Event", "Push Hook")];
    let first = parse_push(Provider::GitLab, &headers[..], &body).expect("parses");
    let again = parse_push(Provider::GitLab, &headers[..], &body).expect("parses");
    assert_eq!(first.id, again.id);
    assert_eq!(first.id, format!("sha256:{}", hex::encode(Sha256::digest(&body))));
    let other =
        parse_push(Provider::GitLab, &headers[..], &gitlab_push("push", "refs/heads/dev", &after)).expect("parses");
    assert_ne!(first.id, other.id);
}

#[test]
fn an_overlong_delivery_id_is_refused() {
    let long = "x".repeat(MAX_DELIVERY_ID + 1);
    let headers = [("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Event-UUID", long.as_str())];
    let error = parse_push(Provider::GitLab, &headers[..], b"{}").expect_err("too long");
    assert_eq!(error, WebhookError::MalformedHeader("X-Gitlab-Event-UUID"));
}

#[test]
fn a_gitlab_token_must_equal_the_secret() {
    let body = gitlab_push("push", "refs/heads/master", "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
    assert_eq!(verify(Provider::GitLab, &[("X-Gitlab-Token", SECRET)][..], &body, SECRET.as_bytes()), Ok(()));
    let prefix = &SECRET[..SECRET.len() - 1];
    let longer = format!("{SECRET}0");
    for wrong in [prefix, longer.as_str(), "secret", &hmac_hex(&body, SECRET)] {
        let result = verify(Provider::GitLab, &[("X-Gitlab-Token", wrong)][..], &body, SECRET.as_bytes());
        assert_eq!(result, Err(WebhookError::BadSignature), "{wrong}");
    }
}

// Gitea

fn gitea_push(git_ref: &str, after: &str) -> Vec<u8> {
    json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "compare_url": "",
        "commits": [],
        "total_commits": 0,
        "repository": { "name": "Hello-World", "full_name": "Codertocat/Hello-World" },
        "pusher": { "login": "Codertocat" },
        "sender": { "login": "Codertocat" }
    })
    .to_string()
    .into_bytes()
}

#[test]
fn a_gitea_push_names_its_branch_commit_and_delivery() {
    let (git_ref, after) = fixture_push();
    let body = gitea_push(&git_ref, &after);
    let headers = [("X-Gitea-Event", "push"), ("X-Gitea-Delivery", DELIVERY)];
    let delivery = parse_push(Provider::Gitea, &headers[..], &body).expect("parses");
    assert_eq!(delivery.id, DELIVERY);
    assert_eq!(pushed(&delivery).pushed, branch("master"));
    assert_eq!(pushed(&delivery).commit, after);
    let create = parse_push(Provider::Gitea, &[("X-Gitea-Event", "create")][..], &body).expect("parses");
    assert_eq!(ignored(&create), &Ignored::OtherEvent("create".into()));
}

#[test]
fn a_gitea_signature_is_a_bare_hex_hmac() {
    let (git_ref, after) = fixture_push();
    let body = gitea_push(&git_ref, &after);
    let good = hmac_hex(&body, SECRET);
    assert_eq!(verify(Provider::Gitea, &[("X-Gitea-Signature", good.as_str())][..], &body, SECRET.as_bytes()), Ok(()));
    let prefixed = format!("sha256={good}");
    let other = hmac_hex(&body, "another secret");
    for wrong in [prefixed.as_str(), other.as_str(), "00"] {
        let result = verify(Provider::Gitea, &[("X-Gitea-Signature", wrong)][..], &body, SECRET.as_bytes());
        assert_eq!(result, Err(WebhookError::BadSignature), "{wrong}");
    }
}

// Bitbucket

fn bitbucket_ref(kind: &str, name: &str, hash: &str) -> Value {
    json!({ "type": kind, "name": name, "target": { "type": "commit", "hash": hash } })
}

fn bitbucket_push_body(changes: &[(Value, Value)]) -> Vec<u8> {
    let changes: Vec<Value> = changes
        .iter()
        .map(|(old, new)| json!({ "old": old, "new": new, "created": old.is_null(), "closed": new.is_null() }))
        .collect();
    json!({
        "push": { "changes": changes },
        "repository": { "type": "repository", "full_name": "Codertocat/Hello-World" },
        "actor": { "display_name": "Codertocat" }
    })
    .to_string()
    .into_bytes()
}

#[test]
fn a_bitbucket_push_takes_the_last_branch_that_moved() {
    let (git_ref, after) = fixture_push();
    let name = git_ref.strip_prefix("refs/heads/").expect("a branch");
    let before = "6113728f27ae82c7b1a177c8d03f9e96e0adf247";
    let body = bitbucket_push_body(&[
        (bitbucket_ref("branch", "feature", before), bitbucket_ref("branch", "feature", before)),
        (bitbucket_ref("branch", name, before), bitbucket_ref("branch", name, &after)),
        (Value::Null, bitbucket_ref("tag", "v1", before)),
    ]);
    let headers = [("X-Event-Key", "repo:push"), ("X-Request-UUID", DELIVERY)];
    let delivery = parse_push(Provider::Bitbucket, &headers[..], &body).expect("parses");
    assert_eq!(delivery.id, DELIVERY);
    assert_eq!(pushed(&delivery).pushed, branch("master"));
    assert_eq!(pushed(&delivery).commit, after);
}

#[test]
fn a_bitbucket_push_of_tags_only_takes_the_last_tag_and_a_deletion_is_ignored() {
    let (_, after) = fixture_push();
    let headers = [("X-Event-Key", "repo:push")];
    let tags = bitbucket_push_body(&[(Value::Null, bitbucket_ref("tag", "v2", &after))]);
    let delivery = parse_push(Provider::Bitbucket, &headers[..], &tags).expect("parses");
    assert_eq!(pushed(&delivery).pushed, tag("v2"));

    let deleted = bitbucket_push_body(&[(bitbucket_ref("branch", "old", &after), Value::Null)]);
    let delivery = parse_push(Provider::Bitbucket, &headers[..], &deleted).expect("parses");
    assert_eq!(ignored(&delivery), &Ignored::Deleted("old".into()));

    let none = bitbucket_push_body(&[]);
    assert_eq!(ignored(&parse_push(Provider::Bitbucket, &headers[..], &none).expect("parses")), &Ignored::NoRef);

    let ping = parse_push(Provider::Bitbucket, &[("X-Event-Key", "diagnostics:ping")][..], b"{}").expect("parses");
    assert_eq!(ignored(&ping), &Ignored::Ping);
}

#[test]
fn a_bitbucket_change_without_name_or_hash_is_refused() {
    let headers = [("X-Event-Key", "repo:push")];
    let nameless = bitbucket_push_body(&[(Value::Null, json!({ "type": "branch", "target": { "hash": "a" } }))]);
    let hashless = bitbucket_push_body(&[(Value::Null, json!({ "type": "branch", "name": "main" }))]);
    for body in [nameless, hashless, b"{\"push\": {}}".to_vec()] {
        let error = parse_push(Provider::Bitbucket, &headers[..], &body).expect_err("incomplete");
        assert!(matches!(error, WebhookError::InvalidPayload(_)), "{error:?}");
    }
}

#[test]
fn a_bitbucket_signature_is_a_prefixed_hmac() {
    let body = bitbucket_push_body(&[]);
    let good = format!("sha256={}", hmac_hex(&body, SECRET));
    assert_eq!(
        verify(Provider::Bitbucket, &[("X-Hub-Signature", good.as_str())][..], &body, SECRET.as_bytes()),
        Ok(())
    );
    let github_header = [("X-Hub-Signature-256", good.as_str())];
    assert_eq!(
        verify(Provider::Bitbucket, &github_header[..], &body, SECRET.as_bytes()),
        Err(WebhookError::MissingSignature("X-Hub-Signature"))
    );
    let tampered = [&body[..], b" "].concat();
    assert_eq!(
        verify(Provider::Bitbucket, &[("X-Hub-Signature", good.as_str())][..], &tampered, SECRET.as_bytes()),
        Err(WebhookError::BadSignature)
    );
}

// Matching and names

#[test]
fn a_pushed_ref_is_tracked_by_its_name_or_its_full_name() {
    let git_ref = |s: &str| GitRef::parse(s).expect("valid");
    assert!(branch("main").is_tracked_by(&git_ref("main")));
    assert!(branch("main").is_tracked_by(&git_ref("refs/heads/main")));
    assert!(tag("v1").is_tracked_by(&git_ref("v1")));
    assert!(tag("v1").is_tracked_by(&git_ref("refs/tags/v1")));
    assert!(!branch("main").is_tracked_by(&git_ref("refs/tags/main")));
    assert!(!branch("main").is_tracked_by(&git_ref("develop")));
    assert!(!branch("release/main").is_tracked_by(&git_ref("main")));
}

#[test]
fn providers_are_named_as_in_the_path() {
    for provider in Provider::ALL {
        assert_eq!(Provider::parse(provider.as_str()), Some(provider));
    }
    assert_eq!(Provider::parse("GitHub"), None);
    assert_eq!(Provider::parse("sourcehut"), None);
}

#[test]
fn header_maps_are_read_case_insensitively() {
    let mut headers = HeaderMap::new();
    headers.insert("x-github-event", "push".parse().expect("a header value"));
    headers.insert("x-github-delivery", DELIVERY.parse().expect("a header value"));
    let delivery = parse_push(Provider::GitHub, &headers, PUSH).expect("parses");
    assert_eq!(delivery.id, DELIVERY);
}

// No panics

/// Every fixture, and bodies built for the other providers, with their event headers.
fn seeds() -> Vec<(Provider, &'static str, Vec<u8>)> {
    let (git_ref, after) = fixture_push();
    let mut seeds: Vec<_> = [PUSH, TAG_DELETED, TAG_DELETED_IN_ORG, PING, PULL_REQUEST, PULL_REQUEST_SYNC]
        .into_iter()
        .map(|body| (Provider::GitHub, "push", body.to_vec()))
        .collect();
    seeds.push((Provider::GitLab, "Push Hook", gitlab_push("push", &git_ref, &after)));
    seeds.push((Provider::Gitea, "push", gitea_push(&git_ref, &after)));
    let change = (bitbucket_ref("branch", "master", &after), bitbucket_ref("branch", "master", &after));
    seeds.push((Provider::Bitbucket, "repo:push", bitbucket_push_body(&[change])));
    seeds
}

/// A JSON value of any shape, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,50}".prop_map(Value::String),
        "[0-9a-fA-F]{38,42}".prop_map(Value::String),
        "refs/(heads|tags|notes)/[a-z./@{}~^-]{0,12}".prop_map(Value::String),
        prop_oneof![Just("branch"), Just("tag"), Just("named_branch")].prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("ref".to_owned()),
                    Just("after".to_owned()),
                    Just("push".to_owned()),
                    Just("changes".to_owned()),
                    Just("new".to_owned()),
                    Just("old".to_owned()),
                    Just("type".to_owned()),
                    Just("name".to_owned()),
                    Just("target".to_owned()),
                    Just("hash".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces the `n`-th node (pre-order, modulo the node count) of `value` with `with`.
fn replace_node(value: &mut Value, n: usize, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(items) => items.iter().map(count).sum(),
            Value::Object(map) => map.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, n: &mut usize, with: &mut Option<Value>) {
        if *n == 0 {
            if let Some(with) = with.take() {
                *v = with;
            }
            return;
        }
        *n -= 1;
        let children: Vec<&mut Value> = match v {
            Value::Array(items) => items.iter_mut().collect(),
            Value::Object(map) => map.values_mut().collect(),
            _ => vec![],
        };
        for child in children {
            walk(child, n, with);
            if with.is_none() {
                return;
            }
        }
    }
    let mut n = n % count(value);
    walk(value, &mut n, &mut Some(with));
}

fn any_provider() -> impl Strategy<Value = Provider> {
    prop::sample::select(Provider::ALL.to_vec())
}

/// Event names each provider knows, and some it doesn't.
fn any_event() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["push", "ping", "Push Hook", "Tag Push Hook", "repo:push", "diagnostics:ping"])
            .prop_map(str::to_owned),
        ".{0,20}",
    ]
}

/// Parses and verifies with every provider's headers set, so each provider's paths run.
fn parse_everything(provider: Provider, event: &str, body: &[u8]) {
    let signature = format!("sha256={}", hmac_hex(body, SECRET));
    let headers = [
        (provider.event_header(), event),
        (provider.delivery_header(), DELIVERY),
        (provider.signature_header(), signature.as_str()),
    ];
    let _ = parse_push(provider, &headers[..], body);
    let _ = verify(provider, &headers[..], body, SECRET.as_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_make_the_parser_panic(
        provider in any_provider(),
        event in any_event(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        parse_everything(provider, &event, &body);
    }

    #[test]
    fn mutated_payloads_never_make_the_parser_panic(
        seed in any::<prop::sample::Index>(),
        node in any::<usize>(),
        replacement in any_json(),
        event in any_event(),
    ) {
        let seeds = seeds();
        let (provider, _, body) = &seeds[seed.index(seeds.len())];
        let mut value: Value = serde_json::from_slice(body).expect("seeds are JSON");
        replace_node(&mut value, node, replacement);
        let body = serde_json::to_vec(&value).expect("serializes");
        parse_everything(*provider, &event, &body);
        parse_everything(*provider, provider.push_event(), &body);
    }

    #[test]
    fn damaged_payloads_never_make_the_parser_panic(
        seed in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        cut in 0usize..64,
        insert in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let seeds = seeds();
        let (provider, event, body) = &seeds[seed.index(seeds.len())];
        let mut body = body.clone();
        let start = at.index(body.len());
        let end = (start + cut).min(body.len());
        body.splice(start..end, insert);
        parse_everything(*provider, event, &body);
    }
}
