-- Read-model documents that are read back whole — an application's configuration, a
-- deployment's release, the audit log's actor and changes — are stored as the JSON text they
-- were written with (`json`: validated on insert, stored as given), as the log's payloads are
-- (0006). As `jsonb`, PostgreSQL parsed, sorted and rebuilt each of them on every write, which
-- was most of its work in a rebuild; the only lookups into them (`->>`) work on `json` too.
-- Compression (lz4, 0003) carries over. See ADR 0013.
alter table rm_applications alter column config type json using config::json;
alter table rm_deployments alter column release type json using release::json;
alter table rm_audit_log
    alter column actor type json using actor::json,
    alter column changes type json using changes::json;
do $$
begin
    alter table rm_applications alter column config set compression lz4;
    alter table rm_deployments alter column release set compression lz4;
    alter table rm_audit_log alter column changes set compression lz4;
exception
    when feature_not_supported then
        raise notice 'lz4 is not available on this server; keeping pglz';
end
$$;
