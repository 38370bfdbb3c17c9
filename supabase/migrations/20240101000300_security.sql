-- Privileges and Row Level Security.
--
-- Roles:
--   anon           no access to any callq table or function.
--   authenticated  app users through the Supabase API: own rows only (policies below),
--                  EXECUTE on schedule_call, cancel_call and delete_my_account
--                  (20240101000310). Admins are authenticated users whose
--                  public.users.is_admin is true (public.is_admin()); they manage plans and
--                  templates, change a provider's operational columns (name, is_active,
--                  priority, max_concurrent_calls), read availability, assignments and retries,
--                  never read provider credentials (no API role can), never write a provider's
--                  credentials, endpoint or config (ops only), and see only their own rows of
--                  the per-user tables (use service_role for support tooling).
--   service_role   Supabase's backend role (BYPASSRLS): everything.
--   callq_worker   the worker fleet's group role (NOLOGIN). Ops grant it to the worker's login
--                  role:  CREATE ROLE callq_app LOGIN PASSWORD '...'; GRANT callq_worker TO callq_app;
--                  (or run the worker as service_role / postgres on Supabase). It holds table
--                  privileges, a permissive policy on each table, and EXECUTE on the worker's
--                  functions.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'callq_worker') THEN
    BEGIN
      CREATE ROLE callq_worker NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
      NULL;
    END;
  END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role, callq_worker;
-- auth.uid() for the worker's own sessions (not needed by the worker functions themselves);
-- where the migration owner may not grant on schema auth, skip rather than fail the push.
DO $$
BEGIN
  GRANT USAGE ON SCHEMA auth TO callq_worker;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'callq: could not grant USAGE on schema auth to callq_worker: %', SQLERRM;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Table privileges. Supabase's default privileges grant everything to anon/authenticated; start
-- from nothing and grant what the policies below are meant to allow.
REVOKE ALL ON public.users, public.subscription_plans, public.user_subscriptions,
  public.user_call_usage, public.call_templates, public.call_history, public.template_favorites,
  public.call_feedback, public.call_service_providers, public.call_queue,
  public.provider_availability, public.call_assignments, public.call_retries,
  public.provider_slots, public.eligible_providers, public.provider_load,
  public.provider_call_tallies, public.provider_stats
  FROM PUBLIC, anon, authenticated;

GRANT ALL ON public.users, public.subscription_plans, public.user_subscriptions,
  public.user_call_usage, public.call_templates, public.call_history, public.template_favorites,
  public.call_feedback, public.call_service_providers, public.call_queue,
  public.provider_availability, public.call_assignments, public.call_retries,
  public.provider_slots, public.eligible_providers, public.provider_load,
  public.provider_call_tallies, public.provider_stats
  TO service_role;

GRANT SELECT, INSERT, UPDATE, DELETE ON public.users, public.subscription_plans,
  public.user_subscriptions, public.user_call_usage, public.call_templates, public.call_history,
  public.template_favorites, public.call_feedback, public.call_service_providers,
  public.call_queue, public.provider_availability, public.call_assignments, public.call_retries,
  public.provider_slots, public.provider_call_tallies
  TO callq_worker;
GRANT SELECT ON public.eligible_providers, public.provider_load, public.provider_stats
  TO callq_worker;

-- authenticated: rows are filtered by the policies; columns limited here. No API role may
-- write an id (choosing an existing id would reveal that it exists), an owner column after the
-- insert, a counter, or anything the functions keep (queue, history, usage, subscriptions).
-- Accounts are closed with delete_my_account(), never by deleting the users row.
GRANT SELECT ON public.users TO authenticated;
GRANT UPDATE (email, full_name, phone, avatar_url, company_name, timezone, metadata)
  ON public.users TO authenticated;   -- never is_admin, deleted_at
GRANT SELECT, INSERT, UPDATE, DELETE ON public.subscription_plans TO authenticated;  -- writes: admins
GRANT SELECT ON public.user_subscriptions, public.user_call_usage, public.call_history,
  public.call_queue TO authenticated;   -- written by billing and the functions only
GRANT SELECT, DELETE ON public.call_templates TO authenticated;
GRANT INSERT (created_by, name, description, category, tags, script, variables, first_message,
              is_public) ON public.call_templates TO authenticated;
GRANT UPDATE (name, description, category, tags, script, variables, first_message, is_public)
  ON public.call_templates TO authenticated;
