-- How read models store what they are rebuilt from (see docs/adr/0005-rebuild-speed.md).
--
-- 1. A read model's `state` (the folded aggregate it continues from) and the audit log's
--    per-stream state are only ever read back whole, by Zpanel. As `text` PostgreSQL stores them
--    as given; as `jsonb` it parsed and re-sorted every one of them on every write, which was
--    most of its work during a rebuild. The queryable columns stay `jsonb`.
alter table rm_teams alter column state type text using state::text;
alter table rm_projects alter column state type text using state::text;
alter table rm_applications alter column state type text using state::text;
alter table rm_deployments alter column state type text using state::text;
alter table rm_servers alter column state type text using state::text;
alter table rm_private_keys alter column state type text using state::text;
alter table rm_api_tokens alter column state type text using state::text;
alter table rm_audit_state alter column state type text using state::text;

-- 2. Large values (states, a deployment's release, an application's configuration, payloads)
--    are compressed when stored out of line. lz4 compresses several times faster than
--    PostgreSQL's default, pglz. Existing values stay as they are; new ones use lz4. A server
--    built without lz4 keeps pglz.
do $$
declare
    target record;
begin
    for target in
        select * from (values
            ('events', 'payload'),
            ('rm_teams', 'state'),
            ('rm_projects', 'state'),
            ('rm_applications', 'config'),
            ('rm_applications', 'state'),
            ('rm_deployments', 'release'),
            ('rm_deployments', 'state'),
            ('rm_servers', 'state'),
            ('rm_private_keys', 'state'),
            ('rm_api_tokens', 'state'),
            ('rm_audit_log', 'changes'),
            ('rm_audit_state', 'state')
        ) as t(table_name, column_name)
    loop
        execute format('alter table %I alter column %I set compression lz4', target.table_name, target.column_name);
    end loop;
exception
    when feature_not_supported then
        raise notice 'lz4 is not available on this server; keeping pglz';
end
$$;
