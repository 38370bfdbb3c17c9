-- The leading worker tracks in its own process (worker/listener.py): while its listener holds
-- the listener lock, a tracker thread beside it runs the tracking tick every
-- CALLQ_TRACK_TICK_SECONDS with no broker message, holding a second advisory lock (the tracker
-- key) on the listener's session. Beat's tracking tick is then a fallback: due_work() reports
-- polls to beat only once one is overdue by p_fallback_seconds (the tracker stalled, or falls
-- behind and the fleet's other workers should help). Without a tracker (LISTEN off behind a
-- transaction pooler, a prefork pool, CALLQ_TRACK_IN_WORKER=false, the leader gone: its
-- session's locks go with it) beat's tick takes every due poll as before.
--
-- The tracker's own question is due_work() with no key: polls due now.
DROP FUNCTION IF EXISTS public.due_work();
CREATE FUNCTION public.due_work(p_tracker_key bigint DEFAULT NULL,
                                p_fallback_seconds double precision DEFAULT 0)
RETURNS TABLE (calls boolean, polls boolean, notifications boolean)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
  SELECT
    EXISTS (SELECT 1 FROM public.call_queue q
             WHERE q.status = 'queued' AND NOT q.via_campaign
               -- every priority call_queue allows (its CHECK): one index probe each
               AND q.priority = ANY (ARRAY(SELECT generate_series(1, 100)))
               AND q.scheduled_time <= public.callq_now())
    OR EXISTS (SELECT 1 FROM public.call_campaigns k WHERE k.status = 'running'),
    EXISTS (SELECT 1 FROM public.call_assignments a
             WHERE a.state = 'placed'
               AND a.next_poll_at <= now() - make_interval(secs => CASE
                     WHEN p_tracker_key IS NOT NULL AND EXISTS (
                       -- an advisory lock on a bigint key: classid the high half, objid the
                       -- low half, objsubid 1
                       SELECT 1 FROM pg_catalog.pg_locks l
                        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                          AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                             WHERE d.datname = pg_catalog.current_database())
                          AND l.classid = (p_tracker_key >> 32)::oid
                          AND l.objid = (p_tracker_key & 4294967295)::oid)
                     THEN greatest(p_fallback_seconds, 0) ELSE 0 END)),
    EXISTS (SELECT 1 FROM public.call_notifications n
             WHERE n.status = 'pending' AND n.next_attempt_at <= now());
$$;

REVOKE EXECUTE ON FUNCTION public.due_work(bigint, double precision) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.due_work(bigint, double precision) TO service_role, callq_worker;
