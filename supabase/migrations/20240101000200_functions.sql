-- The queue's functions. Ordering convention everywhere: lower priority number first (1 = most
-- urgent), then earlier scheduled_time, then earlier created_at.
--
-- Lock order (to stay deadlock free): call_queue row -> call_assignments row -> provider slot
-- -> provider_availability row. Slots are taken only with SKIP LOCKED (a claim never waits on a
-- slot) and freed by assignment id; no claim writes provider_availability.
--
-- Only schedule_call (called by app users) and is_admin (used by policies) are SECURITY
-- DEFINER; the worker functions run with the caller's rights (service_role or callq_worker,
-- which hold the table privileges and RLS policies given in 20240101000300).

-- Live assignment states (hold a provider slot): public.live_assignment_states().

-- The providers a call may go to now: active, not offline, circuit closed (the one home of that
-- rule; a view, so the planner inlines it). Free slots are provider_slots' business.
CREATE VIEW public.eligible_providers WITH (security_invoker = true) AS
  SELECT p.id AS provider_id, p.priority, p.max_concurrent_calls, p.capabilities, pa.status
    FROM public.call_service_providers p
    JOIN public.provider_availability pa ON pa.provider_id = p.id
   WHERE p.is_active
     AND pa.status <> 'offline'
     AND (pa.circuit_open_until IS NULL OR pa.circuit_open_until <= now());

-- A provider still carries calls beyond a lowered capacity (retired slots): no slot of it may be
-- taken until they end (each freed slot goes to one of them; see free_provider_slot). One probe
-- of an index that is almost always empty.
CREATE OR REPLACE FUNCTION public.provider_over_capacity(p_provider_id uuid) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM public.provider_slots r
                  WHERE r.provider_id = p_provider_id AND r.retired);
END
$$;

-- Live capacity figures per provider, counted from its slots (provider_availability's
-- current_calls and available_slots are these as of the last reconcile_provider_slots):
-- current_calls = taken slots, available_slots = slots a claim may take now.
CREATE VIEW public.provider_load WITH (security_invoker = true) AS
  SELECT p.id AS provider_id, p.max_concurrent_calls,
         (SELECT count(*) FROM public.provider_slots s
           WHERE s.provider_id = p.id AND s.assignment_id IS NOT NULL)::integer AS current_calls,
         (SELECT count(*) FROM public.provider_slots s
           WHERE s.provider_id = p.id AND s.assignment_id IS NULL
             AND NOT public.provider_over_capacity(p.id))::integer AS available_slots
    FROM public.call_service_providers p;

-- Each provider's statistics as of now: its row's figures plus the endings not yet folded in
-- (provider_call_tallies).
CREATE VIEW public.provider_stats WITH (security_invoker = true) AS
  SELECT pa.provider_id,
         pa.total_calls + coalesce(t.total, 0) AS total_calls,
         pa.successful_calls + coalesce(t.successful, 0) AS successful_calls,
         pa.failed_calls + coalesce(t.failed, 0) AS failed_calls
    FROM public.provider_availability pa
    LEFT JOIN (SELECT x.provider_id, count(*) AS total, sum(x.successful_calls) AS successful,
                      sum(x.failed_calls) AS failed
                 FROM public.provider_call_tallies x GROUP BY x.provider_id) t
      ON t.provider_id = pa.provider_id;

-- tally_provider_call: one attempt ended on the provider (p_successful / p_failed 0 or 1; a
-- canceled one is neither), counted in its statistics without waiting: on its row when nobody
-- holds it, else as a row of provider_call_tallies.
CREATE OR REPLACE FUNCTION public.tally_provider_call(
  p_provider_id uuid, p_successful integer, p_failed integer
) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  UPDATE public.provider_availability pa
     SET total_calls = pa.total_calls + 1,
         successful_calls = pa.successful_calls + p_successful,
         failed_calls = pa.failed_calls + p_failed
   WHERE pa.id = (SELECT x.id FROM public.provider_availability x
                   WHERE x.provider_id = p_provider_id
                     FOR NO KEY UPDATE SKIP LOCKED);
  IF NOT FOUND THEN
    INSERT INTO public.provider_call_tallies (provider_id, successful_calls, failed_calls)
    VALUES (p_provider_id, p_successful, p_failed);
  END IF;
END
$$;