GRANT SELECT, DELETE ON public.template_favorites TO authenticated;
GRANT INSERT (user_id, template_id) ON public.template_favorites TO authenticated;
GRANT SELECT, DELETE ON public.call_feedback TO authenticated;
GRANT INSERT (call_id, user_id, rating, comment) ON public.call_feedback TO authenticated;
GRANT UPDATE (rating, comment) ON public.call_feedback TO authenticated;
-- live state of the worker: admins read it (drain a provider with is_active = false instead)
GRANT SELECT ON public.provider_availability, public.call_assignments, public.call_retries,
  public.provider_slots, public.provider_load, public.provider_call_tallies, public.provider_stats
  TO authenticated;
-- Providers: credentials (api_key, api_secret, webhook_secret) are not readable by any API role;
-- admins change only the operational columns. Inserting or deleting a provider and writing
-- its credentials, base_url, provider_type, capabilities or config is for ops (service_role).
GRANT SELECT (id, name, provider_type, base_url, max_concurrent_calls, priority, capabilities,
              config, is_active, created_at, updated_at)
  ON public.call_service_providers TO authenticated;
GRANT UPDATE (name, is_active, priority, max_concurrent_calls)
  ON public.call_service_providers TO authenticated;

-- Providers without credentials, for dashboards (RLS of the caller applies).
CREATE VIEW public.call_service_providers_public WITH (security_invoker = true) AS
  SELECT id, name, provider_type, base_url, max_concurrent_calls, priority, capabilities, config,
         is_active, created_at, updated_at
    FROM public.call_service_providers;
REVOKE ALL ON public.call_service_providers_public FROM PUBLIC, anon, authenticated;
GRANT SELECT ON public.call_service_providers_public TO authenticated, service_role, callq_worker;

-- ---------------------------------------------------------------------------------------------
-- Policies. auth.uid() is wrapped in a sub-select so it is evaluated once per statement.

-- The worker role sees and changes everything (service_role bypasses RLS).
-- Admins manage plans and templates, update providers (operational columns, by the grants
-- above) and read availability, assignments and retries. They get no extra policy on the per-user tables: permissive policies are OR-ed, and
-- "user_id = auth.uid() OR is_admin()" cannot use the user_id indexes, which would turn every
-- user's unfiltered API read into a sequential scan. Support tooling that must read other
-- users' data uses service_role.
DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['users', 'subscription_plans', 'user_subscriptions',
    'user_call_usage', 'call_templates', 'call_history', 'template_favorites', 'call_feedback',
    'call_service_providers', 'call_queue', 'provider_availability', 'call_assignments',
    'call_retries', 'provider_slots', 'provider_call_tallies']
  LOOP
    EXECUTE format('CREATE POLICY worker_all ON public.%I FOR ALL TO callq_worker '
                   'USING (true) WITH CHECK (true)', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['call_service_providers', 'provider_availability',
    'call_assignments', 'call_retries', 'provider_slots', 'provider_call_tallies']
  LOOP
    EXECUTE format('CREATE POLICY admin_select ON public.%I FOR SELECT TO authenticated '
                   'USING ((SELECT public.is_admin()))', t);
  END LOOP;
END
$$;
CREATE POLICY admin_all ON public.subscription_plans FOR ALL TO authenticated
  USING ((SELECT public.is_admin())) WITH CHECK ((SELECT public.is_admin()));
CREATE POLICY admin_update ON public.call_service_providers FOR UPDATE TO authenticated
  USING ((SELECT public.is_admin())) WITH CHECK ((SELECT public.is_admin()));
-- Admins manage system templates (created_by NULL) and moderate public ones (edit, unpublish,
-- delete); another user's private template is that user's data: invisible to admins too.
-- They create only system templates or their own, never one in another user's account.
CREATE POLICY admin_select ON public.call_templates FOR SELECT TO authenticated
  USING ((created_by IS NULL OR is_public) AND (SELECT public.is_admin()));
CREATE POLICY admin_insert ON public.call_templates FOR INSERT TO authenticated
  WITH CHECK ((SELECT public.is_admin()) AND (created_by IS NULL OR created_by = (SELECT auth.uid())));
CREATE POLICY admin_update ON public.call_templates FOR UPDATE TO authenticated
  USING ((created_by IS NULL OR is_public) AND (SELECT public.is_admin()))
  WITH CHECK ((SELECT public.is_admin()));
CREATE POLICY admin_delete ON public.call_templates FOR DELETE TO authenticated
  USING ((created_by IS NULL OR is_public) AND (SELECT public.is_admin()));

-- A closed account (users.deleted_at set) may hold a JWT until it expires: it writes nothing.
-- (Invoker's rights: users_select_own lets a user read its own row.)
CREATE OR REPLACE FUNCTION public.is_open_account() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = ''
AS $$
  SELECT EXISTS (SELECT 1 FROM public.users u WHERE u.id = auth.uid() AND u.deleted_at IS NULL)
$$;

-- users: own profile (read, update the granted columns while the account is open).
CREATE POLICY users_select_own ON public.users FOR SELECT TO authenticated
  USING (id = (SELECT auth.uid()));
CREATE POLICY users_update_own ON public.users FOR UPDATE TO authenticated
  USING (id = (SELECT auth.uid()) AND deleted_at IS NULL) WITH CHECK (id = (SELECT auth.uid()));

-- plans: the active catalogue is readable by every signed-in user.
CREATE POLICY plans_select_active ON public.subscription_plans FOR SELECT TO authenticated
  USING (is_active);

-- subscriptions, usage, history: own rows, read only (written by billing / the functions).
CREATE POLICY subscriptions_select_own ON public.user_subscriptions FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY usage_select_own ON public.user_call_usage FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY history_select_own ON public.call_history FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));

