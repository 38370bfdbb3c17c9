-- Campaigns: the functions an app calls (through supabase.rpc), their grants and RLS.
-- Tables: 20240101000150_campaigns.sql. The checks of every scheduled call live in
-- public.schedule_calls_core (20240101000200_functions.sql).
--
-- SQLSTATEs (class CQ, range CQ040-CQ049):
--   CQ040 invalid_row          a batch row is not an object, has an unknown field, or a
--                              template_id / scheduled_time that does not parse
--   CQ041 invalid_external_id  external_id (idempotency key) not 1..200 characters
--   CQ042 campaign_not_found   missing, or not the caller's
--   CQ043 campaign_closed      completed or canceled: no uploads, no control
--   CQ044 batch_rejected       p_all_or_nothing and another row of the batch is invalid
--   CQ045 invalid_batch        p_calls is not a JSON array of at most 50000 elements
--   CQ046 invalid_campaign     create_campaign / set_campaign_pacing arguments out of range
--   CQ047 invalid_endpoint     a notification URL that is not https:// (http only on loopback)
--   CQ048 endpoint_not_found   missing, or not the caller's
--   reschedule_call answers like cancel_call (20240101000310): CQ015 call_not_found (missing or
--   another user's), CQ016 call_already_ended, CQ017 call_in_flight.

-- campaign_lane: true when the campaign's queued calls must stay out of the plain claim
-- (call_queue.via_campaign): it is not running (draft, paused, closed), or it is paced or has
-- a time window (claim_candidates then takes them through the campaign's lane).
CREATE OR REPLACE FUNCTION public.campaign_lane(c public.call_campaigns) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = ''
AS $$
  SELECT NOT (c.status = 'running' AND c.calls_per_minute IS NULL AND c.max_in_flight IS NULL
              AND c.starts_at IS NULL AND c.ends_at IS NULL);
$$;

-- A campaign call that goes back to the queue (a retry, a released or reaped claim) takes the
-- campaign's current lane; a canceled campaign's call is canceled instead. A plain read, no
-- lock: a claim holds its lanes' campaign rows while it waits for provider rows, which
-- handle_failed_call holds when it requeues. A call requeued while a pause or cancel commits
-- may miss it here; the dial gate (mark_call_dialing) then releases it and this runs again.
CREATE OR REPLACE FUNCTION public.call_queue_campaign_lane() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_c public.call_campaigns;
BEGIN
  SELECT c.* INTO v_c FROM public.call_campaigns c WHERE c.id = NEW.campaign_id;
  IF v_c.status = 'canceled' THEN
    NEW.status := 'canceled';
    NEW.completed_at := now();
    NEW.last_error := 'campaign_canceled';
  ELSE
    NEW.via_campaign := public.campaign_lane(v_c);
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER call_queue_campaign_lane BEFORE UPDATE OF status ON public.call_queue
  FOR EACH ROW
  WHEN (NEW.campaign_id IS NOT NULL AND NEW.status = 'queued' AND OLD.status <> 'queued')
  EXECUTE FUNCTION public.call_queue_campaign_lane();

-- The campaign, locked, after checking that the caller may act on it (service_role and the
-- worker act on any; app users on their own). Raises CQ042 otherwise.
-- p_open: a completed or canceled campaign is refused too (CQ043).
CREATE OR REPLACE FUNCTION public.campaign_for_update(p_campaign_id uuid,
                                                     p_open boolean DEFAULT false)
RETURNS public.call_campaigns
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_c public.call_campaigns;
BEGIN
  SELECT c.* INTO v_c FROM public.call_campaigns c WHERE c.id = p_campaign_id FOR NO KEY UPDATE;
  IF NOT FOUND OR (v_role IN ('anon', 'authenticated')
                   AND v_c.user_id IS DISTINCT FROM (SELECT auth.uid())) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ042',
      MESSAGE = 'campaign_not_found: ' || coalesce(p_campaign_id::text, 'NULL');
  END IF;
  IF p_open AND v_c.status IN ('completed', 'canceled') THEN
    PERFORM public.campaign_closed(v_c);
  END IF;
  RETURN v_c;
END
$$;

-- The one home of CQ043: the campaign is closed (completed or canceled) to what was asked.
CREATE OR REPLACE FUNCTION public.campaign_closed(p_c public.call_campaigns) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'CQ043',
    MESSAGE = 'campaign_closed: campaign ' || p_c.id || ' is ' || p_c.status;
END
$$;

-- create_campaign: a new campaign of p_user_id (as role authenticated: only auth.uid()).
-- Status 'draft' (its calls wait until resume_campaign) or 'running'.
CREATE OR REPLACE FUNCTION public.create_campaign(
  p_user_id uuid,
  p_template_id uuid,
  p_name text,
  p_status text DEFAULT 'draft',
  p_starts_at timestamptz DEFAULT NULL,
  p_ends_at timestamptz DEFAULT NULL,
  p_calls_per_minute integer DEFAULT NULL,
  p_max_in_flight integer DEFAULT NULL,
  p_metadata jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_id uuid;
BEGIN
  IF v_role IN ('anon', 'authenticated')
     AND (auth.uid() IS NULL OR p_user_id IS DISTINCT FROM auth.uid()) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ008',
      MESSAGE = 'not_authorized: cannot create campaigns for another user';
  END IF;
  IF p_user_id IS NULL OR NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = p_user_id) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = 'user_not_found: ' || coalesce(p_user_id::text, 'NULL');
  END IF;
  IF p_template_id IS NULL OR NOT EXISTS (
       SELECT 1 FROM public.call_templates t
        WHERE t.id = p_template_id AND (t.is_public OR t.created_by = p_user_id)) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ004', MESSAGE = 'template_not_found: ' || coalesce(p_template_id::text, 'NULL');
  END IF;
  IF p_status IS NULL OR p_status NOT IN ('draft', 'running')
     OR p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 200
     OR (p_ends_at IS NOT NULL AND p_starts_at IS NOT NULL AND p_ends_at <= p_starts_at)
     OR p_calls_per_minute NOT BETWEEN 1 AND 100000 OR p_max_in_flight NOT BETWEEN 1 AND 100000
     OR jsonb_typeof(coalesce(p_metadata, '{}')) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ046',
      MESSAGE = 'invalid_campaign: name 1..200 characters, status draft or running, ends_at after '
                'starts_at, pacing 1..100000, metadata a JSON object';
  END IF;
  INSERT INTO public.call_campaigns (user_id, template_id, name, status, starts_at, ends_at,
                                     calls_per_minute, max_in_flight, metadata, started_at)
  VALUES (p_user_id, p_template_id, btrim(p_name), p_status, p_starts_at, p_ends_at,
          p_calls_per_minute, p_max_in_flight, coalesce(p_metadata, '{}'),
          CASE WHEN p_status = 'running' THEN now() END)
  RETURNING id INTO v_id;
  RETURN v_id;
END
$$;

-- schedule_calls: queue a campaign's contacts (a JSON array, see schedule_calls_core for the
-- keys). One row back per element: idx (1-based), queue_id, or sqlstate + message; existing
-- is true for an external_id queued before (its first id comes back, nothing is queued twice).
-- With p_all_or_nothing, one invalid row refuses the whole batch (the valid rows get CQ044).
CREATE OR REPLACE FUNCTION public.schedule_calls(
  p_campaign_id uuid,
  p_calls jsonb,
  p_all_or_nothing boolean DEFAULT false
) RETURNS TABLE (idx integer, queue_id uuid, sqlstate text, message text, existing boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
  v_c public.call_campaigns;
  v_new integer := 0;
BEGIN
  v_c := public.campaign_for_update(p_campaign_id);
  IF v_c.status = 'canceled' OR (v_c.status = 'completed' AND v_c.ends_at <= now()) THEN
    PERFORM public.campaign_closed(v_c);
  ELSIF v_c.status = 'completed' THEN  -- more contacts for a campaign that ran out of calls
    UPDATE public.call_campaigns c SET status = 'running', ended_at = NULL
     WHERE c.id = v_c.id RETURNING c.* INTO v_c;
  END IF;
  FOR idx, queue_id, sqlstate, message, existing IN
    SELECT * FROM public.schedule_calls_core(v_c.user_id, v_c.id, v_c.template_id, p_calls,
                                             coalesce(p_all_or_nothing, false))
  LOOP
    v_new := v_new + (queue_id IS NOT NULL AND NOT existing)::integer;
    RETURN NEXT;
  END LOOP;
  UPDATE public.call_campaigns c SET calls_total = c.calls_total + v_new WHERE c.id = v_c.id;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Campaign controls. Each acts on the caller's own campaign (CQ042 otherwise), refuses a
-- closed one (CQ043), is idempotent (pausing a paused campaign changes nothing) and returns
-- the campaign's status afterwards.

-- Calls of the campaign that a worker claimed but has not dialed go back to the queue (or are
-- canceled, when the campaign is). A call a worker holds right now (row locked) is skipped: the
-- dial gate (mark_call_dialing) refuses it anyway. Calls being dialed or in progress finish.
CREATE OR REPLACE FUNCTION public.campaign_recall_undialed(p_campaign_id uuid, p_reason text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_r record;
  v_n integer := 0;
BEGIN
  FOR v_r IN
    SELECT q.id, q.status, a.id AS aid
      FROM public.call_queue q
      LEFT JOIN public.call_assignments a ON a.queue_id = q.id AND a.state = 'assigned'
     WHERE q.campaign_id = p_campaign_id AND q.status IN ('claimed', 'assigned')
       FOR UPDATE OF q SKIP LOCKED
  LOOP
    IF v_r.aid IS NOT NULL THEN
      PERFORM public.release_assignment(v_r.aid, p_reason);
    ELSE
      UPDATE public.call_queue q
         SET status = 'queued', claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL
       WHERE q.id = v_r.id AND q.status = 'claimed';
    END IF;
    v_n := v_n + 1;
  END LOOP;
  RETURN v_n;
END
$$;

CREATE OR REPLACE FUNCTION public.pause_campaign(p_campaign_id uuid) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id, true);
BEGIN
  IF v_c.status <> 'paused' THEN
    UPDATE public.call_campaigns c SET status = 'paused' WHERE c.id = v_c.id;
    UPDATE public.call_queue q SET via_campaign = true
     WHERE q.campaign_id = v_c.id AND q.status = 'queued' AND NOT q.via_campaign;
    PERFORM public.campaign_recall_undialed(v_c.id, 'campaign_paused');
  END IF;
  RETURN 'paused';
END
$$;

-- resume_campaign: draft or paused -> running (its due calls are dialed again).
CREATE OR REPLACE FUNCTION public.resume_campaign(p_campaign_id uuid) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id, true);
  v_lane boolean;
BEGIN
  IF v_c.status <> 'running' THEN
    UPDATE public.call_campaigns c
       SET status = 'running', started_at = coalesce(c.started_at, now())
     WHERE c.id = v_c.id
    RETURNING public.campaign_lane(c) INTO v_lane;
    UPDATE public.call_queue q SET via_campaign = v_lane
     WHERE q.campaign_id = v_c.id AND q.status = 'queued' AND q.via_campaign IS DISTINCT FROM v_lane;
    PERFORM pg_notify('callq_queue', '');
  END IF;
  RETURN 'running';
END
$$;

-- cancel_campaign: queued calls canceled, calls not yet dialed canceled, calls being dialed or
-- in progress finish; no more uploads.
CREATE OR REPLACE FUNCTION public.cancel_campaign(p_campaign_id uuid) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id);
  v_n integer;
