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
CREATE OR REPLACE FUNCTION public.campaign_for_update(p_campaign_id uuid)
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
  RETURN v_c;
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
    RAISE EXCEPTION USING ERRCODE = 'CQ043',
      MESSAGE = 'campaign_closed: campaign ' || p_campaign_id || ' is ' || v_c.status;
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
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id);
BEGIN
  IF v_c.status IN ('completed', 'canceled') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ043',
      MESSAGE = 'campaign_closed: campaign ' || p_campaign_id || ' is ' || v_c.status;
  END IF;
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
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id);
  v_lane boolean;
BEGIN
  IF v_c.status IN ('completed', 'canceled') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ043',
      MESSAGE = 'campaign_closed: campaign ' || p_campaign_id || ' is ' || v_c.status;
  END IF;
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
    RAISE EXCEPTION USING ERRCODE = 'CQ043',
      MESSAGE = 'campaign_closed: campaign ' || p_campaign_id || ' is ' || v_c.status;
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
  v_c public.call_campaigns := public.campaign_for_update(p_campaign_id);
  v_lane boolean;
BEGIN
  IF v_c.status IN ('completed', 'canceled') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ043',
      MESSAGE = 'campaign_closed: campaign ' || p_campaign_id || ' is ' || v_c.status;
  END IF;
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
                          AND q.status IN ('queued', 'claimed', 'assigned', 'dialing', 'in_progress'))
       FOR NO KEY UPDATE OF c SKIP LOCKED
  )
  UPDATE public.call_campaigns c SET status = 'completed', ended_at = now()
    FROM done WHERE c.id = done.id;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges and RLS. Campaign rows are written only through the functions above (status,
-- counts); owners read their own, admins read all, the worker reads and writes all.
REVOKE ALL ON public.call_campaigns FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.call_campaigns TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.call_campaigns TO callq_worker;
GRANT SELECT ON public.call_campaigns TO authenticated;
GRANT UPDATE (name, metadata) ON public.call_campaigns TO authenticated;

CREATE POLICY worker_all ON public.call_campaigns FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
-- one policy, not two OR-ed ones: a campaign list is small, and the owner's filter still
-- matches call_campaigns_user_idx when the app adds ?user_id=eq.<uid>
CREATE POLICY campaigns_select ON public.call_campaigns FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()) OR (SELECT public.is_admin()));
CREATE POLICY campaigns_update_own ON public.call_campaigns FOR UPDATE TO authenticated
  USING (user_id = (SELECT auth.uid())) WITH CHECK (user_id = (SELECT auth.uid()));

REVOKE ALL ON FUNCTION
  public.schedule_calls_core(uuid, uuid, uuid, jsonb, boolean), public.try_timestamptz(text),
  public.campaign_for_update(uuid), public.campaign_lane(public.call_campaigns),
  public.call_queue_campaign_lane(), public.claim_candidates(integer, timestamptz, uuid[]),
  public.campaign_recall_undialed(uuid, text), public.pause_campaign(uuid),
  public.resume_campaign(uuid), public.cancel_campaign(uuid),
  public.set_campaign_pacing(uuid, integer, integer, timestamptz, timestamptz),
  public.reschedule_call(uuid, timestamptz), public.close_campaigns(),
  public.create_campaign(uuid, uuid, text, text, timestamptz, timestamptz, integer, integer, jsonb),
  public.schedule_calls(uuid, jsonb, boolean)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.create_campaign(uuid, uuid, text, text, timestamptz, timestamptz, integer, integer, jsonb),
  public.schedule_calls(uuid, jsonb, boolean), public.pause_campaign(uuid),
  public.resume_campaign(uuid), public.cancel_campaign(uuid),
  public.set_campaign_pacing(uuid, integer, integer, timestamptz, timestamptz),
  public.reschedule_call(uuid, timestamptz)
  TO authenticated, service_role, callq_worker;
GRANT EXECUTE ON FUNCTION
  public.campaign_lane(public.call_campaigns), public.claim_candidates(integer, timestamptz, uuid[]),
  public.campaign_recall_undialed(uuid, text), public.close_campaigns()
  TO service_role, callq_worker;
