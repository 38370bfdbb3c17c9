-- Whether beat's ticks find work (worker/beat.py): a queued call that is due, a placed call
-- whose poll is due, a notification whose attempt is due. Beat sends a tick's message only
-- when its answer is true, so an idle fleet handles no tick messages: an isolated message costs
-- a worker about 2.5 ms of CPU, several times the empty tick's own work (bench/FINDINGS.md 21).
--
-- Each answer covers everything its task could take (the task still decides what it takes): a
-- tick sent for nothing costs what every tick cost before, a tick held back for work that waits
-- would delay it. Read-only; index probes only:
--   calls          a non-campaign call due (call_queue_claim_idx: one probe per priority, each
--                  ending at the first call, due or not), or a running campaign (its lanes and
--                  their pacing are the claim's to judge)
--   polls          call_assignments_next_poll_idx, one probe
--   notifications  call_notifications_due_idx, one probe (a leased one counts: superset)
CREATE OR REPLACE FUNCTION public.due_work()
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
             WHERE a.state = 'placed' AND a.next_poll_at <= now()),
    EXISTS (SELECT 1 FROM public.call_notifications n
             WHERE n.status = 'pending' AND n.next_attempt_at <= now());
$$;

REVOKE EXECUTE ON FUNCTION public.due_work() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.due_work() TO service_role, callq_worker;
