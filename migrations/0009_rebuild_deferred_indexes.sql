-- A rebuild drops the secondary indexes of the read models it empties (those no constraint
-- needs) and creates them again once the log is replayed: building an index from the loaded
-- rows is a sort, while keeping it up to date row by row is a random insert per row and index.
-- Their definitions wait here meanwhile, in the transaction that drops them, so an interrupted
-- rebuild's indexes are created again by the next start (`ProjectionRunner::register`).
create table rebuild_deferred_indexes (
    index_name  text primary key,
    table_name  text not null,
    definition  text not null
);
