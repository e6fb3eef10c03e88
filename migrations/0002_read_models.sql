-- Read models. Each table is written only by its projection, in the same transaction as the
-- projection's checkpoint, so a read model is always the fold of a prefix of the log.

create table rm_teams (
    team_id    uuid primary key,
    name       text not null,
    members    jsonb not null default '{}',
    state      jsonb not null,
    version    bigint not null,
    created_at timestamptz not null,
    updated_at timestamptz not null
);

create table rm_projects (
    project_id   uuid primary key,
    team_id      uuid not null,
    name         text not null,
    environments text[] not null,
    archived     boolean not null default false,
    state        jsonb not null,
    version      bigint not null,
    created_at   timestamptz not null,
    updated_at   timestamptz not null
);
create index rm_projects_team on rm_projects (team_id, name);

create table rm_applications (
    application_id uuid primary key,
    team_id        uuid not null,
    project_id     uuid not null,
    environment    text not null,
    name           text not null,
    -- The configuration as the API shows it, secret values masked (null). `state` is the folded
    -- aggregate, whose secrets are sealed (ciphertext only).
    config         jsonb not null,
    archived       boolean not null default false,
    state          jsonb not null,
    version        bigint not null,
    created_at     timestamptz not null,
    updated_at     timestamptz not null
);
create index rm_applications_team on rm_applications (team_id, project_id, environment, application_id);

create table rm_deployments (
    deployment_id  uuid primary key,
    team_id        uuid not null,
    application_id uuid not null,
    status         text not null,
    reason         jsonb not null,
    commit         text,
    image          text,
    failed_step    text,
    failure        text,
    worker_id      text,
    lease_expires_at timestamptz,
    release        jsonb not null,
    state          jsonb not null,
    version        bigint not null,
    created_at     timestamptz not null,
    started_at     timestamptz,
    finished_at    timestamptz,
    updated_at     timestamptz not null
);
create index rm_deployments_application on rm_deployments (team_id, application_id, deployment_id desc);
create index rm_deployments_status on rm_deployments (status) where status in ('queued', 'running');

create table rm_servers (
    server_id      uuid primary key,
    team_id        uuid not null,
    name           text not null,
    host           text not null,
    port           integer not null,
    username       text not null,
    private_key_id uuid not null,
    status         text not null,
    last_error     text,
    host_key_fingerprint text,
    facts          jsonb,
    state          jsonb not null,
    version        bigint not null,
    created_at     timestamptz not null,
    updated_at     timestamptz not null
);
create index rm_servers_team on rm_servers (team_id, name);

create table rm_private_keys (
    private_key_id uuid primary key,
    team_id        uuid not null,
    name           text not null,
    public_key     text not null,
    fingerprint    text not null,
    state          jsonb not null,
    version        bigint not null,
    created_at     timestamptz not null,
    updated_at     timestamptz not null
);
create index rm_private_keys_team on rm_private_keys (team_id, name);

create table rm_api_tokens (
    token_id    uuid primary key,
    team_id     uuid not null,
    name        text not null,
    abilities   text[] not null,
    token_hash  text not null,
    expires_at  timestamptz,
    revoked     boolean not null default false,
    state       jsonb not null,
    version     bigint not null,
    created_at  timestamptz not null,
    updated_at  timestamptz not null,
    constraint rm_api_tokens_hash_key unique (token_hash)
);
create index rm_api_tokens_team on rm_api_tokens (team_id);

-- The audit log: one row per event, with what changed.
create table rm_audit_log (
    global_position bigint primary key,
    team_id     uuid not null,
    stream_id   text not null,
    version     bigint not null,
    event_type  text not null,
    actor       jsonb not null,
    at          timestamptz not null,
    changes     jsonb not null
);
create index rm_audit_log_team on rm_audit_log (team_id, global_position desc);
create index rm_audit_log_stream on rm_audit_log (stream_id, global_position desc);

-- The audit projection's memory: each stream's latest described state, to diff the next event against.
create table rm_audit_state (
    stream_id  text primary key,
    state      jsonb not null
);
