-- The leading worker tracks in its own process (worker/listener.py): while its listener holds
-- the listener lock, its session also holds a second advisory lock (the tracker key) and
-- listens on 'callq_track'. Beat's tracking tick then wakes it with a NOTIFY instead of
-- sending a broker message (a worker spends about 2.5 ms of CPU on an isolated message,
-- bench/FINDINGS.md 21), and sends its message only as a fallback, for a poll overdue by
-- p_fallback_seconds (the tracker stalled or fell behind). Without a tracker (LISTEN off
-- behind a transaction pooler, a prefork pool, CALLQ_TRACK_IN_WORKER=false, the leader gone:
-- its session's locks go with it) beat's tick takes every due poll as before.
--
--   p_tracker_key      the tracker's advisory lock (a bigint key); NULL: no tracker asked for
--   p_fallback_seconds how overdue a poll must be for beat's message while a tracker runs
--   p_wake_tracker     NOTIFY 'callq_track' when a poll is due and a tracker runs (beat's
--                      tracking tick asks with true, its other ticks with false)
DROP FUNCTION IF EXISTS public.due_work();
CREATE FUNCTION public.due_work(p_tracker_key bigint DEFAULT NULL,
                                p_fallback_seconds double precision DEFAULT 0,
                                p_wake_tracker boolean DEFAULT false)
RETURNS TABLE (calls boolean, polls boolean, notifications boolean)
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  -- an advisory lock on a bigint key: classid the high half, objid the low half, objsubid 1
  v_tracked boolean := p_tracker_key IS NOT NULL AND EXISTS (
    SELECT 1 FROM pg_catalog.pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                          WHERE d.datname = pg_catalog.current_database())
       AND l.classid = (p_tracker_key >> 32)::oid
       AND l.objid = (p_tracker_key & 4294967295)::oid);
  v_polls boolean := EXISTS (SELECT 1 FROM public.call_assignments a
                              WHERE a.state = 'placed' AND a.next_poll_at <= now());
BEGIN
  IF v_tracked AND v_polls THEN
    IF p_wake_tracker THEN
      PERFORM pg_catalog.pg_notify('callq_track', '');
    END IF;
    v_polls := EXISTS (SELECT 1 FROM public.call_assignments a
                        WHERE a.state = 'placed'
                          AND a.next_poll_at <= now()
                                                - make_interval(secs => greatest(p_fallback_seconds, 0)));
  END IF;
  RETURN QUERY SELECT
    EXISTS (SELECT 1 FROM public.call_queue q
             WHERE q.status = 'queued' AND NOT q.via_campaign
               -- every priority call_queue allows (its CHECK): one index probe each
               AND q.priority = ANY (ARRAY(SELECT generate_series(1, 100)))
               AND q.scheduled_time <= public.callq_now())
    OR EXISTS (SELECT 1 FROM public.call_campaigns k WHERE k.status = 'running'),
    v_polls,
    EXISTS (SELECT 1 FROM public.call_notifications n
             WHERE n.status = 'pending' AND n.next_attempt_at <= now());
END
$$;

REVOKE EXECUTE ON FUNCTION public.due_work(bigint, double precision, boolean)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.due_work(bigint, double precision, boolean)
  TO service_role, callq_worker;