-- templates: public ones to everyone signed in, private ones to their creator; creators write.
CREATE POLICY templates_select ON public.call_templates FOR SELECT TO authenticated
  USING (is_public OR created_by = (SELECT auth.uid()));
CREATE POLICY templates_insert_own ON public.call_templates FOR INSERT TO authenticated
  WITH CHECK (created_by = (SELECT auth.uid()) AND (SELECT public.is_open_account()));
CREATE POLICY templates_update_own ON public.call_templates FOR UPDATE TO authenticated
  USING (created_by = (SELECT auth.uid())) WITH CHECK (created_by = (SELECT auth.uid()));
CREATE POLICY templates_delete_own ON public.call_templates FOR DELETE TO authenticated
  USING (created_by = (SELECT auth.uid()));

-- favorites: own rows, of templates the user can see.
CREATE POLICY favorites_select_own ON public.template_favorites FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY favorites_insert_own ON public.template_favorites FOR INSERT TO authenticated
  WITH CHECK (user_id = (SELECT auth.uid()) AND (SELECT public.is_open_account())
              AND EXISTS (SELECT 1 FROM public.call_templates t WHERE t.id = template_id));
CREATE POLICY favorites_delete_own ON public.template_favorites FOR DELETE TO authenticated
  USING (user_id = (SELECT auth.uid()));

-- feedback: own rows, on own calls.
CREATE POLICY feedback_select_own ON public.call_feedback FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));
CREATE POLICY feedback_insert_own ON public.call_feedback FOR INSERT TO authenticated
  WITH CHECK (user_id = (SELECT auth.uid()) AND (SELECT public.is_open_account())
              AND EXISTS (SELECT 1 FROM public.call_history h
                           WHERE h.id = call_id AND h.user_id = (SELECT auth.uid())));
CREATE POLICY feedback_update_own ON public.call_feedback FOR UPDATE TO authenticated
  USING (user_id = (SELECT auth.uid()))
  WITH CHECK (user_id = (SELECT auth.uid())
              AND EXISTS (SELECT 1 FROM public.call_history h
                           WHERE h.id = call_id AND h.user_id = (SELECT auth.uid())));
CREATE POLICY feedback_delete_own ON public.call_feedback FOR DELETE TO authenticated
  USING (user_id = (SELECT auth.uid()));

-- queue: own rows readable; written only through schedule_call and cancel_call.
CREATE POLICY queue_select_own ON public.call_queue FOR SELECT TO authenticated
  USING (user_id = (SELECT auth.uid()));

-- providers, availability, slots, assignments, retries: admins (admin_select, admin_update on
-- providers) and the worker only.

