# One image for the whole fleet; the command picks the role:
#   worker | beat | flower | webhooks | simulator | migrate | demo | queue
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md celeryconfig.py ./
COPY worker ./worker
COPY dispatch ./dispatch
COPY models ./models
COPY providers ./providers
COPY supabase ./supabase
COPY docker/entrypoint.sh /usr/local/bin/callq-entrypoint
RUN pip install . && useradd --create-home --uid 10001 callq && chmod 0755 /usr/local/bin/callq-entrypoint

USER callq
ENV CALLQ_SUPABASE_DIR=/app/supabase
EXPOSE 5555 8080 8765
ENTRYPOINT ["callq-entrypoint"]
CMD ["worker"]
