-- Campaigns: a named group of calls of one user, with a status the claim honours and optional
-- pacing. The functions that act on them are in 20240101000350_campaigns.sql.

CREATE TABLE public.call_campaigns (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  -- the default template of the campaign's calls (a row of schedule_calls may name another)
  template_id uuid NOT NULL REFERENCES public.call_templates (id),
  name text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
  status text NOT NULL DEFAULT 'draft'
    CHECK (status IN ('draft', 'running', 'paused', 'completed', 'canceled')),
  -- calls are claimed only between these times (either may be NULL)
  starts_at timestamptz,
  ends_at timestamptz,
  -- pacing across the whole fleet (NULL: no limit)
  calls_per_minute integer CHECK (calls_per_minute BETWEEN 1 AND 100000),
  max_in_flight integer CHECK (max_in_flight BETWEEN 1 AND 100000),
  -- calls_per_minute's token bucket, kept by claim_candidates under the row's lock
  pace_tokens double precision NOT NULL DEFAULT 0,
  pace_at timestamptz,
  -- counts kept by the functions (schedule_calls, cancel_campaign)
  calls_total integer NOT NULL DEFAULT 0 CHECK (calls_total >= 0),
  calls_canceled integer NOT NULL DEFAULT 0 CHECK (calls_canceled >= 0),
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  started_at timestamptz,
  ended_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CHECK (ends_at IS NULL OR starts_at IS NULL OR ends_at > starts_at)
);
CREATE INDEX call_campaigns_user_idx ON public.call_campaigns (user_id, created_at DESC);
CREATE INDEX call_campaigns_template_idx ON public.call_campaigns (template_id);
-- the claim's lanes: running campaigns with pacing or a window (see claim_candidates)
CREATE INDEX call_campaigns_lane_idx ON public.call_campaigns (id)
  WHERE status = 'running' AND (calls_per_minute IS NOT NULL OR max_in_flight IS NOT NULL
                                OR starts_at IS NOT NULL OR ends_at IS NOT NULL);

CREATE TRIGGER call_campaigns_updated_at BEFORE UPDATE ON public.call_campaigns
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

-- NO ACTION: a campaign with calls is not deleted on its own (deleting its user removes both).
ALTER TABLE public.call_queue
  ADD CONSTRAINT call_queue_campaign_id_fkey FOREIGN KEY (campaign_id)
    REFERENCES public.call_campaigns (id);
-- a campaign's calls by status (progress, cancel, pacing's in-flight count)
CREATE INDEX call_queue_campaign_idx ON public.call_queue (campaign_id, status)
  WHERE campaign_id IS NOT NULL;
-- a lane of the claim: one campaign's queued calls kept out of call_queue_claim_idx
CREATE INDEX call_queue_campaign_claim_idx
  ON public.call_queue (campaign_id, priority, scheduled_time, created_at)
  WHERE status = 'queued' AND via_campaign;

ALTER TABLE public.call_campaigns ENABLE ROW LEVEL SECURITY;

-- ---------------------------------------------------------------------------------------------
-- Notifications back to the app: endpoints a user registers (for all its calls, or one
-- campaign's), and the outbox of signed call.ended events, which is also the delivery log.

CREATE TABLE public.notification_endpoints (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  -- NULL: every call of the user; else only this campaign's
  campaign_id uuid REFERENCES public.call_campaigns (id) ON DELETE CASCADE,
  -- https, or http on loopback for local development (delivered only when ops allow it)
  url text NOT NULL CHECK (length(url) <= 2000 AND (
    url ~ '^https://[^/?#@[:space:]]+(/[^[:space:]]*)?$'
    OR url ~ '^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?(/[^[:space:]]*)?$')),
  -- the HMAC-SHA256 key of the signatures; never readable by API roles (shown once)
  secret text NOT NULL,
  include_transcript boolean NOT NULL DEFAULT false,
  is_active boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_endpoints_user_idx ON public.notification_endpoints (user_id)
  WHERE is_active;
CREATE INDEX notification_endpoints_campaign_idx ON public.notification_endpoints (campaign_id);

CREATE TABLE public.call_notifications (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  endpoint_id uuid NOT NULL REFERENCES public.notification_endpoints (id) ON DELETE CASCADE,
  user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
  queue_id uuid NOT NULL REFERENCES public.call_queue (id) ON DELETE CASCADE,
  event text NOT NULL DEFAULT 'call.ended' CHECK (event IN ('call.ended')),
  status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
  attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  lease_until timestamptz,
  last_http_status integer,
  last_error text,
  delivered_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (endpoint_id, queue_id, event)
);
CREATE INDEX call_notifications_due_idx ON public.call_notifications (next_attempt_at)
  WHERE status = 'pending';
CREATE INDEX call_notifications_user_idx ON public.call_notifications (user_id, created_at DESC);
CREATE INDEX call_notifications_queue_idx ON public.call_notifications (queue_id);

CREATE TRIGGER notification_endpoints_updated_at BEFORE UPDATE ON public.notification_endpoints
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER call_notifications_updated_at BEFORE UPDATE ON public.call_notifications
  FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

ALTER TABLE public.notification_endpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.call_notifications ENABLE ROW LEVEL SECURITY;
