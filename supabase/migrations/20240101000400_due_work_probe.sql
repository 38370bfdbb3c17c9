-- due_work() asks whether the leading worker's tracker runs only when a poll is due, and asks
-- with a shared advisory lock of the tracker key for the transaction instead of reading
-- pg_locks: pg_locks takes every partition of the server's lock table for its read, which every
-- backend that takes a lock meanwhile waits for, about three times a second from beat. The
-- shared lock is refused exactly while a session holds the key (the tracker's exclusive
-- session lock), in this database only (advisory locks are per database), and goes with the
-- transaction. The tracker takes its key waiting up to a few seconds (worker/listener.py), so
-- the shared lock's moment never keeps it off.
CREATE OR REPLACE FUNCTION public.due_work(p_tracker_key bigint DEFAULT NULL,
                                           p_fallback_seconds double precision DEFAULT 0,
                                           p_wake_tracker boolean DEFAULT false)
RETURNS TABLE (calls boolean, polls boolean, notifications boolean)
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_polls boolean := EXISTS (SELECT 1 FROM public.call_assignments a
                              WHERE a.state = 'placed' AND a.next_poll_at <= now());
BEGIN
  IF v_polls AND p_tracker_key IS NOT NULL
     AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(p_tracker_key) THEN
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
