-- Deployments at work (workers crate, deploy worker; ADR 0009).

-- A deployment's log: every line of output of every step, secrets redacted before they are
-- written. Lines are not events: a build writes thousands, and they say nothing about state.
-- The worker inserts them in batches and then notifies `zpanel_deployment_logs` with the
-- deployment id, so `deploymentLogs` subscribers read the new lines at once.
create table deployment_logs (
    deployment_id uuid not null,
    sequence      integer not null,
    stream        text not null check (stream in ('system', 'stdout', 'stderr')),
    at            timestamptz not null,
    text          text not null,
    primary key (deployment_id, sequence)
);

-- The deploy worker's queue: one active deployment per application, the others wait in the
-- order they were queued. Rows are the worker's bookkeeping, derived from deployment events:
-- inserted on `DeploymentQueued`, marked when a worker starts one, deleted when it finishes.
create table deploy_queue (
    deployment_id  uuid primary key,
    application_id uuid not null,
    team_id        uuid not null,
    position       bigint generated always as identity,
    started        boolean not null default false
);
create index deploy_queue_application on deploy_queue (application_id, position);
