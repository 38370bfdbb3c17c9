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

-- The stripe a call counts in (see tenant_call_counters): on insert, its transaction's (every
-- call a transaction inserts counts in one row, so two transactions that schedule calls one by
-- one never take two rows each in opposite orders; concurrent transactions spread); the
-- claim's stripe from its claim on. 16 stripes: public.counter_stripes()
-- (20240101000320_plans.sql) says so to the functions.
ALTER TABLE public.call_queue
  ADD COLUMN counter_stripe smallint NOT NULL DEFAULT (txid_current() % 16)::smallint
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

-- Usage not yet folded into its period's user_call_usage row: minutes billed by calls' endings,
-- and the dials of gate chunks of tenants whose plan has no call or minute limit. An ending
-- (settle_call_usage) adds a row here instead of updating the period's row, which every dial
-- gate of the tenant also writes (calls_made) and holds through its commit: so a tenant's
-- endings never queue on its gates or on each other; and a chunk's dials of a plan without
-- limits (nothing to check them against) are counted here too (dial_gates), so that tenant's
-- gate chunks do not queue on the row either. fold_call_usage moves the
-- rows into user_call_usage (deleted here, added there, in one transaction): the ending itself
-- when the period's row is free at its end (SKIP LOCKED), the tenant's next dial gate, and
-- beat's reconcile_tenant_counters. Exact figures at any moment are user_call_usage plus these
-- rows: usage_totals() and the view user_call_usage_live.
--   calls_made        dials counted (a gate chunk's, plan without limits)
--   minutes_used      minutes billed (the provider's duration, rounded up per call)
--   minutes_released  the call's reservation, given back (subtracted from minutes_reserved)
-- No foreign key to user_call_usage on purpose: its check would lock the period's row (FOR KEY
-- SHARE) on every ending, the very row this table keeps the endings off. Usage rows are never
-- deleted while a tenant exists (users ON DELETE RESTRICT).
CREATE TABLE public.user_call_usage_deltas (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  usage_id uuid NOT NULL,
  user_id uuid NOT NULL,
  calls_made integer NOT NULL DEFAULT 0 CHECK (calls_made >= 0),
  minutes_used integer NOT NULL DEFAULT 0 CHECK (minutes_used >= 0),
  minutes_released integer NOT NULL DEFAULT 0 CHECK (minutes_released >= 0),
  created_at timestamptz NOT NULL DEFAULT now()
) WITH (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX user_call_usage_deltas_usage_idx ON public.user_call_usage_deltas (usage_id);

ALTER TABLE public.user_call_usage_deltas ENABLE ROW LEVEL SECURITY;
