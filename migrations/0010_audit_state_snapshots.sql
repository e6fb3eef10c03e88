-- The audit projection stores a stream's state only at every 32nd version (with the version it
-- is at) instead of after every batch that touched the stream: a stream it does not hold in
-- memory continues from that state and the log's events after it. Most streams (a deployment's
-- handful of events) are then never stored, which was a third of a rebuild's writes. See ADR
-- 0013, second addendum.
alter table rm_audit_state add column version bigint;
-- The states stored so far are each at their stream's last audited event.
update rm_audit_state s
   set version = l.version
  from (select stream_id, max(version) as version from rm_audit_log group by stream_id) l
 where l.stream_id = s.stream_id;
delete from rm_audit_state where version is null;
alter table rm_audit_state alter column version set not null;
