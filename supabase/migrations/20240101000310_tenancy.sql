-- Tenancy and secrets (issue 8): provider secrets stay out of config, calls carry a snapshot
-- of their template, users cancel calls and close accounts through functions that act only
-- for auth.uid(). See supabase/README.md, "Security".
--
-- SQLSTATEs: CQ014 secret_in_config, CQ015 call_not_found, CQ016 call_already_ended,
-- CQ017 call_in_flight, CQ018 input_too_large, CQ019 invalid_text (the last two:
-- call_input_violation, a check of schedule_calls_core in 20240101000200).

-- ---------------------------------------------------------------------------------------------
-- Every (depth, key, value) of a JSON document, the document itself at depth 0 (key NULL);
-- array elements have key NULL. Used to look for secret-looking keys and to bound input.
CREATE OR REPLACE FUNCTION public.jsonb_walk(p_doc jsonb)
RETURNS TABLE (depth int, key text, value jsonb)
LANGUAGE sql IMMUTABLE
SET search_path = ''
AS $$
  WITH RECURSIVE walk(depth, key, value) AS (
    SELECT 0, NULL::text, p_doc
    UNION ALL
    SELECT w.depth + 1, c.key, c.value
      FROM walk w
      CROSS JOIN LATERAL (
        SELECT e.key, e.value
          FROM jsonb_each(CASE WHEN jsonb_typeof(w.value) = 'object' THEN w.value END) e
        UNION ALL
        SELECT NULL, a.value
          FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.value) = 'array' THEN w.value END) a
      ) c
  )
  SELECT walk.depth, walk.key, walk.value FROM walk
$$;

-- Does this key name a credential? Words of snake_case, kebab-case or camelCase names:
-- secret(s), token, password, passwd, passphrase, api key, authorization, bearer,
-- credential(s), private key, signing key ("max_tokens" or "maxTokens" is not one).
CREATE OR REPLACE FUNCTION public.is_secret_name(p_key text) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = ''
AS $$
  SELECT lower(regexp_replace(p_key, '([a-z0-9])([A-Z])', '\1_\2', 'g'))
         ~ ('(^|[^a-z])(secrets?|token|password|passwd|passphrase|api[_-]?key|authorization'
            '|bearer|credentials?|private[_-]?key|signing[_-]?key)([^a-z]|$)')
$$;

