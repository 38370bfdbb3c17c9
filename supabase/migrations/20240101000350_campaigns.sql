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
  IF v_c.status IN ('completed', 'canceled') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ043',
      MESSAGE = 'campaign_closed: campaign ' || p_campaign_id || ' is ' || v_c.status;
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
-- Privileges and RLS. Campaign rows are written only through the functions above (status,
-- counts); owners read their own (admins too: a campaign is its user's data, issue 8), the
-- worker reads and writes all.
REVOKE ALL ON public.call_campaigns FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.call_campaigns TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.call_campaigns TO callq_worker;
GRANT SELECT ON public.call_campaigns TO authenticated;
GRANT UPDATE (name, metadata) ON public.call_campaigns TO authenticated;

CREATE POLICY worker_all ON public.call_campaigns FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
CREATE POLICY campaigns_select ON public.call_campaigns FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY campaigns_update_own ON public.call_campaigns FOR UPDATE TO authenticated
  USING (user_id = (SELECT auth.uid())) WITH CHECK (user_id = (SELECT auth.uid()));

REVOKE ALL ON FUNCTION
  public.schedule_calls_core(uuid, uuid, uuid, jsonb, boolean), public.try_timestamptz(text),
  public.campaign_for_update(uuid),
  public.create_campaign(uuid, uuid, text, text, timestamptz, timestamptz, integer, integer, jsonb),
  public.schedule_calls(uuid, jsonb, boolean)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.create_campaign(uuid, uuid, text, text, timestamptz, timestamptz, integer, integer, jsonb),
  public.schedule_calls(uuid, jsonb, boolean)
  TO authenticated, service_role, callq_worker;