BEGIN
  IF v_c.status = 'canceled' THEN
    RETURN 'canceled';
  ELSIF v_c.status = 'completed' THEN
    PERFORM public.campaign_closed(v_c);
  END IF;
  UPDATE public.call_campaigns c SET status = 'canceled', ended_at = now() WHERE c.id = v_c.id;
  -- undialed claims come back as queued and are canceled by the lane trigger
  PERFORM public.campaign_recall_undialed(v_c.id, 'campaign_canceled');
  UPDATE public.call_queue q
     SET status = 'canceled', completed_at = now(), last_error = 'campaign_canceled'
   WHERE q.campaign_id = v_c.id AND q.status = 'queued';
  SELECT count(*) INTO v_n FROM public.call_queue q
   WHERE q.campaign_id = v_c.id AND q.status = 'canceled' AND q.last_error = 'campaign_canceled';
  UPDATE public.call_campaigns c SET calls_canceled = v_n WHERE c.id = v_c.id;
  RETURN 'canceled';
END
$$;

-- set_campaign_pacing: calls per minute and calls in flight (NULL: no limit), and the window.
CREATE OR REPLACE FUNCTION public.set_campaign_pacing(
  p_campaign_id uuid,
  p_calls_per_minute integer,
  p_max_in_flight integer,
  p_starts_at timestamptz DEFAULT NULL,
  p_ends_at timestamptz DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id, true);
  v_lane boolean;
