-- 0003 set lz4 compression on the log's payloads, but 0006's change of their type to `json` put
-- the column back to the server's default (pglz): every large payload (a deployment's release,
-- ~3 KB) was compressed and, on every read of the log, decompressed with pglz, several times
-- slower than lz4. New payloads use lz4 again; stored ones stay as they are. A server built
-- without lz4 keeps pglz.
do $$
begin
    alter table events alter column payload set compression lz4;
exception
    when feature_not_supported then
        raise notice 'lz4 is not available on this server; keeping pglz';
end
$$;