-- ---------------------------------------------------------------------------------------------
-- call_input_violation: the first limit a call's input breaks, as (sqlstate, message); no row
-- when it keeps them all. schedule_calls_core reports it for each row (rank 1150), so
-- schedule_call and schedule_calls apply the same limits (supabase/README.md, Security):
--   CQ018 input_too_large: custom_variables or metadata over 16384 bytes as JSON text, nested
--         deeper than 4 levels or with more than 200 keys; an email over 254 characters;
--   CQ019 invalid_text: a JSON key that is blank, over 64 characters or has control
--         characters; control characters in the recipient's name or the idempotency key; a
--         blank idempotency key (its length is CQ041's).
-- Messages name the argument and the limit, never the content.
CREATE OR REPLACE FUNCTION public.call_input_violation(
  p_recipient_name text,
  p_recipient_email text,
  p_custom_variables jsonb,
  p_metadata jsonb,
  p_idempotency_key text
) RETURNS TABLE (code text, message text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
  c_max_bytes constant integer := 16384;
  c_max_depth constant integer := 4;
  c_max_keys constant integer := 200;
  c_max_key_length constant integer := 64;
  c_bad_key constant text := '(^[[:space:]]*$)|[[:cntrl:]]';
  v_doc record;
  v_shape record;
BEGIN
  IF p_recipient_name ~ '[[:cntrl:]]' THEN
    RETURN QUERY SELECT 'CQ019', 'invalid_text: recipient_name contains control characters';
    RETURN;
  ELSIF length(p_recipient_email) > 254 THEN
    RETURN QUERY SELECT 'CQ018', 'input_too_large: recipient_email is longer than 254 characters';
    RETURN;
  ELSIF p_idempotency_key ~ c_bad_key THEN
    RETURN QUERY SELECT 'CQ019',
      'invalid_text: idempotency_key is blank or contains control characters';
    RETURN;
  END IF;
  FOR v_doc IN
    SELECT d.name, d.doc FROM (VALUES ('custom_variables', p_custom_variables),
                                      ('metadata', p_metadata)) AS d(name, doc)
     WHERE d.doc IS NOT NULL
  LOOP
    -- the size first: nothing larger is walked
    IF octet_length(v_doc.doc::text) > c_max_bytes THEN
      RETURN QUERY SELECT 'CQ018', format('input_too_large: %s is %s bytes as JSON; at most %s',
                                          v_doc.name, octet_length(v_doc.doc::text), c_max_bytes);
      RETURN;
    END IF;
    IF jsonb_typeof(v_doc.doc) = 'object' AND NOT jsonb_path_exists(v_doc.doc,
         'strict $.* ? (@.type() == "object" || @.type() == "array")') THEN
      -- a flat object (the usual case): its keys are all there is to check
      SELECT 1 AS depth, count(*) AS keys,
             coalesce(bool_or(length(k) > c_max_key_length OR k ~ c_bad_key), false) AS bad_key
        INTO v_shape FROM jsonb_object_keys(v_doc.doc) AS k;
    ELSE
      SELECT max(w.depth) AS depth, count(w.key) AS keys,
             coalesce(bool_or(length(w.key) > c_max_key_length OR w.key ~ c_bad_key), false)
               AS bad_key
        INTO v_shape FROM public.jsonb_walk(v_doc.doc) w;
    END IF;
    IF v_shape.depth > c_max_depth OR v_shape.keys > c_max_keys THEN
      RETURN QUERY SELECT 'CQ018',
        format('input_too_large: %s nests deeper than %s levels or has more than %s keys',
               v_doc.name, c_max_depth, c_max_keys);
      RETURN;
    ELSIF v_shape.bad_key THEN
      RETURN QUERY SELECT 'CQ019',
        format('invalid_text: %s has a key that is blank, longer than %s characters or '
               'contains control characters', v_doc.name, c_max_key_length);
      RETURN;
    END IF;
  END LOOP;
END
$$;

-- Provider rows: config holds settings, never credentials (those live in api_key, api_secret
-- and webhook_secret, which no API role can read); base_url carries no user:password@ and no
-- credential-looking query parameter. Refused with CQ014; the message names the key, never a value.
CREATE OR REPLACE FUNCTION public.guard_provider_secrets() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_key text;
BEGIN
  SELECT w.key INTO v_key
    FROM public.jsonb_walk(NEW.config) w
   WHERE w.key IS NOT NULL AND public.is_secret_name(w.key)
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ014',
      MESSAGE = format('secret_in_config: config key "%s" names a credential; put credentials '
                       'in api_key, api_secret or webhook_secret', left(v_key, 64));
  END IF;
  IF NEW.base_url ~ '^[^:/?#]+://[^/?#]*@' OR EXISTS (
       SELECT 1 FROM regexp_matches(NEW.base_url, '[?&;]([^=&;#]*)', 'g') AS m(p)
        WHERE public.is_secret_name(m.p[1])) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ014',
      MESSAGE = 'secret_in_config: base_url must not carry credentials (user:password@ or a '
                'key in the query)';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER call_service_providers_guard_secrets
  BEFORE INSERT OR UPDATE OF config, base_url ON public.call_service_providers
  FOR EACH ROW EXECUTE FUNCTION public.guard_provider_secrets();

-- ---------------------------------------------------------------------------------------------
-- A queued call keeps a snapshot of its template (the whole row, so columns added later come
-- along), taken when it is inserted by whatever path (schedule_call, a bulk insert, ops). The
-- worker reads the snapshot (models.queries.LOAD_CALL), so a later edit by the template's
-- owner cannot change another user's call, and deleting the template only detaches the call
-- (template_id ON DELETE SET NULL).
CREATE OR REPLACE FUNCTION public.snapshot_call_template() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  NEW.template_snapshot := (SELECT to_jsonb(t) FROM public.call_templates t
                             WHERE t.id = NEW.template_id);
  RETURN NEW;
END
$$;

CREATE TRIGGER call_queue_snapshot_template BEFORE INSERT ON public.call_queue
  FOR EACH ROW WHEN (NEW.template_id IS NOT NULL AND NEW.template_snapshot IS NULL)
  EXECUTE FUNCTION public.snapshot_call_template();

-- ---------------------------------------------------------------------------------------------
-- Cancel a call nobody has dialed yet: queued, claimed, or assigned (a provider slot taken,
-- mark_call_dialing not yet passed: the assignment is canceled and its slot given back, so the
-- worker's gate refuses to dial). Returns the status the call had; changes nothing unless it
-- was queued, claimed or assigned. Locks: queue row -> assignment -> its slot.
CREATE OR REPLACE FUNCTION public.cancel_undialed_call(p_queue_id uuid, p_reason text)
RETURNS text
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_status text;
  v_a record;
BEGIN
  SELECT q.status INTO v_status FROM public.call_queue q WHERE q.id = p_queue_id FOR UPDATE;
  IF NOT FOUND OR v_status NOT IN ('queued', 'claimed', 'assigned') THEN
    RETURN v_status;
  END IF;
  FOR v_a IN
    SELECT a.id, a.provider_id FROM public.call_assignments a
     WHERE a.queue_id = p_queue_id AND a.state = 'assigned'
       FOR UPDATE
  LOOP
    UPDATE public.call_assignments a
       SET state = 'canceled', ended_at = now(), outcome = 'canceled', error = p_reason
     WHERE a.id = v_a.id;
    PERFORM public.free_provider_slot(v_a.id);
  END LOOP;
  UPDATE public.call_queue q
     SET status = 'canceled', last_error = p_reason, completed_at = now(),
         claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL
   WHERE q.id = p_queue_id;
  RETURN v_status;
END
$$;

-- cancel_call: an app user cancels one of its own calls (service_role/the worker: any call).
-- Another user's call and an unknown id are the same CQ015; a finished call is CQ016; a call
-- being dialed or in progress is CQ017 (it finishes normally: the phone may already ring).
CREATE OR REPLACE FUNCTION public.cancel_call(p_queue_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  v_owner uuid;
  v_status text;
BEGIN
  SELECT q.user_id INTO v_owner FROM public.call_queue q WHERE q.id = p_queue_id;
  IF NOT FOUND OR (v_role IN ('anon', 'authenticated')
                   AND (auth.uid() IS NULL OR v_owner IS DISTINCT FROM auth.uid())) THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ015', MESSAGE = 'call_not_found: no such call of yours';
  END IF;
  v_status := public.cancel_undialed_call(p_queue_id, 'canceled_by_user');
  IF v_status IN ('completed', 'failed', 'canceled') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ016',
      MESSAGE = 'call_already_ended: the call is ' || v_status;
  ELSIF v_status IN ('dialing', 'in_progress') THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ017',
      MESSAGE = 'call_in_flight: the call is being dialed or in progress and will finish';
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Closing an account. The users row stays as an anonymised tombstone (deleted_at set) so
-- usage, subscriptions and history keep their owner; nothing is cascaded away. Calls not yet
-- dialed are canceled; calls in flight finish normally (their slot is given back and usage
-- billed by complete_call/handle_failed_call) and are anonymised when they end.

-- Anonymise a finished call of a closed account (call_queue when it reaches a final status,
-- call_history on insert and update): recipient, variables, metadata, script, transcript and
-- recording are dropped; ids, times, status, duration and cost stay. The one list of what
-- a closed account's calls keep.
CREATE OR REPLACE FUNCTION public.scrub_closed_account_call() RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM public.users u WHERE u.id = NEW.user_id AND u.deleted_at IS NOT NULL)
  THEN
    -- keys a table does not have are ignored
    NEW := jsonb_populate_record(NEW, '{"recipient_name": null, "recipient_phone": null,
      "recipient_email": null, "metadata": {}, "custom_variables": {}, "idempotency_key": null,
      "template_snapshot": null, "transcript": null, "recording_url": null}'::jsonb);
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER call_queue_scrub_closed_account BEFORE INSERT OR UPDATE ON public.call_queue
  FOR EACH ROW WHEN (NEW.status IN ('completed', 'failed', 'canceled'))
  EXECUTE FUNCTION public.scrub_closed_account_call();
CREATE TRIGGER call_history_scrub_closed_account BEFORE INSERT OR UPDATE ON public.call_history
  FOR EACH ROW EXECUTE FUNCTION public.scrub_closed_account_call();

-- close_account: the one path that closes an account (delete_my_account, DELETE FROM
-- auth.users, or ops calling it). Idempotent.
CREATE OR REPLACE FUNCTION public.close_account(p_user_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
  v_q uuid;
BEGIN
  -- the profile first: from here on the scrub triggers anonymise every call as it ends
  UPDATE public.users u
     SET email = NULL, full_name = NULL, phone = NULL, avatar_url = NULL, company_name = NULL,
         metadata = '{}', is_admin = false, deleted_at = coalesce(u.deleted_at, now())
   WHERE u.id = p_user_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  FOR v_q IN
    SELECT q.id FROM public.call_queue q
     WHERE q.user_id = p_user_id AND q.status IN ('queued', 'claimed', 'assigned')
     ORDER BY q.id
  LOOP
    PERFORM public.cancel_undialed_call(v_q, 'account_closed');
  END LOOP;
  -- finished calls: an update through the scrub triggers anonymises them
  UPDATE public.call_queue q SET status = q.status
   WHERE q.user_id = p_user_id AND q.status IN ('completed', 'failed', 'canceled')
     AND q.recipient_phone IS NOT NULL;
  UPDATE public.call_history h SET updated_at = now()
   WHERE h.user_id = p_user_id AND h.recipient_phone IS NOT NULL;
  -- billing stops; the rows stay
  UPDATE public.user_subscriptions s
     SET status = 'canceled', canceled_at = now(), cancel_at_period_end = false
   WHERE s.user_id = p_user_id AND s.status IN ('trialing', 'active', 'past_due');
  -- the user's own content goes (other users' calls keep their template snapshot)
  DELETE FROM public.template_favorites f WHERE f.user_id = p_user_id;
  DELETE FROM public.call_feedback f WHERE f.user_id = p_user_id;
  DELETE FROM public.call_templates t WHERE t.created_by = p_user_id;
END
$$;

-- delete_my_account: an app user closes its own account and removes its sign-in.
CREATE OR REPLACE FUNCTION public.delete_my_account() RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_uid uuid := auth.uid();
BEGIN
  IF v_uid IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'CQ008', MESSAGE = 'not_authorized: sign in to delete your account';
  END IF;
  PERFORM public.close_account(v_uid);
  BEGIN
    DELETE FROM auth.users WHERE id = v_uid;
  EXCEPTION WHEN insufficient_privilege THEN
    -- the account is closed either way; ops remove the sign-in (supabase/README.md)
    RAISE WARNING 'callq: account closed; the auth user could not be deleted by this role';
  END;
END
$$;

-- Deleting the auth user (Supabase dashboard, admin API, SQL) closes the account.
CREATE OR REPLACE FUNCTION public.handle_deleted_user() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  PERFORM public.close_account(OLD.id);
  RETURN OLD;
END
$$;

CREATE TRIGGER on_auth_user_deleted AFTER DELETE ON auth.users
  FOR EACH ROW EXECUTE FUNCTION public.handle_deleted_user();

-- ---------------------------------------------------------------------------------------------
-- Privileges: nothing to PUBLIC/anon (Supabase's default privileges grant them).
REVOKE ALL ON FUNCTION
  public.jsonb_walk(jsonb), public.is_secret_name(text), public.guard_provider_secrets(),
  public.snapshot_call_template(), public.cancel_undialed_call(uuid, text),
  public.cancel_call(uuid), public.scrub_closed_account_call(), public.close_account(uuid),
  public.delete_my_account(), public.handle_deleted_user(),
  public.call_input_violation(text, text, jsonb, jsonb, text)
  FROM PUBLIC, anon, authenticated;

GRANT EXECUTE ON FUNCTION public.cancel_call(uuid), public.delete_my_account()
  TO authenticated, service_role, callq_worker;
GRANT EXECUTE ON FUNCTION public.jsonb_walk(jsonb), public.is_secret_name(text),
  public.cancel_undialed_call(uuid, text),
  public.call_input_violation(text, text, jsonb, jsonb, text)
  TO service_role, callq_worker;
GRANT EXECUTE ON FUNCTION public.close_account(uuid) TO service_role;

-- Functions created before the roles exist (20240101000170) get their privileges here: the
-- catalog matrix (tests/integration/test_db_privileges.py) allows anon nothing.
REVOKE ALL ON FUNCTION public.default_lease_seconds(), public.poll_deadline_seconds(),
  public.failure_kinds()
  FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.default_lease_seconds(), public.poll_deadline_seconds(),
  public.failure_kinds()
  TO authenticated, service_role, callq_worker;