-- Give back the slot an assignment holds (nothing when it holds none): free again, at the back
-- of the rotation. A retired slot (beyond a lowered capacity) is deleted instead; and while the
-- provider still carries such calls, a freed slot goes to one of them (its retired slot is
-- deleted), so no slot is free before the calls in flight fit the new capacity.
-- (PL/pgSQL rather than SQL here and in take_provider_slot and get_best_available_provider: a
-- SQL function that is not inlined is planned again at every call; PL/pgSQL keeps its plans.)
CREATE OR REPLACE FUNCTION public.free_provider_slot(p_assignment_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_slot record;
  v_moved uuid;
BEGIN
  -- The slot, locked, in its latest version (a capacity change may be retiring it or moving its
  -- call into another slot right now: a second look, in a new snapshot, finds the moved one).
  FOR v_try IN 1..2 LOOP
    SELECT s.provider_id, s.slot_no, s.retired INTO v_slot
      FROM public.provider_slots s WHERE s.assignment_id = p_assignment_id
       FOR UPDATE;
    EXIT WHEN FOUND;
  END LOOP;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_slot.retired THEN
    DELETE FROM public.provider_slots s
     WHERE s.provider_id = v_slot.provider_id AND s.slot_no = v_slot.slot_no;
    RETURN;
  END IF;
  WITH r AS (
    SELECT x.slot_no FROM public.provider_slots x
     WHERE x.provider_id = v_slot.provider_id AND x.retired
     ORDER BY x.slot_no DESC
     LIMIT 1
       FOR UPDATE SKIP LOCKED
  )
  DELETE FROM public.provider_slots s USING r
   WHERE s.provider_id = v_slot.provider_id AND s.slot_no = r.slot_no
  RETURNING s.assignment_id INTO v_moved;
  UPDATE public.provider_slots s
     SET assignment_id = v_moved,
         freed_at = CASE WHEN v_moved IS NULL THEN clock_timestamp() ELSE s.freed_at END
   WHERE s.provider_id = v_slot.provider_id AND s.slot_no = v_slot.slot_no;
END
$$;

-- TRUNCATE of the assignments (tests, benchmarks, a reset) frees every slot with them.
CREATE OR REPLACE FUNCTION public.free_all_provider_slots() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  DELETE FROM public.provider_slots s WHERE s.retired;
  UPDATE public.provider_slots s SET assignment_id = NULL, freed_at = clock_timestamp()
   WHERE s.assignment_id IS NOT NULL;
  RETURN NULL;
END
$$;
CREATE TRIGGER call_assignments_truncate_frees_slots AFTER TRUNCATE ON public.call_assignments
  FOR EACH STATEMENT EXECUTE FUNCTION public.free_all_provider_slots();

-- Take the free slot of a provider freed longest ago (SKIP LOCKED: never waits) for an
-- assignment; no row when the provider has none free. The caller inserts the assignment with
-- this id and the slot's caller_id in the same transaction.
CREATE OR REPLACE FUNCTION public.take_provider_slot(p_provider_id uuid, p_assignment_id uuid)
RETURNS TABLE (caller_id text)
LANGUAGE plpgsql
SET search_path = ''
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  UPDATE public.provider_slots s SET assignment_id = p_assignment_id
    FROM (SELECT f.slot_no FROM public.provider_slots f
           WHERE f.provider_id = p_provider_id AND f.assignment_id IS NULL
             AND NOT public.provider_over_capacity(p_provider_id)
           ORDER BY f.freed_at, f.slot_no
           LIMIT 1
             FOR UPDATE SKIP LOCKED) f
   WHERE s.provider_id = p_provider_id AND s.slot_no = f.slot_no
  RETURNING s.caller_id;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- schedule_calls_core: the one home of scheduling's checks. schedule_call (one row) and
-- schedule_calls (a campaign's batch) both call it; app roles cannot call it directly.
--
-- p_calls is a JSON array of objects with the keys name, phone, email, variables, metadata,
-- scheduled_time, priority, external_id (the idempotency key), template_id (default
-- p_template_id) and timezone (the recipient's IANA zone; default: the number's zones, calling
-- rules 20240101000340). Every row is validated in one set-based statement, the valid rows are
-- inserted with one INSERT ... SELECT, and one row per input element comes back:
-- (idx 1-based, queue_id, sqlstate, message, existing). existing is true when the external id
-- was already queued for this user and campaign (or earlier in the batch): the first id comes
-- back and nothing is queued twice. One NOTIFY per batch.
--
-- HOW TO ADD A CHECK: add one branch to the "violations" CTE, in the block marked
-- "ADD CHECKS HERE":
--     UNION ALL
--     SELECT r.idx, <rank>, 'CQxxx', 'word: readable text' FROM rows r WHERE <rule broken>
-- rows has one row per input element with the parsed fields (see the rows CTE); join what you
-- need (set-based: one join for the batch, never a query per row). A row reports its
-- lowest-ranked violation, and schedule_call raises exactly that one, so the rank is the
-- precedence. The plan's call limit is rank 300: rows with a violation ranked below 300 never
-- count against it, rows ranked above 300 report CQ003 instead once the allowance is used up
-- (as a single schedule_call would), and only rows without any violation use the allowance, in
-- input order. Messages never contain a phone number, a name or a secret.
--   Ranks taken: 10 CQ040 malformed row, 200 CQ002, 250 CQ030, 300 CQ003, 400 CQ004, 500 CQ005,
--   600 CQ006, 700 CQ007, 900/910 CQ009, 1000 CQ010, 1100 CQ041,
--   1150 CQ018/CQ019 (input limits, public.call_input_violation), 1200 CQ021,
--   1210 CQ023, 1300 CQ020, 1400 CQ022.
-- Whole-batch refusals (CQ008, CQ001, CQ045) are raised before any row is looked at.
CREATE OR REPLACE FUNCTION public.schedule_calls_core(
  p_user_id uuid,
  p_campaign_id uuid,
  p_template_id uuid,
  p_calls jsonb,
  p_all_or_nothing boolean DEFAULT false
) RETURNS TABLE (idx integer, queue_id uuid, sqlstate text, message text, existing boolean)
LANGUAGE plpgsql
SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_sub record;
  v_subscribed boolean;
  v_allowance bigint;  -- calls the plan still allows (NULL: unlimited)
  v_base bigint := 0;  -- calls used or pending before this batch
  v_minutes bigint := 0;  -- minutes used or reserved this period (CQ030 when at the limit)
  v_idx integer[];
  v_qid uuid[];
  v_code text[];
  v_msg text[];
  v_existing boolean[];
  v_lost boolean[];
  v_key text[];
  v_due integer;
  v_now timestamptz := public.callq_now();  -- the calling rules' clock (tests pin it)
  -- a campaign that is not running, or paced, keeps its calls out of the plain claim
  v_via_campaign boolean := coalesce(
    (SELECT public.campaign_lane(c) FROM public.call_campaigns c WHERE c.id = p_campaign_id),
    false);
BEGIN
  -- Authorization first, so an app user learns nothing about other users.
  IF v_role IN ('anon', 'authenticated')
     AND (auth.uid() IS NULL OR p_user_id IS DISTINCT FROM auth.uid()) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ008',
      MESSAGE = 'not_authorized: cannot schedule calls for another user';
  END IF;
  IF p_user_id IS NULL OR NOT EXISTS (SELECT 1 FROM public.users u
                                        WHERE u.id = p_user_id AND u.deleted_at IS NULL) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = 'user_not_found: ' || coalesce(p_user_id::text, 'NULL');
  END IF;
  IF jsonb_typeof(p_calls) IS DISTINCT FROM 'array' OR jsonb_array_length(p_calls) > 50000 THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ045',
      MESSAGE = 'invalid_batch: p_calls must be a JSON array of at most 50000 objects';
  END IF;

  -- The live subscription, locked so concurrent batches of one user count each other.
  SELECT s.id, s.current_period_start, pl.call_limit, pl.minute_limit INTO v_sub
    FROM public.user_subscriptions s
    JOIN public.subscription_plans pl ON pl.id = s.plan_id
   WHERE s.user_id = p_user_id AND s.status IN ('active', 'trialing')
     AND s.current_period_end > now()
   ORDER BY s.current_period_end DESC
   LIMIT 1
     FOR NO KEY UPDATE OF s;
  v_subscribed := FOUND;
  -- The plan's limits (billing model in supabase/README.md), read from counters, never a scan
  -- of the backlog: dials counted this period plus calls still needing a dial stay below
  -- call_limit; minutes billed plus reserved stay below minute_limit.
  IF v_subscribed AND (v_sub.call_limit IS NOT NULL OR v_sub.minute_limit IS NOT NULL) THEN
    SELECT u.calls_made, u.minutes_used + u.minutes_reserved INTO v_base, v_minutes
      FROM public.usage_totals(p_user_id, v_sub.current_period_start) u;
    v_base := v_base + coalesce((SELECT sum(c.queued + c.claimed)::integer
                                   FROM public.tenant_call_counters c
                                  WHERE c.user_id = p_user_id), 0);
    v_allowance := v_sub.call_limit - v_base;
  END IF;

  WITH input AS (
    SELECT e.ord::integer AS idx, e.r
      FROM jsonb_array_elements(p_calls) WITH ORDINALITY AS e(r, ord)
  ),
  rows AS MATERIALIZED (
    SELECT i.idx,
           gen_random_uuid() AS new_id,
           CASE
             WHEN jsonb_typeof(i.r) <> 'object' THEN 'each row must be a JSON object'
             WHEN EXISTS (SELECT 1 FROM jsonb_object_keys(i.r) k
                           WHERE k <> ALL (ARRAY['name', 'phone', 'email', 'variables',
                                                 'metadata', 'scheduled_time', 'priority',
                                                 'external_id', 'template_id', 'timezone'])) THEN
               'unknown field (allowed: name, phone, email, variables, metadata, '
               'scheduled_time, priority, external_id, template_id, timezone)'
             WHEN i.r->>'template_id' IS NOT NULL
                  AND i.r->>'template_id' !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
               THEN 'template_id must be a uuid'
             WHEN i.r->>'scheduled_time' IS NOT NULL AND t.ts IS NULL
               THEN 'scheduled_time must be an ISO 8601 timestamp'
           END AS malformed,
           CASE WHEN i.r->>'template_id' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                THEN (i.r->>'template_id')::uuid ELSE p_template_id END AS template_id,
           i.r->>'name' AS name,
           i.r->>'phone' AS phone,
           i.r->>'email' AS email,
           greatest(coalesce(t.ts, v_now), v_now) AS scheduled_time,
           nullif(i.r->'priority', 'null'::jsonb) AS priority_json,
           coalesce(nullif(i.r->'variables', 'null'::jsonb), '{}'::jsonb) AS variables,
           coalesce(nullif(i.r->'metadata', 'null'::jsonb), '{}'::jsonb) AS metadata,
           i.r->>'external_id' AS key,
           i.r->>'timezone' AS timezone,
           CASE WHEN i.r->>'timezone' IS NOT NULL THEN ARRAY[i.r->>'timezone']
                ELSE public.phone_timezones(i.r->>'phone') END AS zones
      FROM input i
      CROSS JOIN LATERAL (
        SELECT CASE WHEN jsonb_typeof(i.r) = 'object' AND i.r->>'scheduled_time' IS NOT NULL
                    THEN public.try_timestamptz(i.r->>'scheduled_time') END AS ts
      ) t
  ),
  violations AS (
    SELECT r.idx, 10 AS rank, 'CQ040' AS code, 'invalid_row: ' || r.malformed AS message
      FROM rows r WHERE r.malformed IS NOT NULL
    UNION ALL
    SELECT r.idx, 200, 'CQ002', 'no_active_subscription: ' || p_user_id
      FROM rows r WHERE NOT v_subscribed
    UNION ALL
    SELECT r.idx, 250, 'CQ030',
           format('minute_limit_reached: %s of %s minutes used or reserved this period',
                  v_minutes, v_sub.minute_limit)
      FROM rows r WHERE v_subscribed AND v_minutes >= v_sub.minute_limit
    -- rank 300, CQ003 call_limit_reached, is counted below over the rows still valid
    UNION ALL
    SELECT r.idx, 400, 'CQ004', 'template_not_found: ' || coalesce(r.template_id::text, 'NULL')
      FROM rows r
     WHERE NOT EXISTS (SELECT 1 FROM public.call_templates t
                        WHERE t.id = r.template_id AND (t.is_public OR t.created_by = p_user_id))
    UNION ALL
    SELECT r.idx, 500, 'CQ005',
           'invalid_phone: recipient_phone must be E.164 (+ then 7 to 15 digits)'
      FROM rows r WHERE r.phone IS NULL OR r.phone !~ '^\+[1-9][0-9]{6,14}$'
    UNION ALL
    SELECT r.idx, 600, 'CQ006',
           CASE WHEN jsonb_typeof(r.priority_json) = 'number' AND r.priority_json::text ~ '^-?[0-9]+$'
                THEN 'invalid_priority: must be 1..10, got ' || r.priority_json::text
                ELSE 'invalid_priority: must be an integer 1..10' END
      FROM rows r
     WHERE r.priority_json IS NOT NULL
       AND NOT (jsonb_typeof(r.priority_json) = 'number'
                AND r.priority_json::text ~ '^[0-9]{1,2}$'
                AND r.priority_json::text::integer BETWEEN 1 AND 10)
    UNION ALL
    SELECT r.idx, 700, 'CQ007', 'invalid_custom_variables: must be a JSON object'
      FROM rows r WHERE jsonb_typeof(r.variables) <> 'object'
    UNION ALL
    SELECT r.idx, 900, 'CQ009', 'invalid_recipient: name must be 1..200 characters'
      FROM rows r WHERE r.name IS NULL OR length(btrim(r.name)) NOT BETWEEN 1 AND 200
    UNION ALL
    SELECT r.idx, 910, 'CQ009', 'invalid_recipient: malformed email'
      FROM rows r
     WHERE r.email IS NOT NULL AND r.email !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'
    UNION ALL
    SELECT r.idx, 1000, 'CQ010', 'invalid_metadata: must be a JSON object'
      FROM rows r WHERE jsonb_typeof(r.metadata) <> 'object'
    UNION ALL
    SELECT r.idx, 1100, 'CQ041', 'invalid_external_id: must be 1..200 characters'
      FROM rows r WHERE r.key IS NOT NULL AND length(r.key) NOT BETWEEN 1 AND 200
    UNION ALL
    SELECT r.idx, 1150, b.code, b.message
      FROM rows r
     CROSS JOIN LATERAL public.call_input_violation(r.name, r.email, r.variables, r.metadata,
                                                    r.key) b
    -- calling rules (20240101000340): zone, do-not-call, consent
    UNION ALL
    SELECT r.idx, 1200, 'CQ021',
           'invalid_timezone: recipient_timezone must be an IANA zone name such as America/New_York'
      FROM rows r
     WHERE r.timezone IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM public.calling_timezones z WHERE z.name = r.timezone)
    UNION ALL
    SELECT r.idx, 1210, 'CQ023',
           'timezone_unknown: no time zone is known for this number; pass recipient_timezone'
      FROM rows r WHERE r.zones IS NULL
    UNION ALL
    SELECT r.idx, 1300, 'CQ020', 'do_not_call: the number is on a do-not-call list'
      FROM rows r WHERE public.do_not_call_listed(p_user_id, r.phone, v_now)
    UNION ALL
    SELECT r.idx, 1400, 'CQ022',
           'consent_required: the plan or template requires consent from this number'
      FROM rows r WHERE public.consent_missing(p_user_id, r.template_id, r.phone, v_now)
    -- ADD CHECKS HERE (one UNION ALL branch per rule; see the comment above the function)
  ),
  first_error AS (
    SELECT DISTINCT ON (v.idx) v.idx, v.rank, v.code, v.message
      FROM violations v ORDER BY v.idx, v.rank
  ),
  checked AS (
    SELECT r.*, e.rank, e.code, e.message,
           (SELECT x.id FROM public.call_queue x
             WHERE x.user_id = p_user_id
               AND coalesce(x.campaign_id, '00000000-0000-0000-0000-000000000000'::uuid)
                   = coalesce(p_campaign_id, '00000000-0000-0000-0000-000000000000'::uuid)
               AND x.idempotency_key = r.key) AS existing_id
      FROM rows r LEFT JOIN first_error e ON e.idx = r.idx
  ),
  -- candidates: rows to queue unless the allowance is used up; the first of each external id
  firsts AS (
    SELECT c.*,
           c.existing_id IS NULL AND c.rank IS NULL
             AND (c.key IS NULL OR c.idx = min(c.idx) FILTER (WHERE c.existing_id IS NULL AND c.rank IS NULL)
                                           OVER (PARTITION BY c.key)) AS first_cand,
           min(c.idx) FILTER (WHERE c.existing_id IS NULL AND c.rank IS NULL)
             OVER (PARTITION BY c.key) AS owner_idx
      FROM checked c
  ),
  counted AS (
    SELECT f.*,
           v_allowance IS NOT NULL
             AND coalesce(count(*) FILTER (WHERE f.first_cand)
                            OVER (ORDER BY f.idx ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                          0) >= v_allowance AS exhausted
      FROM firsts f
  ),
  owners AS (
    SELECT c.*,
           c.first_cand AND NOT c.exhausted AS ins,
           CASE WHEN c.key IS NOT NULL THEN
             (array_agg(c.new_id) FILTER (WHERE c.first_cand AND NOT c.exhausted)
                OVER (PARTITION BY c.key))[1] END AS owner_id
      FROM counted c
  ),
  resolved AS (
    SELECT o.*,
           CASE WHEN o.existing_id IS NOT NULL THEN o.existing_id
                WHEN o.ins THEN o.new_id
                WHEN o.owner_id IS NOT NULL AND o.idx > o.owner_idx THEN o.owner_id END AS qid,
           o.existing_id IS NOT NULL OR (NOT o.ins AND o.owner_id IS NOT NULL AND o.idx > o.owner_idx)
             AS existing
      FROM owners o
  ),
  decided AS MATERIALIZED (
    SELECT o.idx, o.ins, o.new_id, o.key, o.template_id, o.name, o.phone, o.email,
           o.scheduled_time, o.priority_json, o.variables, o.metadata, o.qid, o.existing, o.zones,
           CASE WHEN o.qid IS NOT NULL THEN NULL
                WHEN o.rank < 300 THEN o.code
                WHEN o.exhausted THEN 'CQ003'
                ELSE o.code END AS code,
           CASE WHEN o.qid IS NOT NULL THEN NULL
                WHEN o.rank < 300 THEN o.message
                WHEN o.exhausted THEN
                  format('call_limit_reached: %s of %s calls used or pending this period',
                         v_base + greatest(v_allowance, 0), v_sub.call_limit)
                ELSE o.message END AS message
      FROM resolved o
  ),
  verdict AS (
    SELECT p_all_or_nothing AND EXISTS (
             SELECT 1 FROM decided d WHERE d.qid IS NULL AND d.code IS NOT NULL) AS refuse
  ),
  ins AS (
    INSERT INTO public.call_queue (id, user_id, campaign_id, template_id, recipient_name,
                                   recipient_phone, recipient_email, priority, scheduled_time,
                                   custom_variables, metadata, idempotency_key,
                                   recipient_timezones, via_campaign)
    SELECT d.new_id, p_user_id, p_campaign_id, d.template_id, btrim(d.name), d.phone, d.email,
           coalesce(d.priority_json::text::integer, 5), d.scheduled_time, d.variables,
           d.metadata, d.key, d.zones, v_via_campaign
      FROM decided d, verdict
     WHERE d.ins AND NOT verdict.refuse
     ORDER BY d.idx
    ON CONFLICT DO NOTHING  -- a concurrent batch queued the same external id: looked up below
    RETURNING id, scheduled_time
  )
  SELECT array_agg(d.idx ORDER BY d.idx),
         array_agg(CASE WHEN v.refuse AND NOT d.existing THEN NULL
                        WHEN d.ins AND i.id IS NULL THEN NULL ELSE d.qid END ORDER BY d.idx),
         array_agg(CASE WHEN v.refuse AND d.code IS NULL AND NOT d.existing THEN 'CQ044'
                        ELSE d.code END ORDER BY d.idx),
         array_agg(CASE WHEN v.refuse AND d.code IS NULL AND NOT d.existing
                        THEN 'batch_rejected: another row is invalid (p_all_or_nothing)'
                        ELSE d.message END ORDER BY d.idx),
         array_agg(d.existing ORDER BY d.idx),
         array_agg(d.ins AND NOT v.refuse AND i.id IS NULL ORDER BY d.idx),
         array_agg(d.key ORDER BY d.idx),
         count(*) FILTER (WHERE i.scheduled_time <= v_now)
    INTO v_idx, v_qid, v_code, v_msg, v_existing, v_lost, v_key, v_due
    FROM decided d CROSS JOIN verdict v LEFT JOIN ins i ON i.id = d.new_id;

  IF v_due > 0 THEN
    PERFORM pg_notify('callq_queue', '');  -- wake the dispatchers; no PII in the payload
  END IF;

  -- Rows whose external id a concurrent batch queued first (ON CONFLICT skipped them) get that
  -- call's id; this statement's snapshot sees the other batch's commit.
  RETURN QUERY
  SELECT u.idx,
         CASE WHEN u.lost THEN
           (SELECT x.id FROM public.call_queue x
             WHERE x.user_id = p_user_id
               AND coalesce(x.campaign_id, '00000000-0000-0000-0000-000000000000'::uuid)
                   = coalesce(p_campaign_id, '00000000-0000-0000-0000-000000000000'::uuid)
               AND x.idempotency_key = u.key)
         ELSE u.qid END,
         u.code, u.msg, u.existing OR u.lost
    FROM unnest(v_idx, v_qid, v_code, v_msg, v_existing, v_lost, v_key)
           AS u(idx, qid, code, msg, existing, lost, key)
   ORDER BY u.idx;
END
$$;

-- try_timestamptz: the text as a timestamptz, NULL when it is not one (a bad row of a batch is
-- reported, not allowed to abort the batch).
CREATE OR REPLACE FUNCTION public.try_timestamptz(p_text text) RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN p_text::timestamptz;
EXCEPTION WHEN others THEN
  RETURN NULL;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- schedule_call: validate and enqueue one call (the checks are schedule_calls_core's). SECURITY
-- DEFINER because app users may not write the queue directly; as role authenticated it only
-- acts for auth.uid(). A rejected call raises its SQLSTATE and message.
CREATE OR REPLACE FUNCTION public.schedule_call(
  p_user_id uuid,
  p_template_id uuid,
  p_recipient_name text,
  p_recipient_phone text,
  p_recipient_email text DEFAULT NULL,
  p_scheduled_time timestamptz DEFAULT NULL,
  p_priority int DEFAULT 5,
  p_custom_variables jsonb DEFAULT '{}',
  p_metadata jsonb DEFAULT '{}',
  p_idempotency_key text DEFAULT NULL,
  p_recipient_timezone text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_r record;
BEGIN
  SELECT * INTO v_r
    FROM public.schedule_calls_core(
           p_user_id, NULL, p_template_id,
           jsonb_build_array(jsonb_build_object(
             'name', p_recipient_name, 'phone', p_recipient_phone, 'email', p_recipient_email,
             'scheduled_time', p_scheduled_time, 'priority', p_priority,
             'variables', p_custom_variables, 'metadata', p_metadata,
             'external_id', p_idempotency_key, 'timezone', p_recipient_timezone)));
  IF v_r.sqlstate IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = v_r.sqlstate, MESSAGE = v_r.message;
  END IF;
  RETURN v_r.queue_id;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- claim_candidates: lock (FOR UPDATE SKIP LOCKED) and return up to p_limit due queued calls in
-- claim order, except those in p_skip; the one place where the claim decides which calls may
-- go. Calls of campaigns that are not running are never returned (they are via_campaign and
-- outside call_queue_claim_idx). Calls of a running campaign with pacing or a time window
-- (also via_campaign) come through their campaign's lane: the campaign row is locked (SKIP
-- LOCKED: a campaign another claimer is pacing right now sits this claim out), so its limits
-- hold across the whole fleet:
--   calls_per_minute  a token bucket on the campaign row: refilled at calls_per_minute / 60
--                     per second, holding at most one second's worth (at least 1); at most
--                     the tokens held are returned, and the caller (claimable_calls, after
--                     the plan's checks) spends one per call it keeps;
--   max_in_flight     the campaign's claimed, assigned, dialing and in-progress calls (plus
--                     those of p_skip) never exceed it;
--   starts_at/ends_at calls are returned only in between.
-- The caller claims the returned rows in the same transaction (the locks hold until commit).
-- p_lanes_only: only the campaigns' lanes (claimable_calls takes plain calls itself, and calls
-- this for the lanes: the plan's concurrency and subscription checks apply to both).
CREATE OR REPLACE FUNCTION public.claim_candidates(
  p_limit integer,
  p_now timestamptz DEFAULT now(),
  p_skip uuid[] DEFAULT NULL,
  p_lanes_only boolean DEFAULT false
) RETURNS TABLE (id uuid, priority integer, scheduled_time timestamptz, created_at timestamptz,
                 excluded_provider_ids uuid[], required_capabilities jsonb)
LANGUAGE plpgsql
SET search_path = ''
-- every statement's shape is fixed (lanes by key, a lane's calls through
-- call_queue_campaign_claim_idx in claim order): generic plans, planned once per session
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
  v_ids uuid[];
  v_locked uuid[];
BEGIN
  IF p_limit IS NULL OR p_limit <= 0 THEN
    RETURN;
  END IF;
  -- Lock the lanes first; count in the next statement, whose snapshot sees what the claimer
  -- that held a lane before us committed.
  v_locked := ARRAY(
    SELECT c.id
      FROM public.call_campaigns c
     WHERE c.status = 'running'
       AND (c.calls_per_minute IS NOT NULL OR c.max_in_flight IS NOT NULL
            OR c.starts_at IS NOT NULL OR c.ends_at IS NOT NULL)
       AND (c.starts_at IS NULL OR c.starts_at <= p_now)
       AND (c.ends_at IS NULL OR c.ends_at > p_now)
       FOR NO KEY UPDATE SKIP LOCKED);
  IF p_lanes_only AND cardinality(v_locked) = 0 THEN
    RETURN;  -- no lane to take from (the common case): skip the rest
  END IF;

  WITH lanes AS MATERIALIZED (
    SELECT c.id, c.max_in_flight, c.calls_per_minute,
           CASE WHEN c.calls_per_minute IS NOT NULL THEN
             least(greatest(c.calls_per_minute / 60.0, 1),
                   c.pace_tokens + greatest(extract(epoch FROM p_now - coalesce(c.pace_at, p_now - interval '1 day')), 0)
                                   * c.calls_per_minute / 60.0) END AS tokens
      FROM public.call_campaigns c
     WHERE c.id = ANY (v_locked) AND c.status = 'running'
  ),
  quotas AS (
    SELECT l.id,
           least(p_limit,
                 floor(l.tokens)::integer,
                 l.max_in_flight
                   - (SELECT count(*) FROM public.call_queue f
                       WHERE f.campaign_id = l.id
                         AND f.status = ANY (public.in_flight_call_statuses()))::integer
                   - (SELECT count(*) FROM public.call_queue f
                       WHERE p_skip IS NOT NULL AND f.id = ANY (p_skip)
                         AND f.campaign_id = l.id)::integer) AS quota
      FROM lanes l
  ),
  plain AS (
    SELECT q.id, q.priority, q.scheduled_time, q.created_at, NULL::uuid AS lane
      FROM public.call_queue q
     WHERE NOT p_lanes_only
       AND q.status = 'queued' AND NOT q.via_campaign AND q.scheduled_time <= p_now
       AND (p_skip IS NULL OR NOT (q.id = ANY (p_skip)))
     ORDER BY q.priority, q.scheduled_time, q.created_at
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  ),
  picked AS (
    SELECT * FROM plain
    UNION ALL
    SELECT x.id, x.priority, x.scheduled_time, x.created_at, x.lane
      FROM quotas l
      CROSS JOIN LATERAL (
        SELECT q.id, q.priority, q.scheduled_time, q.created_at, l.id AS lane
          FROM public.call_queue q
         WHERE q.campaign_id = l.id AND q.status = 'queued' AND q.via_campaign
           AND q.scheduled_time <= p_now AND (p_skip IS NULL OR NOT (q.id = ANY (p_skip)))
         ORDER BY q.priority, q.scheduled_time, q.created_at
         LIMIT greatest(l.quota, 0)
           FOR UPDATE SKIP LOCKED
      ) x
     WHERE l.quota > 0
  ),
  top AS (
    SELECT p.id, p.lane FROM picked p
     ORDER BY p.priority, p.scheduled_time, p.created_at
     LIMIT p_limit
  )
  SELECT array_agg(t.id) INTO v_ids FROM top t;

  RETURN QUERY
  SELECT q.id, q.priority, q.scheduled_time, q.created_at, q.excluded_provider_ids,
         q.required_capabilities
    FROM public.call_queue q
   WHERE q.id = ANY (v_ids)
   ORDER BY q.priority, q.scheduled_time, q.created_at;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- claim_due_calls: claim up to p_limit due calls (status -> claimed, with a lease).
CREATE OR REPLACE FUNCTION public.claim_due_calls(
  p_limit int DEFAULT 50,
  p_worker text DEFAULT NULL,
  p_lease_seconds int DEFAULT public.default_lease_seconds()
) RETURNS TABLE (queue_id uuid, user_id uuid, template_id uuid, priority int,
                 scheduled_time timestamptz, attempts int)
LANGUAGE plpgsql
SET search_path = ''
-- Its own statement is a primary-key update of the chosen rows: one generic plan, never planned
-- again (planning an UPDATE of call_queue, with its indexes and triggers, cost as much as a
-- single claim's whole work).
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
  v_now timestamptz := public.callq_now();
  v_ids uuid[] := '{}';
  v_st smallint[] := '{}';
BEGIN
  -- fair order, plan concurrency, subscription, calling windows (locked, with their stripes)
  SELECT c.ids, c.stripes INTO v_ids, v_st FROM public.claim_open_calls(p_limit, v_now) c;
  -- "id = ANY (v_ids)" keeps the update a primary-key index scan of the chosen rows (no join:
  -- each row finds its stripe by its place in v_ids).
  RETURN QUERY
  UPDATE public.call_queue q
     SET status = 'claimed', claimed_by = p_worker, claimed_at = now(),
         lease_expires_at = now() + make_interval(secs => p_lease_seconds),
         counter_stripe = v_st[array_position(v_ids, q.id)]
   WHERE q.id = ANY (v_ids) AND q.status = 'queued'
  RETURNING q.id, q.user_id, q.template_id, q.priority, q.scheduled_time, q.attempts;
END
$$;

-- get_next_call_in_queue: claim the single next due call (default lease); zero rows when none.
CREATE OR REPLACE FUNCTION public.get_next_call_in_queue()
RETURNS TABLE (queue_id uuid, user_id uuid, template_id uuid, priority int,
               scheduled_time timestamptz, attempts int)
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  -- (PL/pgSQL: a SQL function that is not inlined is planned again at every call)
  RETURN QUERY SELECT * FROM public.claim_due_calls(1, NULL, public.default_lease_seconds());
END
$$;

-- ---------------------------------------------------------------------------------------------
-- get_best_available_provider: eligible (active, circuit closed, not offline: the view
-- eligible_providers), with a free slot and the required capabilities, not excluded; lowest
-- priority number first, then the provider whose next free slot has waited longest (slots never
-- used first, in order of the share of capacity they bring: equal providers fill evenly), an
-- online one before a degraded one. One index probe per provider: no count of anything.
CREATE OR REPLACE FUNCTION public.get_best_available_provider(
  p_required_capabilities jsonb DEFAULT NULL,
  p_exclude uuid[] DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN (
    SELECT e.provider_id
      FROM public.eligible_providers e
     CROSS JOIN LATERAL (
       SELECT s.freed_at FROM public.provider_slots s
        WHERE s.provider_id = e.provider_id AND s.assignment_id IS NULL
          AND NOT public.provider_over_capacity(e.provider_id)
        ORDER BY s.freed_at, s.slot_no
        LIMIT 1) f
     WHERE (p_required_capabilities IS NULL OR e.capabilities @> p_required_capabilities)
       AND (p_exclude IS NULL OR NOT (e.provider_id = ANY (p_exclude)))
     ORDER BY e.priority, f.freed_at, e.status = 'degraded', e.provider_id
     LIMIT 1);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- assign_call_to_provider: take a slot, insert the assignment, queue -> assigned.
-- NULL and no change when the call is not queued/claimed or the provider (active) has no free
-- slot. The slot is a row taken with SKIP LOCKED: concurrent assigners to one provider take
-- different slots and never wait on each other.
CREATE OR REPLACE FUNCTION public.assign_call_to_provider(p_queue_id uuid, p_provider_id uuid)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_q record;
  v_id uuid := gen_random_uuid();
  v_caller text;
BEGIN
  -- As in claim_and_assign_calls: the commit need not wait for its WAL flush. Losing an
  -- unflushed assignment in a crash is harmless (nothing is dialed before mark_call_dialing
  -- commits synchronously, which flushes the WAL up to this assignment).
  PERFORM set_config('synchronous_commit', 'off', true);
  -- (the call locked and the provider checked in one statement: each statement costs its
  -- executor start-up, as much as the work of these look-ups)
  SELECT q.status, q.attempts,
         EXISTS (SELECT 1 FROM public.call_service_providers p
                  WHERE p.id = p_provider_id AND p.is_active) AS provider_active
    INTO v_q
    FROM public.call_queue q WHERE q.id = p_queue_id FOR UPDATE OF q;
  IF NOT FOUND OR v_q.status NOT IN ('queued', 'claimed') OR NOT v_q.provider_active THEN
    RETURN NULL;
  END IF;
  -- No provider row is locked (the slot is taken with SKIP LOCKED, which never waits), so
  -- nothing needs the tenant's counters first: the queue trigger locks them only when the
  -- call's class changes (queued -> assigned), and assigning a claimed call touches them not.
  SELECT t.caller_id INTO v_caller FROM public.take_provider_slot(p_provider_id, v_id) t;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;

  -- The assignment and the queue row in one statement (the assignment's triggers run at its
  -- end and see the row assigned). A claimed call keeps the lease its claim chose; a call
  -- assigned straight from the queue gets the default one.
  WITH a AS (
    INSERT INTO public.call_assignments (id, queue_id, provider_id, state, attempt, caller_id)
    VALUES (v_id, p_queue_id, p_provider_id, 'assigned', v_q.attempts + 1, v_caller)
  )
  UPDATE public.call_queue q
     SET status = 'assigned',
         claimed_at = coalesce(q.claimed_at, now()),
         lease_expires_at = coalesce(q.lease_expires_at,
                                     now() + make_interval(secs => public.default_lease_seconds()))
   WHERE q.id = p_queue_id;
  RETURN v_id;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- claim_and_assign_calls: the worker's hot path, set-based (no per-row loop in the common case):
--   1. count the eligible providers' free slots (at most p_limit, a plain read) and claim up
--      to min(p_limit, free slots) due calls with SKIP LOCKED;
--   2. take slots for the calls without exclusions or capability needs (the common case):
--      priority levels in order; within a level each provider first takes its share of the
--      calls in proportion to its capacity, then what is left goes to whoever still has slots;
--      each provider's slots in rotation order, taken with FOR UPDATE SKIP LOCKED (one
--      statement per provider: concurrent claimers take different slots and never wait on each
--      other). Then one INSERT of the assignments (each with its slot's caller id) and one
--      UPDATE of the queue rows;
--   3. the few calls with exclusions/capabilities are placed one by one on what is left.
-- Calls that got no slot are not modified (they stay queued).
CREATE OR REPLACE FUNCTION public.claim_and_assign_calls(
  p_limit int DEFAULT 50,
  p_worker text DEFAULT NULL,
  p_lease_seconds int DEFAULT public.default_lease_seconds()
) RETURNS TABLE (queue_id uuid, assignment_id uuid, provider_id uuid)
LANGUAGE plpgsql
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
  v_free integer;
  v_ids uuid[];
  v_special uuid[];
  v_calls uuid[];
  v_mp uuid[] := '{}';
  v_ma uuid[] := '{}';
  v_mc text[] := '{}';
  v_need integer;
  v_level_need integer;
  v_level_cap numeric;
  v_level_n integer;
  v_k integer;
  v_p record;
  v_lvl integer;
  v_lease interval := make_interval(secs => p_lease_seconds);
  v_pid uuid;
  v_aid uuid;
  v_row record;
  v_now timestamptz := public.callq_now();
  v_st smallint[] := '{}';
BEGIN
  IF p_limit <= 0 THEN
    RETURN;
  END IF;
  -- The claim's commit need not wait for its WAL flush: the tenants' counter rows stay locked
  -- until commit, so a synchronous flush would serialise every worker on disk latency. Losing an
  -- unflushed claim in a server crash is harmless (the calls are simply queued again and the
  -- slots never taken), and nothing is dialed before mark_call_dialing commits synchronously,
  -- which flushes the WAL up to and including this claim. (Transaction-local setting.)
  PERFORM set_config('synchronous_commit', 'off', true);
  -- free slots, up to the batch in all: each provider's first ones in the free slots' index
  -- (ordered as the index is, so a generic plan walks it too, never the table)
  SELECT count(*) INTO v_free
    FROM (SELECT 1 FROM public.eligible_providers e
           CROSS JOIN LATERAL (
             SELECT 1 FROM public.provider_slots s
              WHERE s.provider_id = e.provider_id AND s.assignment_id IS NULL
              ORDER BY s.freed_at, s.slot_no
              LIMIT p_limit) x
           LIMIT p_limit) f;
  IF v_free = 0 THEN
    RETURN;
  END IF;

  -- fair order, plan concurrency, subscription, calling windows (locked, with their stripes)
  SELECT c.ids, c.stripes INTO v_ids, v_st
    FROM public.claim_open_calls(least(p_limit, v_free), v_now) c;
  IF cardinality(v_ids) = 0 THEN
    RETURN;
  END IF;
  SELECT array_agg(q.id) FILTER (WHERE cardinality(q.excluded_provider_ids) > 0
                                   OR q.required_capabilities IS NOT NULL)
    INTO v_special
    FROM public.call_queue q WHERE q.id = ANY (v_ids);

  v_calls := ARRAY(SELECT c.id FROM unnest(v_ids) WITH ORDINALITY AS c(id, ord)
                    WHERE v_special IS NULL OR NOT (c.id = ANY (v_special))
                    ORDER BY c.ord);
  v_need := cardinality(v_calls);
  FOR v_lvl IN SELECT DISTINCT e.priority FROM public.eligible_providers e ORDER BY 1 LOOP
    EXIT WHEN v_need = 0;
    SELECT sum(e.max_concurrent_calls), count(*) INTO v_level_cap, v_level_n
      FROM public.eligible_providers e WHERE e.priority = v_lvl;
    v_level_need := v_need;
    -- pass 1: each provider its share of the level's calls; pass 2: the rest, anywhere
    FOR v_pass IN 1..(CASE WHEN v_level_n > 1 THEN 2 ELSE 1 END) LOOP
      FOR v_p IN SELECT e.provider_id, e.max_concurrent_calls FROM public.eligible_providers e
                  WHERE e.priority = v_lvl ORDER BY e.status = 'degraded', e.provider_id LOOP
        EXIT WHEN v_need = 0;
        v_k := CASE WHEN v_pass = 1 AND v_level_n > 1
                    THEN least(v_need, ceil(v_level_need * v_p.max_concurrent_calls / v_level_cap))
                    ELSE v_need END;
        WITH f AS (
          SELECT f.slot_no FROM public.provider_slots f
           WHERE f.provider_id = v_p.provider_id AND f.assignment_id IS NULL
             AND NOT public.provider_over_capacity(v_p.provider_id)
           ORDER BY f.freed_at, f.slot_no
           LIMIT v_k
             FOR UPDATE SKIP LOCKED
        ), t AS (
          -- (= ANY of the locked slots: a primary-key look-up in any plan, generic ones too)
          UPDATE public.provider_slots s SET assignment_id = gen_random_uuid()
           WHERE s.provider_id = v_p.provider_id AND s.slot_no = ANY (ARRAY(SELECT f.slot_no FROM f))
          RETURNING s.assignment_id, s.caller_id
        )
        SELECT v_mp || array_agg(v_p.provider_id), v_ma || array_agg(t.assignment_id),
               v_mc || array_agg(t.caller_id), v_need - count(*)
          INTO v_mp, v_ma, v_mc, v_need
          FROM t;
      END LOOP;
      EXIT WHEN v_need = 0;
    END LOOP;
  END LOOP;

  IF cardinality(v_ma) > 0 THEN
    INSERT INTO public.call_assignments (id, queue_id, provider_id, state, attempt, caller_id)
    SELECT m.aid, m.qid, m.pid, 'assigned', q.attempts + 1, m.cid
      FROM unnest(v_ma, v_calls[1:cardinality(v_ma)], v_mp, v_mc) AS m(aid, qid, pid, cid)
      JOIN public.call_queue q ON q.id = m.qid;

    UPDATE public.call_queue q
       SET status = 'assigned', claimed_by = p_worker, claimed_at = now(),
           lease_expires_at = now() + v_lease,
           counter_stripe = v_st[array_position(v_ids, q.id)]
     WHERE q.id = ANY (v_calls[1:cardinality(v_ma)]);

    RETURN QUERY SELECT m.qid, m.aid, m.pid
                   FROM unnest(v_calls[1:cardinality(v_ma)], v_ma, v_mp) AS m(qid, aid, pid);
  END IF;

  IF v_special IS NOT NULL THEN
    FOR v_row IN
      SELECT q.id, q.excluded_provider_ids, q.required_capabilities
        FROM unnest(v_ids) WITH ORDINALITY AS c(id, ord)
        JOIN public.call_queue q ON q.id = c.id
       WHERE c.id = ANY (v_special)
       ORDER BY c.ord
    LOOP
      v_pid := public.get_best_available_provider(v_row.required_capabilities,
                                                  v_row.excluded_provider_ids);
      CONTINUE WHEN v_pid IS NULL;
      -- the counter stripe of its claim, before the assignment counts it in flight
      UPDATE public.call_queue q SET counter_stripe = v_st[array_position(v_ids, q.id)]
       WHERE q.id = v_row.id;
      v_aid := public.assign_call_to_provider(v_row.id, v_pid);
      CONTINUE WHEN v_aid IS NULL;
      UPDATE public.call_queue q
         SET claimed_by = p_worker, claimed_at = now(), lease_expires_at = now() + v_lease
       WHERE q.id = v_row.id;
      queue_id := v_row.id;
      assignment_id := v_aid;
      provider_id := v_pid;
      RETURN NEXT;
    END LOOP;
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- mark_call_dialing: assigned -> dialing, counts the attempt. FALSE when already past
-- assigned (or released): the caller must not dial. The never-dial-twice gate.
-- It re-checks the calling rules at this last moment (calling_dial_check, 20240101000340): a
-- number on a do-not-call list or without a required consent is canceled (FALSE, never
-- dialed); a call outside its window or over the attempt cap goes back to the queue for its
-- next allowed time (slot released, FALSE). A dial is recorded in contact_attempts.
-- A call of a campaign that was paused or canceled after the claim is not dialed: its
-- assignment is released (the call waits in the queue, or is canceled with its campaign).
-- It is also the plan's gate (billing model in supabase/README.md): the dial is counted in the
-- period's calls_made, and with a minute limit the call reserves whole minutes (its share of
-- what is left after the reservations of calls in flight) that become its max duration.
-- FALSE, and not dialed, when the plan cannot pay for it:
--   * no live subscription any more: released back to the queue (held, see claimable_calls);
--   * minutes all reserved by calls in flight: released and due again in 30 s;
--   * no dial or no minute left: the call ends as failed ('call_limit_reached' /
--     'minute_limit_reached'), never dialed.
-- It runs in two halves, so that a chunk's gates (dial_gates) hold the tenant's usage and
-- counter rows only for the second halves: dial_gate_check locks the call and checks what
-- needs no row of the tenant (gateable: still assigned; verdict: the campaign's or the calling
-- rules', NULL when they allow the dial at "at"); dial_gate_apply acts on the verdict and
-- passes the plan's gate. Nothing is written between the halves.
-- The queue rows of calls that passed the gate: dialing, one more attempt, a dialing lease as
-- long as the claim lease the worker asked for. One statement for a chunk (dial_gates): the
-- counter trigger then updates each tenant's row once.
CREATE OR REPLACE FUNCTION public.queue_to_dialing(p_queue_ids uuid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  UPDATE public.call_queue q
     SET status = 'dialing', attempts = q.attempts + 1, hold_reason = NULL,
         lease_expires_at = now() + coalesce(q.lease_expires_at - q.claimed_at,
                                             make_interval(secs => public.default_lease_seconds()))
   WHERE q.id = ANY (p_queue_ids);
END
$$;

CREATE OR REPLACE FUNCTION public.dial_gate_check(
  p_assignment_id uuid, OUT gateable boolean, OUT verdict text, OUT not_before timestamptz,
  OUT at timestamptz)
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_qid uuid;
  v_campaign uuid;
  v_check record;
BEGIN
  gateable := false;
  SELECT a.queue_id INTO v_qid FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT q.campaign_id INTO v_campaign FROM public.call_queue q WHERE q.id = v_qid FOR UPDATE;
  PERFORM 1 FROM public.call_assignments a
   WHERE a.id = p_assignment_id AND a.state = 'assigned' FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  gateable := true;
  IF v_campaign IS NOT NULL AND EXISTS (
       SELECT 1 FROM public.call_campaigns c
        WHERE c.id = v_campaign AND c.status IN ('paused', 'canceled', 'draft')) THEN
    verdict := 'campaign_not_running';
    RETURN;
  END IF;
  at := public.callq_now();
  SELECT * INTO v_check FROM public.calling_dial_check(v_qid, at);
  verdict := v_check.verdict;
  not_before := v_check.not_before;
END
$$;

-- The second half, for a call dial_gate_check found gateable (its rows still locked).
-- p_defer (dial_gates): for a tenant whose plan has no call or minute limit (nothing to check
-- against the usage row), the usage row is neither locked nor updated and the queue row stays
-- as it is: the caller counts the chunk's dials as a pending row of the period and moves its
-- queue rows in one statement at its end, so the tenant's counter rows are held from there to
-- the commit only, and its usage row not at all.
CREATE OR REPLACE FUNCTION public.dial_gate_apply(
  p_assignment_id uuid, p_verdict text, p_not_before timestamptz, p_at timestamptz,
  p_defer boolean DEFAULT false
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_qid uuid;
  v_q record;
  v_uid uuid;
  v_usage uuid;
  v_p record;
  v_u record;
  v_left integer;
  v_min integer;
  v_share integer;
  v_defer boolean := false;
BEGIN
  -- still assigned (the same call twice in a chunk is dialed once)
  SELECT a.queue_id INTO v_qid FROM public.call_assignments a
   WHERE a.id = p_assignment_id AND a.state = 'assigned';
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  SELECT q.user_id, q.recipient_phone INTO v_q FROM public.call_queue q WHERE q.id = v_qid;
  v_uid := v_q.user_id;
  IF p_verdict = 'campaign_not_running' THEN
    PERFORM public.release_assignment(p_assignment_id, 'campaign_not_running');
    RETURN false;
  ELSIF p_verdict IN ('do_not_call', 'consent_missing') THEN
    PERFORM public.handle_failed_call(p_assignment_id, 'canceled', p_verdict);
    RETURN false;
  ELSIF p_verdict IS NOT NULL THEN
    PERFORM public.release_assignment(p_assignment_id, p_verdict);
    UPDATE public.call_queue q
       SET scheduled_time = p_not_before, hold_reason = p_verdict
     WHERE q.id = v_qid;
    PERFORM public.record_call_event(v_qid, 'held', jsonb_build_object(
      'rule', p_verdict, 'until', p_not_before, 'at', 'dial_gate'));
    RETURN false;
  END IF;

  IF p_defer THEN
    SELECT * INTO v_p FROM public.tenant_plan(v_uid);
    v_defer := FOUND AND v_p.call_limit IS NULL AND v_p.minute_limit IS NULL;
  END IF;
  IF v_defer THEN
    SELECT u.id INTO v_usage FROM public.user_call_usage u
     WHERE u.user_id = v_uid AND u.period_start = v_p.period_start;
    IF NOT FOUND THEN  -- the period's first dial creates its row
      v_usage := public.lock_current_usage(v_uid);
    END IF;
  ELSE
    v_usage := public.lock_current_usage(v_uid);
    IF v_usage IS NULL THEN
      PERFORM public.release_assignment(p_assignment_id, 'subscription_inactive');
      RETURN false;
    END IF;
    -- the row is locked: the endings settled on it since the last fold are folded in, so the
    -- checks below read the exact figures
    PERFORM public.fold_call_usage(v_usage);
    SELECT * INTO v_p FROM public.tenant_plan(v_uid);
    SELECT u.calls_made, u.minutes_used, u.minutes_reserved INTO v_u
      FROM public.user_call_usage u WHERE u.id = v_usage;
    IF v_p.call_limit IS NOT NULL AND v_u.calls_made >= v_p.call_limit THEN
      PERFORM public.refuse_dial(p_assignment_id, 'call_limit_reached');
      RETURN false;
    END IF;
    IF v_p.minute_limit IS NOT NULL THEN
      v_left := v_p.minute_limit - v_u.minutes_used - v_u.minutes_reserved;
      IF v_left <= 0 AND v_u.minutes_reserved > 0 THEN
        PERFORM public.release_assignment(p_assignment_id, 'minutes_reserved_in_flight');
        UPDATE public.call_queue q SET scheduled_time = now() + interval '30 seconds'
         WHERE q.id = v_qid AND q.status = 'queued';
        RETURN false;
      ELSIF v_left <= 0 THEN
        PERFORM public.refuse_dial(p_assignment_id, 'minute_limit_reached');
        RETURN false;
      END IF;
      -- an even share between the calls that may want minutes at the same time (this one and the
      -- tenant's other undialed calls, at most its free concurrency), at most the plan's
      -- max_call_minutes (default 10; 720 = Vapi's 43200 s)
      SELECT greatest(least(v_p.max_concurrent_calls - sum(c.dialed),
                            sum(c.claimed + c.queued)), 1)::integer
        INTO v_share FROM public.tenant_call_counters c WHERE c.user_id = v_uid;
      v_min := least(greatest(v_left / coalesce(v_share, 1), 1), v_p.max_call_minutes, 720);
    END IF;

    UPDATE public.user_call_usage u
       SET calls_made = u.calls_made + 1, minutes_reserved = u.minutes_reserved + coalesce(v_min, 0)
     WHERE u.id = v_usage;
  END IF;
  UPDATE public.call_assignments a
     SET state = 'dialing', dialing_at = now(), usage_id = v_usage,
         reserved_minutes = coalesce(v_min, 0),
         -- 5 s under the reservation: a hang-up a little late still rounds within it
         max_duration_seconds = CASE WHEN v_min IS NULL THEN NULL ELSE v_min * 60 - 5 END
   WHERE a.id = p_assignment_id;
  IF NOT v_defer THEN
    PERFORM public.queue_to_dialing(ARRAY[v_qid]);
  END IF;
  INSERT INTO public.contact_attempts (assignment_id, user_id, phone, attempted_at)
  VALUES (p_assignment_id, v_uid, v_q.recipient_phone, p_at);
  RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION public.mark_call_dialing(p_assignment_id uuid) RETURNS boolean
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_c record;
BEGIN
  SELECT * INTO v_c FROM public.dial_gate_check(p_assignment_id);
  IF NOT v_c.gateable THEN
    RETURN false;
  END IF;
  RETURN public.dial_gate_apply(p_assignment_id, v_c.verdict, v_c.not_before, v_c.at);
END
$$;

-- mark_calls_placed: the calls were dialed and their providers know them by these ids: each
-- assignment dialing -> placed with its provider call id and the poll deadline, its queue row
-- -> in_progress (no lease while placed); then, for each call now placed and not yet polled
-- (poll token 0) whose p_first_poll_seconds is not NULL, its first poll: due in that many
-- seconds, token 1. A call no longer dialing is left as it is (a repeated request finds it
-- placed). The queue rows are locked in the order given (callers sort the ids). Returns the
-- calls whose first poll was set, with their token. Set-based: one statement per step for a
-- whole chunk (per call, the statements and the queue's statement triggers ran once each).
CREATE OR REPLACE FUNCTION public.mark_calls_placed(
  p_assignment_ids uuid[], p_provider_call_ids text[], p_first_poll_seconds double precision[]
) RETURNS TABLE (assignment_id uuid, poll_count integer)
LANGUAGE plpgsql
SET search_path = ''
-- (each statement reaches its rows by primary key, from the arrays given: one generic plan,
-- never planned again; a lone call's chunk re-planned them at every call)
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
  v_queue uuid[];
BEGIN
  -- no wait for the WAL flush, as complete_call: lost in a crash, the call is back to dialing
  -- and the reaper's reconcile finds it at the provider by its correlation id
  PERFORM set_config('synchronous_commit', 'off', true);
  PERFORM 1
     FROM (SELECT q.id
             FROM unnest(p_assignment_ids) WITH ORDINALITY AS u(id, n)
             JOIN public.call_assignments a ON a.id = u.id
             JOIN public.call_queue q ON q.id = a.queue_id
            ORDER BY u.n
              FOR UPDATE OF q) locked;
  WITH placed AS (
    UPDATE public.call_assignments a
       SET state = 'placed', placed_at = now(), provider_call_id = x.provider_call_id,
           next_poll_at = now() + make_interval(secs => public.poll_deadline_seconds())
      FROM unnest(p_assignment_ids, p_provider_call_ids) AS x(id, provider_call_id)
     WHERE a.id = x.id AND a.state = 'dialing'
    RETURNING a.queue_id
  )
  SELECT array_agg(p.queue_id) INTO v_queue FROM placed p;
  IF v_queue IS NOT NULL THEN
    UPDATE public.call_queue q
       SET status = 'in_progress', lease_expires_at = NULL
     WHERE q.id = ANY (v_queue);
  END IF;
  RETURN QUERY
  UPDATE public.call_assignments a
     SET last_polled_at = now(), next_poll_at = now() + make_interval(secs => x.delay),
         poll_count = 1
    FROM unnest(p_assignment_ids, p_first_poll_seconds) AS x(id, delay)
   WHERE a.id = x.id AND a.state = 'placed' AND a.poll_count = 0 AND x.delay IS NOT NULL
  RETURNING a.id, a.poll_count;
END
$$;

-- mark_call_placed: mark_calls_placed of one call, its first poll left to the poll deadline.
-- TRUE when the call is placed with this provider call id (now, or by an earlier request).
CREATE OR REPLACE FUNCTION public.mark_call_placed(p_assignment_id uuid, p_provider_call_id text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  PERFORM 1 FROM public.mark_calls_placed(ARRAY[p_assignment_id], ARRAY[p_provider_call_id],
                                          ARRAY[NULL::double precision]);
  RETURN EXISTS (SELECT 1 FROM public.call_assignments a
                  WHERE a.id = p_assignment_id AND a.state = 'placed'
                    AND a.provider_call_id IS NOT DISTINCT FROM p_provider_call_id);
END
$$;

-- Add a provider to a call's exclusion list; if that would exclude every active provider,
-- clear the list instead so the call is not stranded.
CREATE OR REPLACE FUNCTION public.exclude_provider(p_excluded uuid[], p_provider_id uuid)
RETURNS uuid[]
LANGUAGE sql STABLE
SET search_path = ''
AS $$
  SELECT CASE
    WHEN p_provider_id IS NULL THEN p_excluded
    WHEN NOT EXISTS (
      SELECT 1 FROM public.call_service_providers p
       WHERE p.is_active AND p.id <> p_provider_id AND NOT (p.id = ANY (p_excluded)))
      THEN '{}'::uuid[]
    WHEN p_provider_id = ANY (p_excluded) THEN p_excluded
    ELSE array_append(p_excluded, p_provider_id)
  END;
$$;

-- release_assignment: for calls proven never dialed. Frees the slot, assignment -> released,
-- queue -> queued (due now, or p_delay_seconds from now) with attempts unchanged (an attempt
-- counted by mark_call_dialing is given back). Reasons starting with "provider" (e.g.
-- provider_error, provider_unavailable) or equal to circuit_open / rate_limited exclude the
-- provider from the next attempt. The worker releases with a delay a create that would wait
-- in its client-side throttle longer than the dialing lease allows (reason client_throttle).
CREATE OR REPLACE FUNCTION public.release_assignment(
  p_assignment_id uuid, p_reason text, p_delay_seconds double precision DEFAULT 0
)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_a record;
  v_prev text;
BEGIN
  SELECT a.queue_id, a.provider_id INTO v_a
    FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM 1 FROM public.call_queue q WHERE q.id = v_a.queue_id FOR UPDATE;

  SELECT a.state INTO v_prev FROM public.call_assignments a
   WHERE a.id = p_assignment_id FOR UPDATE;
  IF v_prev NOT IN ('assigned', 'dialing') THEN
    RETURN false;
  END IF;
  PERFORM public.return_dial(p_assignment_id);
  UPDATE public.call_assignments a
     SET state = 'released', ended_at = now(), outcome = 'released', error = p_reason
   WHERE a.id = p_assignment_id;
  -- never dialed: the attempt does not count against the contact's cap either
  DELETE FROM public.contact_attempts c WHERE c.assignment_id = p_assignment_id;

  UPDATE public.call_queue q
     SET status = 'queued',
         attempts = CASE WHEN v_prev = 'dialing' THEN greatest(q.attempts - 1, 0) ELSE q.attempts END,
         scheduled_time = CASE WHEN p_delay_seconds > 0
           THEN greatest(q.scheduled_time, now() + make_interval(secs => p_delay_seconds))
           ELSE q.scheduled_time END,
         claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
         last_error = p_reason,
         excluded_provider_ids = CASE
           WHEN p_reason LIKE 'provider%' OR p_reason IN ('circuit_open', 'rate_limited')
             THEN public.exclude_provider(q.excluded_provider_ids, v_a.provider_id)
           ELSE q.excluded_provider_ids END
   WHERE q.id = v_a.queue_id AND q.status IN ('claimed', 'assigned', 'dialing');
  PERFORM public.free_provider_slot(p_assignment_id);  -- after the tenant's counters (lock order)
  PERFORM pg_notify('callq_queue', '');  -- due again now (identical notifications coalesce)
  RETURN true;
END
$$;

-- complete_call: the call ended with a conversation: history row, slot freed, usage and provider
-- stats, queue -> completed. Every other ending goes through handle_failed_call.
-- Idempotent per assignment: a second call for an ended assignment returns the existing
-- history id (NULL if the assignment ended without history, e.g. released) and changes nothing.
CREATE OR REPLACE FUNCTION public.complete_call(
  p_assignment_id uuid,
  p_duration_seconds double precision DEFAULT NULL,
  p_recording_url text DEFAULT NULL,
  p_transcript text DEFAULT NULL,
  p_cost double precision DEFAULT NULL,
  p_provider_call_id text DEFAULT NULL,
  p_started_at timestamptz DEFAULT NULL,
  p_ended_at timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_a record;
  v_q record;
  v_hid uuid;
  v_usage uuid;
BEGIN
  -- An ending commits without waiting for its WAL flush (transaction-local), so the tenant's
  -- counter row and the provider's stats row it updates are not held locked through a disk
  -- flush: with the flush, every ending of one tenant queued behind the previous one's.
  -- Safe because an ending is re-derivable: lost in a server crash, the call is back to
  -- placed with its poll overdue, and the next poll (or reconcile) ends it again, idempotently;
  -- and nothing outside the database acts on it before a later synchronous commit (a dial
  -- gate, a notification claim), which flushes the WAL up to and including this one.
  PERFORM set_config('synchronous_commit', 'off', true);
  SELECT a.queue_id INTO v_a FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ011', MESSAGE = 'assignment_not_found: ' || p_assignment_id;
  END IF;
  SELECT q.* INTO v_q FROM public.call_queue q WHERE q.id = v_a.queue_id FOR UPDATE;
  SELECT a.* INTO v_a FROM public.call_assignments a WHERE a.id = p_assignment_id FOR UPDATE;

  IF NOT (v_a.state = ANY (public.live_assignment_states())) THEN
    SELECT h.id INTO v_hid FROM public.call_history h
     WHERE h.assignment_id = p_assignment_id;
    RETURN v_hid;
  END IF;

  UPDATE public.call_assignments a
     SET state = 'completed', ended_at = coalesce(p_ended_at, now()), outcome = 'completed',
         provider_call_id = coalesce(a.provider_call_id, p_provider_call_id), next_poll_at = NULL
   WHERE a.id = p_assignment_id;

  INSERT INTO public.call_history (user_id, template_id, queue_id, assignment_id, provider_id,
                                   recipient_name, recipient_phone, recipient_email, status,
                                   started_at, ended_at, duration_seconds, recording_url,
                                   transcript, cost, provider_call_id, attempts, metadata)
  VALUES (v_q.user_id, v_q.template_id, v_q.id, p_assignment_id, v_a.provider_id,
          v_q.recipient_name, v_q.recipient_phone, v_q.recipient_email, 'completed',
          coalesce(p_started_at, v_a.placed_at, v_a.dialing_at),
          coalesce(p_ended_at, now()), p_duration_seconds, p_recording_url, p_transcript, p_cost,
          coalesce(v_a.provider_call_id, p_provider_call_id), greatest(v_q.attempts, 1),
          v_q.metadata)
  RETURNING id INTO v_hid;

  -- Billing: the reservation is settled and the reported minutes billed, as a pending row of
  -- the period (settle_call_usage; the dial itself was counted at the gate). Then the tenant's
  -- counter stripe as late as possible (the endings of the calls counted in one stripe wait for
  -- each other's commit on it): the queue row's status (its trigger updates the stripe).
  v_usage := public.settle_call_usage(p_assignment_id, v_q.user_id, p_duration_seconds);
  UPDATE public.call_queue q
     SET status = 'completed', completed_at = now(), lease_expires_at = NULL
   WHERE q.id = v_q.id;
  -- Provider rows after the counters, as on every path (lock order: handle_failed_call and
  -- release_assignment hold the stripe when they free their slot, and reconcile_provider_slots
  -- locks every taken slot: a slot freed before the stripe closed a cycle through it). The
  -- statistics never wait (tally_provider_call).
  PERFORM public.free_provider_slot(p_assignment_id);
  PERFORM public.tally_provider_call(v_a.provider_id, 1, 0);
  -- the period's row only if nobody holds it (never waits), right before the commit
  PERFORM public.fold_call_usage(v_usage, true);
  RETURN v_hid;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- record_provider_health: a health probe or call result. A success closes the circuit and
-- marks the provider online; failures mark it degraded and, from the 5th in a row, open the
-- circuit for 30 s (no new calls until then; then one success closes it again).
CREATE OR REPLACE FUNCTION public.record_provider_health(
  p_provider_id uuid,
  p_ok boolean,
  p_latency_ms double precision,
  p_error text DEFAULT NULL
) RETURNS text
LANGUAGE sql
SET search_path = ''
AS $$
  UPDATE public.provider_availability pa
     SET last_check = now(),
         latency_ms = coalesce(greatest(p_latency_ms, 0), pa.latency_ms),
         consecutive_failures = CASE WHEN p_ok THEN 0 ELSE pa.consecutive_failures + 1 END,
         status = CASE WHEN p_ok THEN 'online'
                       WHEN pa.status = 'offline' THEN 'offline'
                       ELSE 'degraded' END,
         circuit_open_until = CASE
           WHEN p_ok THEN NULL
           WHEN pa.consecutive_failures + 1 >= 5 THEN now() + interval '30 seconds'
           ELSE pa.circuit_open_until END,
         last_error = CASE WHEN p_ok THEN pa.last_error ELSE p_error END
   WHERE pa.provider_id = p_provider_id
  RETURNING pa.status;
$$;

-- handle_failed_call: the call ended without a conversation (failure kinds: failure_kinds()).
-- Returns 'retry_scheduled', 'failed', 'canceled'
-- or 'noop' (assignment already ended: a duplicate webhook/poll changes nothing).
-- Backoff: base * 2^(attempts-1), capped at 1 h, times a jitter factor in [0.8, 1.2);
-- base 300 s for busy/no_answer/voicemail, 30 s for provider_error (provider excluded next
-- time), rate_limited: p_retry_after_seconds (or 15 s) plus up to 20 % jitter.
CREATE OR REPLACE FUNCTION public.handle_failed_call(
  p_assignment_id uuid,
  p_failure_kind text,
  p_error text DEFAULT NULL,
  p_retry_after_seconds int DEFAULT NULL,
  p_duration_seconds double precision DEFAULT NULL,
  p_provider_call_id text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_a record;
  v_q record;
  v_delay double precision;
  v_next timestamptz;
  v_final boolean;
  v_hstatus text;
  v_rule record;
  v_plan record;
  v_usage record;
  v_settled uuid;
  v_waiting integer;
BEGIN
  -- no wait for the WAL flush, as complete_call (a retry is dialed only after a synchronous
  -- dial gate, which flushes this ending first)
  PERFORM set_config('synchronous_commit', 'off', true);
  IF p_failure_kind IS NULL OR NOT (p_failure_kind = ANY (public.failure_kinds())) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ013',
      MESSAGE = 'invalid_failure_kind: ' || coalesce(p_failure_kind, 'NULL');
  END IF;

  SELECT a.queue_id INTO v_a FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ011', MESSAGE = 'assignment_not_found: ' || p_assignment_id;
  END IF;
  SELECT q.* INTO v_q FROM public.call_queue q WHERE q.id = v_a.queue_id FOR UPDATE;
  SELECT a.* INTO v_a FROM public.call_assignments a WHERE a.id = p_assignment_id FOR UPDATE;
  IF NOT (v_a.state = ANY (public.live_assignment_states())) THEN
    RETURN 'noop';
  END IF;

  UPDATE public.call_assignments a
     SET state = CASE WHEN p_failure_kind = 'canceled' THEN 'canceled' ELSE 'failed' END,
         ended_at = now(), outcome = p_failure_kind, error = p_error, next_poll_at = NULL,
         provider_call_id = coalesce(a.provider_call_id, p_provider_call_id)
   WHERE a.id = p_assignment_id;

  -- billing: the dial was counted at the gate; settle the reservation, bill reported minutes
  -- (a pending row of the period, folded at the end)
  v_settled := public.settle_call_usage(p_assignment_id, v_q.user_id, p_duration_seconds);

  v_final := p_failure_kind IN ('permanent', 'canceled') OR v_q.attempts >= v_q.max_attempts;
  -- A retry needs a dial (and a minute) the plan still has after every call already waiting
  -- got its own: calls accepted by schedule_call keep their first dial; retries take what is
  -- left, otherwise the call ends with this attempt's outcome.
  IF NOT v_final THEN
    SELECT * INTO v_plan FROM public.tenant_plan(v_q.user_id);
    IF FOUND AND (v_plan.call_limit IS NOT NULL OR v_plan.minute_limit IS NOT NULL) THEN
      SELECT u.calls_made AS calls, u.minutes_used + u.minutes_reserved AS minutes
        INTO v_usage
        FROM public.usage_totals(v_q.user_id, v_plan.period_start) u;
      SELECT coalesce(sum(c.queued + c.claimed), 0) INTO v_waiting
        FROM public.tenant_call_counters c WHERE c.user_id = v_q.user_id;
      IF v_plan.call_limit IS NOT NULL AND v_usage.calls + v_waiting >= v_plan.call_limit THEN
        v_final := true;
        p_error := coalesce(p_error || '; ', '') || 'no retry: call_limit_reached';
      ELSIF v_plan.minute_limit IS NOT NULL AND v_usage.minutes >= v_plan.minute_limit THEN
        v_final := true;
        p_error := coalesce(p_error || '; ', '') || 'no retry: minute_limit_reached';
      END IF;
    END IF;
  END IF;
  IF NOT v_final THEN
    v_delay := CASE p_failure_kind
      WHEN 'rate_limited' THEN coalesce(p_retry_after_seconds, 15) * (1 + random() * 0.2)
      ELSE least(
             (CASE WHEN p_failure_kind = 'provider_error' THEN 30 ELSE 300 END)
               * power(2, greatest(v_q.attempts, 1) - 1),
             3600) * (0.8 + random() * 0.4)
    END;
    -- ops_settings.retry_delay_scale (default 1) shortens every wait for demos and tests; a
    -- session's callq.retry_delay_scale setting overrides it.
    v_delay := v_delay * coalesce(
      nullif(current_setting('callq.retry_delay_scale', true), '')::double precision,
      (SELECT o.retry_delay_scale FROM public.ops_settings o), 1);
    v_next := public.callq_now() + make_interval(secs => v_delay);
    -- calling rules: the retry goes to the next moment its window and the attempt cap allow
    SELECT * INTO v_rule FROM public.calling_next_dial_time(v_q.id, v_next);
    v_next := v_rule.at;
  END IF;

  INSERT INTO public.call_retries (queue_id, assignment_id, provider_id, attempt, reason, error,
                                   next_attempt_at)
  VALUES (v_q.id, p_assignment_id, v_a.provider_id, greatest(v_q.attempts, v_a.attempt),
          p_failure_kind, p_error, v_next);

  IF NOT v_final THEN
    UPDATE public.call_queue q
       SET status = 'queued', scheduled_time = v_next, last_error = coalesce(p_error, p_failure_kind),
           hold_reason = v_rule.reason,
           claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
           excluded_provider_ids = CASE WHEN p_failure_kind = 'provider_error'
             THEN public.exclude_provider(q.excluded_provider_ids, v_a.provider_id)
             ELSE q.excluded_provider_ids END
     WHERE q.id = v_q.id;
    IF v_rule.reason IS NOT NULL THEN  -- a calling rule moved the retry
      PERFORM public.record_call_event(v_q.id, 'held', jsonb_build_object(
        'rule', v_rule.reason, 'until', v_next));
    END IF;
    PERFORM public.free_provider_slot(p_assignment_id);
    PERFORM public.fail_on_provider(v_a.provider_id, p_failure_kind, p_error);
    PERFORM public.fold_call_usage(v_settled, true);  -- as complete_call: never waits
    RETURN 'retry_scheduled';
  END IF;

  v_hstatus := CASE WHEN p_failure_kind IN ('busy', 'no_answer', 'voicemail', 'canceled')
                    THEN p_failure_kind ELSE 'failed' END;
  INSERT INTO public.call_history (user_id, template_id, queue_id, assignment_id, provider_id,
                                   recipient_name, recipient_phone, recipient_email, status,
                                   started_at, ended_at, duration_seconds, provider_call_id,
                                   attempts, error, metadata)
  VALUES (v_q.user_id, v_q.template_id, v_q.id, p_assignment_id, v_a.provider_id,
          v_q.recipient_name, v_q.recipient_phone, v_q.recipient_email, v_hstatus,
          coalesce(v_a.placed_at, v_a.dialing_at), now(), p_duration_seconds,
          coalesce(v_a.provider_call_id, p_provider_call_id), v_q.attempts,
          coalesce(p_error, p_failure_kind), v_q.metadata);

  UPDATE public.call_queue q
     SET status = CASE WHEN p_failure_kind = 'canceled' THEN 'canceled' ELSE 'failed' END,
         last_error = coalesce(p_error, p_failure_kind), completed_at = now(),
         lease_expires_at = NULL
   WHERE q.id = v_q.id;
  PERFORM public.free_provider_slot(p_assignment_id);
  PERFORM public.fail_on_provider(v_a.provider_id, p_failure_kind, p_error);
  PERFORM public.fold_call_usage(v_settled, true);
  RETURN CASE WHEN p_failure_kind = 'canceled' THEN 'canceled' ELSE 'failed' END;
END
$$;

-- fail_on_provider: a failed attempt's effect on its provider row (attempt and failure
-- counted, health); run last by handle_failed_call, after the slot was freed (lock order:
-- provider rows after tenant counters).
CREATE OR REPLACE FUNCTION public.fail_on_provider(
  p_provider_id uuid, p_failure_kind text, p_error text
) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  PERFORM public.tally_provider_call(p_provider_id, 0, (p_failure_kind <> 'canceled')::int);
  IF p_failure_kind = 'provider_error' THEN
    PERFORM public.record_provider_health(p_provider_id, false, NULL, p_error);
  ELSIF p_failure_kind = 'rate_limited' THEN
    UPDATE public.provider_availability pa
       SET status = CASE WHEN pa.status = 'online' THEN 'degraded' ELSE pa.status END
     WHERE pa.provider_id = p_provider_id;
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- reap_expired_leases: claimed rows past their lease -> queued ('requeued'); assigned (never
-- dialed) assignments past the lease -> released ('released'); dialing rows past the lease and
-- placed rows whose poll is overdue are returned as 'reconcile' (the worker asks the provider).
CREATE OR REPLACE FUNCTION public.reap_expired_leases()
RETURNS TABLE (queue_id uuid, assignment_id uuid, action text)
LANGUAGE plpgsql
SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
  v_row record;
BEGIN
  RETURN QUERY
  WITH expired AS (
    SELECT q.id FROM public.call_queue q
     WHERE q.status = 'claimed' AND q.lease_expires_at < now()
       FOR UPDATE SKIP LOCKED
  )
  UPDATE public.call_queue q
     SET status = 'queued', claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL
    FROM expired WHERE q.id = expired.id
  RETURNING q.id, NULL::uuid, 'requeued'::text;

  FOR v_row IN
    SELECT a.id AS aid, q.id AS qid
      FROM public.call_queue q
      JOIN public.call_assignments a ON a.queue_id = q.id AND a.state = 'assigned'
     WHERE q.status = 'assigned' AND q.lease_expires_at < now()
       FOR UPDATE OF q SKIP LOCKED
  LOOP
    IF public.release_assignment(v_row.aid, 'lease_expired') THEN
      queue_id := v_row.qid;
      assignment_id := v_row.aid;
      action := 'released';
      RETURN NEXT;
    END IF;
  END LOOP;

  RETURN QUERY
  SELECT q.id, a.id, 'reconcile'::text
    FROM public.call_queue q
    JOIN public.call_assignments a ON a.queue_id = q.id
   WHERE (q.status = 'dialing' AND a.state = 'dialing' AND q.lease_expires_at < now())
      OR (q.status = 'in_progress' AND a.state = 'placed'
          -- a poll this overdue means its tracking chain was lost (broker restart, dead worker)
          AND a.next_poll_at < now() - make_interval(secs => public.poll_deadline_seconds()));
END
$$;

-- reconcile_provider_slots: a slot held by an assignment that is not live (or gone) is freed,
-- and provider_availability's current_calls / available_slots are refreshed from the slots
-- (cheap: one count per provider; run by beat with the reaper). The taken slots are locked
-- first, then checked in a fresh snapshot, so an assignment committed while waiting counts as
-- live. Returns the number of slots freed (0 when nothing leaked).
CREATE OR REPLACE FUNCTION public.reconcile_provider_slots() RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_taken uuid[];
  v_n integer;
BEGIN
  v_taken := ARRAY(SELECT s.assignment_id FROM public.provider_slots s
                    WHERE s.assignment_id IS NOT NULL
                    ORDER BY s.provider_id, s.slot_no
                      FOR NO KEY UPDATE);
  WITH stray AS (
    SELECT u.id FROM unnest(v_taken) AS u(id)
     WHERE NOT EXISTS (SELECT 1 FROM public.call_assignments a
                        WHERE a.id = u.id AND a.state = ANY (public.live_assignment_states()))
  ), gone AS (
    DELETE FROM public.provider_slots s USING stray
     WHERE s.assignment_id = stray.id AND s.retired
    RETURNING 1
  ), freed AS (
    UPDATE public.provider_slots s SET assignment_id = NULL, freed_at = clock_timestamp()
      FROM stray
     WHERE s.assignment_id = stray.id AND NOT s.retired
    RETURNING 1
  )
  SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM freed) INTO v_n;

  UPDATE public.provider_availability pa
     SET current_calls = l.current_calls, available_slots = l.available_slots
    FROM public.provider_load l
   WHERE pa.provider_id = l.provider_id
     AND (pa.current_calls, pa.available_slots)
         IS DISTINCT FROM (l.current_calls, l.available_slots);
  -- the endings' pending tallies, into their providers' statistics (rows other transactions
  -- hold are left for the next run)
  WITH rows_ AS (
    SELECT pa.id, pa.provider_id FROM public.provider_availability pa
     WHERE pa.provider_id IN (SELECT DISTINCT t.provider_id FROM public.provider_call_tallies t)
     ORDER BY pa.provider_id
       FOR NO KEY UPDATE SKIP LOCKED
  ), taken AS (
    DELETE FROM public.provider_call_tallies t USING rows_ r
     WHERE t.provider_id = r.provider_id
    RETURNING t.provider_id, t.successful_calls, t.failed_calls
  )
  UPDATE public.provider_availability pa
     SET total_calls = pa.total_calls + s.total,
         successful_calls = pa.successful_calls + s.successful,
         failed_calls = pa.failed_calls + s.failed
    FROM (SELECT k.provider_id, count(*) AS total, sum(k.successful_calls) AS successful,
                 sum(k.failed_calls) AS failed
            FROM taken k GROUP BY k.provider_id) s
   WHERE pa.provider_id = s.provider_id;
  RETURN v_n;
END
$$;

-- rollover_usage_periods: for live subscriptions whose period ended, advance the period (by
-- whole billing intervals until it contains now) and create its usage row. Returns the number
-- of subscriptions rolled over.
CREATE OR REPLACE FUNCTION public.rollover_usage_periods() RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_s record;
  v_step interval;
  v_start timestamptz;
  v_end timestamptz;
  v_n integer := 0;
BEGIN
  FOR v_s IN
    SELECT s.id, s.user_id, s.current_period_end, s.cancel_at_period_end, pl.billing_interval,
           pl.call_limit, pl.minute_limit
      FROM public.user_subscriptions s
      JOIN public.subscription_plans pl ON pl.id = s.plan_id
     WHERE s.status IN ('active', 'trialing') AND s.current_period_end <= now()
       FOR NO KEY UPDATE OF s SKIP LOCKED
  LOOP
    -- cancel_at_period_end: the subscription ends here instead of renewing; the tenant's
    -- queued calls are held (not claimed) until a live subscription exists again
    IF v_s.cancel_at_period_end THEN
      UPDATE public.user_subscriptions s
         SET status = 'canceled', canceled_at = coalesce(s.canceled_at, s.current_period_end)
       WHERE s.id = v_s.id;
      v_n := v_n + 1;
      CONTINUE;
    END IF;
    v_step := CASE v_s.billing_interval WHEN 'year' THEN interval '1 year' ELSE interval '1 month' END;
    v_start := v_s.current_period_end;
    v_end := v_start + v_step;
    WHILE v_end <= now() LOOP
      v_start := v_end;
      v_end := v_end + v_step;
    END LOOP;
    UPDATE public.user_subscriptions s
       SET current_period_start = v_start, current_period_end = v_end
     WHERE s.id = v_s.id;
    INSERT INTO public.user_call_usage (user_id, subscription_id, period_start, period_end,
                                        calls_limit, minutes_limit)
    VALUES (v_s.user_id, v_s.id, v_start, v_end, v_s.call_limit, v_s.minute_limit)
    ON CONFLICT (user_id, period_start) DO NOTHING;
    v_n := v_n + 1;
  END LOOP;
  RETURN v_n;
END
$$;
