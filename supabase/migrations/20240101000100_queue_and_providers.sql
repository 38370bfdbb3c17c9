-- Queue and provider management: providers, the call queue, live provider availability,
-- assignments (which provider runs which attempt) and retries.
--
-- Claim-path tables (call_queue, call_assignments, provider_availability) are updated many
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
  recipient_name text CHECK (length(btrim(recipient_name)) BETWEEN 1 AND 200),
  recipient_phone text CHECK (recipient_phone ~ '^\+[1-9][0-9]{6,14}$'),
  recipient_email text
    CHECK (recipient_email IS NULL OR recipient_email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'),
  status text NOT NULL DEFAULT 'queued'
    CHECK (status IN ('queued', 'claimed', 'assigned', 'dialing', 'in_progress',
                      'completed', 'failed', 'canceled')),
  priority integer NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
  scheduled_time timestamptz NOT NULL DEFAULT now(),
  attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  max_attempts integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 20),
  custom_variables jsonb NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(custom_variables) = 'object'),
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  -- the app's id for this contact (idempotency key): unique per user and campaign
  idempotency_key text CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 200),
  -- the campaign the call belongs to (FK added in 20240101000150_campaigns.sql)
  campaign_id uuid,
  -- true: claimed only through its campaign's lane (pacing, time window) or not at all (draft,
  -- paused); kept by the campaign functions and the trigger call_queue_campaign_lane
  via_campaign boolean NOT NULL DEFAULT false,
  last_error text,
  excluded_provider_ids uuid[] NOT NULL DEFAULT '{}',
  required_capabilities jsonb
    CHECK (required_capabilities IS NULL OR jsonb_typeof(required_capabilities) = 'object'),
  -- calling rules (20240101000340): the recipient's IANA zone(s), given to schedule_call or
  -- derived from the number (a calling window must hold in every one); set on insert by the
  -- trigger call_queue_timezones when not given. hold_reason: why a rule last moved the call
  -- ('calling_window', 'attempt_cap', 'no_calling_window'); cleared when it is dialed.
  recipient_timezones text[] NOT NULL CHECK (cardinality(recipient_timezones) >= 1),
  hold_reason text,
  claimed_by text,
  claimed_at timestamptz,
  lease_expires_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  completed_at timestamptz,
  CHECK (status IN ('completed', 'failed', 'canceled')
         OR (recipient_name IS NOT NULL AND recipient_phone IS NOT NULL))
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

-- 11. provider_availability: live capacity and health, one row per provider.
-- Invariant kept by the functions: current_calls + available_slots = max_concurrent_calls
-- (available_slots never below 0, current_calls never below 0).
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

-- 12. call_assignments: one row per attempt on a provider.
CREATE TABLE public.call_assignments (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  queue_id uuid NOT NULL REFERENCES public.call_queue (id) ON DELETE CASCADE,
  -- a provider with call records is deactivated, not deleted
  provider_id uuid NOT NULL REFERENCES public.call_service_providers (id) ON DELETE RESTRICT,
  provider_call_id text,
  state text NOT NULL DEFAULT 'assigned'
    CHECK (state IN ('assigned', 'dialing', 'placed', 'completed', 'failed', 'canceled',
                     'released')),
  attempt integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
  assigned_at timestamptz NOT NULL DEFAULT now(),
  dialing_at timestamptz,
  placed_at timestamptz,
  ended_at timestamptz,
  last_polled_at timestamptz,
  next_poll_at timestamptz,
  poll_count integer NOT NULL DEFAULT 0 CHECK (poll_count >= 0),
  outcome text,
  error text,
  -- billing (set by the dial gate, mark_call_dialing): the usage period the dial was counted
  -- in, the minutes it reserved there, and the call's cap sent to the provider
  usage_id uuid REFERENCES public.user_call_usage (id) ON DELETE SET NULL,
  reserved_minutes integer NOT NULL DEFAULT 0 CHECK (reserved_minutes >= 0),
  max_duration_seconds integer CHECK (max_duration_seconds > 0),
  -- the outbound number (or number id) this attempt dials from, when the provider has a pool
  caller_id text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
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

-- When a provider's max_concurrent_calls changes, its free slots follow.
CREATE OR REPLACE FUNCTION public.sync_provider_slots() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  UPDATE public.provider_availability pa
     SET available_slots = greatest(NEW.max_concurrent_calls - pa.current_calls, 0)
   WHERE pa.provider_id = NEW.id;
  RETURN NEW;
END
$$;

CREATE TRIGGER call_service_providers_sync_slots
  AFTER UPDATE OF max_concurrent_calls ON public.call_service_providers
  FOR EACH ROW WHEN (OLD.max_concurrent_calls IS DISTINCT FROM NEW.max_concurrent_calls)
  EXECUTE FUNCTION public.sync_provider_slots();

ALTER TABLE public.call_service_providers ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.provider_availability ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_assignments ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_retries ENABLE ROW LEVEL SECURITY;
