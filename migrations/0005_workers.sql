-- The worker runtime (workers crate): each worker's inbox of handled events. A delivered event
-- found here is acknowledged without being handled again. The relay and embedded workers keep
-- their cursors in `checkpoints` (`relay:<topic>`, `worker:<name>`).
create table worker_inbox (
    worker      text not null,
    event_id    uuid not null,
    handled_at  timestamptz not null default now(),
    primary key (worker, event_id)
);
-- Entries older than the longest redelivery are pruned hourly.
create index worker_inbox_handled_at on worker_inbox (handled_at);
