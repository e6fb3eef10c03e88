-- Domain claims (ADR 0018): which application stream holds each domain name, across every team.
-- Written only by the event store, in the transaction of the append that changes an
-- application's domains (create, update, archive), after taking an advisory lock per `scope`:
-- two names that overlap always share a scope (the parent of an exact host, the base of a
-- wildcard), so claims that could collide are decided one after the other, and of two teams
-- claiming one name at once exactly one gets it. Not a read model: it is never rebuilt from
-- the log, and a rebuild does not touch it.
create table domain_claims (
    -- Lowercase, no trailing dot; a wildcard keeps its `*.`. One stream per name.
    domain     text primary key,
    scope      text not null,
    stream_id  text not null,
    team_id    uuid not null
);
create index domain_claims_scope on domain_claims (scope);
create index domain_claims_stream on domain_claims (stream_id);

-- Claims for the applications that exist already, from their read model. Where two
-- applications hold one name (possible before this rule), the older keeps it; the other's
-- next change of domains must choose another.
insert into domain_claims (domain, scope, stream_id, team_id)
select d.domain,
       case when d.domain like '*.%' then substr(d.domain, 3)
            else coalesce(nullif(substring(d.domain from position('.' in d.domain) + 1), ''), d.domain) end,
       'application-' || a.application_id,
       a.team_id
  from rm_applications a,
       json_array_elements_text(a.config -> 'domains') as d(domain)
 where not a.archived
 order by a.created_at, a.application_id
on conflict (domain) do nothing;
