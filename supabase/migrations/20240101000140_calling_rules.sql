-- Calling rules (issue 10): the recipient's time zones, calling windows, do-not-call, consent,
-- attempt caps per contact. Tables here; functions, grants and RLS policies in
-- 20240101000340_calling_rules.sql; the number prefix -> zones data in 20240101000145.
-- The rules are checked where a call is claimed (windows) and again at the dial gate
-- (mark_call_dialing: windows, do-not-call, consent, attempt cap), with the time of
-- public.callq_now(), which tests can pin (calling_settings.test_now).

-- One row: defaults an operator can change, and the test clock.
CREATE TABLE public.calling_settings (
  id boolean PRIMARY KEY DEFAULT true CHECK (id),
  -- dial attempts to one number per rolling 24 h per tenant, unless the plan says otherwise
  -- (subscription_plans.contact_attempts_per_24h)
  default_attempts_per_24h integer NOT NULL DEFAULT 3 CHECK (default_attempts_per_24h >= 1),
  -- the test clock: when set, callq_now() returns it instead of now(). NULL in production
  -- (`callq queue` warns when it is set). Only the owner and service_role can write it.
  test_now timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.calling_settings DEFAULT VALUES;

-- The zone names this server knows (pg_timezone_names, which takes ~0.5 s to read, so
-- schedule_call validates against this copy). public.refresh_calling_timezones() re-reads it
-- after a PostgreSQL upgrade.
CREATE TABLE public.calling_timezones (
  name text PRIMARY KEY
);
INSERT INTO public.calling_timezones (name) SELECT DISTINCT name FROM pg_catalog.pg_timezone_names;

-- Number prefix (country code + leading digits, no '+') -> IANA zones, from libphonenumber
-- (scripts/gen_phone_zones.py). The longest matching prefix wins (public.phone_timezones).
CREATE TABLE public.phone_prefix_zones (
  prefix text PRIMARY KEY CHECK (prefix ~ '^[1-9][0-9]{0,14}$'),
  zones text[] NOT NULL CHECK (cardinality(zones) >= 1)
);

-- Calling windows. A call may be dialed only at a moment that every applicable active rule
-- allows in every one of its zones (the strictest rule wins): local ISO weekday in days,
-- start_time <= local time < end_time, local date not excluded. Applicable: every 'default'
-- rule, the rules of the caller's live plan, of the caller, of the call's template.
CREATE TABLE public.calling_windows (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  scope text NOT NULL CHECK (scope IN ('default', 'plan', 'user', 'template')),
  plan_id uuid REFERENCES public.subscription_plans (id) ON DELETE CASCADE,
  user_id uuid REFERENCES public.users (id) ON DELETE CASCADE,
  template_id uuid REFERENCES public.call_templates (id) ON DELETE CASCADE,
  -- ISO weekdays: 1 = Monday .. 7 = Sunday
  days integer[] NOT NULL DEFAULT '{1,2,3,4,5,6,7}'
    CHECK (cardinality(days) >= 1 AND days <@ '{1,2,3,4,5,6,7}'),
  start_time time NOT NULL DEFAULT '08:00',
  end_time time NOT NULL DEFAULT '21:00',   -- exclusive; '24:00' = until midnight
  excluded_dates date[] NOT NULL DEFAULT '{}',
  description text CHECK (description IS NULL OR length(description) <= 500),
  is_active boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CHECK (start_time < end_time),
  CHECK (CASE scope
           WHEN 'default' THEN num_nonnulls(plan_id, user_id, template_id) = 0
           WHEN 'plan' THEN plan_id IS NOT NULL AND num_nonnulls(user_id, template_id) = 0
           WHEN 'user' THEN user_id IS NOT NULL AND num_nonnulls(plan_id, template_id) = 0
           ELSE template_id IS NOT NULL AND num_nonnulls(plan_id, user_id) = 0
         END)
);
CREATE INDEX calling_windows_plan_idx ON public.calling_windows (plan_id) WHERE plan_id IS NOT NULL;
CREATE INDEX calling_windows_user_idx ON public.calling_windows (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX calling_windows_template_idx ON public.calling_windows (template_id)
  WHERE template_id IS NOT NULL;
-- The shipped default: the US federal rule (47 CFR 64.1200(c)(1)), 08:00-21:00 local, every day.
INSERT INTO public.calling_windows (scope, start_time, end_time, description)
VALUES ('default', '08:00', '21:00', 'US federal rule: 8 a.m. to 9 p.m. at the called party''s location');

-- Do-not-call: a tenant's own list (user_id) or the global list (user_id NULL). A listed,
-- unexpired number is refused by schedule_call (CQ020) and canceled at the dial gate.
CREATE TABLE public.do_not_call (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  phone text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
  user_id uuid REFERENCES public.users (id) ON DELETE CASCADE,
  reason text CHECK (reason IS NULL OR length(reason) <= 500),
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz,
  UNIQUE NULLS NOT DISTINCT (phone, user_id)
);
CREATE INDEX do_not_call_user_idx ON public.do_not_call (user_id) WHERE user_id IS NOT NULL;

-- Consent: a tenant's record that a number agreed to be called (needed when the plan or the
-- template requires it). Active while granted_at <= now and not revoked.
CREATE TABLE public.call_consents (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  phone text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
  source text NOT NULL CHECK (length(btrim(source)) BETWEEN 1 AND 200),
  granted_at timestamptz NOT NULL DEFAULT now(),
  revoked_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK (revoked_at IS NULL OR revoked_at >= granted_at)
);
CREATE INDEX call_consents_user_phone_idx ON public.call_consents (user_id, phone);

-- Dial attempts per contact: one row per dial, written by the gate (mark_call_dialing) at
-- callq_now(), given back by release_assignment when the dial is proven never to have left.
-- The rolling-24 h cap counts these rows (index: user, phone, time).
CREATE TABLE public.contact_attempts (
  assignment_id uuid PRIMARY KEY REFERENCES public.call_assignments (id) ON DELETE CASCADE,
  user_id uuid NOT NULL,
  phone text NOT NULL,
  attempted_at timestamptz NOT NULL
);
CREATE INDEX contact_attempts_contact_idx
  ON public.contact_attempts (user_id, phone, attempted_at);

CREATE TRIGGER calling_settings_updated_at BEFORE UPDATE ON public.calling_settings
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER calling_windows_updated_at BEFORE UPDATE ON public.calling_windows
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

ALTER TABLE public.calling_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.calling_timezones ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.phone_prefix_zones ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.calling_windows ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.do_not_call ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_consents ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.contact_attempts ENABLE ROW LEVEL SECURITY;
