-- call_events writers, retention, ops views, privileges and RLS.
--
-- Inserts are logged by statement-level triggers with a transition table: the batch claim
-- inserts a whole batch of assignments in one statement (and a bulk schedule a batch of calls),
-- and one INSERT ... SELECT per statement costs far less than one trigger call per row.
-- Updates are logged by row-level triggers guarded by WHEN: most updates change no logged
-- status (the claim's queued -> assigned, leases, polls), and a WHEN that is false costs no
-- function call and, unlike a transition table, captures no rows (bench/events.py measured
-- both designs; see bench/RESULTS.md).
-- They are SECURITY DEFINER because the statement that changes a call may run as any role that
-- may change it (the worker, an app user canceling), while only the owner writes call_events.
--
-- Which table records what (one source per kind, so nothing is logged twice):
--   call_queue        scheduled (insert), claimed, requeued, retried, failed_over,
--                     completed, failed, canceled
--   call_assignments  assigned (insert), dialing, placed, released, ended (outcome)
--   record_call_event held, rescheduled, ringing, in_progress

CREATE OR REPLACE FUNCTION public.call_queue_log_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  INSERT INTO public.call_events (queue_id, user_id, kind, attempt, due_at)
  SELECT n.id, n.user_id, 'scheduled', n.attempts, n.scheduled_time FROM new_rows n;
  RETURN NULL;
END
$$;

-- A status change of call_queue (only the logged ones reach here: see the trigger's WHEN).
-- Back to queued: "retried" when the next attempt is later than the last due time
-- (handle_failed_call), "failed_over" when it also excludes a provider, "requeued" otherwise
-- (reaper, release_assignment: due again now).
CREATE OR REPLACE FUNCTION public.call_queue_log_status() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_kind text := CASE
    WHEN NEW.status <> 'queued' THEN NEW.status
    WHEN NEW.scheduled_time <= OLD.scheduled_time THEN 'requeued'
    WHEN NEW.excluded_provider_ids IS DISTINCT FROM OLD.excluded_provider_ids THEN 'failed_over'
    ELSE 'retried' END;
BEGIN
  INSERT INTO public.call_events (queue_id, user_id, kind, attempt, due_at, detail)
  VALUES (NEW.id, NEW.user_id, v_kind, NEW.attempts,
          CASE WHEN NEW.status = 'queued' THEN NEW.scheduled_time END,
          CASE WHEN v_kind IN ('failed', 'canceled') AND NEW.last_error IS NOT NULL
               THEN jsonb_build_object('reason', left(NEW.last_error, 200)) END);
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION public.call_assignments_log_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  INSERT INTO public.call_events (queue_id, user_id, kind, attempt, provider_id, assignment_id)
  SELECT n.queue_id, q.user_id, 'assigned', n.attempt, n.provider_id, n.id
    FROM new_rows n
    JOIN public.call_queue q ON q.id = n.queue_id;
  RETURN NULL;
END
$$;

-- A state change of call_assignments. dialing and placed carry the time the call was due
-- (call_queue.scheduled_time, unchanged until the attempt ends), for the latency views.
CREATE OR REPLACE FUNCTION public.call_assignments_log_state() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_kind text := CASE WHEN NEW.state IN ('completed', 'failed', 'canceled') THEN 'ended'
                      ELSE NEW.state END;
BEGIN
  INSERT INTO public.call_events (queue_id, user_id, kind, attempt, provider_id, assignment_id,
                                  outcome, due_at, detail)
  SELECT NEW.queue_id, q.user_id, v_kind, NEW.attempt, NEW.provider_id, NEW.id,
         CASE WHEN v_kind = 'ended' THEN NEW.outcome END,
         CASE WHEN v_kind IN ('dialing', 'placed') THEN q.scheduled_time END,
         CASE WHEN v_kind = 'released' AND NEW.error IS NOT NULL
              THEN jsonb_build_object('reason', left(NEW.error, 200)) END
    FROM public.call_queue q
   WHERE q.id = NEW.queue_id;
  RETURN NULL;
END
$$;

-- A user's events leave with the user (call_events has no foreign keys, to keep inserts lean).
CREATE OR REPLACE FUNCTION public.users_forget_call_events() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  DELETE FROM public.call_events e USING old_rows o WHERE e.user_id = o.id;
  RETURN NULL;
END
$$;

CREATE TRIGGER call_queue_log_insert AFTER INSERT ON public.call_queue
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.call_queue_log_insert();
CREATE TRIGGER call_queue_log_status AFTER UPDATE OF status ON public.call_queue
  FOR EACH ROW
  WHEN (OLD.status IS DISTINCT FROM NEW.status
        AND NEW.status IN ('claimed', 'queued', 'completed', 'failed', 'canceled'))
  EXECUTE FUNCTION public.call_queue_log_status();
CREATE TRIGGER call_assignments_log_insert AFTER INSERT ON public.call_assignments
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.call_assignments_log_insert();
CREATE TRIGGER call_assignments_log_state AFTER UPDATE OF state ON public.call_assignments
  FOR EACH ROW
  WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state <> 'assigned')
  EXECUTE FUNCTION public.call_assignments_log_state();
CREATE TRIGGER users_forget_call_events AFTER DELETE ON public.users
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.users_forget_call_events();

-- ---------------------------------------------------------------------------------------------
-- record_call_event: a fact that is not a status change (held by a rule, rescheduled, the
-- provider reports ringing or in progress), in the caller's transaction. attempt and provider
-- come from the call's live assignment (or its attempts so far). Returns the event id.
-- CQ050: no such call; CQ051: a kind this function may not write (status kinds come from the
-- triggers only).
CREATE OR REPLACE FUNCTION public.record_call_event(
  p_queue_id uuid,
  p_kind text,
  p_detail jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_q record;
  v_a record;
  v_id bigint;
BEGIN
  IF p_kind IS NULL OR p_kind NOT IN ('held', 'rescheduled', 'ringing', 'in_progress') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ051',
      MESSAGE = 'invalid_event_kind: record_call_event takes held, rescheduled, ringing or in_progress';
  END IF;
  IF p_detail IS NOT NULL AND jsonb_typeof(p_detail) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ051', MESSAGE = 'invalid_event_detail: must be a JSON object';
  END IF;
  SELECT q.user_id, q.attempts INTO v_q FROM public.call_queue q WHERE q.id = p_queue_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ050',
      MESSAGE = 'call_not_found: ' || coalesce(p_queue_id::text, 'NULL');
  END IF;
  SELECT a.id, a.attempt, a.provider_id INTO v_a
    FROM public.call_assignments a
   WHERE a.queue_id = p_queue_id AND a.state = ANY (public.live_assignment_states());
  INSERT INTO public.call_events (queue_id, user_id, kind, attempt, provider_id, assignment_id,
                                  detail)
  VALUES (p_queue_id, v_q.user_id, p_kind, coalesce(v_a.attempt, v_q.attempts), v_a.provider_id,
          v_a.id, nullif(p_detail, '{}'::jsonb))
  RETURNING id INTO v_id;
  RETURN v_id;
END
$$;

-- prune_call_events: the retention. Deletes up to p_limit events older than p_older_than,
-- oldest first (ids grow with time, so the primary key finds them); beat calls it until it
-- returns less than p_limit. CQ052: a retention under one hour (a typo would empty the log).
CREATE OR REPLACE FUNCTION public.prune_call_events(
  p_older_than interval DEFAULT interval '90 days',
  p_limit int DEFAULT 10000
) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_n integer;
BEGIN
  IF p_older_than IS NULL OR p_older_than < interval '1 hour' THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ052',
      MESSAGE = 'invalid_retention: call events are kept at least one hour';
  END IF;
  DELETE FROM public.call_events e
   WHERE e.id = ANY (ARRAY(
           SELECT d.id FROM public.call_events d
            WHERE d.created_at < now() - p_older_than
            ORDER BY d.id
            LIMIT greatest(p_limit, 0)));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Ops views over the last 48 hours (security_invoker: the caller's privileges and RLS apply;
-- granted to service_role and the worker role only).

-- Answer rate per provider and hour: attempts ended, and how many were answered (completed).
CREATE VIEW public.ops_answer_rate_hourly WITH (security_invoker = true) AS
  SELECT date_trunc('hour', e.created_at) AS hour,
         e.provider_id,
         p.name AS provider,
         count(*) AS attempts_ended,
         count(*) FILTER (WHERE e.outcome = 'completed') AS answered,
         round(count(*) FILTER (WHERE e.outcome = 'completed')::numeric / count(*), 4)
           AS answer_rate
    FROM public.call_events e
    LEFT JOIN public.call_service_providers p ON p.id = e.provider_id
   WHERE e.kind = 'ended' AND e.created_at > now() - interval '48 hours'
   GROUP BY 1, 2, 3;

-- Schedule-to-dial (due -> dial gate passed) and schedule-to-create (due -> provider accepted)
-- per hour, p50 and p99 in seconds, over every attempt.
CREATE VIEW public.ops_dial_latency_hourly WITH (security_invoker = true) AS
  SELECT date_trunc('hour', e.created_at) AS hour,
         count(*) FILTER (WHERE e.kind = 'dialing') AS dialed,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM e.created_at - e.due_at))
           FILTER (WHERE e.kind = 'dialing') AS dial_p50_s,
         percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM e.created_at - e.due_at))
           FILTER (WHERE e.kind = 'dialing') AS dial_p99_s,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM e.created_at - e.due_at))
           FILTER (WHERE e.kind = 'placed') AS create_p50_s,
         percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM e.created_at - e.due_at))
           FILTER (WHERE e.kind = 'placed') AS create_p99_s
    FROM public.call_events e
   WHERE e.kind IN ('dialing', 'placed') AND e.created_at > now() - interval '48 hours'
   GROUP BY 1;