BEGIN
  IF p_calls_per_minute NOT BETWEEN 1 AND 100000 OR p_max_in_flight NOT BETWEEN 1 AND 100000
     OR p_ends_at <= p_starts_at THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ046',
      MESSAGE = 'invalid_campaign: pacing 1..100000 (or NULL), ends_at after starts_at';
  END IF;
  UPDATE public.call_campaigns c
     SET calls_per_minute = p_calls_per_minute, max_in_flight = p_max_in_flight,
         starts_at = p_starts_at, ends_at = p_ends_at
   WHERE c.id = v_c.id
  RETURNING public.campaign_lane(c) INTO v_lane;
  UPDATE public.call_queue q SET via_campaign = v_lane
   WHERE q.campaign_id = v_c.id AND q.status = 'queued' AND q.via_campaign IS DISTINCT FROM v_lane;
  RETURN v_c.status;
END
$$;

-- reschedule_call: move one of the caller's queued calls to p_scheduled_time (NULL or past:
-- now). Answers like cancel_call: CQ015 not the caller's (or no such call), CQ016 ended,
-- CQ017 being dialed or in progress. A claimed but undialed call is taken back first.
CREATE OR REPLACE FUNCTION public.reschedule_call(p_queue_id uuid, p_scheduled_time timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_q record;
  v_aid uuid;
  v_when timestamptz := greatest(coalesce(p_scheduled_time, now()), now());
BEGIN
  SELECT q.user_id, q.status INTO v_q FROM public.call_queue q WHERE q.id = p_queue_id FOR UPDATE;
  IF NOT FOUND OR (v_role IN ('anon', 'authenticated')
                   AND (auth.uid() IS NULL OR v_q.user_id IS DISTINCT FROM auth.uid())) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ015', MESSAGE = 'call_not_found: no such call of yours';
  END IF;
  IF v_q.status IN ('completed', 'failed', 'canceled') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ016', MESSAGE = 'call_already_ended: the call is ' || v_q.status;
  ELSIF v_q.status IN ('dialing', 'in_progress') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ017',
      MESSAGE = 'call_in_flight: the call is being dialed or in progress and will finish';
  END IF;
  IF v_q.status = 'assigned' THEN
    SELECT a.id INTO v_aid FROM public.call_assignments a
     WHERE a.queue_id = p_queue_id AND a.state = 'assigned';
    PERFORM public.release_assignment(v_aid, 'rescheduled');
  END IF;
  UPDATE public.call_queue q
     SET status = 'queued', scheduled_time = v_when, claimed_by = NULL, claimed_at = NULL,
         lease_expires_at = NULL
   WHERE q.id = p_queue_id AND q.status IN ('queued', 'claimed');
  PERFORM public.record_call_event(p_queue_id, 'rescheduled',
                                   jsonb_build_object('scheduled_time', v_when));
  IF v_when <= now() THEN
    PERFORM pg_notify('callq_queue', '');
  END IF;
  RETURN v_when;
END
$$;

-- close_campaigns (beat, with the reaper): a campaign past its ends_at has its queued calls
-- canceled ('campaign_ended'); a campaign whose every call ended (none queued or in flight, at
-- least one call) becomes completed when it is past its ends_at, or running without one.
-- An upload to a completed campaign before its ends_at reopens it. Returns campaigns closed.
CREATE OR REPLACE FUNCTION public.close_campaigns() RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE public.call_queue q
     SET status = 'canceled', completed_at = now(), last_error = 'campaign_ended'
    FROM public.call_campaigns c
   WHERE c.status IN ('draft', 'running', 'paused') AND c.ends_at <= now()
     AND q.campaign_id = c.id AND q.status = 'queued';
  WITH done AS (
    SELECT c.id FROM public.call_campaigns c
     WHERE c.status IN ('draft', 'running', 'paused')
       AND (c.ends_at <= now() OR (c.ends_at IS NULL AND c.status = 'running'))
       AND c.calls_total > 0
       AND NOT EXISTS (SELECT 1 FROM public.call_queue q
                        WHERE q.campaign_id = c.id
                          AND q.status = ANY (public.live_call_statuses()))
       FOR NO KEY UPDATE OF c SKIP LOCKED
  )
  UPDATE public.call_campaigns c SET status = 'completed', ended_at = now()
    FROM done WHERE c.id = done.id;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- call_campaign_progress: one row per campaign, as the caller may see it (security_invoker: the
-- RLS of call_campaigns, call_queue and call_history applies, so an owner sees its own).
--   calls by queue status: queued (waiting, paused ones included), in_flight (claimed,
--   assigned, dialing, in progress), completed, failed, canceled;
--   outcomes of the ended calls (call_history): answered, busy, no_answer, voicemail,
--   failed_outcome, canceled_outcome; attempts (dials, retries included); answer_rate =
--   answered / calls that ended after at least one dial; minutes (rounded up per call, as
--   billed); cost; first_call_at (first dial) and last_call_at (last end); held = queued calls
--   a calling rule moved to a later time (their hold_reason is set).
CREATE VIEW public.call_campaign_progress WITH (security_invoker = true) AS
SELECT c.id AS campaign_id, c.user_id, c.name, c.status, c.calls_per_minute, c.max_in_flight,
       c.created_at, c.started_at, c.ended_at,
       coalesce(q.calls, 0) AS calls,
       coalesce(q.queued, 0) AS queued,
       coalesce(q.in_flight, 0) AS in_flight,
       coalesce(q.completed, 0) AS completed,
       coalesce(q.failed, 0) AS failed,
       coalesce(q.canceled, 0) AS canceled,
       coalesce(q.attempts, 0) AS attempts,
       coalesce(h.answered, 0) AS answered,
       coalesce(h.busy, 0) AS busy,
       coalesce(h.no_answer, 0) AS no_answer,
       coalesce(h.voicemail, 0) AS voicemail,
       coalesce(h.failed_outcome, 0) AS failed_outcome,
       coalesce(h.canceled_outcome, 0) AS canceled_outcome,
       CASE WHEN h.dialed > 0 THEN round(h.answered::numeric / h.dialed, 3) END AS answer_rate,
       coalesce(h.minutes, 0) AS minutes,
       coalesce(h.seconds, 0) AS seconds,
       coalesce(h.cost, 0) AS cost,
       h.first_call_at, h.last_call_at,
       coalesce(q.held, 0) AS held
  FROM public.call_campaigns c
  LEFT JOIN LATERAL (
    SELECT count(*) AS calls,
           count(*) FILTER (WHERE x.status = 'queued') AS queued,
           count(*) FILTER (WHERE x.status = ANY (public.in_flight_call_statuses()))
             AS in_flight,
           count(*) FILTER (WHERE x.status = 'completed') AS completed,
           count(*) FILTER (WHERE x.status = 'failed') AS failed,
           count(*) FILTER (WHERE x.status = 'canceled') AS canceled,
           sum(x.attempts) AS attempts,
           count(*) FILTER (WHERE x.status = 'queued' AND x.hold_reason IS NOT NULL) AS held
      FROM public.call_queue x WHERE x.campaign_id = c.id
  ) q ON true
  LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE y.status = 'completed') AS answered,
           count(*) FILTER (WHERE y.status = 'busy') AS busy,
           count(*) FILTER (WHERE y.status = 'no_answer') AS no_answer,
           count(*) FILTER (WHERE y.status = 'voicemail') AS voicemail,
           count(*) FILTER (WHERE y.status = 'failed') AS failed_outcome,
           count(*) FILTER (WHERE y.status = 'canceled') AS canceled_outcome,
           count(*) FILTER (WHERE y.attempts > 0 AND y.status <> 'canceled') AS dialed,
           sum(ceil(coalesce(y.duration_seconds, 0) / 60.0)) AS minutes,
           sum(y.duration_seconds) AS seconds,
           sum(y.cost) AS cost,
           min(y.started_at) AS first_call_at,
           max(y.ended_at) AS last_call_at
      FROM public.call_queue x JOIN public.call_history y ON y.queue_id = x.id
     WHERE x.campaign_id = c.id
  ) h ON true;

