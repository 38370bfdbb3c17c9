-- callq initial schema: user profiles, plans, subscriptions, usage, templates, history,
-- favorites, feedback. Queue and provider tables follow in 20240101000100; functions in
-- 20240101000200; grants and RLS policies in 20240101000300. Every table gets RLS enabled here
-- (default deny) so no table is ever exposed between migrations.

-- updated_at maintenance shared by every table that has the column.
CREATE OR REPLACE FUNCTION public.set_updated_at() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END
$$;

-- 1. users: the profile that extends auth.users (one row per auth user, same id). No foreign
-- key to auth.users: deleting the auth user closes the account (trigger in 20240101000310) and
-- leaves this row as an anonymised tombstone, so usage, billing and history keep their owner.
CREATE TABLE public.users (
  id uuid PRIMARY KEY,
  email text,
  full_name text,
  phone text CHECK (phone IS NULL OR phone ~ '^\+[1-9][0-9]{6,14}$'),
  avatar_url text,
  company_name text,
  timezone text NOT NULL DEFAULT 'UTC',
  is_admin boolean NOT NULL DEFAULT false,
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  -- set when the account was closed (public.close_account): the row is then anonymised
  deleted_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_email_idx ON public.users (email);

-- 2. subscription_plans: price, interval, limits (NULL limit = unlimited), features.
CREATE TABLE public.subscription_plans (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL UNIQUE CHECK (length(btrim(name)) > 0),
  description text,
  price numeric(10, 2) NOT NULL DEFAULT 0 CHECK (price >= 0),
  currency text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
  billing_interval text NOT NULL DEFAULT 'month' CHECK (billing_interval IN ('month', 'year')),
  call_limit integer CHECK (call_limit >= 0),
  minute_limit integer CHECK (minute_limit >= 0),
  max_concurrent_calls integer NOT NULL DEFAULT 1 CHECK (max_concurrent_calls >= 1),
  -- the longest one call may last (minutes): at most this is reserved per call at the dial gate
  -- (default 10, Vapi's own default call length); 720 = Vapi's maximum (43200 s)
  max_call_minutes integer NOT NULL DEFAULT 10 CHECK (max_call_minutes BETWEEN 1 AND 720),
  -- optional: the tenant's calls claimed per minute, fleet-wide (NULL = no limit); calls over
  -- the rate stay queued and are claimed later (public.plan_rate_allowance, 20240101000320)
  calls_per_minute integer CHECK (calls_per_minute BETWEEN 1 AND 100000),
  features jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(features) = 'object'),
  -- calling rules (20240101000340): dial attempts to one number per rolling 24 h per tenant
  -- (NULL = calling_settings.default_attempts_per_24h), and whether calls need recorded consent
  contact_attempts_per_24h integer CHECK (contact_attempts_per_24h >= 1),
  requires_consent boolean NOT NULL DEFAULT false,
  is_active boolean NOT NULL DEFAULT true,
  -- the plan a new signup is subscribed to (handle_new_user); at most one active default
  is_default boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX subscription_plans_one_default_idx
  ON public.subscription_plans (is_default) WHERE is_default AND is_active;

-- 3. user_subscriptions: a user's plan and billing period; at most one live one per user.
CREATE TABLE public.user_subscriptions (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- billing records: a user row with subscriptions is never deleted (accounts are closed)
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE RESTRICT,
  -- a plan with subscribers cannot be deleted (deactivate it instead)
  plan_id uuid NOT NULL REFERENCES public.subscription_plans (id) ON DELETE RESTRICT,
  status text NOT NULL DEFAULT 'active'
    CHECK (status IN ('trialing', 'active', 'past_due', 'canceled', 'expired')),
  current_period_start timestamptz NOT NULL DEFAULT now(),
  current_period_end timestamptz NOT NULL DEFAULT (now() + interval '1 month'),
  cancel_at_period_end boolean NOT NULL DEFAULT false,
  canceled_at timestamptz,
  external_customer_id text,
  external_subscription_id text UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CHECK (current_period_end > current_period_start)
);
CREATE UNIQUE INDEX user_subscriptions_one_live_idx
  ON public.user_subscriptions (user_id) WHERE status IN ('trialing', 'active');
CREATE INDEX user_subscriptions_user_idx ON public.user_subscriptions (user_id);
CREATE INDEX user_subscriptions_plan_idx ON public.user_subscriptions (plan_id);
CREATE INDEX user_subscriptions_period_end_idx
  ON public.user_subscriptions (current_period_end) WHERE status IN ('trialing', 'active');

-- 4. user_call_usage: calls and minutes per user per billing period, with what is left.
CREATE TABLE public.user_call_usage (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE RESTRICT,
  -- usage outlives a deleted subscription row (billing records)
  subscription_id uuid REFERENCES public.user_subscriptions (id) ON DELETE SET NULL,
  period_start timestamptz NOT NULL,
  period_end timestamptz NOT NULL,
  calls_made integer NOT NULL DEFAULT 0 CHECK (calls_made >= 0),
  minutes_used integer NOT NULL DEFAULT 0 CHECK (minutes_used >= 0),
  -- minutes held by calls in flight (their max duration), settled when each call ends
  minutes_reserved integer NOT NULL DEFAULT 0 CHECK (minutes_reserved >= 0),
  calls_limit integer CHECK (calls_limit >= 0),
  minutes_limit integer CHECK (minutes_limit >= 0),
  calls_remaining integer GENERATED ALWAYS AS
    (CASE WHEN calls_limit IS NULL THEN NULL ELSE greatest(calls_limit - calls_made, 0) END) STORED,
  minutes_remaining integer GENERATED ALWAYS AS
    (CASE WHEN minutes_limit IS NULL THEN NULL ELSE greatest(minutes_limit - minutes_used, 0) END)
    STORED,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (user_id, period_start),
  CHECK (period_end > period_start)
);
CREATE INDEX user_call_usage_subscription_idx ON public.user_call_usage (subscription_id);

-- 5. call_templates: scripts; public ones are visible to every signed-in user.
CREATE TABLE public.call_templates (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- NULL = a system template (created by ops); closing an account deletes its templates
  created_by uuid REFERENCES public.users (id) ON DELETE CASCADE,
  name text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
  description text,
  category text,
  tags text[] NOT NULL DEFAULT '{}',
  script text NOT NULL,
  -- declared variables: ["company_name", ...] or {"company_name": {"required": true}, ...}
  variables jsonb NOT NULL DEFAULT '[]'::jsonb
    CHECK (jsonb_typeof(variables) IN ('array', 'object')),
  first_message text,
  -- provider call features (NULL = the provider's own agent/account setting applies)
  voicemail_detection boolean,
  voicemail_action text NOT NULL DEFAULT 'hang_up'
    CHECK (voicemail_action IN ('hang_up', 'leave_message')),
  voicemail_message text CHECK (length(voicemail_message) <= 1000),
  record_calls boolean,
  is_public boolean NOT NULL DEFAULT false,
  -- calling rules: calls with this template need the recipient's recorded consent
  requires_consent boolean NOT NULL DEFAULT false,
  usage_count integer NOT NULL DEFAULT 0 CHECK (usage_count >= 0),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT call_templates_leave_message_has_text
    CHECK (voicemail_action <> 'leave_message' OR coalesce(length(btrim(voicemail_message)), 0) > 0)
);
CREATE INDEX call_templates_created_by_idx ON public.call_templates (created_by);
CREATE INDEX call_templates_public_idx ON public.call_templates (category) WHERE is_public;
CREATE INDEX call_templates_tags_idx ON public.call_templates USING gin (tags);

-- (row checks of the hot tables: see call_queue_row_check, 20240101000100)
CREATE OR REPLACE FUNCTION public.call_history_row_check(
  p_recipient_phone text, p_status text, p_duration_seconds numeric, p_cost numeric,
  p_attempts integer, p_started_at timestamptz, p_ended_at timestamptz
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_broken text := CASE
    WHEN NOT (p_recipient_phone ~ '^\+[1-9][0-9]{6,14}$') THEN 'recipient_phone: an E.164 number'
    WHEN NOT (p_status IN ('completed', 'failed', 'canceled', 'busy', 'no_answer', 'voicemail'))
      THEN 'status: a final call status'
    WHEN NOT (p_duration_seconds >= 0) THEN 'duration_seconds: at least 0'
    WHEN NOT (p_cost >= 0) THEN 'cost: at least 0'
    WHEN NOT (p_attempts >= 0) THEN 'attempts: at least 0'
    WHEN NOT (p_ended_at >= p_started_at) THEN 'ended_at: not before started_at'
  END;
BEGIN
  IF v_broken IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'call_history.' || v_broken;
  END IF;
  RETURN true;
END
$$;

-- 6. call_history: one row per finished call (queue item). FKs to the queue, providers and
-- assignments are added in 20240101000100 once those tables exist.
CREATE TABLE public.call_history (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE RESTRICT,
  -- history keeps the call when its template is deleted
  template_id uuid REFERENCES public.call_templates (id) ON DELETE SET NULL,
  queue_id uuid,
  assignment_id uuid,
  provider_id uuid,
  -- NULL once the user closed the account (anonymised; the row stays for billing)
  recipient_name text,
  recipient_phone text,
  recipient_email text,
  status text NOT NULL,
  started_at timestamptz,
  ended_at timestamptz,
  duration_seconds numeric(12, 3),
  recording_url text,
  transcript text,
  cost numeric(12, 4),
  provider_call_id text,
  attempts integer NOT NULL DEFAULT 0,
  error text,
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT call_history_row_check CHECK (public.call_history_row_check(
    recipient_phone, status, duration_seconds, cost, attempts, started_at, ended_at))
);
-- a user's history, newest first
CREATE INDEX call_history_user_created_idx ON public.call_history (user_id, created_at DESC);
-- one history row per queue item and per assignment: what makes completion idempotent
CREATE UNIQUE INDEX call_history_queue_idx ON public.call_history (queue_id);
CREATE UNIQUE INDEX call_history_assignment_idx ON public.call_history (assignment_id);
CREATE INDEX call_history_template_idx ON public.call_history (template_id);
CREATE INDEX call_history_provider_idx ON public.call_history (provider_id);

-- 7. template_favorites
CREATE TABLE public.template_favorites (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  template_id uuid NOT NULL REFERENCES public.call_templates (id) ON DELETE CASCADE,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (user_id, template_id)
);
CREATE INDEX template_favorites_template_idx ON public.template_favorites (template_id);

-- 8. call_feedback: one rating per user per call.
CREATE TABLE public.call_feedback (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  call_id uuid NOT NULL REFERENCES public.call_history (id) ON DELETE CASCADE,
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  rating smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
  comment text CHECK (comment IS NULL OR length(comment) <= 5000),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (call_id, user_id)
);
CREATE INDEX call_feedback_user_idx ON public.call_feedback (user_id);

CREATE TRIGGER users_updated_at BEFORE UPDATE ON public.users
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER subscription_plans_updated_at BEFORE UPDATE ON public.subscription_plans
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER user_subscriptions_updated_at BEFORE UPDATE ON public.user_subscriptions
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER user_call_usage_updated_at BEFORE UPDATE ON public.user_call_usage
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER call_templates_updated_at BEFORE UPDATE ON public.call_templates
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER call_history_updated_at BEFORE UPDATE ON public.call_history
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER call_feedback_updated_at BEFORE UPDATE ON public.call_feedback
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

-- Supabase convention: a profile row appears when an auth user is created.
CREATE OR REPLACE FUNCTION public.handle_new_user() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  INSERT INTO public.users (id, email, full_name, avatar_url)
  VALUES (
    NEW.id,
    NEW.email,
    NEW.raw_user_meta_data ->> 'full_name',
    NEW.raw_user_meta_data ->> 'avatar_url'
  )
  ON CONFLICT (id) DO NOTHING;
  -- A signup gets the default plan, if one is marked (subscription_plans.is_default).
  INSERT INTO public.user_subscriptions (user_id, plan_id, status, current_period_start,
                                         current_period_end)
  SELECT NEW.id, pl.id, 'active', now(),
         now() + CASE pl.billing_interval WHEN 'year' THEN interval '1 year'
                                          ELSE interval '1 month' END
    FROM public.subscription_plans pl
   WHERE pl.is_default AND pl.is_active
     AND NOT EXISTS (SELECT 1 FROM public.user_subscriptions s
                      WHERE s.user_id = NEW.id AND s.status IN ('trialing', 'active'));
  RETURN NEW;
END
$$;

CREATE TRIGGER on_auth_user_created AFTER INSERT ON auth.users
  FOR EACH ROW EXECUTE FUNCTION public.handle_new_user();

-- Admin = public.users.is_admin (set only by service_role/SQL; users cannot update the column).
-- SECURITY DEFINER so policies can consult users without recursing into its own RLS.
CREATE OR REPLACE FUNCTION public.is_admin() RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
  SELECT coalesce(
    (SELECT u.is_admin FROM public.users u WHERE u.id = auth.uid()),
    false
  )
$$;

ALTER TABLE public.users ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.subscription_plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.user_subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.user_call_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_history ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.template_favorites ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_feedback ENABLE ROW LEVEL SECURITY;
