-- Grants for the call path's constants (20240101000170): the worker's functions read them with
-- the caller's rights, so the worker roles may execute them; nobody else needs them.
REVOKE EXECUTE ON FUNCTION
  public.default_lease_seconds(), public.poll_deadline_seconds(), public.failure_kinds(),
  public.live_call_statuses(), public.in_flight_call_statuses(), public.live_assignment_states()
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.default_lease_seconds(), public.poll_deadline_seconds(), public.failure_kinds(),
  public.live_call_statuses(), public.in_flight_call_statuses(), public.live_assignment_states()
  TO service_role, callq_worker;
-- The live-state lists are also read by views app users query with their own rights
-- (call_campaign_progress counts a campaign's calls in flight).
GRANT EXECUTE ON FUNCTION
  public.live_call_statuses(), public.in_flight_call_statuses(), public.live_assignment_states()
  TO authenticated;
