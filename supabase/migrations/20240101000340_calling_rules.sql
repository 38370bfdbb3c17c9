-- Calling rules (issue 10): functions, grants and RLS. Tables in 20240101000140.
--
-- Where each rule acts:
--   schedule_calls_core  zone given (CQ021 if unknown) or derived from the number (CQ023 if
--                        none), do-not-call (CQ020), consent (CQ022), for schedule_call and
--                        a campaign's schedule_calls alike
--   claims               a due call outside its window is not claimed: calling_hold moves it to
--                        its next opening (status stays queued, hold_reason set)
--   mark_call_dialing    re-checks everything at the last moment (calling_dial_check): a listed
--                        number or missing consent cancels the call; a closed window or the
--                        attempt cap sends it back to the queue for its next allowed time
--   handle_failed_call   a retry is placed at its next allowed time (calling_next_dial_time)
-- Every rule reads the time from callq_now().

-- ---------------------------------------------------------------------------------------------
-- The clock of every rule: calling_settings.test_now when a test pinned it, else now(). A table,
-- not a session setting: app users cannot write it (a setting could be SET by anyone in their
-- own session), it works on hosted Supabase (no ALTER DATABASE SET), and a test that updates it
-- moves the clock of the worker processes too.
CREATE OR REPLACE FUNCTION public.callq_now() RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN coalesce((SELECT s.test_now FROM public.calling_settings s), now());
END
$$;

-- Re-read the server's zone names (after a PostgreSQL upgrade). Returns how many there are.
CREATE OR REPLACE FUNCTION public.refresh_calling_timezones() RETURNS integer
LANGUAGE sql
SET search_path = ''
AS $$
  INSERT INTO public.calling_timezones (name)
  SELECT DISTINCT n.name FROM pg_catalog.pg_timezone_names n
  ON CONFLICT (name) DO NOTHING;
  SELECT count(*)::int FROM public.calling_timezones;
$$;

-- The zones of a number: the longest prefix of its digits in phone_prefix_zones; NULL if none.
CREATE OR REPLACE FUNCTION public.phone_timezones(p_phone text) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = ''
AS $$
  SELECT z.zones FROM public.phone_prefix_zones z
   WHERE z.prefix = ANY (ARRAY(SELECT left(substr(p_phone, 2), n) FROM generate_series(1, 15) n))
   ORDER BY length(z.prefix) DESC
   LIMIT 1;
$$;

-- A row inserted without zones (not through schedule_call) gets the zones of its number.
CREATE OR REPLACE FUNCTION public.call_queue_timezones() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  IF NEW.recipient_timezones IS NULL THEN
    NEW.recipient_timezones := public.phone_timezones(NEW.recipient_phone);
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER call_queue_timezones BEFORE INSERT ON public.call_queue
  FOR EACH ROW WHEN (NEW.recipient_timezones IS NULL)
  EXECUTE FUNCTION public.call_queue_timezones();

-- Every (call, zone, active window rule) that applies to the call: the one home of "which rules
-- apply" (default rules; the caller's live plan's; the caller's; the template's).
CREATE OR REPLACE VIEW public.call_queue_windows WITH (security_invoker = true) AS
SELECT c.id AS queue_id, z.zone, w.id AS window_id, w.days, w.start_time, w.end_time,
       w.excluded_dates
  FROM public.call_queue c
 CROSS JOIN LATERAL unnest(c.recipient_timezones) AS z(zone)
  JOIN public.calling_windows w
    ON w.is_active
   AND CASE w.scope
         WHEN 'default' THEN true
         WHEN 'user' THEN w.user_id = c.user_id
         WHEN 'template' THEN w.template_id = c.template_id
         ELSE EXISTS (SELECT 1 FROM public.user_subscriptions s
                       WHERE s.user_id = c.user_id AND s.plan_id = w.plan_id
                         AND s.status IN ('active', 'trialing'))
       END;

