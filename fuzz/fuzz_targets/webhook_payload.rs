//! Any body, with any provider's headers: the webhook parser and the signature check answer
//! `Ok` or `Err` and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zpanel_api::webhooks::{Provider, parse_push, verify};

/// Event names: each provider's push and ping, and one nobody sends.
const EVENTS: [&str; 7] = ["push", "Push Hook", "Tag Push Hook", "repo:push", "ping", "diagnostics:ping", "issues"];

fuzz_target!(|body: &[u8]| {
    // The event varies with the input, but every provider also parses the body as its push:
    // that is where the payload is read.
    let other = EVENTS[body.len() % EVENTS.len()];
    let signature = format!("sha256={}", "ab".repeat(32));
    for provider in Provider::ALL {
        for event in [provider.push_event(), other] {
            let headers = [
                (provider.event_header(), event),
                (provider.delivery_header(), "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
                (provider.signature_header(), signature.as_str()),
            ];
            let _ = parse_push(provider, &headers[..], body);
            let _ = verify(provider, &headers[..], body, b"secret");
        }
        // Without a delivery id the parser hashes the body instead.
        let _ = parse_push(provider, &[(provider.event_header(), provider.push_event())][..], body);
    }
});
