-- call_events: the durable, append-only log of what happened to each call.
--
-- Written in the same transaction as the state change it records: by statement-level triggers
-- on call_queue and call_assignments (20240101000330_events.sql), and by
-- public.record_call_event() for facts that are not a status change (held by a rule,
-- do-not-call...). Nobody is granted UPDATE; rows leave only through the retention
-- (public.prune_call_events, run by beat) or with their user.
--
-- Kept lean: no foreign keys (an event outlives its queue row and provider; a user's events go
-- with the user through a trigger), detail is NULL unless an event needs it, and created_at is
-- indexed with a BRIN index (rows arrive in time order, so a few pages describe the table).

-- (row checks of the hot tables: see call_queue_row_check, 20240101000100). A call's life
-- writes about eight events, each its own statement.
CREATE OR REPLACE FUNCTION public.call_events_row_check(p_kind text, p_detail jsonb)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_broken text := CASE
    WHEN NOT (p_kind IN (
      'scheduled',     -- call_queue row inserted (due_at = scheduled_time)
      'held',          -- a rule kept it from being dialed now (record_call_event)
      'rescheduled',   -- moved to another time (record_call_event)
      'claimed',       -- queued -> claimed (claim_due_calls)
      'assigned',      -- an attempt assigned to a provider (call_assignments insert)
      'dialing',       -- the dial gate passed (due_at = the time it was due)
      'placed',        -- the provider accepted the create (due_at as for dialing)
      'ringing',       -- the provider reports ringing (record_call_event)
      'in_progress',   -- the provider reports the call answered / in progress (record_call_event)
      'ended',         -- an attempt ended; outcome = completed, busy, no_answer, voicemail, ...
      'released',      -- an attempt given back, proven never dialed (detail.reason)
      'requeued',      -- back to queued without a failed attempt (lease expired, released)
      'retried',       -- queued again after a failed attempt (due_at = next attempt)
      'failed_over',   -- as retried, with the provider excluded from the next attempt
      'completed',     -- the call ended completed
      'failed',        -- the call ended failed (no attempt left, or a permanent failure)
      'canceled'       -- the call was canceled
    )) THEN 'kind: an event kind'
    WHEN NOT (p_detail IS NULL OR jsonb_typeof(p_detail) = 'object') THEN 'detail: an object'
  END;
BEGIN
  IF v_broken IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'call_events.' || v_broken;
  END IF;
  RETURN true;
END
$$;

CREATE TABLE public.call_events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  created_at timestamptz NOT NULL DEFAULT now(),
  queue_id uuid NOT NULL,
  user_id uuid NOT NULL,
  kind text NOT NULL,
  attempt integer NOT NULL DEFAULT 0,
  provider_id uuid,
  assignment_id uuid,
  outcome text,
  due_at timestamptz,
  detail jsonb,
  CONSTRAINT call_events_row_check CHECK (public.call_events_row_check(kind, detail))
);
-- One call's timeline (and Realtime / RLS reads by call).
CREATE INDEX call_events_queue_idx ON public.call_events (queue_id, id);
-- A user's events (RLS reads without a filter; deleting a user).
CREATE INDEX call_events_user_idx ON public.call_events (user_id, id);
-- Time windows for the ops views and metrics; the retention deletes by id order.
CREATE INDEX call_events_created_brin ON public.call_events USING brin (created_at);

ALTER TABLE public.call_events ENABLE ROW LEVEL SECURITY;

-- ops_settings: knobs ops turn at run time, one row. A table rather than a custom GUC: hosted
-- Supabase refuses ALTER DATABASE ... SET of custom settings, and a transaction pooler would
-- lose a session-level SET.
--   retry_delay_scale  multiplies every retry backoff of handle_failed_call (demos and tests
--                      use 0.01 or less); a session's callq.retry_delay_scale still wins.
CREATE TABLE public.ops_settings (
  id boolean PRIMARY KEY DEFAULT true CHECK (id),
  retry_delay_scale double precision NOT NULL DEFAULT 1 CHECK (retry_delay_scale > 0),
  updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.ops_settings DEFAULT VALUES;
ALTER TABLE public.ops_settings ENABLE ROW LEVEL SECURITY;
