-- Plans: per-tenant counters that the plan checks read instead of counting the queue.
-- Functions, triggers, grants and policies of this domain: 20240101000320_plans.sql.
-- The billing model and the limits are described in supabase/README.md ("Billing model").

-- Per tenant (user), counter_stripes() rows (stripes), kept by a statement trigger on
-- call_queue (same transaction) so that their sums equal a recount of call_queue;
-- reconcile_tenant_counters() corrects any drift.
--   queued   calls waiting (status queued): each still needs a dial
--   claimed  claimed or assigned: taken by the fleet, not dialed yet
--   dialed   dialing or in_progress
--   rate_tat the plan's per-tenant calls per minute, see plan_rate_allowance (stripe 0's only)
-- calls in flight (plan concurrency) = claimed + dialed; calls needing a dial = queued + claimed.
-- Why stripes: one row per tenant was a hot row. Every claim of the tenant locked it until
-- commit, so its claimers queued on it, one at a time. A call counts in the stripe of its row
-- (call_queue.counter_stripe): a claim takes stripes with room (SKIP LOCKED) and stamps the
-- calls it takes with them, so concurrent claimers of one tenant never wait on each other.
-- Each stripe carries a share of the plan's concurrency (counter_stripe_share); a claim keeps
-- a stripe's calls in flight within its share, so the tenant's stay within the plan.
-- Exact per stripe: claimed and dialed (a call changes stripe only when it is taken from the
-- queue). Exact only as a sum over the tenant's stripes: queued (a claim moves the call's
-- queued count to its new stripe, which may go below zero there).
CREATE TABLE public.tenant_call_counters (
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  stripe smallint NOT NULL DEFAULT 0,
  queued integer NOT NULL DEFAULT 0,
  claimed integer NOT NULL DEFAULT 0,
  dialed integer NOT NULL DEFAULT 0,
  -- the plan's calls_per_minute (GCRA): the theoretical arrival time of the tenant's next
  -- claim; kept by the counter trigger from the claims it sees (NULL: never limited yet)
  rate_tat timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (user_id, stripe)
) WITH (
  fillfactor = 50,
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_vacuum_cost_delay = 0
);
-- the claim enumerates tenants with waiting calls (a tenant whose stripes sum to a positive
-- count has a stripe with a positive one)
CREATE INDEX tenant_call_counters_waiting_idx ON public.tenant_call_counters (user_id)
  WHERE queued > 0;

-- The stripe a call counts in (see tenant_call_counters): any, on insert (spread, so that
-- concurrent inserts of one tenant seldom meet on a row); the claim's stripe from its claim on.
-- 16 stripes: public.counter_stripes() (20240101000320_plans.sql) says so to the functions.
ALTER TABLE public.call_queue
  ADD COLUMN counter_stripe smallint NOT NULL DEFAULT floor(random() * 16)::smallint
    CHECK (counter_stripe >= 0 AND counter_stripe < 16);

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
