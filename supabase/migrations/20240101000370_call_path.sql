-- Grants for the call path's constants (20240101000170): the worker's functions read them with
-- the caller's rights, so the worker roles may execute them; nobody else needs them.
REVOKE EXECUTE ON FUNCTION
  public.default_lease_seconds(), public.poll_deadline_seconds(), public.failure_kinds()
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
  public.default_lease_seconds(), public.poll_deadline_seconds(), public.failure_kinds()
  TO service_role, callq_worker;