-- The (call, moment) pairs, of p_ids x p_times, at which some applicable rule is closed in some
-- zone of the call: the one home of "is a window open". Empty = every pair may be dialed.
CREATE OR REPLACE FUNCTION public.calling_closed_pairs(p_ids uuid[], p_times timestamptz[])
RETURNS TABLE (queue_id uuid, at timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = ''
-- tiny sets with huge row estimates (generate_series, unnest): JIT would cost seconds
SET jit = off
-- one shape for any input (primary-key look-ups of p_ids): planning it at every claim, as a
-- custom plan does, cost twice the check itself
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  SELECT DISTINCT v.queue_id, t.at
    FROM public.call_queue_windows v
   CROSS JOIN unnest(p_times) AS t(at)
   CROSS JOIN LATERAL (SELECT t.at AT TIME ZONE v.zone AS l) loc
   WHERE v.queue_id = ANY (p_ids)
     AND NOT (extract(isodow FROM loc.l)::int = ANY (v.days)
              AND loc.l::time >= v.start_time AND loc.l::time < v.end_time
              AND NOT (loc.l::date = ANY (v.excluded_dates)));
END
$$;

-- The first moment >= p_from at which every applicable rule is open in every zone of the call;
-- NULL when there is none within 8 days (rules that never overlap, or dates excluded for longer).
-- Candidates: p_from and each rule's start on each local day, each verified. A start near a
-- daylight-saving change may be skipped (spring) or happen twice (autumn), and PostgreSQL maps it
-- to the later instant: there, the 2 h before are tried too, in 15-minute steps (every zone's
-- offsets and changes fall on quarter hours).
CREATE OR REPLACE FUNCTION public.calling_next_opening(p_queue_id uuid, p_from timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = ''
-- tiny sets with huge row estimates (generate_series, unnest): JIT would cost seconds
SET jit = off
AS $$
DECLARE
  v_candidates timestamptz[];
BEGIN
  SELECT array_agg(DISTINCT x.t ORDER BY x.t) INTO v_candidates
    FROM (SELECT p_from AS t
          UNION ALL
          SELECT s.t - make_interval(mins => 15 * k.k)
            FROM (SELECT (d.d::date + v.start_time) AT TIME ZONE v.zone AS t, v.zone
                    FROM public.call_queue_windows v
                   CROSS JOIN LATERAL generate_series((p_from AT TIME ZONE v.zone)::date,
                                                      (p_from AT TIME ZONE v.zone)::date + 8,
                                                      interval '1 day') AS d(d)
                   WHERE v.queue_id = p_queue_id) s
           CROSS JOIN LATERAL generate_series(
             0, CASE WHEN (s.t AT TIME ZONE s.zone) - ((s.t - interval '2 hours') AT TIME ZONE s.zone)
                          = interval '2 hours' THEN 0 ELSE 8 END) AS k(k)) x
   WHERE x.t >= p_from;
  RETURN (SELECT min(c.t) FROM unnest(v_candidates) AS c(t)
           WHERE c.t NOT IN (SELECT cp.at
                               FROM public.calling_closed_pairs(ARRAY[p_queue_id], v_candidates) cp));
END
$$;

-- Dial attempts allowed to one number per rolling 24 h for a tenant: its live plan's setting,
-- else calling_settings.default_attempts_per_24h.
CREATE OR REPLACE FUNCTION public.calling_attempt_cap(p_user_id uuid) RETURNS integer
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN coalesce(
    (SELECT pl.contact_attempts_per_24h
       FROM public.user_subscriptions s
       JOIN public.subscription_plans pl ON pl.id = s.plan_id
      WHERE s.user_id = p_user_id AND s.status IN ('active', 'trialing')
      ORDER BY s.current_period_end DESC
      LIMIT 1),
    (SELECT st.default_attempts_per_24h FROM public.calling_settings st));
END
$$;

-- NULL when one more attempt at p_at stays within the cap; else the moment the cap allows it
-- (the cap-th most recent attempt in the 24 h before p_at, plus 24 h).
CREATE OR REPLACE FUNCTION public.calling_cap_release(p_user_id uuid, p_phone text,
                                                      p_at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN (SELECT a.attempted_at + interval '24 hours'
            FROM public.contact_attempts a
           WHERE a.user_id = p_user_id AND a.phone = p_phone
             AND a.attempted_at > p_at - interval '24 hours'
           ORDER BY a.attempted_at DESC
          OFFSET public.calling_attempt_cap(p_user_id) - 1
           LIMIT 1);
END
$$;

-- When a call may next be dialed, at or after p_from: after the attempt cap allows it, then at
-- the next opening of its windows. reason: what moved it ('attempt_cap', 'calling_window',
-- 'no_calling_window' when no opening within 8 days: then it is looked at again a day later),
-- NULL when p_from is fine.
CREATE OR REPLACE FUNCTION public.calling_next_dial_time(
  p_queue_id uuid, p_from timestamptz, OUT at timestamptz, OUT reason text)
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
  v_q record;
  v_cap timestamptz;
  v_open timestamptz;
BEGIN
  SELECT q.user_id, q.recipient_phone INTO v_q FROM public.call_queue q WHERE q.id = p_queue_id;
  at := p_from;
  v_cap := public.calling_cap_release(v_q.user_id, v_q.recipient_phone, p_from);
  IF v_cap > at THEN
    at := v_cap;
    reason := 'attempt_cap';
  END IF;
  v_open := public.calling_next_opening(p_queue_id, at);
  IF v_open IS NULL THEN
    at := at + interval '1 day';
    reason := 'no_calling_window';
  ELSIF v_open > at THEN
    at := v_open;
    reason := coalesce(reason, 'calling_window');
  END IF;
END
$$;

-- The claims' window check, for calls the caller has locked: those outside their window are
-- moved to their next allowed time (status stays 'queued', hold_reason says why) and returned;
-- NULL when all may be dialed now (the common case: one query).
CREATE OR REPLACE FUNCTION public.calling_hold(p_ids uuid[], p_now timestamptz) RETURNS uuid[]
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_closed uuid[];
  v_id uuid;
  v_next record;
BEGIN
  SELECT array_agg(DISTINCT c.queue_id) INTO v_closed
    FROM public.calling_closed_pairs(p_ids, ARRAY[p_now]) c;
  IF v_closed IS NULL THEN
    RETURN NULL;
  END IF;
  FOREACH v_id IN ARRAY v_closed LOOP
    SELECT * INTO v_next FROM public.calling_next_dial_time(v_id, p_now);
    UPDATE public.call_queue q
       SET scheduled_time = v_next.at, hold_reason = coalesce(v_next.reason, 'calling_window')
     WHERE q.id = v_id;
    PERFORM public.record_call_event(v_id, 'held', jsonb_build_object(
      'rule', coalesce(v_next.reason, 'calling_window'), 'until', v_next.at));
  END LOOP;
  RETURN v_closed;
END
$$;

-- The claims' calls (claim_due_calls, claim_and_assign_calls): up to p_limit calls from
-- claimable_calls (fair order, plan concurrency and subscription; locked, each with the counter
-- stripe its claim must stamp on it), less those outside their calling window, which
-- calling_hold moves to their next opening. After a hold, a few more rounds (of at least 50
-- rows; open rows beyond the batch stay queued, their locks go at commit) fill the batch.
CREATE OR REPLACE FUNCTION public.claim_open_calls(p_limit integer, p_now timestamptz,
                                                   OUT ids uuid[], OUT stripes smallint[])
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_c record;
  v_held uuid[];
BEGIN
  ids := '{}';
  stripes := '{}';
  FOR v_round IN 1..4 LOOP
    -- (paced campaigns' calls come through their lanes, inside claimable_calls)
    SELECT * INTO v_c FROM public.claimable_calls(
      CASE WHEN v_round = 1 THEN greatest(p_limit, 0)
           ELSE greatest(p_limit - cardinality(ids), 50) END, ids, stripes);
    EXIT WHEN coalesce(cardinality(v_c.ids), 0) = 0;
    v_held := public.calling_hold(v_c.ids, p_now);
    IF v_held IS NULL AND cardinality(v_c.ids) <= p_limit - cardinality(ids) THEN
      ids := ids || v_c.ids;  -- the common case
      stripes := stripes || v_c.stripes;
      RETURN;
    END IF;
    SELECT ids || coalesce(array_agg(u.id ORDER BY u.n), '{}'),
           stripes || coalesce(array_agg(u.s ORDER BY u.n), '{}')
      INTO ids, stripes
      FROM (SELECT x.id, x.s, x.n FROM unnest(v_c.ids, v_c.stripes) WITH ORDINALITY AS x(id, s, n)
             WHERE v_held IS NULL OR NOT (x.id = ANY (v_held))
             ORDER BY x.n
             LIMIT greatest(p_limit - cardinality(ids), 0)) u;
    EXIT WHEN v_held IS NULL OR cardinality(ids) >= p_limit;
  END LOOP;
END
$$;

-- Is the number on the tenant's or the global do-not-call list at p_at?
CREATE OR REPLACE FUNCTION public.do_not_call_listed(p_user_id uuid, p_phone text,
                                                     p_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM public.do_not_call d
                  WHERE d.phone = p_phone AND (d.user_id IS NULL OR d.user_id = p_user_id)
                    AND (d.expires_at IS NULL OR d.expires_at > p_at));
END
$$;

-- Does a call of this tenant and template to this number need consent it does not have at p_at?
CREATE OR REPLACE FUNCTION public.consent_missing(p_user_id uuid, p_template_id uuid,
                                                  p_phone text, p_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN (EXISTS (SELECT 1 FROM public.call_templates t
                   WHERE t.id = p_template_id AND t.requires_consent)
          OR EXISTS (SELECT 1 FROM public.user_subscriptions s
                       JOIN public.subscription_plans pl ON pl.id = s.plan_id
                      WHERE s.user_id = p_user_id AND s.status IN ('active', 'trialing')
                        AND pl.requires_consent))
     AND NOT EXISTS (SELECT 1 FROM public.call_consents c
                      WHERE c.user_id = p_user_id AND c.phone = p_phone
                        AND c.granted_at <= p_at
                        AND (c.revoked_at IS NULL OR c.revoked_at > p_at));
END
$$;

-- The dial gate's rules, at p_now, for a call whose row the caller has locked. verdict NULL: dial.
-- 'do_not_call' / 'consent_missing': cancel. 'calling_window' / 'attempt_cap' /
-- 'no_calling_window': back to the queue until not_before.
CREATE OR REPLACE FUNCTION public.calling_dial_check(
  p_queue_id uuid, p_now timestamptz, OUT verdict text, OUT not_before timestamptz)
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_q record;
  v_next record;
BEGIN
  SELECT q.user_id, q.template_id, q.recipient_phone INTO v_q
    FROM public.call_queue q WHERE q.id = p_queue_id;
  IF public.do_not_call_listed(v_q.user_id, v_q.recipient_phone, p_now) THEN
    verdict := 'do_not_call';
    RETURN;
  END IF;
  IF public.consent_missing(v_q.user_id, v_q.template_id, v_q.recipient_phone, p_now) THEN
    verdict := 'consent_missing';
    RETURN;
  END IF;
  -- attempts to one contact are counted one dial gate at a time (class 10 = calling rules)
  PERFORM pg_advisory_xact_lock(10, hashtext(v_q.user_id::text || v_q.recipient_phone));
  IF EXISTS (SELECT 1 FROM public.calling_closed_pairs(ARRAY[p_queue_id], ARRAY[p_now]))
     OR public.calling_cap_release(v_q.user_id, v_q.recipient_phone, p_now) IS NOT NULL THEN
    SELECT * INTO v_next FROM public.calling_next_dial_time(p_queue_id, p_now);
    verdict := coalesce(v_next.reason, 'calling_window');
    not_before := v_next.at;
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- For apps. CQ005 unless the number is E.164.
CREATE OR REPLACE FUNCTION public.calling_require_e164(p_phone text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
  IF p_phone IS NULL OR p_phone !~ '^\+[1-9][0-9]{6,14}$' THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ005',
      MESSAGE = 'invalid_phone: phone must be E.164 (+ then 7 to 15 digits)';
  END IF;
END
$$;

-- Whose consents an app call acts on: the app user's own (p_user_id, if given, must be them),
-- or p_user_id for service_role and the worker. CQ008 otherwise.
CREATE OR REPLACE FUNCTION public.calling_consent_user(p_user_id uuid) RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  IF coalesce(auth.uid(), p_user_id) IS NULL
     OR (auth.uid() IS NOT NULL AND p_user_id IS NOT NULL AND p_user_id <> auth.uid()) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ008',
      MESSAGE = 'not_authorized: consents are the calling user''s own';
  END IF;
  RETURN coalesce(auth.uid(), p_user_id);
END
$$;

-- add_do_not_call: as an app user, onto the caller's own list; as service_role (no
-- auth.uid()), onto the global list. Idempotent (a second call updates the reason). Returns
-- the row id. CQ005 for a number that is not E.164.
CREATE OR REPLACE FUNCTION public.add_do_not_call(p_phone text, p_reason text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_id uuid;
BEGIN
  PERFORM public.calling_require_e164(p_phone);
  IF p_reason IS NOT NULL AND length(p_reason) > 500 THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ024', MESSAGE = 'invalid_reason: at most 500 characters';
  END IF;
  INSERT INTO public.do_not_call AS d (phone, user_id, reason)
  VALUES (p_phone, auth.uid(), p_reason)
  ON CONFLICT (phone, user_id) DO UPDATE
     SET reason = coalesce(EXCLUDED.reason, d.reason), expires_at = NULL
  RETURNING d.id INTO v_id;
  RETURN v_id;
END
$$;

-- Record that a number agreed to be called by the caller (an app user; or service_role acting
-- for p_user_id). Returns the consent id.
CREATE OR REPLACE FUNCTION public.grant_call_consent(p_phone text, p_source text,
                                                     p_user_id uuid DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_user uuid := public.calling_consent_user(p_user_id);
  v_id uuid;
BEGIN
  PERFORM public.calling_require_e164(p_phone);
  IF p_source IS NULL OR length(btrim(p_source)) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ025', MESSAGE = 'invalid_consent_source: 1..200 characters';
  END IF;
  INSERT INTO public.call_consents (user_id, phone, source, granted_at)
  VALUES (v_user, p_phone, btrim(p_source), public.callq_now())
  RETURNING id INTO v_id;
  RETURN v_id;
END
$$;

-- Revoke the caller's active consents for a number. Returns how many were revoked.
CREATE OR REPLACE FUNCTION public.revoke_call_consent(p_phone text, p_user_id uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_user uuid := public.calling_consent_user(p_user_id);
  v_now timestamptz := public.callq_now();
  v_n integer;
BEGIN
  UPDATE public.call_consents c
     SET revoked_at = greatest(v_now, c.granted_at)
   WHERE c.user_id = v_user AND c.phone = p_phone
     AND (c.revoked_at IS NULL OR c.revoked_at > v_now);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges. Nothing to PUBLIC/anon. Operators change rules and settings as the owner or
-- service_role (or as an app admin through the API, for windows and the global list).
REVOKE ALL ON public.calling_settings, public.calling_timezones, public.phone_prefix_zones,
  public.calling_windows, public.do_not_call, public.call_consents, public.contact_attempts,
  public.call_queue_windows
  FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.calling_settings, public.calling_timezones, public.phone_prefix_zones,
  public.calling_windows, public.do_not_call, public.call_consents, public.contact_attempts
  TO service_role;
GRANT SELECT ON public.call_queue_windows TO service_role, callq_worker;
GRANT SELECT ON public.calling_settings, public.calling_timezones, public.phone_prefix_zones,
  public.calling_windows TO callq_worker, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.do_not_call, public.call_consents,
  public.contact_attempts TO callq_worker;
-- App users write only the columns a rule needs: never an id, and never a row's owner or scope
-- after insert (the policies below keep every row the user's own, or an admin's).
GRANT INSERT (scope, plan_id, user_id, template_id, days, start_time, end_time, excluded_dates,
              description, is_active),
      UPDATE (days, start_time, end_time, excluded_dates, description, is_active),
      DELETE ON public.calling_windows TO authenticated;
GRANT SELECT, INSERT (phone, user_id, reason, expires_at), UPDATE (reason, expires_at), DELETE
  ON public.do_not_call TO authenticated;
GRANT SELECT, INSERT (user_id, phone, source, granted_at, revoked_at), UPDATE (revoked_at)
  ON public.call_consents TO authenticated;

DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['calling_settings', 'calling_timezones', 'phone_prefix_zones',
    'calling_windows', 'do_not_call', 'call_consents', 'contact_attempts']
  LOOP
    EXECUTE format('CREATE POLICY worker_all ON public.%I FOR ALL TO callq_worker '
                   'USING (true) WITH CHECK (true)', t);
  END LOOP;
END
$$;

-- Reference data and settings: readable by every signed-in user (nothing secret), written by
-- the owner / service_role only.
CREATE POLICY settings_select ON public.calling_settings FOR SELECT TO authenticated
  USING (true);
CREATE POLICY timezones_select ON public.calling_timezones FOR SELECT TO authenticated
  USING (true);
CREATE POLICY prefix_zones_select ON public.phone_prefix_zones FOR SELECT TO authenticated
  USING (true);
-- Windows: everyone reads the default and plan rules and their own; admins write any rule;
-- a user may add stricter rules for themselves and their own templates (rules only restrict).
CREATE POLICY windows_select ON public.calling_windows FOR SELECT TO authenticated
  USING (scope IN ('default', 'plan') OR user_id = (SELECT auth.uid())
         OR template_id IN (SELECT t.id FROM public.call_templates t
                             WHERE t.created_by = (SELECT auth.uid()))
         OR (SELECT public.is_admin()));
CREATE POLICY windows_admin ON public.calling_windows FOR ALL TO authenticated
  USING ((SELECT public.is_admin())) WITH CHECK ((SELECT public.is_admin()));
CREATE POLICY windows_own ON public.calling_windows FOR ALL TO authenticated
  USING ((scope = 'user' AND user_id = (SELECT auth.uid()))
         OR (scope = 'template' AND template_id IN (
               SELECT t.id FROM public.call_templates t WHERE t.created_by = (SELECT auth.uid()))))
  WITH CHECK ((scope = 'user' AND user_id = (SELECT auth.uid()))
              OR (scope = 'template' AND template_id IN (
                    SELECT t.id FROM public.call_templates t
                     WHERE t.created_by = (SELECT auth.uid()))));
-- Do-not-call: a tenant's own rows; the global list (user_id NULL) by admins.
CREATE POLICY dnc_own ON public.do_not_call FOR ALL TO authenticated
  USING (user_id = (SELECT auth.uid())) WITH CHECK (user_id = (SELECT auth.uid()));
CREATE POLICY dnc_global_admin ON public.do_not_call FOR ALL TO authenticated
  USING (user_id IS NULL AND (SELECT public.is_admin()))
  WITH CHECK (user_id IS NULL AND (SELECT public.is_admin()));
-- Consents: a tenant's own rows (read, record, revoke); never deleted through the API.
CREATE POLICY consents_select_own ON public.call_consents FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY consents_insert_own ON public.call_consents FOR INSERT TO authenticated
  WITH CHECK (user_id = (SELECT auth.uid()));
CREATE POLICY consents_update_own ON public.call_consents FOR UPDATE TO authenticated
  USING (user_id = (SELECT auth.uid())) WITH CHECK (user_id = (SELECT auth.uid()));

REVOKE ALL ON FUNCTION
  public.callq_now(), public.refresh_calling_timezones(), public.phone_timezones(text),
  public.call_queue_timezones(), public.calling_closed_pairs(uuid[], timestamptz[]),
  public.calling_next_opening(uuid, timestamptz), public.calling_attempt_cap(uuid),
  public.calling_cap_release(uuid, text, timestamptz),
  public.calling_next_dial_time(uuid, timestamptz), public.calling_hold(uuid[], timestamptz),
  public.claim_open_calls(integer, timestamptz),
  public.do_not_call_listed(uuid, text, timestamptz),
  public.consent_missing(uuid, uuid, text, timestamptz),
  public.calling_dial_check(uuid, timestamptz), public.add_do_not_call(text, text),
  public.grant_call_consent(text, text, uuid), public.revoke_call_consent(text, uuid),
  public.calling_require_e164(text), public.calling_consent_user(uuid)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.callq_now(), public.phone_timezones(text), public.add_do_not_call(text, text),
  public.grant_call_consent(text, text, uuid), public.revoke_call_consent(text, uuid),
  public.calling_require_e164(text), public.calling_consent_user(uuid)
  TO authenticated, service_role, callq_worker;
GRANT EXECUTE ON FUNCTION public.refresh_calling_timezones() TO service_role;
GRANT EXECUTE ON FUNCTION
  public.calling_closed_pairs(uuid[], timestamptz[]),
  public.calling_next_opening(uuid, timestamptz), public.calling_attempt_cap(uuid),
  public.calling_cap_release(uuid, text, timestamptz),
  public.calling_next_dial_time(uuid, timestamptz), public.calling_hold(uuid[], timestamptz),
  public.claim_open_calls(integer, timestamptz),
  public.do_not_call_listed(uuid, text, timestamptz),
  public.consent_missing(uuid, uuid, text, timestamptz),
  public.calling_dial_check(uuid, timestamptz)
  TO service_role, callq_worker;