-- ---------------------------------------------------------------------------------------------
-- Notifications back to the app. A call that ends (queue status completed, failed or canceled)
-- writes one call_notifications row per matching active endpoint, in the transaction that ends
-- it; the worker drains that outbox (claim_notifications -> notification_delivery -> POST ->
-- record_notification_result) on its own queue, so a receiver that is down never holds up a
-- call. Payloads are built at delivery time and carry no phone number or name.

-- register_notification_endpoint: an endpoint of p_user_id (as role authenticated: auth.uid()),
-- for every call of the user or for one of its campaigns. Returns the endpoint id and the
-- signing secret, which is shown only here (rotate_notification_secret makes a new one).
CREATE OR REPLACE FUNCTION public.register_notification_endpoint(
  p_user_id uuid,
  p_url text,
  p_campaign_id uuid DEFAULT NULL,
  p_include_transcript boolean DEFAULT false
) RETURNS TABLE (endpoint_id uuid, secret text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_secret text := 'whsec_' || replace(gen_random_uuid()::text, '-', '')
                            || replace(gen_random_uuid()::text, '-', '');
  v_id uuid;
BEGIN
  IF v_role IN ('anon', 'authenticated')
     AND (auth.uid() IS NULL OR p_user_id IS DISTINCT FROM auth.uid()) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ008',
      MESSAGE = 'not_authorized: cannot register endpoints for another user';
  END IF;
  IF p_user_id IS NULL OR NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = p_user_id) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = 'user_not_found: ' || coalesce(p_user_id::text, 'NULL');
  END IF;
  IF p_campaign_id IS NOT NULL AND NOT EXISTS (
       SELECT 1 FROM public.call_campaigns c WHERE c.id = p_campaign_id AND c.user_id = p_user_id) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ042', MESSAGE = 'campaign_not_found: ' || p_campaign_id;
  END IF;
  IF p_url IS NULL OR length(p_url) > 2000 OR NOT (
       p_url ~ '^https://[^/?#@[:space:]]+(/[^[:space:]]*)?$'
       OR p_url ~ '^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?(/[^[:space:]]*)?$') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ047',
      MESSAGE = 'invalid_endpoint: an https:// URL without credentials (http only on loopback)';
  END IF;
  INSERT INTO public.notification_endpoints (user_id, campaign_id, url, secret, include_transcript)
  VALUES (p_user_id, p_campaign_id, p_url, v_secret, coalesce(p_include_transcript, false))
  RETURNING id INTO v_id;
  RETURN QUERY SELECT v_id, v_secret;
