-- The call path's timing, written once. A LANGUAGE sql body is checked when it is created, so
-- the functions that use these (20240101000200) need them to exist first.
--
-- The lease: how long a claimed, assigned or dialing call may sit before the reaper takes it
-- back. A claimer passes its own (the worker: CALLQ_LEASE_SECONDS, whose default is this
-- value; a test compares them); later steps keep the length the claim chose.
CREATE OR REPLACE FUNCTION public.default_lease_seconds() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$ SELECT 120 $$;

-- A placed call's polls: mark_call_placed expects the first poll within this many seconds
-- (next_poll_at), and each poll sets next_poll_at to the poll after it. The reaper restarts a
-- tracking chain whose poll is this many seconds late (grace). The worker's first poll
-- (CALLQ_TRACK_INITIAL_DELAY_SECONDS) must come before this deadline; a test checks that.
CREATE OR REPLACE FUNCTION public.poll_deadline_seconds() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$ SELECT 15 $$;

-- The failure kinds handle_failed_call accepts: the same set as dispatch/policy.py's
-- FAILURE_KINDS and call_retries.reason's CHECK (a test compares the three).
CREATE OR REPLACE FUNCTION public.failure_kinds() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$ SELECT ARRAY['busy', 'no_answer', 'voicemail', 'provider_error', 'rate_limited',
                   'permanent', 'canceled'] $$;

-- The vocabulary of live things, written once. Partial index predicates must spell their lists
-- out (tests/integration/test_db_queue.py checks each one against these functions). IMMUTABLE
-- with no argument: the planner folds "x = ANY (public.live_call_statuses())" into the literal
-- list, so a partial index with the same list still matches.
-- A call not finished: waiting, claimed, on a provider or on the phone.
CREATE OR REPLACE FUNCTION public.live_call_statuses() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$ SELECT ARRAY['queued', 'claimed', 'assigned', 'dialing', 'in_progress'] $$;

-- A call in flight: a live call that left the queue (counts against concurrency caps).
CREATE OR REPLACE FUNCTION public.in_flight_call_statuses() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$ SELECT ARRAY['claimed', 'assigned', 'dialing', 'in_progress'] $$;

-- A live assignment: it holds a provider slot.
CREATE OR REPLACE FUNCTION public.live_assignment_states() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$ SELECT ARRAY['assigned', 'dialing', 'placed'] $$;