-- ---------------------------------------------------------------------------------------------
-- Function privileges: nothing to PUBLIC (Supabase's defaults also grant anon/authenticated).
REVOKE ALL ON FUNCTION
  public.set_updated_at(), public.handle_new_user(), public.sync_provider_slots(),
  public.is_admin(), public.is_open_account(), public.free_provider_slot(uuid),
  public.take_provider_slot(uuid, uuid), public.free_all_provider_slots(),
  public.provider_over_capacity(uuid),
  public.caller_ids_violation(jsonb), public.provider_slot_layout(integer, jsonb),
  public.schedule_call(uuid, uuid, text, text, text, timestamptz, int, jsonb, jsonb, text, text),
  public.claim_due_calls(int, text, int), public.get_next_call_in_queue(),
  public.get_best_available_provider(jsonb, uuid[]), public.assign_call_to_provider(uuid, uuid),
  public.claim_and_assign_calls(int, text, int), public.mark_call_dialing(uuid),
  public.dial_gate_check(uuid),
  public.dial_gate_apply(uuid, text, timestamptz, timestamptz, boolean),
  public.queue_to_dialing(uuid[]),
  public.mark_call_placed(uuid, text),
  public.mark_calls_placed(uuid[], text[], double precision[]),
  public.exclude_provider(uuid[], uuid),
  public.release_assignment(uuid, text, double precision),
  public.complete_call(uuid, double precision, text, text, double precision, text,
    timestamptz, timestamptz),
  public.record_provider_health(uuid, boolean, double precision, text),
  public.handle_failed_call(uuid, text, text, int, double precision, text),
  public.reap_expired_leases(), public.reconcile_provider_slots(),
  public.rollover_usage_periods(), public.tally_provider_call(uuid, integer, integer)
  FROM PUBLIC, anon, authenticated;

-- the policies call is_admin() as the querying role
GRANT EXECUTE ON FUNCTION public.is_admin(), public.is_open_account()
  TO authenticated, service_role, callq_worker;

GRANT EXECUTE ON FUNCTION
  public.schedule_call(uuid, uuid, text, text, text, timestamptz, int, jsonb, jsonb, text, text)
  TO authenticated, service_role, callq_worker;

GRANT EXECUTE ON FUNCTION
  public.free_provider_slot(uuid), public.take_provider_slot(uuid, uuid),
  public.provider_over_capacity(uuid), public.caller_ids_violation(jsonb),
  public.provider_slot_layout(integer, jsonb),
  public.claim_due_calls(int, text, int), public.get_next_call_in_queue(),
  public.get_best_available_provider(jsonb, uuid[]), public.assign_call_to_provider(uuid, uuid),
  public.claim_and_assign_calls(int, text, int), public.mark_call_dialing(uuid),
  public.dial_gate_check(uuid),
  public.dial_gate_apply(uuid, text, timestamptz, timestamptz, boolean),
  public.queue_to_dialing(uuid[]),
  public.mark_call_placed(uuid, text),
  public.mark_calls_placed(uuid[], text[], double precision[]),
  public.exclude_provider(uuid[], uuid),
  public.release_assignment(uuid, text, double precision),
  public.complete_call(uuid, double precision, text, text, double precision, text,
    timestamptz, timestamptz),
  public.record_provider_health(uuid, boolean, double precision, text),
  public.handle_failed_call(uuid, text, text, int, double precision, text),
  public.reap_expired_leases(), public.reconcile_provider_slots(),
  public.rollover_usage_periods(), public.tally_provider_call(uuid, integer, integer)
  TO service_role, callq_worker;

-- The hot tables' row checks (call_queue_row_check & co., 20240101000100) run with the rights
-- of whoever writes the row, so every role that may write one of those tables executes them.
-- They read nothing: true, or the name of the rule a row breaks.
REVOKE ALL ON FUNCTION
  public.call_queue_row_check(text, text, text, text, integer, integer, integer, jsonb, jsonb,
                              text, jsonb, text[]),
  public.call_assignments_row_check(text, integer, integer, integer, integer),
  public.call_history_row_check(text, text, numeric, numeric, integer, timestamptz, timestamptz),
  public.call_events_row_check(text, jsonb)
  FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION
  public.call_queue_row_check(text, text, text, text, integer, integer, integer, jsonb, jsonb,
                              text, jsonb, text[]),
  public.call_assignments_row_check(text, integer, integer, integer, integer),
  public.call_history_row_check(text, text, numeric, numeric, integer, timestamptz, timestamptz),
  public.call_events_row_check(text, jsonb)
  TO authenticated, service_role, callq_worker;

-- provider_load (admins read it) asks provider_over_capacity with the reader's rights
GRANT EXECUTE ON FUNCTION public.provider_over_capacity(uuid) TO authenticated;