END
$$;

-- rotate_notification_secret: a new signing secret for one of the caller's endpoints.
CREATE OR REPLACE FUNCTION public.rotate_notification_secret(p_endpoint_id uuid) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_secret text := 'whsec_' || replace(gen_random_uuid()::text, '-', '')
                            || replace(gen_random_uuid()::text, '-', '');
BEGIN
  UPDATE public.notification_endpoints e SET secret = v_secret
   WHERE e.id = p_endpoint_id
     AND (v_role NOT IN ('anon', 'authenticated') OR e.user_id = auth.uid());
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ048', MESSAGE = 'endpoint_not_found: no such endpoint of yours';
  END IF;
  RETURN v_secret;
END
$$;

-- The outbox writer: one row per matching endpoint when a call reaches its end. SECURITY
-- DEFINER because whoever ends the call (the worker, a user's cancel) may not write the outbox.
CREATE OR REPLACE FUNCTION public.enqueue_call_notifications() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  INSERT INTO public.call_notifications (endpoint_id, user_id, queue_id)
  SELECT e.id, NEW.user_id, NEW.id
    FROM public.notification_endpoints e
   WHERE e.user_id = NEW.user_id AND e.is_active
     AND (e.campaign_id IS NULL OR e.campaign_id = NEW.campaign_id)
  ON CONFLICT (endpoint_id, queue_id, event) DO NOTHING;
  RETURN NULL;
END
$$;

CREATE TRIGGER call_queue_notify_ended AFTER UPDATE OF status ON public.call_queue
  FOR EACH ROW
  WHEN (NEW.status IN ('completed', 'failed', 'canceled')
        AND OLD.status NOT IN ('completed', 'failed', 'canceled'))
  EXECUTE FUNCTION public.enqueue_call_notifications();

-- claim_notifications (worker): due pending notifications, leased; each comes back with its
-- attempt number, the token the delivery must present to record its result.
CREATE OR REPLACE FUNCTION public.claim_notifications(p_limit integer, p_lease_seconds integer DEFAULT 60)
RETURNS TABLE (notification_id uuid, attempt integer)
LANGUAGE sql
SET search_path = ''
AS $$
  UPDATE public.call_notifications n
     SET attempts = n.attempts + 1, lease_until = now() + make_interval(secs => p_lease_seconds)
   WHERE n.id = ANY (ARRAY(
           SELECT d.id FROM public.call_notifications d
            WHERE d.status = 'pending' AND d.next_attempt_at <= now()
              AND (d.lease_until IS NULL OR d.lease_until < now())
            ORDER BY d.next_attempt_at
            LIMIT greatest(p_limit, 0)
              FOR UPDATE SKIP LOCKED))
  RETURNING n.id, n.attempts;
$$;

-- notification_delivery (worker): what to send for one claimed attempt: the URL, the secret
-- and the event body. No row when the attempt is no longer the current one.
CREATE OR REPLACE FUNCTION public.notification_delivery(p_notification_id uuid, p_attempt integer)
RETURNS TABLE (url text, secret text, body jsonb)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
  SELECT e.url, e.secret,
         jsonb_build_object(
           'id', n.id,
           'type', n.event,
           'created', floor(extract(epoch FROM n.created_at))::bigint,
           'data', jsonb_build_object(
             'queue_id', q.id,
             'campaign_id', q.campaign_id,
             'external_id', q.idempotency_key,
             'status', q.status,
             'outcome', coalesce(h.status, q.status),
             'attempts', q.attempts,
             'duration_seconds', h.duration_seconds,
             'cost', h.cost,
             'ended_at', coalesce(h.ended_at, q.completed_at)
           ) || CASE WHEN e.include_transcript
                     THEN jsonb_build_object('transcript', h.transcript)
                     ELSE '{}'::jsonb END)
    FROM public.call_notifications n
    JOIN public.notification_endpoints e ON e.id = n.endpoint_id
    JOIN public.call_queue q ON q.id = n.queue_id
    LEFT JOIN public.call_history h ON h.queue_id = q.id
   WHERE n.id = p_notification_id AND n.attempts = p_attempt AND n.status = 'pending';
$$;

-- record_notification_result (worker): delivered, or another attempt after a backoff of
-- 10 s * 2^(attempt-1), at most 1 h, jittered by +-20 % (times the retry delay scale, as for
-- calls); failed after 15 attempts (about 7 hours). Returns delivered, retry, failed or noop
-- (a stale attempt: a newer one owns the row).
CREATE OR REPLACE FUNCTION public.record_notification_result(
  p_notification_id uuid,
  p_attempt integer,
  p_ok boolean,
  p_http_status integer DEFAULT NULL,
  p_error text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_status text;
  v_delay double precision := least(10 * power(2, greatest(p_attempt, 1) - 1), 3600)
    * (0.8 + random() * 0.4)
    * coalesce(nullif(current_setting('callq.retry_delay_scale', true), '')::double precision,
               (SELECT o.retry_delay_scale FROM public.ops_settings o), 1);
BEGIN
  UPDATE public.call_notifications n
     SET status = CASE WHEN p_ok THEN 'delivered' WHEN p_attempt >= 15 THEN 'failed'
                       ELSE 'pending' END,
         delivered_at = CASE WHEN p_ok THEN now() END,
         next_attempt_at = CASE WHEN p_ok THEN n.next_attempt_at
                                ELSE now() + make_interval(secs => v_delay) END,
         lease_until = NULL,
         last_http_status = p_http_status,
         last_error = CASE WHEN p_ok THEN NULL ELSE left(p_error, 200) END
   WHERE n.id = p_notification_id AND n.attempts = p_attempt AND n.status = 'pending'
  RETURNING n.status INTO v_status;
  RETURN CASE WHEN v_status IS NULL THEN 'noop' WHEN v_status = 'pending' THEN 'retry'
              ELSE v_status END;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges and RLS. Campaign rows are written only through the functions above (status,
-- counts); owners read their own (admins too: a campaign is its user's data, issue 8), the
-- worker reads and writes all.
REVOKE ALL ON public.call_campaigns FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.call_campaigns TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.call_campaigns TO callq_worker;
GRANT SELECT ON public.call_campaigns TO authenticated;
GRANT UPDATE (name, metadata) ON public.call_campaigns TO authenticated;
REVOKE ALL ON public.notification_endpoints, public.call_notifications
  FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.notification_endpoints, public.call_notifications TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.notification_endpoints, public.call_notifications
  TO callq_worker;
-- owners: their endpoints without the secret (switch off, transcript opt-in, delete) and
-- their delivery log, read only
GRANT SELECT (id, user_id, campaign_id, url, include_transcript, is_active, created_at,
              updated_at) ON public.notification_endpoints TO authenticated;
GRANT UPDATE (is_active, include_transcript), DELETE ON public.notification_endpoints TO authenticated;
GRANT SELECT ON public.call_notifications TO authenticated;
REVOKE ALL ON public.call_campaign_progress FROM PUBLIC, anon, authenticated;
GRANT SELECT ON public.call_campaign_progress TO authenticated, service_role, callq_worker;

CREATE POLICY worker_all ON public.call_campaigns FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
CREATE POLICY campaigns_select ON public.call_campaigns FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY campaigns_update_own ON public.call_campaigns FOR UPDATE TO authenticated
  USING (user_id = (SELECT auth.uid())) WITH CHECK (user_id = (SELECT auth.uid()));

CREATE POLICY worker_all ON public.notification_endpoints FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
CREATE POLICY worker_all ON public.call_notifications FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
CREATE POLICY endpoints_select_own ON public.notification_endpoints FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY endpoints_update_own ON public.notification_endpoints FOR UPDATE TO authenticated
  USING (user_id = (SELECT auth.uid())) WITH CHECK (user_id = (SELECT auth.uid()));
CREATE POLICY endpoints_delete_own ON public.notification_endpoints FOR DELETE TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY notifications_select_own ON public.call_notifications FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));

REVOKE ALL ON FUNCTION
  public.schedule_calls_core(uuid, uuid, uuid, jsonb, boolean), public.try_timestamptz(text),
  public.campaign_for_update(uuid, boolean), public.campaign_closed(public.call_campaigns),
  public.campaign_lane(public.call_campaigns),
  public.call_queue_campaign_lane(), public.claim_candidates(integer, timestamptz, uuid[], boolean),
  public.campaign_recall_undialed(uuid, text), public.pause_campaign(uuid),
  public.resume_campaign(uuid), public.cancel_campaign(uuid),
  public.set_campaign_pacing(uuid, integer, integer, timestamptz, timestamptz),
  public.reschedule_call(uuid, timestamptz), public.close_campaigns(),
  public.register_notification_endpoint(uuid, text, uuid, boolean),
  public.rotate_notification_secret(uuid), public.enqueue_call_notifications(),
  public.claim_notifications(integer, integer), public.notification_delivery(uuid, integer),
  public.record_notification_result(uuid, integer, boolean, integer, text),
  public.create_campaign(uuid, uuid, text, text, timestamptz, timestamptz, integer, integer, jsonb),
  public.schedule_calls(uuid, jsonb, boolean)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.create_campaign(uuid, uuid, text, text, timestamptz, timestamptz, integer, integer, jsonb),
  public.schedule_calls(uuid, jsonb, boolean), public.pause_campaign(uuid),
  public.resume_campaign(uuid), public.cancel_campaign(uuid),
  public.set_campaign_pacing(uuid, integer, integer, timestamptz, timestamptz),
  public.reschedule_call(uuid, timestamptz),
  public.register_notification_endpoint(uuid, text, uuid, boolean),
  public.rotate_notification_secret(uuid)
  TO authenticated, service_role, callq_worker;
GRANT EXECUTE ON FUNCTION
  public.campaign_lane(public.call_campaigns), public.claim_candidates(integer, timestamptz, uuid[], boolean),
  public.campaign_recall_undialed(uuid, text), public.close_campaigns(),
  public.claim_notifications(integer, integer), public.notification_delivery(uuid, integer),
  public.record_notification_result(uuid, integer, boolean, integer, text)
  TO service_role, callq_worker;
