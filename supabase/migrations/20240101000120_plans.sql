-- Plans: per-tenant counters that the plan checks read instead of counting the queue.
-- Functions, triggers, grants and policies of this domain: 20240101000320_plans.sql.
-- The billing model and the limits are described in supabase/README.md ("Billing model").

-- One row per tenant (user), kept equal to a recount of call_queue by a statement trigger on
-- call_queue (same transaction); reconcile_tenant_counters() corrects any drift.
--   queued   calls waiting (status queued): each still needs a dial
--   claimed  claimed or assigned: taken by the fleet, not dialed yet
--   dialed   dialing or in_progress
--   rate_tat the plan's per-tenant calls per minute, see plan_rate_allowance
-- calls in flight (plan concurrency) = claimed + dialed; calls needing a dial = queued + claimed.
CREATE TABLE public.tenant_call_counters (
  user_id uuid PRIMARY KEY REFERENCES public.users (id) ON DELETE CASCADE,
  queued integer NOT NULL DEFAULT 0,
  claimed integer NOT NULL DEFAULT 0,
  dialed integer NOT NULL DEFAULT 0,
  -- the plan's calls_per_minute (GCRA): the theoretical arrival time of the tenant's next
  -- claim; kept by the counter trigger from the claims it sees (NULL: never limited yet)
  rate_tat timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now()
) WITH (
  fillfactor = 50,
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_vacuum_cost_delay = 0
);
-- the claim enumerates tenants with waiting calls
CREATE INDEX tenant_call_counters_waiting_idx ON public.tenant_call_counters (user_id)
  WHERE queued > 0;

ALTER TABLE public.tenant_call_counters ENABLE ROW LEVEL SECURITY;

-- Fleet-wide create pacing per provider (a shared GCRA bucket): next_at is the earliest time
-- the next create may be sent by any worker. Rows appear on first use
-- (reserve_provider_create); the rate is the provider row's config.creates_per_second, or the
-- provider type's documented limit (provider_creates_per_second).
CREATE TABLE public.provider_create_pacing (
  provider_id uuid PRIMARY KEY REFERENCES public.call_service_providers (id) ON DELETE CASCADE,
  next_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

ALTER TABLE public.provider_create_pacing ENABLE ROW LEVEL SECURITY;
