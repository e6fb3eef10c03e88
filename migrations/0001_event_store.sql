-- The event store: the only source of truth. Everything else is derived from `events`.

create table streams (
    stream_id  text primary key,
    kind       text not null,
    team_id    uuid not null,
    version    bigint not null check (version >= 0),
    created_at timestamptz not null default now()
);

create table events (
    global_position bigint generated always as identity,
    -- The writing transaction's id. Readers of the whole log order by (tx_id, global_position) and
    -- read only below the oldest running transaction, so an event whose transaction commits late
    -- is delayed for them, never skipped. (global_position alone is assigned at insert, not commit.)
    tx_id           xid8 not null default pg_current_xact_id(),
    -- No foreign key to streams: an append inserts events only through the row it just
    -- bumped or created in `streams`, and the check would cost every event a trigger.
    stream_id       text not null,
    stream_position bigint not null check (stream_position >= 1),
    event_id        uuid not null,
    event_type      text not null,
    schema_version  integer not null check (schema_version >= 1),
    team_id         uuid not null,
    payload         jsonb not null,
    metadata        jsonb not null,
    recorded_at     timestamptz not null default now(),
    -- The log's order, and readers' cursor, is (tx_id, global_position): the primary key.
    constraint events_pkey primary key (tx_id, global_position),
    constraint events_event_id_key unique (event_id),
    constraint events_stream_position_key unique (stream_id, stream_position)
);
-- Nothing else is indexed: every index costs each append, and queries by team, type or time
-- are served by the read models (rm_audit_log), not by the log.

-- Where each reader of the whole log (projection, relay, worker inbox feeder) has got to.
create table checkpoints (
    name        text primary key,
    tx_id       xid8 not null default '0',
    position    bigint not null default 0,
    updated_at  timestamptz not null default now()
);
