-- Plans: counters, billing periods, the dial allowance, the fair claim's candidates.
-- Tables: 20240101000120_plans.sql. The model is described in supabase/README.md.
--
-- Lock order (extends the one in 20240101000200): call_queue row -> call_assignments row ->
-- user_call_usage row(s) -> tenant_call_counters row(s) (several of a kind always in user_id
-- order) -> provider_availability row(s). An ending takes its period's usage row last, with
-- SKIP LOCKED (fold_call_usage): it never waits for it.

-- ---------------------------------------------------------------------------------------------
-- Counters: a statement trigger on call_queue adds each statement's net change per tenant.
-- The class of a status: 1 queued, 2 claimed/assigned, 3 dialing/in_progress, else 0.
CREATE OR REPLACE FUNCTION public.call_status_class(p_status text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
  RETURN CASE p_status WHEN 'queued' THEN 1 WHEN 'claimed' THEN 2 WHEN 'assigned' THEN 2
                       WHEN 'dialing' THEN 3 WHEN 'in_progress' THEN 3 ELSE 0 END;
END
$$;

-- The plan's calls per minute, fleet-wide: a GCRA over claims. Emission interval
-- T = 60 / calls_per_minute seconds, burst b = plan_rate_burst (one second's worth, at least 1),
-- tolerance (b - 1) * T. A claim at p_now may take plan_rate_allowance calls; each call taken
-- moves the tenant's rate_tat on by T (from p_now when it lies in the past), rounded up to the
-- microsecond. Hence in any 60 s window a tenant gets at most calls_per_minute + b - 1 claims
-- (b = 1, so exactly calls_per_minute, below 120 per minute). NULL: no limit.
-- (PL/pgSQL, both: a SQL function that pins search_path is never inlined, and called with a
-- column it is parsed and planned again at every statement that calls it; a PL/pgSQL one keeps
-- its expression's plan for the session)
CREATE OR REPLACE FUNCTION public.plan_rate_burst(p_calls_per_minute integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
  RETURN greatest(p_calls_per_minute / 60, 1);
END
$$;

CREATE OR REPLACE FUNCTION public.plan_rate_allowance(
  p_calls_per_minute integer, p_tat timestamptz, p_now timestamptz
) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
  -- calls j = 1.. conform while tat + (j - 1) T - (b - 1) T <= now, i.e. j <= b - (tat - now) / T
  RETURN CASE WHEN p_calls_per_minute IS NOT NULL THEN
           greatest(public.plan_rate_burst(p_calls_per_minute)
                    - ceil(greatest(extract(epoch FROM coalesce(p_tat, p_now) - p_now), 0)
                           * p_calls_per_minute / 60)::integer, 0) END;
END
$$;

-- Stripes per tenant (tenant_call_counters, 20240101000120); the bound of
-- call_queue.counter_stripe's CHECK.
CREATE OR REPLACE FUNCTION public.counter_stripes() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
  SELECT 16;
$$;

-- Apply per-stripe deltas (user_id, stripe, queued, claimed, dialed, claims): rows locked in
-- (user_id, stripe) order. A tenant's first counts create all its stripes (a claim takes only
-- stripes that exist). claims (calls taken from the queue by a claim) move the tenant's
-- rate_tat (stripe 0's) on when its plan has calls_per_minute.
CREATE OR REPLACE FUNCTION public.apply_counter_deltas(p_deltas jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_now timestamptz;
BEGIN
  INSERT INTO public.tenant_call_counters (user_id, stripe)
  SELECT u.user_id, g.g::smallint
    FROM (SELECT DISTINCT d.user_id FROM jsonb_to_recordset(p_deltas) AS d(user_id uuid)) u
   CROSS JOIN generate_series(0, public.counter_stripes() - 1) AS g(g)
   WHERE EXISTS (SELECT 1 FROM public.users x WHERE x.id = u.user_id)
     AND NOT EXISTS (SELECT 1 FROM public.tenant_call_counters c WHERE c.user_id = u.user_id)
   ORDER BY 1, 2
  ON CONFLICT (user_id, stripe) DO NOTHING;
  INSERT INTO public.tenant_call_counters AS c (user_id, stripe, queued, claimed, dialed)
  SELECT d.user_id, d.stripe, d.queued, d.claimed, d.dialed
    FROM jsonb_to_recordset(p_deltas)
         AS d(user_id uuid, stripe smallint, queued int, claimed int, dialed int)
   WHERE EXISTS (SELECT 1 FROM public.users u WHERE u.id = d.user_id)
   ORDER BY d.user_id, d.stripe
  ON CONFLICT (user_id, stripe) DO UPDATE
     SET queued = c.queued + EXCLUDED.queued, claimed = c.claimed + EXCLUDED.claimed,
         dialed = c.dialed + EXCLUDED.dialed, updated_at = now();
  IF jsonb_path_exists(p_deltas, '$[*] ? (@.claims > 0)') THEN
    v_now := public.callq_now();
    UPDATE public.tenant_call_counters c
       SET rate_tat = greatest(coalesce(c.rate_tat, v_now), v_now)
                      + ceil(d.claims * 60000000.0 / pl.calls_per_minute)::float8
                        * interval '1 microsecond'
      FROM (SELECT x.user_id, sum(x.claims) AS claims
              FROM jsonb_to_recordset(p_deltas) AS x(user_id uuid, claims int)
             GROUP BY x.user_id) d
      JOIN public.user_subscriptions s
        ON s.user_id = d.user_id AND s.status IN ('active', 'trialing')
      JOIN public.subscription_plans pl ON pl.id = s.plan_id
     WHERE c.user_id = d.user_id AND c.stripe = 0 AND d.claims > 0
       AND pl.calls_per_minute IS NOT NULL;
  END IF;
END
$$;

-- SECURITY DEFINER: the trigger also runs for statements of roles that may not write the
-- counters (an app user canceling a call); it only ever applies the statement's own changes.
-- Where a change counts: a row's new state in the stripe of its new version; its old state in
-- the stripe it was counted in (its old stripe), except a call taken from the queue, whose
-- queued count goes with it to its claim's stripe (so a claim writes only that stripe).
-- Fast path: a statement that changed one row, in one stripe of a tenant whose row exists (the
-- call path's steps: a single claim, dial gate, placed, ending, retry; schedule_call) updates
-- that row directly; anything else (several rows, a new tenant) aggregates the statement's
-- rows per stripe and goes through apply_counter_deltas.
CREATE OR REPLACE FUNCTION public.count_tenant_calls() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_deltas jsonb;
  v_one record;
  v_from integer := 0;
  v_to integer := 0;
  v_now timestamptz;
  v_single boolean := false;
  v_cpm integer;
BEGIN
  -- one statement finds a statement's only row (none when it changed several)
  IF TG_OP = 'UPDATE' THEN
    SELECT n.user_id, o.user_id AS old_user_id, n.status, o.status AS old_status,
           n.counter_stripe AS stripe, o.counter_stripe AS old_stripe INTO v_one
      FROM old_rows o, new_rows n
     WHERE (SELECT count(*) FROM new_rows) = 1;
    v_single := FOUND;
    v_from := public.call_status_class(v_one.old_status);
  ELSIF TG_OP = 'INSERT' THEN
    SELECT n.user_id, n.user_id AS old_user_id, n.status, n.counter_stripe AS stripe,
           n.counter_stripe AS old_stripe INTO v_one
      FROM new_rows n
     WHERE (SELECT count(*) FROM new_rows) = 1;
    v_single := FOUND;
  END IF;
  IF v_single THEN
    v_to := public.call_status_class(v_one.status);
    IF v_one.user_id IS NOT DISTINCT FROM v_one.old_user_id
       AND (v_one.stripe = v_one.old_stripe OR v_from = 1) THEN
      IF v_from = v_to THEN
        RETURN NULL;
      END IF;
      -- A claim (queued -> taken) also moves the plan's rate on, as apply_counter_deltas does
      -- (stripe 0's: a claimer of a tenant with a rate holds it already, claimable_calls); the
      -- update returns the rate when it must (no other statement when the plan has none).
      UPDATE public.tenant_call_counters c
         SET queued = c.queued + (v_to = 1)::int - (v_from = 1)::int,
             claimed = c.claimed + (v_to = 2)::int - (v_from = 2)::int,
             dialed = c.dialed + (v_to = 3)::int - (v_from = 3)::int,
             updated_at = now()
       WHERE c.user_id = v_one.user_id AND c.stripe = v_one.stripe
      RETURNING (SELECT pl.calls_per_minute
                   FROM public.user_subscriptions s
                   JOIN public.subscription_plans pl ON pl.id = s.plan_id
                  WHERE v_from = 1 AND v_to >= 2
                    AND s.user_id = c.user_id AND s.status IN ('active', 'trialing'))
        INTO v_cpm;
      IF FOUND THEN
        IF v_cpm IS NOT NULL THEN
          v_now := public.callq_now();
          UPDATE public.tenant_call_counters c
             SET rate_tat = greatest(coalesce(c.rate_tat, v_now), v_now)
                            + ceil(60000000.0 / v_cpm)::float8 * interval '1 microsecond'
           WHERE c.user_id = v_one.user_id AND c.stripe = 0;
        END IF;
        RETURN NULL;
      END IF;
    END IF;
  END IF;

  -- the classes of call_status_class, spelled inline: a function call per row (it cannot be
  -- inlined, it pins search_path) cost more than the rest of the statement
  IF TG_OP = 'INSERT' THEN
    SELECT jsonb_agg(d) INTO v_deltas FROM (
      SELECT n.user_id, n.counter_stripe AS stripe,
             count(*) FILTER (WHERE n.status = 'queued') AS queued,
             count(*) FILTER (WHERE n.status IN ('claimed', 'assigned')) AS claimed,
             count(*) FILTER (WHERE n.status IN ('dialing', 'in_progress')) AS dialed
        FROM new_rows n GROUP BY n.user_id, n.counter_stripe) d;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT jsonb_agg(d) INTO v_deltas FROM (
      SELECT o.user_id, o.counter_stripe AS stripe,
             -count(*) FILTER (WHERE o.status = 'queued') AS queued,
             -count(*) FILTER (WHERE o.status IN ('claimed', 'assigned')) AS claimed,
             -count(*) FILTER (WHERE o.status IN ('dialing', 'in_progress')) AS dialed
        FROM old_rows o GROUP BY o.user_id, o.counter_stripe) d;
  ELSE
    -- claims: rows taken from the queue (queued -> claimed, assigned, dialing, in progress)
    SELECT jsonb_agg(d) INTO v_deltas FROM (
      SELECT x.user_id, x.stripe, sum(x.s * x.q) AS queued, sum(x.s * x.c) AS claimed,
             sum(x.s * x.d) AS dialed, sum(x.took) AS claims
        FROM (SELECT n.user_id, n.counter_stripe AS stripe, 1 AS s, (n.status = 'queued')::int AS q,
                     (n.status IN ('claimed', 'assigned'))::int AS c,
                     (n.status IN ('dialing', 'in_progress'))::int AS d,
                     (o.status = 'queued' AND n.status IN ('claimed', 'assigned', 'dialing',
                                                           'in_progress'))::int AS took
                FROM new_rows n JOIN old_rows o ON o.id = n.id
               WHERE o.status IS DISTINCT FROM n.status OR o.user_id IS DISTINCT FROM n.user_id
                  OR o.counter_stripe <> n.counter_stripe
              UNION ALL
              SELECT o.user_id,
                     CASE WHEN o.status = 'queued' AND o.user_id = n.user_id
                          THEN n.counter_stripe ELSE o.counter_stripe END,
                     -1, (o.status = 'queued')::int,
                     (o.status IN ('claimed', 'assigned'))::int,
                     (o.status IN ('dialing', 'in_progress'))::int, 0
                FROM new_rows n JOIN old_rows o ON o.id = n.id
               WHERE o.status IS DISTINCT FROM n.status OR o.user_id IS DISTINCT FROM n.user_id
                  OR o.counter_stripe <> n.counter_stripe) x
       GROUP BY x.user_id, x.stripe
      HAVING sum(x.s * x.q) <> 0 OR sum(x.s * x.c) <> 0 OR sum(x.s * x.d) <> 0) d;
  END IF;
  IF v_deltas IS NOT NULL THEN
    PERFORM public.apply_counter_deltas(v_deltas);
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER call_queue_count_insert AFTER INSERT ON public.call_queue
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.count_tenant_calls();
CREATE TRIGGER call_queue_count_update AFTER UPDATE ON public.call_queue
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.count_tenant_calls();
CREATE TRIGGER call_queue_count_delete AFTER DELETE ON public.call_queue
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.count_tenant_calls();

CREATE OR REPLACE FUNCTION public.zero_tenant_counters() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  UPDATE public.tenant_call_counters c SET queued = 0, claimed = 0, dialed = 0, updated_at = now()
   WHERE c.queued <> 0 OR c.claimed <> 0 OR c.dialed <> 0;
  RETURN NULL;
END
$$;
CREATE TRIGGER call_queue_count_truncate AFTER TRUNCATE ON public.call_queue
  FOR EACH STATEMENT EXECUTE FUNCTION public.zero_tenant_counters();

-- reconcile_tenant_counters: counters := a recount of call_queue (per stripe; queued as the
-- tenant's sum, see tenant_call_counters), and each usage period's
-- minutes_reserved := the reservations of its live assignments. Locks the rows first (usage,
-- then counters, each in user_id order; counter stripes in use are skipped, not waited for:
-- the next round corrects them), folds the usage rows' pending endings (fold_call_usage), then
-- counts in a fresh snapshot. Returns rows corrected.
CREATE OR REPLACE FUNCTION public.reconcile_tenant_counters() RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_n integer;
  v_m integer;
  v_usage uuid[];
  v_users uuid[];
  v_stripes smallint[];
BEGIN
  v_usage := ARRAY(
    SELECT u.id FROM public.user_call_usage u
     WHERE u.minutes_reserved <> 0
        OR u.id IN (SELECT a.usage_id FROM public.call_assignments a
                     WHERE a.state = ANY (public.live_assignment_states()) AND a.usage_id IS NOT NULL)
        OR u.id IN (SELECT x.usage_id FROM public.user_call_usage_deltas x)
     ORDER BY u.user_id, u.period_start FOR NO KEY UPDATE);
  PERFORM public.fold_call_usage(i.id)
     FROM unnest(v_usage) AS i(id)
    WHERE EXISTS (SELECT 1 FROM public.user_call_usage_deltas x WHERE x.usage_id = i.id);
  -- an ending committed after the fold is still a delta: its reservation stays in the row
  -- until folded (the live view subtracts it), so it is counted here, in the same snapshot as
  -- the live assignments
  WITH r AS (
    SELECT u.id,
           (coalesce((SELECT sum(a.reserved_minutes) FROM public.call_assignments a
                       WHERE a.usage_id = u.id
                         AND a.state = ANY (public.live_assignment_states())), 0)
            + coalesce((SELECT sum(x.minutes_released) FROM public.user_call_usage_deltas x
                         WHERE x.usage_id = u.id), 0))::int AS m
      FROM public.user_call_usage u
     WHERE u.id = ANY (v_usage)
  )
  UPDATE public.user_call_usage u SET minutes_reserved = r.m
    FROM r WHERE u.id = r.id AND u.minutes_reserved <> r.m;
  GET DIAGNOSTICS v_m = ROW_COUNT;

  -- the counter stripes it can lock now (one in use is left for the next round: waiting for it
  -- could close a cycle with a transaction that takes a tenant's stripes in another order)
  SELECT array_agg(c.user_id), array_agg(c.stripe) INTO v_users, v_stripes
    FROM (SELECT c.user_id, c.stripe FROM public.tenant_call_counters c
           ORDER BY c.user_id, c.stripe FOR NO KEY UPDATE SKIP LOCKED) c;
  WITH ins AS (
    INSERT INTO public.tenant_call_counters (user_id, stripe)
    SELECT u.user_id, g.g::smallint
      FROM (SELECT DISTINCT q.user_id FROM public.call_queue q
             WHERE q.status = ANY (public.live_call_statuses())) u
     CROSS JOIN generate_series(0, public.counter_stripes() - 1) AS g(g)
     -- (a tenant's stripes are made together: one that has any has all, and checking the key
     -- of a stripe in use would wait for it)
     WHERE NOT EXISTS (SELECT 1 FROM public.tenant_call_counters c WHERE c.user_id = u.user_id)
     ORDER BY 1, 2
    ON CONFLICT (user_id, stripe) DO NOTHING
    RETURNING user_id, stripe
  )
  SELECT v_users || array_agg(ins.user_id), v_stripes || array_agg(ins.stripe)
    INTO v_users, v_stripes FROM ins;
  -- claimed and dialed per stripe; queued as the tenant's sum (any drift lands on stripe 0)
  WITH flight AS (
    SELECT q.user_id, q.counter_stripe AS stripe,
           count(*) FILTER (WHERE q.status IN ('claimed', 'assigned'))::int AS claimed,
           count(*) FILTER (WHERE q.status IN ('dialing', 'in_progress'))::int AS dialed
      FROM public.call_queue q
     WHERE q.status = ANY (public.in_flight_call_statuses())
     GROUP BY 1, 2
  ),
  waiting AS (
    SELECT q.user_id, count(*)::int AS queued
      FROM public.call_queue q WHERE q.status = 'queued' GROUP BY 1
  ),
  counted AS (
    SELECT c.user_id, sum(c.queued)::int AS queued
      FROM public.tenant_call_counters c GROUP BY 1
  ),
  live AS (
    SELECT c.user_id, c.stripe,
           c.queued + CASE WHEN c.stripe = 0
                           THEN coalesce(w.queued, 0) - n.queued ELSE 0 END AS queued,
           coalesce(f.claimed, 0) AS claimed, coalesce(f.dialed, 0) AS dialed
      FROM public.tenant_call_counters c
      JOIN counted n ON n.user_id = c.user_id
      LEFT JOIN waiting w ON w.user_id = c.user_id
      LEFT JOIN flight f ON f.user_id = c.user_id AND f.stripe = c.stripe
  )
  UPDATE public.tenant_call_counters c
     SET queued = live.queued, claimed = live.claimed, dialed = live.dialed, updated_at = now()
    FROM live
   WHERE c.user_id = live.user_id AND c.stripe = live.stripe
     AND (c.user_id, c.stripe) IN (SELECT * FROM unnest(v_users, v_stripes))
     AND (c.queued, c.claimed, c.dialed) IS DISTINCT FROM (live.queued, live.claimed, live.dialed);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n + v_m;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The tenant's live subscription and plan (active or trialing), or no row.
CREATE OR REPLACE FUNCTION public.tenant_plan(p_user_id uuid)
RETURNS TABLE (subscription_id uuid, period_start timestamptz, period_end timestamptz,
               call_limit integer, minute_limit integer, max_concurrent_calls integer,
               max_call_minutes integer)
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  SELECT s.id, s.current_period_start, s.current_period_end, pl.call_limit, pl.minute_limit,
         pl.max_concurrent_calls, pl.max_call_minutes
    FROM public.user_subscriptions s
    JOIN public.subscription_plans pl ON pl.id = s.plan_id
   WHERE s.user_id = p_user_id AND s.status IN ('active', 'trialing')
   ORDER BY s.current_period_end DESC
   LIMIT 1;
END
$$;

-- The usage row of the tenant's current period (created on first use), locked. NULL when the
-- tenant has no live subscription.
CREATE OR REPLACE FUNCTION public.lock_current_usage(p_user_id uuid) RETURNS uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_p record;
  v_id uuid;
BEGIN
  SELECT * INTO v_p FROM public.tenant_plan(p_user_id);
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  -- the row exists but for the period's first call: look before inserting
  SELECT u.id INTO v_id FROM public.user_call_usage u
   WHERE u.user_id = p_user_id AND u.period_start = v_p.period_start
     FOR NO KEY UPDATE;
  IF FOUND THEN
    RETURN v_id;
  END IF;
  INSERT INTO public.user_call_usage (user_id, subscription_id, period_start, period_end,
                                      calls_limit, minutes_limit)
  VALUES (p_user_id, v_p.subscription_id, v_p.period_start, v_p.period_end, v_p.call_limit,
          v_p.minute_limit)
  ON CONFLICT (user_id, period_start) DO NOTHING;
  SELECT u.id INTO v_id FROM public.user_call_usage u
   WHERE u.user_id = p_user_id AND u.period_start = v_p.period_start
     FOR NO KEY UPDATE;
  RETURN v_id;
END
$$;

-- settle_call_usage: a call's attempt ended. Its reservation is released and the minutes the
-- provider reported, rounded up per call, are billed to the period the dial was counted in
-- (the current period when the attempt never passed the gate). Called once per assignment by
-- complete_call and handle_failed_call under the assignment's row lock.
-- A dial counted at the gate (usage_id set) is settled as a row of user_call_usage_deltas (when
-- there is anything to settle), not on the period's row: the period's row is what the tenant's
-- gates write, and an ending waiting for it queued behind every gate and every other ending of
-- the tenant. The caller folds it in at its end (fold_call_usage, SKIP LOCKED) when that row is
-- free; else the next gate or beat does. Returns the usage row billed, NULL when none.
CREATE OR REPLACE FUNCTION public.settle_call_usage(
  p_assignment_id uuid, p_user_id uuid, p_duration_seconds double precision
) RETURNS uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_a record;
  v_usage uuid;
  v_minutes integer := ceil(greatest(coalesce(p_duration_seconds, 0), 0)::numeric / 60)::int;
BEGIN
  SELECT a.usage_id, a.reserved_minutes INTO v_a
    FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF v_a.usage_id IS NOT NULL THEN
    IF v_minutes = 0 AND v_a.reserved_minutes = 0 THEN
      RETURN NULL;  -- nothing to bill, nothing to give back
    END IF;
    INSERT INTO public.user_call_usage_deltas (usage_id, user_id, minutes_used, minutes_released)
    VALUES (v_a.usage_id, p_user_id, v_minutes, v_a.reserved_minutes);
    UPDATE public.call_assignments a SET reserved_minutes = 0
     WHERE a.id = p_assignment_id AND a.reserved_minutes <> 0;
    RETURN v_a.usage_id;
  END IF;
  IF v_minutes = 0 THEN
    RETURN NULL;
  END IF;
  -- never gated (no period billed yet): the current period's row, directly (rare)
  v_usage := public.lock_current_usage(p_user_id);
  IF v_usage IS NULL THEN  -- no live subscription: account the calendar month
    INSERT INTO public.user_call_usage AS u (user_id, period_start, period_end)
    VALUES (p_user_id, date_trunc('month', now()), date_trunc('month', now()) + interval '1 month')
    ON CONFLICT (user_id, period_start) DO UPDATE SET updated_at = now()
    RETURNING u.id INTO v_usage;
  END IF;
  UPDATE public.user_call_usage u SET minutes_used = u.minutes_used + v_minutes
   WHERE u.id = v_usage;
  RETURN NULL;
END
$$;

-- fold_call_usage: the pending usage of a period (user_call_usage_deltas) moved into its
-- user_call_usage row: its deltas deleted and added to it, in one transaction, under the row's
-- lock (so two folds never both count a delta; a delta committed meanwhile waits for the next
-- fold). p_skip_locked: only if the row is free now (an ending's own fold, taken last, after the
-- tenant's counter stripe and provider rows). SKIP LOCKED alone does not keep that from waiting:
-- when the row's version this statement sees has been updated since, PostgreSQL follows its
-- update chain and waits for the newest version's locker whatever the wait policy
-- (heap_lock_updated_tuple). A dial gate holds this row and then wants the tenant's stripe,
-- which the ending holds: that wait closed a deadlock (bench/FINDINGS.md 16). So the try is
-- bounded: a lock not had within 2 ms counts as locked (the block's subtransaction undoes the
-- setting; after a lock, the caller's own lock_timeout is put back). The settings are
-- assignments, not PERFORMs: an expression costs less than a statement, on every ending.
-- TRUE when the row was folded.
CREATE OR REPLACE FUNCTION public.fold_call_usage(
  p_usage_id uuid, p_skip_locked boolean DEFAULT false
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_timeout text;
  v_set text;
  v_locked boolean;
BEGIN
  IF p_usage_id IS NULL OR NOT EXISTS (SELECT 1 FROM public.user_call_usage_deltas x
                                        WHERE x.usage_id = p_usage_id) THEN
    RETURN false;
  END IF;
  IF p_skip_locked THEN
    v_timeout := current_setting('lock_timeout');
    BEGIN
      v_set := set_config('lock_timeout', '2ms', true);
      PERFORM 1 FROM public.user_call_usage u WHERE u.id = p_usage_id
         FOR NO KEY UPDATE SKIP LOCKED;
      v_locked := FOUND;
      v_set := set_config('lock_timeout', v_timeout, true);
    EXCEPTION WHEN lock_not_available THEN
      RETURN false;
    END;
  ELSE
    PERFORM 1 FROM public.user_call_usage u WHERE u.id = p_usage_id FOR NO KEY UPDATE;
    v_locked := FOUND;
  END IF;
  IF NOT v_locked THEN
    RETURN false;
  END IF;
  WITH d AS (
    DELETE FROM public.user_call_usage_deltas x WHERE x.usage_id = p_usage_id
    RETURNING x.calls_made, x.minutes_used, x.minutes_released
  )
  UPDATE public.user_call_usage u
     SET calls_made = u.calls_made + s.calls,
         minutes_used = u.minutes_used + s.used,
         minutes_reserved = greatest(u.minutes_reserved - s.released, 0)
    FROM (SELECT sum(d.calls_made)::int AS calls, sum(d.minutes_used)::int AS used,
                 sum(d.minutes_released)::int AS released
            FROM d HAVING count(*) > 0) s
   WHERE u.id = p_usage_id;
  RETURN true;
END
$$;

-- user_call_usage_live: user_call_usage with the pending usage not folded into it yet added
-- (the figures of user_call_usage itself trail by what user_call_usage_deltas holds: while a
-- tenant's calls end, or its unlimited plan's chunks dial, faster than its row is free, until
-- the row is free, its next gate with limits, or beat's reconcile).
-- Same columns; the caller's RLS applies to both tables (an app user reads its own periods).
CREATE VIEW public.user_call_usage_live WITH (security_invoker = true) AS
  SELECT u.id, u.user_id, u.subscription_id, u.period_start, u.period_end,
         u.calls_made + coalesce(d.calls, 0) AS calls_made,
         u.minutes_used + coalesce(d.used, 0) AS minutes_used,
         greatest(u.minutes_reserved - coalesce(d.released, 0), 0) AS minutes_reserved,
         u.calls_limit, u.minutes_limit,
         CASE WHEN u.calls_limit IS NULL THEN NULL
              ELSE greatest(u.calls_limit - u.calls_made - coalesce(d.calls, 0), 0)
         END AS calls_remaining,
         CASE WHEN u.minutes_limit IS NULL THEN NULL
              ELSE greatest(u.minutes_limit - u.minutes_used - coalesce(d.used, 0), 0)
         END AS minutes_remaining,
         u.created_at, u.updated_at
    FROM public.user_call_usage u
    LEFT JOIN LATERAL (
      SELECT sum(x.calls_made)::int AS calls, sum(x.minutes_used)::int AS used,
             sum(x.minutes_released)::int AS released
        FROM public.user_call_usage_deltas x WHERE x.usage_id = u.id) d ON true;

-- usage_totals: a period's usage as billed so far, exact at any moment: its user_call_usage
-- row plus the endings not folded into it yet, read in one snapshot. Zeros when the period has
-- no row yet.
CREATE OR REPLACE FUNCTION public.usage_totals(
  p_user_id uuid, p_period_start timestamptz,
  OUT calls_made integer, OUT minutes_used integer, OUT minutes_reserved integer)
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  SELECT u.calls_made, u.minutes_used, u.minutes_reserved
    INTO calls_made, minutes_used, minutes_reserved
    FROM public.user_call_usage_live u
   WHERE u.user_id = p_user_id AND u.period_start = p_period_start;
  calls_made := coalesce(calls_made, 0);
  minutes_used := coalesce(minutes_used, 0);
  minutes_reserved := coalesce(minutes_reserved, 0);
END
$$;

-- return_dial: an attempt proven never dialed (release_assignment) gives back its dial and its
-- reservation.
CREATE OR REPLACE FUNCTION public.return_dial(p_assignment_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_a record;
BEGIN
  SELECT a.usage_id, a.reserved_minutes INTO v_a
    FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF v_a.usage_id IS NULL THEN
    RETURN;
  END IF;
  -- the row is locked for the update anyway: its pending usage folded in first (the dial
  -- given back may still be a pending row)
  PERFORM public.fold_call_usage(v_a.usage_id);
  UPDATE public.user_call_usage u
     SET calls_made = greatest(u.calls_made - 1, 0),
         minutes_reserved = greatest(u.minutes_reserved - v_a.reserved_minutes, 0)
   WHERE u.id = v_a.usage_id;
  UPDATE public.call_assignments a
     SET usage_id = NULL, reserved_minutes = 0, max_duration_seconds = NULL
   WHERE a.id = p_assignment_id;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- claimable_calls: up to p_limit due queued calls, locked (FOR UPDATE SKIP LOCKED), in fair
-- order, for claim_due_calls and claim_and_assign_calls: the one claim path, plain calls and
-- paced campaigns' calls alike:
--   * only tenants whose subscription is active or trialing (others' calls are held queued);
--   * at most the tenant's free concurrency (plan max_concurrent_calls minus its calls in
--     flight, from tenant_call_counters): calls over the cap stay queued, untouched;
--   * at most what the plan's calls_per_minute allows now (plan_rate_allowance; the counter
--     trigger moves rate_tat on for each call the claim takes): the rest stay queued;
--   * within a priority level, tenants take turns: each tenant's k-th call ranks with the other
--     tenants' k-th call, then by scheduled_time, so one tenant's backlog does not delay another.
-- Candidates come from the per-tenant index (one probe per tenant and priority, down to the
-- level that fills its room: a tenant's far future calls are never walked). Calls of running
-- campaigns with pacing or a window come through their campaign's lane (claim_candidates)
-- for what is left of the batch. Then, per tenant (user_id order), the room is taken from its counter stripes (tenant_call_counters):
-- stripes with room under their share are locked with SKIP LOCKED (another claimer's are
-- passed over, never waited for), as many as the calls need and up to half of them for a
-- large claim (its calls' later writes spread over several rows, and the other half stays for
-- a concurrent claimer), and each call kept is given one
-- (stripes: the stripe its claim must stamp on it, call_queue.counter_stripe); calls beyond
-- the room stay queued. Concurrent claimers of one tenant so take different stripes and never
-- exceed a plan's cap. A tenant whose plan limits calls per minute has its stripe 0 (the rate)
-- locked first, waited for. Only then do the lanes' calls kept spend their campaign's tokens.
-- p_exclude, p_exclude_stripes: calls this claim already took in an earlier round, with their
-- stripes (they count against the room). In a later round a stripe 0 held by another claimer
-- is skipped, not waited for: this claim already holds other tenants' rows, and waiting could
-- deadlock.
-- (Generic plans, always: each statement's shape is fixed by its joins (per tenant, per
-- priority, an index range in claim order; primary-key look-ups), so planning it again at every
-- call, as a custom plan would, only adds the planning, which cost more than the claim itself.)
CREATE OR REPLACE FUNCTION public.claimable_calls(
  p_limit integer, p_exclude uuid[] DEFAULT NULL, p_exclude_stripes smallint[] DEFAULT NULL,
  OUT ids uuid[], OUT stripes smallint[])
LANGUAGE plpgsql
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_cand uuid[];
  v_ids uuid[];
  v_lane uuid[];
  v_now timestamptz := public.callq_now();
  v_span integer := p_limit + greatest(p_limit, 8);
  v_n integer := public.counter_stripes();
  v_later boolean := coalesce(cardinality(p_exclude), 0) > 0;
  v_t record;
  v_s record;
  v_tat timestamptz;
  v_room integer;
  v_left integer;
  v_k integer;
  v_take integer;
  v_block integer;
  v_stripes smallint[];
  v_rooms integer[];
  v_out uuid[] := '{}';
  v_out_stripes smallint[] := '{}';
  v_tenants integer := 0;
  v_skip uuid[] := p_exclude;
  v_got uuid[];
BEGIN
  IF p_limit IS NULL OR p_limit <= 0 THEN
    RETURN;
  END IF;
  -- Candidates, then the ones not locked by another claimer. Concurrent claimers walk the same
  -- first candidates: a claim that lost some of its span to them (it found the span full but
  -- locked less than its batch) walks on past them, a few times at most, in a newer snapshot.
  FOR v_try IN 1..4 LOOP
    -- (the tenants' room is materialized: computed once per tenant, not once per candidate row)
    WITH RECURSIVE t AS MATERIALIZED (
      SELECT c.user_id,
             -- the batch and as many again, at least 8 more: rows concurrent claimers locked are
             -- skipped, and a small claim among several still finds one they left
             least(pl.max_concurrent_calls - c.flight, v_span,
                   public.plan_rate_allowance(pl.calls_per_minute, c.rate_tat, v_now)) AS room
        -- tenants with a stripe counting calls waiting, then each one's stripes (by key: never
        -- a scan of every tenant's)
        FROM (SELECT DISTINCT w.user_id FROM public.tenant_call_counters w WHERE w.queued > 0) u
       CROSS JOIN LATERAL (
         SELECT u.user_id, sum(x.claimed + x.dialed)::integer AS flight,
                max(x.rate_tat) FILTER (WHERE x.stripe = 0) AS rate_tat
           FROM public.tenant_call_counters x WHERE x.user_id = u.user_id) c
        JOIN public.user_subscriptions s
          ON s.user_id = c.user_id AND s.status IN ('active', 'trialing')
        JOIN public.subscription_plans pl ON pl.id = s.plan_id
       WHERE c.flight < pl.max_concurrent_calls
    ),
    -- Each tenant's first "room" due calls in (priority, scheduled_time, created_at) order: a
    -- walk down the priorities (one index probe each), stopping once the room is filled, so a
    -- tenant whose most urgent level fills the claim costs one probe, not ten. Each step keeps
    -- its level's calls in order (k: their turn within the level).
    walk AS (
      SELECT t.user_id, t.room, 0 AS prio, 0 AS taken,
             NULL::uuid[] AS ids, NULL::timestamptz[] AS sts, NULL::timestamptz[] AS cas
        FROM t WHERE t.room > 0
      UNION ALL
      SELECT w.user_id, w.room, w.prio + 1, w.taken + coalesce(cardinality(x.ids), 0),
             x.ids, x.sts, x.cas
        FROM walk w
       CROSS JOIN LATERAL (
         SELECT array_agg(q.id ORDER BY q.scheduled_time, q.created_at) AS ids,
                array_agg(q.scheduled_time ORDER BY q.scheduled_time, q.created_at) AS sts,
                array_agg(q.created_at ORDER BY q.scheduled_time, q.created_at) AS cas
           FROM (SELECT q.id, q.scheduled_time, q.created_at
                   FROM public.call_queue q
                  WHERE q.user_id = w.user_id AND q.status = 'queued' AND q.priority = w.prio + 1
                    AND q.scheduled_time <= v_now
                    -- a paused, draft or paced campaign's calls: see claim_candidates
                    AND NOT q.via_campaign
                    AND (v_skip IS NULL OR NOT (q.id = ANY (v_skip)))
                  ORDER BY q.scheduled_time, q.created_at
                  LIMIT w.room - w.taken) q) x
       WHERE w.prio < 10 AND w.taken < w.room
    )
    -- within a priority level, tenants take turns: each one's k-th call ranks with the others'
    SELECT array_agg(r.id ORDER BY r.priority, r.k, r.scheduled_time, r.created_at) INTO v_cand
      FROM (
        SELECT x.id, w.prio AS priority, x.k, x.scheduled_time, x.created_at
          FROM walk w
         CROSS JOIN LATERAL unnest(w.ids, w.sts, w.cas) WITH ORDINALITY
                            AS x(id, scheduled_time, created_at, k)
         WHERE w.prio > 0
         ORDER BY 2, 3, 4, 5
         LIMIT v_span
      ) r;

    EXIT WHEN v_cand IS NULL;
    -- "id = ANY": primary-key look-ups of the candidates (a join with unnest() may be planned
    -- as a scan of the tenant's live rows, which grows with its backlog)
    SELECT array_agg(l.id ORDER BY l.ord) INTO v_got
      FROM (SELECT q.id, array_position(v_cand, q.id) AS ord
              FROM public.call_queue q
             WHERE q.id = ANY (v_cand) AND q.status = 'queued' AND q.scheduled_time <= v_now
             ORDER BY 2
             LIMIT p_limit - coalesce(cardinality(v_ids), 0)
               FOR UPDATE OF q SKIP LOCKED) l;
    v_ids := coalesce(v_ids, '{}') || coalesce(v_got, '{}');
    EXIT WHEN cardinality(v_ids) >= p_limit OR cardinality(v_cand) < v_span;
    v_skip := coalesce(v_skip, '{}') || v_cand;
  END LOOP;
  -- paced campaigns' calls, through their lanes (locked, pacing held across the fleet), for
  -- what is left of the batch
  IF coalesce(cardinality(v_ids), 0) < p_limit THEN
    v_lane := ARRAY(
      SELECT d.id
        FROM public.claim_candidates(p_limit - coalesce(cardinality(v_ids), 0), v_now,
                                     coalesce(p_exclude, '{}') || coalesce(v_ids, '{}'), true) d
       ORDER BY d.priority, d.scheduled_time, d.created_at);
    v_ids := coalesce(v_ids, '{}') || v_lane;
  END IF;
  IF coalesce(cardinality(v_ids), 0) = 0 THEN
    RETURN;
  END IF;

  FOR v_t IN
    SELECT q.user_id, array_agg(q.id ORDER BY array_position(v_ids, q.id)) AS calls,
           pl.max_concurrent_calls AS cap, pl.calls_per_minute AS cpm,
           (SELECT count(*) FROM public.call_queue x
             WHERE x.id = ANY (p_exclude) AND x.user_id = q.user_id)::integer AS excluded
      FROM public.call_queue q
      JOIN public.user_subscriptions s
        ON s.user_id = q.user_id AND s.status IN ('active', 'trialing')
      JOIN public.subscription_plans pl ON pl.id = s.plan_id
     WHERE q.id = ANY (v_ids)
     GROUP BY q.user_id, pl.max_concurrent_calls, pl.calls_per_minute
     ORDER BY q.user_id
  LOOP
    v_tenants := v_tenants + 1;
    -- the tenant's room: its cap less all its calls in flight (the latest committed counts),
    -- and what its plan's rate allows now (stripe 0, locked)
    SELECT v_t.cap - sum(c.claimed + c.dialed)::integer - v_t.excluded INTO v_left
      FROM public.tenant_call_counters c WHERE c.user_id = v_t.user_id;
    IF v_t.cpm IS NOT NULL THEN
      IF v_later THEN
        SELECT c.rate_tat INTO v_tat FROM public.tenant_call_counters c
         WHERE c.user_id = v_t.user_id AND c.stripe = 0 FOR UPDATE SKIP LOCKED;
      ELSE
        SELECT c.rate_tat INTO v_tat FROM public.tenant_call_counters c
         WHERE c.user_id = v_t.user_id AND c.stripe = 0 FOR UPDATE;
      END IF;
      CONTINUE WHEN NOT FOUND;
      v_left := least(v_left,
                      public.plan_rate_allowance(v_t.cpm, v_tat, v_now) - v_t.excluded);
    END IF;
    v_left := least(v_left, cardinality(v_t.calls));
    CONTINUE WHEN v_left IS NULL OR v_left <= 0;
    -- stripes with room under their share, as few as the calls need (at first as many as an
    -- even share would; more when they had less room), each locked without waiting
    v_stripes := '{}';
    v_rooms := '{}';
    v_room := 0;
    FOR v_round IN 1..2 LOOP
      FOR v_s IN
        SELECT c.stripe,
               v_t.cap / v_n + (c.stripe < v_t.cap % v_n)::integer - c.claimed - c.dialed
                 - (SELECT count(*) FROM unnest(p_exclude, p_exclude_stripes) AS e(id, stripe)
                     JOIN public.call_queue x ON x.id = e.id
                    WHERE e.stripe = c.stripe AND x.user_id = c.user_id)::integer AS room
          FROM public.tenant_call_counters c
         WHERE c.user_id = v_t.user_id
           AND c.claimed + c.dialed < v_t.cap / v_n + (c.stripe < v_t.cap % v_n)::integer
           AND NOT (c.stripe = ANY (v_stripes))
         ORDER BY c.stripe
         LIMIT CASE WHEN v_round = 1
                    THEN greatest(ceil(v_left::numeric / greatest(v_t.cap / v_n, 1))::integer,
                                  least(v_left, v_n / 2))
                    ELSE v_n END
           FOR UPDATE OF c SKIP LOCKED
      LOOP
        CONTINUE WHEN v_s.room <= 0;
        v_stripes := v_stripes || v_s.stripe;
        v_rooms := v_rooms || v_s.room;
        v_room := v_room + v_s.room;
      END LOOP;
      EXIT WHEN v_room >= v_left;
    END LOOP;
    -- the tenant's calls in order, in even blocks over the stripes taken, then what is left to
    -- the stripes with room left: the calls' later steps (gate, ending) write several rows,
    -- not one (a chunk of consecutive calls, a few)
    v_k := 1;
    v_block := ceil(v_left::numeric / greatest(cardinality(v_stripes), 1))::integer;
    FOR v_pass IN 1..2 LOOP
      FOR v_i IN 1..coalesce(cardinality(v_stripes), 0) LOOP
        EXIT WHEN v_left <= 0;
        v_take := least(v_rooms[v_i], v_left, CASE WHEN v_pass = 1 THEN v_block ELSE v_left END);
        CONTINUE WHEN v_take <= 0;
        v_out := v_out || v_t.calls[v_k:v_k + v_take - 1];
        v_out_stripes := v_out_stripes || array_fill(v_stripes[v_i], ARRAY[v_take]);
        v_rooms[v_i] := v_rooms[v_i] - v_take;
        v_k := v_k + v_take;
        v_left := v_left - v_take;
      END LOOP;
    END LOOP;
  END LOOP;
  IF cardinality(v_out) = 0 THEN
    RETURN;
  END IF;
  -- in claim order (one tenant's calls are in it already: a single claim's case)
  IF v_tenants > 1 THEN
    SELECT array_agg(x.id ORDER BY array_position(v_ids, x.id)),
           array_agg(x.stripe ORDER BY array_position(v_ids, x.id))
      INTO v_ids, v_out_stripes
      FROM unnest(v_out, v_out_stripes) AS x(id, stripe);
  ELSE
    v_ids := v_out;
  END IF;

  -- each call kept from a paced campaign spends one of its tokens
  IF v_lane IS NOT NULL AND cardinality(v_lane) > 0 AND v_ids IS NOT NULL THEN
    UPDATE public.call_campaigns c
       SET pace_tokens = greatest(
             least(greatest(c.calls_per_minute / 60.0, 1),
                   c.pace_tokens + greatest(extract(epoch FROM v_now - coalesce(c.pace_at, v_now - interval '1 day')), 0)
                                   * c.calls_per_minute / 60.0) - n.taken, 0),
           pace_at = v_now
      FROM (SELECT q.campaign_id, count(*) AS taken
              FROM public.call_queue q
             WHERE q.id = ANY (v_lane) AND q.id = ANY (v_ids)
             GROUP BY q.campaign_id) n
     WHERE c.id = n.campaign_id AND c.calls_per_minute IS NOT NULL;
  END IF;
  ids := v_ids;
  stripes := v_out_stripes;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- dial_gates: the dial gates of a chunk of calls (mark_call_dialing of each), then what the
-- adapter must send with each dial won (the call's max duration from its minute reservation,
-- the caller id); won = false: do not dial. paced: the provider's creates go through
-- reserve_provider_create first. Every call's first half (dial_gate_check: its rows locked,
-- campaign and calling rules) runs before any second half (dial_gate_apply: the tenant's usage
-- and counter rows), so the chunk holds the tenants' rows only for the second halves.
-- A chunk of several tenants locks their usage rows first (user_id order), then does the
-- second halves tenant by tenant, in user_id order (the chunk's order within a tenant): it
-- takes usage rows before counter rows and each kind in user_id order, as every claim takes
-- counter rows and beat's reconcile takes both, so it never waits in a cycle with a claim, a
-- reconcile or another chunk. For a tenant whose plan has no call or
-- minute limit, its dials are counted as one pending row of its period
-- (user_call_usage_deltas: the usage row is not locked) and its calls' queue rows moved (its
-- counter rows) in one statement at the end of its turn (dial_gate_apply's p_defer), so its
-- counter rows are held from there to the commit only. Calls a rule refused (released, held,
-- canceled) are acted on at the end of their tenant's turn, after those writes (lock order:
-- usage rows before counter rows).
CREATE OR REPLACE FUNCTION public.dial_gates(p_assignment_ids uuid[])
RETURNS TABLE (assignment_id uuid, won boolean, max_duration_seconds integer, caller_id text,
               paced boolean)
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_n integer := coalesce(cardinality(p_assignment_ids), 0);
  v_c record;
  v_ok boolean[] := '{}';
  v_verdict text[] := '{}';
  v_not_before timestamptz[] := '{}';
  v_at timestamptz[] := '{}';
  v_later boolean[];
  v_user uuid[];
  v_order integer[];
  v_won uuid[] := '{}';
  v_deferred uuid[];
  v_refused integer[] := '{}';
  v_i integer;
  v_k integer;
  v_tenants uuid[];
  v_t uuid;
BEGIN
  -- a second call of the chunk to the same contact is checked after the first one's dial is
  -- recorded (the attempt cap counts it), in the second pass; each call's tenant, and the
  -- order of the second pass (by tenant, then as given)
  SELECT array_agg(d.k > 1 ORDER BY d.ord), array_agg(d.user_id ORDER BY d.ord),
         array_agg(d.ord::int ORDER BY d.user_id NULLS LAST, d.ord)
    INTO v_later, v_user, v_order
    FROM (SELECT u.ord, q.user_id,
                 row_number() OVER (PARTITION BY q.user_id, q.recipient_phone ORDER BY u.ord) AS k
            FROM unnest(p_assignment_ids) WITH ORDINALITY AS u(id, ord)
            LEFT JOIN public.call_assignments a ON a.id = u.id
            LEFT JOIN public.call_queue q ON q.id = a.queue_id) d;
  -- first pass: every call's first half; second pass: the second halves, tenant by tenant
  -- (a call checked late does its first half right before its second)
  FOR v_pass IN 1 .. 2 LOOP
    IF v_pass = 2 THEN
      -- a chunk of several tenants takes their usage rows first, in user_id order, as beat's
      -- reconcile does (all usage rows before any counter row); one tenant's chunk takes its
      -- row at its first gate (a plan with limits) or not at all
      v_tenants := ARRAY(SELECT DISTINCT v_user[i] FROM generate_subscripts(v_user, 1) AS i
                          WHERE v_user[i] IS NOT NULL AND (v_later[i] OR v_ok[i])
                          ORDER BY 1);
      IF cardinality(v_tenants) > 1 THEN
        FOREACH v_t IN ARRAY v_tenants LOOP
          PERFORM public.lock_current_usage(v_t);
        END LOOP;
      END IF;
    END IF;
    FOR v_k IN 1 .. v_n LOOP
      v_i := CASE v_pass WHEN 1 THEN v_k ELSE v_order[v_k] END;
      IF v_later[v_i] = (v_pass = 2) THEN
        SELECT * INTO v_c FROM public.dial_gate_check(p_assignment_ids[v_i]);
        v_ok[v_i] := v_c.gateable;
        v_verdict[v_i] := v_c.verdict;
        v_not_before[v_i] := v_c.not_before;
        v_at[v_i] := v_c.at;
      END IF;
      CONTINUE WHEN v_pass = 1;
      assignment_id := p_assignment_ids[v_i];
      won := false;
      max_duration_seconds := NULL;
      caller_id := NULL;
      paced := NULL;
      IF v_ok[v_i] AND v_verdict[v_i] IS NULL THEN
        won := public.dial_gate_apply(p_assignment_ids[v_i], NULL, NULL, v_at[v_i],
                                      p_defer => true);
      ELSIF v_ok[v_i] THEN
        v_refused := v_refused || v_i;  -- acted on at the end of the tenant's turn
      END IF;
      IF won THEN
        SELECT a.max_duration_seconds, a.caller_id,
               public.provider_creates_per_second(a.provider_id) IS NOT NULL
          INTO max_duration_seconds, caller_id, paced
          FROM public.call_assignments a WHERE a.id = p_assignment_ids[v_i];
        v_won := v_won || p_assignment_ids[v_i];
      END IF;
      RETURN NEXT;
      CONTINUE WHEN v_k < v_n AND v_user[v_order[v_k + 1]] IS NOT DISTINCT FROM v_user[v_i];
      -- the end of the tenant's turn: the dials deferred by dial_gate_apply (queue rows not
      -- moved yet, plan without limits) counted as a pending row of the period (no lock: the
      -- tenant's chunks do not queue on its usage row), the queue rows moved in one statement,
      -- then the period's row folded if it is free (SKIP LOCKED: never waits)
      SELECT array_agg(a.id) INTO v_deferred
        FROM public.call_assignments a JOIN public.call_queue q ON q.id = a.queue_id
       WHERE a.id = ANY (v_won) AND q.status <> 'dialing';
      IF v_deferred IS NOT NULL THEN
        INSERT INTO public.user_call_usage_deltas (usage_id, user_id, calls_made)
        SELECT a.usage_id, v_user[v_i], count(*)::int
          FROM public.call_assignments a
         WHERE a.id = ANY (v_deferred) AND a.usage_id IS NOT NULL
         GROUP BY a.usage_id;
        PERFORM public.queue_to_dialing(ARRAY(
          SELECT a.queue_id FROM public.call_assignments a WHERE a.id = ANY (v_deferred)));
        PERFORM public.fold_call_usage(d.usage_id, true)
           FROM (SELECT DISTINCT a.usage_id FROM public.call_assignments a
                  WHERE a.id = ANY (v_deferred)) d;
      END IF;
      -- calls a rule refused: released, held or canceled (usage before counters, as everywhere)
      FOREACH v_i IN ARRAY v_refused LOOP
        PERFORM public.dial_gate_apply(p_assignment_ids[v_i], v_verdict[v_i], v_not_before[v_i],
                                       v_at[v_i]);
      END LOOP;
      v_won := '{}';
      v_refused := '{}';
    END LOOP;
  END LOOP;
END
$$;

-- dial_gate: dial_gates of one call.
CREATE OR REPLACE FUNCTION public.dial_gate(p_assignment_id uuid)
RETURNS TABLE (won boolean, max_duration_seconds integer, caller_id text, paced boolean)
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  RETURN QUERY SELECT g.won, g.max_duration_seconds, g.caller_id, g.paced
                 FROM public.dial_gates(ARRAY[p_assignment_id]) g;
END
$$;

-- claim_and_gate_calls: claim_and_assign_calls, and when the claim took at most p_gate calls,
-- all of one tenant, their dial gates (dial_gates) in the same transaction: a call that
-- trickles in alone is claimed and passes its gate in one round trip. Returns every call
-- claimed, in claim order, with its assignment as it stands after the gates: 'dialing' (the
-- gate won: dial it now), 'assigned' (not gated here: the caller passes the gates as for any
-- chunk), anything else (the gate refused it: released, held or ended).
-- Lock order: the claim holds the tenant's counter stripes, and a gate takes the tenant's usage
-- row, which everybody else takes before counter rows; so the gates run here only when that
-- row is free now (SKIP LOCKED, held from then on), never waiting for it with stripes held.
-- A gate won commits synchronously (as mark_call_dialing: nothing is dialed before its WAL is
-- flushed); a claim alone does not (claim_and_assign_calls).
-- What a dialed call's create sends from its queue row comes back with it (NULL for the other
-- rows): the claim may take a call committed after the caller's statement began, which a join
-- in that statement would not see.
CREATE OR REPLACE FUNCTION public.claim_and_gate_calls(
  p_limit integer, p_worker text, p_lease_seconds integer, p_gate integer
) RETURNS TABLE (queue_id uuid, assignment_id uuid, provider_id uuid, state text,
                 queue_status text, attempt integer, dialing_at timestamptz,
                 max_duration_seconds integer, caller_id text, paced boolean,
                 recipient_name text, recipient_phone text, recipient_email text,
                 custom_variables jsonb, template_snapshot jsonb)
LANGUAGE plpgsql
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
  v_q uuid[];
  v_a uuid[];
  v_p uuid[];
  v_users uuid[];
  v_plan record;
BEGIN
  SELECT coalesce(array_agg(c.queue_id ORDER BY c.n), '{}'),
         coalesce(array_agg(c.assignment_id ORDER BY c.n), '{}'),
         coalesce(array_agg(c.provider_id ORDER BY c.n), '{}')
    INTO v_q, v_a, v_p
    FROM public.claim_and_assign_calls(p_limit, p_worker, p_lease_seconds)
         WITH ORDINALITY AS c(queue_id, assignment_id, provider_id, n);
  IF cardinality(v_a) BETWEEN 1 AND p_gate THEN
    SELECT array_agg(DISTINCT q.user_id) INTO v_users
      FROM public.call_queue q WHERE q.id = ANY (v_q);
    IF cardinality(v_users) = 1 THEN
      SELECT * INTO v_plan FROM public.tenant_plan(v_users[1]);
      PERFORM 1 FROM public.user_call_usage u
        WHERE u.user_id = v_users[1] AND u.period_start = v_plan.period_start
          FOR NO KEY UPDATE SKIP LOCKED;
      IF FOUND THEN
        PERFORM set_config('synchronous_commit', 'on', true);
        -- sorted, as every chunk's gates (Database.gate_and_load)
        PERFORM 1 FROM public.dial_gates(ARRAY(SELECT x FROM unnest(v_a) AS x ORDER BY x));
      END IF;
    END IF;
  END IF;
  RETURN QUERY
  SELECT m.qid, m.aid, m.pid, a.state, q.status, a.attempt, a.dialing_at, a.max_duration_seconds,
         a.caller_id, public.provider_creates_per_second(a.provider_id) IS NOT NULL,
         q.recipient_name, q.recipient_phone, q.recipient_email, q.custom_variables,
         q.template_snapshot
    FROM unnest(v_q, v_a, v_p) WITH ORDINALITY AS m(qid, aid, pid, n)
    JOIN public.call_assignments a ON a.id = m.aid
    JOIN public.call_queue q ON q.id = m.qid
   ORDER BY m.n;
END
$$;

-- refuse_dial: the plan has no dial (or no minute) left for this call: it ends as failed
-- without being dialed (assignment released, slot freed, history with the reason).
CREATE OR REPLACE FUNCTION public.refuse_dial(p_assignment_id uuid, p_reason text) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_a record;
  v_q record;
BEGIN
  SELECT a.* INTO v_a FROM public.call_assignments a WHERE a.id = p_assignment_id;
  SELECT q.* INTO v_q FROM public.call_queue q WHERE q.id = v_a.queue_id;
  UPDATE public.call_assignments a
     SET state = 'released', ended_at = now(), outcome = 'refused', error = p_reason
   WHERE a.id = p_assignment_id;
  UPDATE public.call_queue q
     SET status = 'failed', last_error = p_reason, completed_at = now(), lease_expires_at = NULL
   WHERE q.id = v_q.id;
  INSERT INTO public.call_history (user_id, template_id, queue_id, assignment_id, provider_id,
                                   recipient_name, recipient_phone, recipient_email, status,
                                   ended_at, attempts, error, metadata)
  VALUES (v_q.user_id, v_q.template_id, v_q.id, p_assignment_id, v_a.provider_id,
          v_q.recipient_name, v_q.recipient_phone, v_q.recipient_email, 'failed', now(),
          v_q.attempts, p_reason, v_q.metadata);
  PERFORM public.free_provider_slot(p_assignment_id);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Fleet-wide create rate per provider. PostgreSQL rather than Redis: every worker already
-- holds a database connection, the broker may be RabbitMQ, and one row update per create is
-- nothing at the rates providers allow (SynthFlow documents 1 create per second).

-- The documented default per provider type (creates per second); NULL: none published
-- (Vapi's org rate limit is not published). Must equal providers/synthflow.py's
-- DEFAULT_CREATES_PER_SECOND (a test compares them).
CREATE OR REPLACE FUNCTION public.provider_creates_per_second(p_provider_id uuid)
RETURNS double precision
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN (SELECT coalesce(nullif(p.config ->> 'creates_per_second', '')::double precision,
                          CASE p.provider_type WHEN 'synthflow' THEN 1.0 END)
            FROM public.call_service_providers p WHERE p.id = p_provider_id);
END
$$;

-- reserve_provider_create: the seconds this worker must wait before sending a create to the
-- provider (0: now), its slot taken in the shared schedule (one create per 1/rate seconds,
-- fleet-wide). NULL, and nothing taken, when the wait would exceed p_max_wait_seconds (the
-- caller puts the call back instead of waiting past its dialing lease).
CREATE OR REPLACE FUNCTION public.reserve_provider_create(
  p_provider_id uuid, p_max_wait_seconds double precision
) RETURNS double precision
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_rate double precision := public.provider_creates_per_second(p_provider_id);
  v_now timestamptz := clock_timestamp();
  v_slot timestamptz;
  v_wait double precision;
BEGIN
  IF v_rate IS NULL OR v_rate <= 0 THEN
    RETURN 0;
  END IF;
  INSERT INTO public.provider_create_pacing (provider_id, next_at) VALUES (p_provider_id, v_now)
  ON CONFLICT (provider_id) DO NOTHING;
  SELECT greatest(c.next_at, v_now) INTO v_slot
    FROM public.provider_create_pacing c WHERE c.provider_id = p_provider_id FOR UPDATE;
  v_wait := extract(epoch FROM v_slot - v_now);
  IF v_wait > greatest(p_max_wait_seconds, 0) THEN
    RETURN NULL;
  END IF;
  UPDATE public.provider_create_pacing c
     SET next_at = v_slot + make_interval(secs => 1.0 / v_rate)
   WHERE c.provider_id = p_provider_id;
  RETURN v_wait;
END
$$;

-- defer_dial: a call that passed the gate but got no create slot within its bound goes back
-- to the queue untouched by the provider (as release_assignment: dial and minutes given back,
-- attempt not counted), due again when the slot would have come.
CREATE OR REPLACE FUNCTION public.defer_dial(p_assignment_id uuid, p_seconds double precision)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_qid uuid;
BEGIN
  SELECT a.queue_id INTO v_qid FROM public.call_assignments a WHERE a.id = p_assignment_id;
  IF NOT public.release_assignment(p_assignment_id, 'fleet_rate_limit') THEN
    RETURN false;
  END IF;
  UPDATE public.call_queue q
     SET scheduled_time = now() + make_interval(secs => greatest(p_seconds, 0))
   WHERE q.id = v_qid AND q.status = 'queued';
  RETURN true;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges and policies of this domain.
REVOKE ALL ON public.tenant_call_counters FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.tenant_call_counters TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.tenant_call_counters TO callq_worker;
GRANT SELECT ON public.tenant_call_counters TO authenticated;
CREATE POLICY worker_all ON public.tenant_call_counters FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
CREATE POLICY counters_select_own ON public.tenant_call_counters FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));

REVOKE ALL ON FUNCTION
  public.counter_stripes(), public.call_status_class(text), public.apply_counter_deltas(jsonb),
  public.plan_rate_burst(integer), public.plan_rate_allowance(integer, timestamptz, timestamptz),
  public.count_tenant_calls(), public.zero_tenant_counters(), public.reconcile_tenant_counters(),
  public.tenant_plan(uuid), public.lock_current_usage(uuid),
  public.settle_call_usage(uuid, uuid, double precision), public.return_dial(uuid),
  public.fold_call_usage(uuid, boolean), public.usage_totals(uuid, timestamptz),
  public.claimable_calls(integer, uuid[], smallint[]), public.dial_gate(uuid), public.dial_gates(uuid[]),
  public.claim_and_gate_calls(integer, text, integer, integer),
  public.refuse_dial(uuid, text),
  public.fail_on_provider(uuid, text, text), public.provider_creates_per_second(uuid),
  public.reserve_provider_create(uuid, double precision),
  public.defer_dial(uuid, double precision)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.counter_stripes(), public.call_status_class(text), public.apply_counter_deltas(jsonb),
  public.plan_rate_burst(integer), public.plan_rate_allowance(integer, timestamptz, timestamptz),
  public.reconcile_tenant_counters(), public.tenant_plan(uuid), public.lock_current_usage(uuid),
  public.settle_call_usage(uuid, uuid, double precision), public.return_dial(uuid),
  public.fold_call_usage(uuid, boolean), public.usage_totals(uuid, timestamptz),
  public.claimable_calls(integer, uuid[], smallint[]), public.dial_gate(uuid), public.dial_gates(uuid[]),
  public.claim_and_gate_calls(integer, text, integer, integer),
  public.refuse_dial(uuid, text),
  public.fail_on_provider(uuid, text, text), public.provider_creates_per_second(uuid),
  public.reserve_provider_create(uuid, double precision),
  public.defer_dial(uuid, double precision)
  TO service_role, callq_worker;
-- pending endings: the worker writes them; an app user reads its own (through
-- user_call_usage_live, whose RLS is the caller's)
REVOKE ALL ON public.user_call_usage_deltas FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.user_call_usage_deltas TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.user_call_usage_deltas TO callq_worker;
GRANT SELECT ON public.user_call_usage_deltas TO authenticated;
CREATE POLICY worker_all ON public.user_call_usage_deltas FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
CREATE POLICY usage_deltas_select_own ON public.user_call_usage_deltas FOR SELECT
  TO authenticated USING (user_id = (SELECT auth.uid()));
REVOKE ALL ON public.user_call_usage_live FROM PUBLIC, anon, authenticated;
GRANT SELECT ON public.user_call_usage_live TO authenticated, service_role, callq_worker;
REVOKE ALL ON public.provider_create_pacing FROM PUBLIC, anon, authenticated;
GRANT ALL ON public.provider_create_pacing TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.provider_create_pacing TO callq_worker;
CREATE POLICY worker_all ON public.provider_create_pacing FOR ALL TO callq_worker
  USING (true) WITH CHECK (true);
