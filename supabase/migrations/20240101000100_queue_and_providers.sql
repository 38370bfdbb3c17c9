-- Queue and provider management: providers, the call queue, live provider availability,
-- assignments (which provider runs which attempt) and retries.
--
-- Claim-path tables (call_queue, call_assignments, provider_slots) are updated many
-- times per row; they get fillfactor < 100 (room for HOT updates) and autovacuum triggered
-- by an absolute number of dead rows rather than a fraction of the table, so the dead index
-- entries each claim leaves behind are cleaned up continuously (see supabase/README.md).

-- 9. call_service_providers: credentials (api_key, api_secret, webhook_secret) are never
-- readable by anon/authenticated (column privileges in 20240101000300); each may hold
-- "env:NAME" (resolved by the worker). config holds no secret (trigger in 20240101000310).
CREATE TABLE public.call_service_providers (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL UNIQUE CHECK (length(btrim(name)) > 0),
  provider_type text NOT NULL CHECK (provider_type ~ '^[a-z][a-z0-9_]*$'),
  api_key text NOT NULL,
  api_secret text,
  -- authenticates the provider's webhooks; readable like api_key (service_role, callq_worker)
  webhook_secret text,
  base_url text NOT NULL CHECK (base_url ~ '^https?://'),
  max_concurrent_calls integer NOT NULL DEFAULT 10 CHECK (max_concurrent_calls >= 1),
  -- lower number = preferred
  priority integer NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 100),
  capabilities jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(capabilities) = 'object'),
  config jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(config) = 'object'),
  is_active boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX call_service_providers_selection_idx
  ON public.call_service_providers (priority) WHERE is_active;

