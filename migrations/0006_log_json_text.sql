-- The log keeps each event's payload and metadata as the JSON text it was written with
-- (`json`: validated on insert, stored as given), not as `jsonb`. Nothing queries into them —
-- the read models do that — while every reader (projections, replay, the relay, subscriptions)
-- reads them whole, and `jsonb` had to be rendered back into text on every read. See ADR 0008.
alter table events
    alter column payload type json using payload::json,
    alter column metadata type json using metadata::json;
