"""Typed SQLAlchemy 2.0 models of the callq tables.

The SQL in ``supabase/migrations`` is the source of truth; these models mirror it for the worker
and admin scripts, and ``tests/integration/test_db_models.py`` fails when the two drift.
Constraints, policies and functions live only in SQL.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Computed,
    DateTime,
    Double,
    ForeignKey,
    Integer,
    Numeric,
    SmallInteger,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NOW = text("now()")
UUID_DEFAULT = text("gen_random_uuid()")
EMPTY_OBJECT = text("'{}'::jsonb")


class Base(DeclarativeBase):
    type_annotation_map = {
        uuid.UUID: Uuid(as_uuid=True),
        datetime: DateTime(timezone=True),
        str: Text(),
        dict[str, Any]: JSONB(),
        Any: JSONB(),
    }


def _pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, server_default=UUID_DEFAULT)


def _created() -> Mapped[datetime]:
    return mapped_column(server_default=NOW)


def _updated() -> Mapped[datetime]:
    return mapped_column(server_default=NOW)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)  # = auth.users.id
    email: Mapped[str | None]
    full_name: Mapped[str | None]
    phone: Mapped[str | None]
    avatar_url: Mapped[str | None]
    company_name: Mapped[str | None]
    timezone: Mapped[str] = mapped_column(server_default=text("'UTC'"))
    is_admin: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=EMPTY_OBJECT)
    deleted_at: Mapped[datetime | None]  # account closed: the row is an anonymised tombstone
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class SubscriptionPlan(Base):
    __tablename__ = "subscription_plans"

    id: Mapped[uuid.UUID] = _pk()
    name: Mapped[str] = mapped_column(unique=True)
    description: Mapped[str | None]
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2), server_default=text("0"))
    currency: Mapped[str] = mapped_column(server_default=text("'USD'"))
    billing_interval: Mapped[str] = mapped_column(server_default=text("'month'"))
    call_limit: Mapped[int | None] = mapped_column(Integer)
    minute_limit: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_calls: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    max_call_minutes: Mapped[int] = mapped_column(Integer, server_default=text("10"))
    calls_per_minute: Mapped[int | None] = mapped_column(Integer)
    features: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_OBJECT)
    contact_attempts_per_24h: Mapped[int | None] = mapped_column(Integer)
    requires_consent: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    is_default: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class UserSubscription(Base):
    __tablename__ = "user_subscriptions"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    plan_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("subscription_plans.id", ondelete="RESTRICT")
    )
    status: Mapped[str] = mapped_column(server_default=text("'active'"))
    current_period_start: Mapped[datetime] = mapped_column(server_default=NOW)
    current_period_end: Mapped[datetime] = mapped_column(
        server_default=text("(now() + '1 mon'::interval)")
    )
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    canceled_at: Mapped[datetime | None]
    external_customer_id: Mapped[str | None]
    external_subscription_id: Mapped[str | None] = mapped_column(unique=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class UserCallUsage(Base):
    __tablename__ = "user_call_usage"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    subscription_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("user_subscriptions.id", ondelete="SET NULL")
    )
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    calls_made: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    minutes_used: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    minutes_reserved: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    calls_limit: Mapped[int | None] = mapped_column(Integer)
    minutes_limit: Mapped[int | None] = mapped_column(Integer)
    calls_remaining: Mapped[int | None] = mapped_column(
        Integer,
        Computed(
            "CASE WHEN calls_limit IS NULL THEN NULL "
            "ELSE greatest(calls_limit - calls_made, 0) END",
            persisted=True,
        ),
    )
    minutes_remaining: Mapped[int | None] = mapped_column(
        Integer,
        Computed(
            "CASE WHEN minutes_limit IS NULL THEN NULL "
            "ELSE greatest(minutes_limit - minutes_used, 0) END",
            persisted=True,
        ),
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallTemplate(Base):
    __tablename__ = "call_templates"

    id: Mapped[uuid.UUID] = _pk()
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str]
    description: Mapped[str | None]
    category: Mapped[str | None]
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    script: Mapped[str]
    variables: Mapped[Any] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    first_message: Mapped[str | None]
    voicemail_detection: Mapped[bool | None]
    voicemail_action: Mapped[str] = mapped_column(server_default=text("'hang_up'"))
    voicemail_message: Mapped[str | None]
    record_calls: Mapped[bool | None]
    is_public: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    requires_consent: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    usage_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallHistory(Base):
    __tablename__ = "call_history"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    template_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_templates.id", ondelete="SET NULL")
    )
    queue_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_queue.id", ondelete="SET NULL"), unique=True
    )
    assignment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_assignments.id", ondelete="SET NULL"), unique=True
    )
    provider_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_service_providers.id", ondelete="SET NULL")
    )
    recipient_name: Mapped[str | None]  # NULL once the account is closed
    recipient_phone: Mapped[str | None]
    recipient_email: Mapped[str | None]
    status: Mapped[str]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    duration_seconds: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))
    recording_url: Mapped[str | None]
    transcript: Mapped[str | None]
    cost: Mapped[Decimal | None] = mapped_column(Numeric(12, 4))
    provider_call_id: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error: Mapped[str | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=EMPTY_OBJECT)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class TemplateFavorite(Base):
    __tablename__ = "template_favorites"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    template_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("call_templates.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = _created()


class CallFeedback(Base):
    __tablename__ = "call_feedback"

    id: Mapped[uuid.UUID] = _pk()
    call_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("call_history.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    rating: Mapped[int] = mapped_column(SmallInteger)
    comment: Mapped[str | None]
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallServiceProvider(Base):
    __tablename__ = "call_service_providers"

    id: Mapped[uuid.UUID] = _pk()
    name: Mapped[str] = mapped_column(unique=True)
    provider_type: Mapped[str]
    api_key: Mapped[str]  # may be "env:NAME"; never readable by anon/authenticated
    api_secret: Mapped[str | None]
    webhook_secret: Mapped[str | None]  # like api_key: never readable by anon/authenticated
    base_url: Mapped[str]
    max_concurrent_calls: Mapped[int] = mapped_column(Integer, server_default=text("10"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("5"))
    capabilities: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_OBJECT)
    config: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_OBJECT)
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallCampaign(Base):
    __tablename__ = "call_campaigns"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    template_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("call_templates.id"))
    name: Mapped[str]
    status: Mapped[str] = mapped_column(server_default=text("'draft'"))
    starts_at: Mapped[datetime | None]
    ends_at: Mapped[datetime | None]
    calls_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    pace_tokens: Mapped[float] = mapped_column(Double, server_default=text("0"))
    pace_at: Mapped[datetime | None]
    calls_total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    calls_canceled: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=EMPTY_OBJECT)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class NotificationEndpoint(Base):
    __tablename__ = "notification_endpoints"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    campaign_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_campaigns.id", ondelete="CASCADE")
    )
    url: Mapped[str]
    secret: Mapped[str]  # the HMAC key; never readable by API roles
    include_transcript: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallNotification(Base):
    __tablename__ = "call_notifications"

    id: Mapped[uuid.UUID] = _pk()
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("notification_endpoints.id", ondelete="CASCADE")
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    queue_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("call_queue.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(server_default=text("'call.ended'"))
    status: Mapped[str] = mapped_column(server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=NOW)
    lease_until: Mapped[datetime | None]
    last_http_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallQueue(Base):
    __tablename__ = "call_queue"

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    template_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_templates.id", ondelete="SET NULL")
    )
    # the template row as it was when the call was queued (what the worker sends)
    template_snapshot: Mapped[dict[str, Any] | None]
    recipient_name: Mapped[str | None]  # NULL only on a closed account's finished call
    recipient_phone: Mapped[str | None]
    recipient_email: Mapped[str | None]
    status: Mapped[str] = mapped_column(server_default=text("'queued'"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("5"))
    scheduled_time: Mapped[datetime] = mapped_column(server_default=NOW)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    custom_variables: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_OBJECT)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=EMPTY_OBJECT)
    idempotency_key: Mapped[str | None]
    campaign_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("call_campaigns.id"))
    via_campaign: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    counter_stripe: Mapped[int] = mapped_column(
        SmallInteger, server_default=text("((txid_current() % (16)::bigint))::smallint")
    )
    last_error: Mapped[str | None]
    excluded_provider_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(Uuid(as_uuid=True)), server_default=text("'{}'")
    )
    required_capabilities: Mapped[dict[str, Any] | None]
    # set by schedule_call or, when absent, by the trigger call_queue_timezones
    recipient_timezones: Mapped[list[str]] = mapped_column(ARRAY(Text))
    hold_reason: Mapped[str | None]
    claimed_by: Mapped[str | None]
    claimed_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    completed_at: Mapped[datetime | None]


class ProviderAvailability(Base):
    __tablename__ = "provider_availability"

    id: Mapped[uuid.UUID] = _pk()
    provider_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("call_service_providers.id", ondelete="CASCADE"), unique=True
    )
    current_calls: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    available_slots: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    status: Mapped[str] = mapped_column(server_default=text("'online'"))
    last_check: Mapped[datetime | None]
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    latency_ms: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))
    circuit_open_until: Mapped[datetime | None]
    last_error: Mapped[str | None]
    total_calls: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    successful_calls: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    failed_calls: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class ProviderCallTally(Base):
    """An attempt that ended on a provider, not yet added to its statistics in
    ``provider_availability`` (SQL: tally_provider_call, reconcile_provider_slots; exact
    figures: the view provider_stats)."""

    __tablename__ = "provider_call_tallies"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    provider_id: Mapped[uuid.UUID]
    successful_calls: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed_calls: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _created()


class ProviderSlot(Base):
    """One call a provider may carry at once, with the number it dials from (free when
    assignment_id is NULL); taken with SKIP LOCKED by the claim functions."""

    __tablename__ = "provider_slots"

    provider_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("call_service_providers.id", ondelete="CASCADE"), primary_key=True
    )
    slot_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    caller_id: Mapped[str | None]
    assignment_id: Mapped[uuid.UUID | None]
    freed_at: Mapped[datetime]
    retired: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class CallAssignment(Base):
    __tablename__ = "call_assignments"

    id: Mapped[uuid.UUID] = _pk()
    queue_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("call_queue.id", ondelete="CASCADE"))
    provider_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("call_service_providers.id", ondelete="RESTRICT")
    )
    provider_call_id: Mapped[str | None]
    state: Mapped[str] = mapped_column(server_default=text("'assigned'"))
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    assigned_at: Mapped[datetime] = mapped_column(server_default=NOW)
    dialing_at: Mapped[datetime | None]
    placed_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    last_polled_at: Mapped[datetime | None]
    next_poll_at: Mapped[datetime | None]
    poll_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    outcome: Mapped[str | None]
    error: Mapped[str | None]
    usage_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("user_call_usage.id", ondelete="SET NULL")
    )
    reserved_minutes: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_duration_seconds: Mapped[int | None] = mapped_column(Integer)
    caller_id: Mapped[str | None]
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class CallRetry(Base):
    __tablename__ = "call_retries"

    id: Mapped[uuid.UUID] = _pk()
    queue_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("call_queue.id", ondelete="CASCADE"))
    assignment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_assignments.id", ondelete="SET NULL"), unique=True
    )
    provider_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("call_service_providers.id", ondelete="SET NULL")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str]
    error: Mapped[str | None]
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()


class TenantCallCounters(Base):
    __tablename__ = "tenant_call_counters"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    stripe: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("0"))
    queued: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    claimed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    dialed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    rate_tat: Mapped[datetime | None]
    updated_at: Mapped[datetime] = _updated()


class UserCallUsageDelta(Base):
    """Usage not yet folded into its period's ``user_call_usage`` row: an ending's minutes, or
    a gate chunk's dials of a plan without limits (SQL: settle_call_usage, dial_gates,
    fold_call_usage; exact figures: the view user_call_usage_live)."""

    __tablename__ = "user_call_usage_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    usage_id: Mapped[uuid.UUID]
    user_id: Mapped[uuid.UUID]
    calls_made: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    minutes_used: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    minutes_released: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _created()


class CallEvent(Base):
    """One row of the append-only call-event log (written by triggers and record_call_event)."""

    __tablename__ = "call_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    created_at: Mapped[datetime] = _created()
    queue_id: Mapped[uuid.UUID]
    user_id: Mapped[uuid.UUID]
    kind: Mapped[str]
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    provider_id: Mapped[uuid.UUID | None]
    assignment_id: Mapped[uuid.UUID | None]
    outcome: Mapped[str | None]
    due_at: Mapped[datetime | None]
    detail: Mapped[dict[str, Any] | None]


class ProviderCreatePacing(Base):
    __tablename__ = "provider_create_pacing"

    provider_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("call_service_providers.id", ondelete="CASCADE"), primary_key=True
    )
    next_at: Mapped[datetime] = mapped_column(server_default=NOW)


class OpsSettings(Base):
    """The one row of knobs ops turn at run time (retry_delay_scale)."""

    __tablename__ = "ops_settings"

    id: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    retry_delay_scale: Mapped[float] = mapped_column(Double, server_default=text("1"))
    updated_at: Mapped[datetime] = _updated()


ALL_MODELS: tuple[type[Base], ...] = (
    User,
    SubscriptionPlan,
    UserSubscription,
    UserCallUsage,
    CallTemplate,
    CallHistory,
    TemplateFavorite,
    CallFeedback,
    CallServiceProvider,
    CallCampaign,
    NotificationEndpoint,
    CallNotification,
    CallQueue,
    ProviderAvailability,
    ProviderCallTally,
    ProviderSlot,
    CallAssignment,
    CallRetry,
    TenantCallCounters,
    UserCallUsageDelta,
    ProviderCreatePacing,
    CallEvent,
    OpsSettings,
)