-- Row checks of the hot tables (call_queue and call_assignments here, call_history in
-- 20240101000000, call_events in 20240101000130): one CHECK per table, calling a function that
-- holds the table's column rules. PostgreSQL reads a table's CHECK expressions back from their
-- stored text at the start of every INSERT or UPDATE statement; a one-row statement of the call
-- path spent more on reading a dozen column CHECKs than on its own writes (15 % of
-- complete_call's server CPU; bench/notes/row_checks.md). A PL/pgSQL function's expression is
-- planned once per session. Each function returns true or raises check_violation (23514)
-- naming the rule broken, never a value: unlike a plain CHECK ("Failing row contains ..."), the
-- error carries no phone number, name or script. A rule that is NULL holds, as in a CHECK.
CREATE OR REPLACE FUNCTION public.call_queue_row_check(
  p_recipient_name text, p_recipient_phone text, p_recipient_email text, p_status text,
  p_priority integer, p_attempts integer, p_max_attempts integer, p_custom_variables jsonb,
  p_metadata jsonb, p_idempotency_key text, p_required_capabilities jsonb,
  p_recipient_timezones text[]
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_broken text := CASE
    WHEN NOT (length(btrim(p_recipient_name)) BETWEEN 1 AND 200)
      THEN 'recipient_name: 1 to 200 characters'
    WHEN NOT (p_recipient_phone ~ '^\+[1-9][0-9]{6,14}$')
      THEN 'recipient_phone: an E.164 number'
    WHEN NOT (p_recipient_email IS NULL
              OR p_recipient_email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$')
      THEN 'recipient_email: an address'
    WHEN NOT (p_status IN ('queued', 'claimed', 'assigned', 'dialing', 'in_progress',
                           'completed', 'failed', 'canceled'))
      THEN 'status: a call status'
    WHEN NOT (p_priority BETWEEN 1 AND 10) THEN 'priority: 1 to 10'
    WHEN NOT (p_attempts >= 0) THEN 'attempts: at least 0'
    WHEN NOT (p_max_attempts BETWEEN 1 AND 20) THEN 'max_attempts: 1 to 20'
    WHEN NOT (jsonb_typeof(p_custom_variables) = 'object') THEN 'custom_variables: an object'
    WHEN NOT (jsonb_typeof(p_metadata) = 'object') THEN 'metadata: an object'
    WHEN NOT (p_idempotency_key IS NULL OR length(p_idempotency_key) BETWEEN 1 AND 200)
      THEN 'idempotency_key: 1 to 200 characters'
    WHEN NOT (p_required_capabilities IS NULL OR jsonb_typeof(p_required_capabilities) = 'object')
      THEN 'required_capabilities: an object'
    WHEN NOT (cardinality(p_recipient_timezones) >= 1) THEN 'recipient_timezones: at least one'
    -- NULL only on a finished call of a closed account (anonymised)
    WHEN NOT (p_status IN ('completed', 'failed', 'canceled')
              OR (p_recipient_name IS NOT NULL AND p_recipient_phone IS NOT NULL))
      THEN 'recipient_name, recipient_phone: required until the call is finished'
  END;
BEGIN
  IF v_broken IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'call_queue.' || v_broken;
  END IF;
  RETURN true;
END
$$;

-- 10. call_queue
CREATE TABLE public.call_queue (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- a user row with calls is never deleted: accounts are closed (public.close_account)
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE RESTRICT,
  -- the template the call was scheduled with; deleting it detaches the call (SET NULL) and
  -- the call goes on with its snapshot below, so no call holds anyone's template hostage
  template_id uuid REFERENCES public.call_templates (id) ON DELETE SET NULL,
  -- the template row (to_jsonb) as it was when the call was queued (trigger in
  -- 20240101000310): what the worker sends; a later edit or deletion does not change the call
  template_snapshot jsonb,
  -- NULL only on a finished call of a closed account (anonymised)
  recipient_name text,
  recipient_phone text,
  recipient_email text,
  status text NOT NULL DEFAULT 'queued',
  priority integer NOT NULL DEFAULT 5,
  scheduled_time timestamptz NOT NULL DEFAULT now(),
  attempts integer NOT NULL DEFAULT 0,
  max_attempts integer NOT NULL DEFAULT 3,
  custom_variables jsonb NOT NULL DEFAULT '{}'::jsonb,
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
  -- the app's id for this contact (idempotency key): unique per user and campaign
  idempotency_key text,
  -- the campaign the call belongs to (FK added in 20240101000150_campaigns.sql)
  campaign_id uuid,
  -- true: claimed only through its campaign's lane (pacing, time window) or not at all (draft,
  -- paused); kept by the campaign functions and the trigger call_queue_campaign_lane
  via_campaign boolean NOT NULL DEFAULT false,
  last_error text,
  excluded_provider_ids uuid[] NOT NULL DEFAULT '{}',
  required_capabilities jsonb,
  -- calling rules (20240101000340): the recipient's IANA zone(s), given to schedule_call or
  -- derived from the number (a calling window must hold in every one); set on insert by the
  -- trigger call_queue_timezones when not given. hold_reason: why a rule last moved the call
  -- ('calling_window', 'attempt_cap', 'no_calling_window'); cleared when it is dialed.
  recipient_timezones text[] NOT NULL,
  hold_reason text,
  claimed_by text,
  claimed_at timestamptz,
  lease_expires_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  completed_at timestamptz,
  CONSTRAINT call_queue_row_check CHECK (public.call_queue_row_check(
    recipient_name, recipient_phone, recipient_email, status, priority, attempts, max_attempts,
    custom_variables, metadata, idempotency_key, required_capabilities, recipient_timezones))
) WITH (
  fillfactor = 70,
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 2000,
  autovacuum_vacuum_cost_delay = 0,
  autovacuum_analyze_scale_factor = 0,
  autovacuum_analyze_threshold = 5000
);
-- The claim: due queued rows in (priority, scheduled_time, created_at) order. Partial, so it
-- only holds the rows waiting; it stays small however large the table grows.
-- Calls of paused or paced campaigns (via_campaign) are not in it: a paused campaign's
-- calls cost the claim nothing (claim_candidates takes paced ones through their campaign).
CREATE INDEX call_queue_claim_idx
  ON public.call_queue (priority, scheduled_time, created_at)
  WHERE status = 'queued' AND NOT via_campaign;
-- A user's queue, newest first (also counts a user's pending calls for the plan limit).
CREATE INDEX call_queue_user_created_idx ON public.call_queue (user_id, created_at DESC);
-- The reaper: in-flight rows by lease.
CREATE INDEX call_queue_lease_idx ON public.call_queue (lease_expires_at)
  WHERE status IN ('claimed', 'assigned', 'dialing', 'in_progress');
-- schedule_call's plan limit counts a user's live calls: only live rows are in this index.
CREATE INDEX call_queue_user_live_idx ON public.call_queue (user_id)
  WHERE status IN ('queued', 'claimed', 'assigned', 'dialing', 'in_progress');
-- The fair claim: one tenant's due calls, per priority, oldest first (see claimable_calls).
CREATE INDEX call_queue_tenant_claim_idx
  ON public.call_queue (user_id, priority, scheduled_time, created_at) WHERE status = 'queued';
-- One call per (user, campaign, key); calls without a campaign share the zero uuid.
CREATE UNIQUE INDEX call_queue_idempotency_idx
  ON public.call_queue (user_id, coalesce(campaign_id, '00000000-0000-0000-0000-000000000000'::uuid),
                        idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE INDEX call_queue_template_idx ON public.call_queue (template_id);

-- 11. provider_availability: health (status, circuit, failures) and statistics, one row per
-- provider. The capacity lives in provider_slots (below): current_calls and available_slots
-- here are figures refreshed by reconcile_provider_slots (beat, every reaper run; live figures:
-- the view provider_load); no claim writes this row, so it is nobody's hot spot.
CREATE TABLE public.provider_availability (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  provider_id uuid NOT NULL UNIQUE
    REFERENCES public.call_service_providers (id) ON DELETE CASCADE,
  current_calls integer NOT NULL DEFAULT 0 CHECK (current_calls >= 0),
  available_slots integer NOT NULL DEFAULT 0 CHECK (available_slots >= 0),
  status text NOT NULL DEFAULT 'online' CHECK (status IN ('online', 'degraded', 'offline')),
  last_check timestamptz,
  consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
  latency_ms numeric(12, 3) CHECK (latency_ms >= 0),
  circuit_open_until timestamptz,
  last_error text,
  total_calls bigint NOT NULL DEFAULT 0 CHECK (total_calls >= 0),
  successful_calls bigint NOT NULL DEFAULT 0 CHECK (successful_calls >= 0),
  failed_calls bigint NOT NULL DEFAULT 0 CHECK (failed_calls >= 0),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
) WITH (
  fillfactor = 50,
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_vacuum_cost_delay = 0
);

-- provider_call_tallies: attempts ended on a provider not yet added to its statistics
-- (provider_availability.total_calls, successful_calls, failed_calls). An ending adds itself to
-- the provider's row when nobody holds it and leaves a row here otherwise (tally_provider_call:
-- it never waits); reconcile_provider_slots (beat) folds them in; the view provider_stats reads
-- both. With every ending of every tenant updating the one row, endings queued on it.
CREATE TABLE public.provider_call_tallies (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  provider_id uuid NOT NULL,
  successful_calls integer NOT NULL DEFAULT 0 CHECK (successful_calls IN (0, 1)),
  failed_calls integer NOT NULL DEFAULT 0 CHECK (failed_calls IN (0, 1)),
  created_at timestamptz NOT NULL DEFAULT now()
) WITH (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX provider_call_tallies_provider_idx ON public.provider_call_tallies (provider_id);

-- (row checks: see call_queue_row_check)
CREATE OR REPLACE FUNCTION public.call_assignments_row_check(
  p_state text, p_attempt integer, p_poll_count integer, p_reserved_minutes integer,
  p_max_duration_seconds integer
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_broken text := CASE
    WHEN NOT (p_state IN ('assigned', 'dialing', 'placed', 'completed', 'failed', 'canceled',
                          'released'))
      THEN 'state: an assignment state'
    WHEN NOT (p_attempt >= 1) THEN 'attempt: at least 1'
    WHEN NOT (p_poll_count >= 0) THEN 'poll_count: at least 0'
    WHEN NOT (p_reserved_minutes >= 0) THEN 'reserved_minutes: at least 0'
    WHEN NOT (p_max_duration_seconds > 0) THEN 'max_duration_seconds: more than 0'
  END;
BEGIN
  IF v_broken IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'call_assignments.' || v_broken;
  END IF;
  RETURN true;
END
$$;

-- 12. call_assignments: one row per attempt on a provider.
CREATE TABLE public.call_assignments (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  queue_id uuid NOT NULL REFERENCES public.call_queue (id) ON DELETE CASCADE,
  -- a provider with call records is deactivated, not deleted
  provider_id uuid NOT NULL REFERENCES public.call_service_providers (id) ON DELETE RESTRICT,
  provider_call_id text,
  state text NOT NULL DEFAULT 'assigned',
  attempt integer NOT NULL DEFAULT 1,
  assigned_at timestamptz NOT NULL DEFAULT now(),
  dialing_at timestamptz,
  placed_at timestamptz,
  ended_at timestamptz,
  last_polled_at timestamptz,
  next_poll_at timestamptz,
  poll_count integer NOT NULL DEFAULT 0,
  outcome text,
  error text,
  -- billing (set by the dial gate, mark_call_dialing): the usage period the dial was counted
  -- in, the minutes it reserved there, and the call's cap sent to the provider
  usage_id uuid REFERENCES public.user_call_usage (id) ON DELETE SET NULL,
  reserved_minutes integer NOT NULL DEFAULT 0,
  max_duration_seconds integer,
  -- the outbound number (or number id) this attempt dials from, when the provider has a pool
  caller_id text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT call_assignments_row_check CHECK (public.call_assignments_row_check(
    state, attempt, poll_count, reserved_minutes, max_duration_seconds))
) WITH (
  fillfactor = 75,
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_cost_delay = 0,
  autovacuum_analyze_scale_factor = 0,
  autovacuum_analyze_threshold = 5000
);
CREATE INDEX call_assignments_queue_idx ON public.call_assignments (queue_id);
-- at most one live assignment per queue item: a call can never be on two providers at once
CREATE UNIQUE INDEX call_assignments_one_live_idx ON public.call_assignments (queue_id)
  WHERE state IN ('assigned', 'dialing', 'placed');
-- live assignments per provider (slot reconciliation)
CREATE INDEX call_assignments_provider_live_idx ON public.call_assignments (provider_id)
  WHERE state IN ('assigned', 'dialing', 'placed');
-- webhook / poll lookup
CREATE INDEX call_assignments_provider_call_idx
  ON public.call_assignments (provider_id, provider_call_id) WHERE provider_call_id IS NOT NULL;
CREATE INDEX call_assignments_next_poll_idx ON public.call_assignments (next_poll_at)
  WHERE state = 'placed';

-- 13. call_retries: one row per failed attempt.
CREATE TABLE public.call_retries (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  queue_id uuid NOT NULL REFERENCES public.call_queue (id) ON DELETE CASCADE,
  assignment_id uuid UNIQUE REFERENCES public.call_assignments (id) ON DELETE SET NULL,
  provider_id uuid REFERENCES public.call_service_providers (id) ON DELETE SET NULL,
  attempt integer NOT NULL CHECK (attempt >= 0),
  reason text NOT NULL
    CHECK (reason IN ('busy', 'no_answer', 'voicemail', 'provider_error', 'rate_limited',
                      'permanent', 'canceled')),
  error text,
  next_attempt_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX call_retries_queue_idx ON public.call_retries (queue_id, created_at);
CREATE INDEX call_retries_provider_idx ON public.call_retries (provider_id);

-- call_history's links to the tables created here. History survives the queue row, the
-- assignment and the provider (SET NULL).
ALTER TABLE public.call_history
  ADD CONSTRAINT call_history_queue_id_fkey FOREIGN KEY (queue_id)
    REFERENCES public.call_queue (id) ON DELETE SET NULL,
  ADD CONSTRAINT call_history_assignment_id_fkey FOREIGN KEY (assignment_id)
    REFERENCES public.call_assignments (id) ON DELETE SET NULL,
  ADD CONSTRAINT call_history_provider_id_fkey FOREIGN KEY (provider_id)
    REFERENCES public.call_service_providers (id) ON DELETE SET NULL;

CREATE TRIGGER call_service_providers_updated_at BEFORE UPDATE ON public.call_service_providers
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER call_queue_updated_at BEFORE UPDATE ON public.call_queue
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER provider_availability_updated_at BEFORE UPDATE ON public.provider_availability
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER call_assignments_updated_at BEFORE UPDATE ON public.call_assignments
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

-- 11b. provider_slots: a provider's capacity as rows, one per call it may carry at once, each
-- with the outbound number it dials from (caller-ID pools). A claim takes a free slot with
-- FOR UPDATE SKIP LOCKED (so concurrent claimers never wait on each other) and writes its
-- assignment id into it; the slot is freed by that assignment id when the attempt ends. So a
-- provider never carries more live assignments than it has slots: max_concurrent_calls (and,
-- with a pool, each number at most its max_concurrent). Kept by sync_provider_slots (below)
-- and the functions in 20240101000200; reconcile_provider_slots repairs a leak.
CREATE TABLE public.provider_slots (
  provider_id uuid NOT NULL REFERENCES public.call_service_providers (id) ON DELETE CASCADE,
  slot_no integer NOT NULL CHECK (slot_no >= 1),
  -- the number (Vapi phoneNumberId, SynthFlow/Retell from number) calls on this slot dial
  -- from; NULL: the provider's default (config phone_number_id / from_number)
  caller_id text,
  -- the live assignment holding the slot; NULL: free. No foreign key: a key check per claim
  -- would cost the claim a lookup and a lock; reconcile_provider_slots frees stray ids.
  assignment_id uuid,
  -- rotation: the free slot freed longest ago is taken first. A slot never used ranks by the
  -- share of the provider's capacity taking it brings (slot_no / slots, as seconds after the
  -- epoch), so equal-priority providers fill evenly and a pool's numbers take turns.
  freed_at timestamptz NOT NULL,
  -- a taken slot beyond the provider's capacity after max_concurrent_calls (or the pool) was
  -- lowered: deleted when its call ends
  retired boolean NOT NULL DEFAULT false,
  PRIMARY KEY (provider_id, slot_no),
  CHECK (NOT retired OR assignment_id IS NOT NULL)
) WITH (
  fillfactor = 70,
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_vacuum_cost_delay = 0
);
-- A provider's free slots in rotation order: what a claim takes.
CREATE INDEX provider_slots_free_idx ON public.provider_slots (provider_id, freed_at, slot_no)
  WHERE assignment_id IS NULL;
-- Freeing by assignment id; one slot per assignment.
CREATE UNIQUE INDEX provider_slots_assignment_idx ON public.provider_slots (assignment_id)
  WHERE assignment_id IS NOT NULL;
-- Retired slots (almost always none): a freed slot goes to their calls first, the highest
-- slot_no first. In slot_no order, so that look-up is one probe whatever the statistics say
-- (without slot_no, a plan made before any ANALYZE walked every slot of the provider backwards
-- through the primary key at each ending: 1.7 ms with 15,000 slots).
CREATE INDEX provider_slots_retired_idx ON public.provider_slots (provider_id, slot_no)
  WHERE retired;

-- What is wrong with config.caller_ids (NULL: nothing, or no pool). A pool is a non-empty array
-- of {"id": "<number or number id>", "max_concurrent": <integer, optional>}, each id once.
-- Messages never contain a number.
CREATE OR REPLACE FUNCTION public.caller_ids_violation(p_config jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
  SELECT CASE
    WHEN p_config IS NULL OR NOT (p_config ? 'caller_ids') THEN NULL
    WHEN jsonb_typeof(p_config->'caller_ids') <> 'array'
         OR jsonb_array_length(p_config->'caller_ids') NOT BETWEEN 1 AND 1000
      THEN 'config.caller_ids must be an array of 1 to 1000 entries'
    WHEN EXISTS (
      SELECT 1 FROM jsonb_array_elements(p_config->'caller_ids') AS e(v)
       WHERE CASE WHEN jsonb_typeof(e.v) <> 'object' THEN true
                  ELSE EXISTS (SELECT 1 FROM jsonb_object_keys(e.v) AS k(k)
                                WHERE k.k NOT IN ('id', 'max_concurrent'))
                       OR jsonb_typeof(e.v->'id') IS DISTINCT FROM 'string'
                       OR length(btrim(e.v->>'id')) NOT BETWEEN 1 AND 100
                       OR e.v->>'id' ~ '[[:cntrl:]]' END)
      THEN 'each entry of config.caller_ids must be an object {"id": "<1 to 100 characters>", '
           '"max_concurrent": <integer, optional>} and nothing else'
    WHEN EXISTS (
      SELECT 1 FROM jsonb_array_elements(p_config->'caller_ids') AS e(v)
       WHERE e.v ? 'max_concurrent'
         AND NOT (jsonb_typeof(e.v->'max_concurrent') = 'number'
                  AND (e.v->>'max_concurrent') ~ '^[0-9]{1,5}$'
                  AND (e.v->>'max_concurrent')::integer BETWEEN 1 AND 10000))
      THEN 'config.caller_ids: max_concurrent must be an integer 1..10000'
    WHEN (SELECT count(DISTINCT e.v->>'id') <> count(*)
            FROM jsonb_array_elements(p_config->'caller_ids') AS e(v))
      THEN 'config.caller_ids lists the same id twice'
  END;
$$;

-- The slots a provider should have: slot_no 1.. with the number each dials from. Without a pool,
-- max_concurrent_calls slots without a number. With one, the numbers take turns (the first
-- slot of each number in pool order, then the second of each, ...), a number getting at most
-- its max_concurrent slots, and at most max_concurrent_calls slots in all: taking a slot
-- respects both caps.
CREATE OR REPLACE FUNCTION public.provider_slot_layout(p_max integer, p_config jsonb)
RETURNS TABLE (slot_no integer, caller_id text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
  SELECT (row_number() OVER (ORDER BY r.turn, n.ord))::integer, n.id
    FROM (SELECT e.v->>'id' AS id, e.ord, (e.v->>'max_concurrent')::integer AS cap
            FROM jsonb_array_elements(
                   CASE WHEN jsonb_typeof(p_config->'caller_ids') = 'array'
                        THEN p_config->'caller_ids' ELSE '[{}]'::jsonb END)
                 WITH ORDINALITY AS e(v, ord)) n
   CROSS JOIN LATERAL generate_series(1, least(coalesce(n.cap, p_max), p_max)) AS r(turn)
   ORDER BY r.turn, n.ord
   LIMIT greatest(p_max, 0);
$$;

-- A provider's slots follow its max_concurrent_calls and caller-ID pool: missing slots are
-- added, free ones beyond the layout deleted, a call on a slot beyond it moved into a free slot
-- inside it or, when none is free, its slot retired (deleted when the call ends); a slot's
-- number follows the pool (a call in flight keeps the number it dials from). Free plus taken
-- slots never exceed the capacity except by calls already in flight when it was lowered. A bad pool is refused with CQ053 and nothing is written. SECURITY DEFINER: an admin
-- may change max_concurrent_calls but not write slots.
CREATE OR REPLACE FUNCTION public.sync_provider_slots() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_error text := public.caller_ids_violation(NEW.config);
  v_n integer;
  v_b record;
  v_free integer;
BEGIN
  IF v_error IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ053', MESSAGE = 'invalid_caller_ids: ' || v_error;
  END IF;
  v_n := (SELECT count(*) FROM public.provider_slot_layout(NEW.max_concurrent_calls, NEW.config));
  DELETE FROM public.provider_slots s
   WHERE s.provider_id = NEW.id AND s.assignment_id IS NULL AND s.slot_no > v_n;
  -- a call on a slot beyond the new layout moves to a free slot inside it (so free plus taken
  -- never exceeds the capacity); when none is free, its slot is retired
  FOR v_b IN SELECT s.slot_no, s.assignment_id FROM public.provider_slots s
              WHERE s.provider_id = NEW.id AND s.slot_no > v_n AND s.assignment_id IS NOT NULL
              ORDER BY s.slot_no
  LOOP
    SELECT s.slot_no INTO v_free FROM public.provider_slots s
     WHERE s.provider_id = NEW.id AND s.slot_no <= v_n AND s.assignment_id IS NULL
     ORDER BY s.slot_no DESC
     LIMIT 1
       FOR UPDATE;
    EXIT WHEN NOT FOUND;
    DELETE FROM public.provider_slots s
     WHERE s.provider_id = NEW.id AND s.slot_no = v_b.slot_no
       AND s.assignment_id = v_b.assignment_id;
    CONTINUE WHEN NOT FOUND;  -- its call ended meanwhile: the slot is free (deleted below)
    UPDATE public.provider_slots s SET assignment_id = v_b.assignment_id
     WHERE s.provider_id = NEW.id AND s.slot_no = v_free;
  END LOOP;
  UPDATE public.provider_slots s SET retired = true
   WHERE s.provider_id = NEW.id AND s.slot_no > v_n AND NOT s.retired
     AND s.assignment_id IS NOT NULL;
  -- slots beyond the layout whose call ended while this ran
  DELETE FROM public.provider_slots s
   WHERE s.provider_id = NEW.id AND s.assignment_id IS NULL AND s.slot_no > v_n;
  UPDATE public.provider_slots s SET caller_id = l.caller_id, retired = false
    FROM public.provider_slot_layout(NEW.max_concurrent_calls, NEW.config) l
   WHERE s.provider_id = NEW.id AND s.slot_no = l.slot_no
     AND (s.caller_id IS DISTINCT FROM l.caller_id OR s.retired);
  INSERT INTO public.provider_slots (provider_id, slot_no, caller_id, freed_at)
  SELECT NEW.id, l.slot_no, l.caller_id,
         'epoch'::timestamptz + make_interval(secs => l.slot_no::double precision / v_n)
    FROM public.provider_slot_layout(NEW.max_concurrent_calls, NEW.config) l
  ON CONFLICT (provider_id, slot_no) DO NOTHING;
  RETURN NEW;
END
$$;

CREATE TRIGGER call_service_providers_sync_slots
  AFTER INSERT ON public.call_service_providers
  FOR EACH ROW EXECUTE FUNCTION public.sync_provider_slots();
CREATE TRIGGER call_service_providers_resync_slots
  AFTER UPDATE OF max_concurrent_calls, config ON public.call_service_providers
  FOR EACH ROW WHEN (OLD.max_concurrent_calls IS DISTINCT FROM NEW.max_concurrent_calls
                     OR OLD.config->'caller_ids' IS DISTINCT FROM NEW.config->'caller_ids')
  EXECUTE FUNCTION public.sync_provider_slots();

ALTER TABLE public.call_service_providers ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.provider_availability ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_assignments ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_retries ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.provider_slots ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.provider_call_tallies ENABLE ROW LEVEL SECURITY;