-- ---------------------------------------------------------------------------------------------
-- Privileges. Nobody is granted UPDATE (append-only); DELETE only to service_role (support) and
-- through prune_call_events / the users trigger.
REVOKE ALL ON public.call_events FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, DELETE ON public.call_events TO service_role;
GRANT SELECT ON public.call_events TO authenticated, callq_worker;

CREATE POLICY events_select_own ON public.call_events FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY worker_select ON public.call_events FOR SELECT TO callq_worker USING (true);

REVOKE ALL ON public.ops_answer_rate_hourly, public.ops_dial_latency_hourly
  FROM PUBLIC, anon, authenticated;
GRANT SELECT ON public.ops_answer_rate_hourly, public.ops_dial_latency_hourly
  TO service_role, callq_worker;

REVOKE ALL ON FUNCTION
  public.call_queue_log_insert(), public.call_queue_log_status(),
  public.call_assignments_log_insert(), public.call_assignments_log_state(),
  public.users_forget_call_events(),
  public.record_call_event(uuid, text, jsonb), public.prune_call_events(interval, int)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.record_call_event(uuid, text, jsonb), public.prune_call_events(interval, int)
  TO service_role, callq_worker;

REVOKE ALL ON public.ops_settings FROM PUBLIC, anon, authenticated;
GRANT SELECT, UPDATE ON public.ops_settings TO service_role;
GRANT SELECT ON public.ops_settings TO callq_worker;
CREATE POLICY worker_select ON public.ops_settings FOR SELECT TO callq_worker USING (true);
