-- A presented API token is found by the first 16 hex digits of its SHA-256 and then compared
-- in full in constant time (api/src/auth.rs), so the index lookup, whose timing depends on the
-- compared bytes, only ever compares a prefix.
create index rm_api_tokens_hash_prefix on rm_api_tokens (left(token_hash, 16));
